"""Fieldprint: verifiable, memory-anchored inference for LLM agents.

The public API, by path through the system:
- provenance (the Supervisor): TransparencyLog, Checkpoint, generate_key, sign_note, open_note,
  leaf_hash, verify_inclusion, verify_consistency, StateEntry, inclusion_bundle, verify_bundle;
- canonical codes: DQPProfile, quantize, QuantizedState, Committer (asynchronous commit);
- memory and promotion (the Pacemaker): Pacemaker, StateStore, SQLiteStateStore, State, PromotionGate,
  GateConfig, Override, Revocation, sign_record, LanceVectorStore, MiniLMEmbedder;
- attention over anchors: AnchorPool, AnchorRouting, paged_attention_decode, paged_attention_prefill;
- the engine: Engine, SamplingParams, verify_receipt.

Names load on first use, so `import fieldprint` does not pull in torch, Triton or LanceDB.
"""

from importlib import import_module

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

_LAZY = {
    "fieldprint.ledger.log": ("TransparencyLog",),
    "fieldprint.ledger.note": ("Checkpoint", "generate_key", "sign_note", "open_note"),
    "fieldprint.ledger.merkle": ("leaf_hash", "verify_inclusion", "verify_consistency"),
    "fieldprint.ledger.entry": ("StateEntry",),
    "fieldprint.ledger.bundle": ("inclusion_bundle", "verify_bundle"),
    "fieldprint.dqp_profile": ("DQPProfile",),
    "fieldprint.dqp": ("quantize", "QuantizedState"),
    "fieldprint.engine.commit": ("Committer",),
    "fieldprint.memory.pacemaker": ("Pacemaker",),
    "fieldprint.memory.store": ("StateStore", "SQLiteStateStore"),
    "fieldprint.memory.state": ("State",),
    "fieldprint.memory.policy": ("PromotionGate", "GateConfig"),
    "fieldprint.memory.records": ("Override", "Revocation", "sign_record"),
    "fieldprint.memory.vectors": ("LanceVectorStore",),
    "fieldprint.memory.embed": ("MiniLMEmbedder",),
    "fieldprint.kernels.paged_attention": ("AnchorPool", "AnchorRouting", "paged_attention_decode", "paged_attention_prefill"),
    "fieldprint.engine.engine": ("Engine",),
    "fieldprint.engine.sequence": ("SamplingParams",),
    "fieldprint.engine.receipt": ("verify_receipt",),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}

__all__ = [
    "CommitError", "DQPError", "EntryError", "FieldprintError", "KernelInputError", "LogError",
    "NoteError", "PolicyError", "ProofError", "StateError", "__version__", *_WHERE,
]


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'fieldprint' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
