"""Fieldprint: verifiable, memory-anchored inference for LLM agents.

The public API is re-exported here; heavy modules (torch, Triton, LanceDB) load only when used.
"""

from fieldprint.errors import (
    CommitError,
    DQPError,
    EntryError,
    FieldprintError,
    KernelInputError,
    LogError,
    NoteError,
    PolicyError,
    ProofError,
    StateError,
)

__version__ = "0.1.0"

__all__ = [
    "CommitError",
    "DQPError",
    "EntryError",
    "FieldprintError",
    "KernelInputError",
    "LogError",
    "NoteError",
    "PolicyError",
    "ProofError",
    "StateError",
    "__version__",
]
