import subprocess
import sys

import fieldprint


def test_every_public_name_resolves():
    for name in fieldprint.__all__:
        assert getattr(fieldprint, name) is not None, name


def test_import_stays_light():
    code = "import sys, fieldprint; print(sorted(m for m in ('torch', 'triton', 'lancedb') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
