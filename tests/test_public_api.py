import subprocess
import sys

import pytest

import fieldprint


def test_every_public_name_is_the_object_of_its_module():
    import importlib

    for module, names in fieldprint._LAZY.items():
        for name in names:
            assert getattr(fieldprint, name) is getattr(importlib.import_module(module), name), name
    assert set(fieldprint._WHERE) <= set(fieldprint.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fieldprint.nope


def test_import_stays_light():
    code = "import sys, fieldprint; print(sorted(m for m in ('torch', 'triton', 'lancedb') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
