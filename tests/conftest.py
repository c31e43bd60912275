import os

import pytest

# Kernel tests run on CPU through Triton's interpreter when no GPU is present; the variable must be
# set before triton is first imported, which is why it lives here and not in a fixture.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

TESTDATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata")


@pytest.fixture(scope="session")
def testdata_dir() -> str:
    """The published vectors the tests carry (tests/testdata; where each comes from: its NOTICE)."""
    return TESTDATA
