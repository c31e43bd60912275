"""The `memory` fixture: a fresh log, state store, vector store, gate and Pacemaker per test."""

import pytest
from memory_harness import make_memory


@pytest.fixture
def memory(tmp_path):
    m = make_memory(str(tmp_path))
    yield m
    m.close()
