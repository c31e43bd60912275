"""Every user-facing failure is a FieldprintError subclass whose message says what was wrong."""


class FieldprintError(Exception):
    """Base class: catch this to handle any Fieldprint failure."""


class ProofError(FieldprintError):
    """A Merkle inclusion or consistency proof does not verify, or its inputs are malformed."""


class NoteError(FieldprintError):
    """A signed note, checkpoint or key is malformed, or a signature does not verify."""


class EntryError(FieldprintError):
    """A ledger leaf entry is malformed, non-canonical or too large."""


class LogError(FieldprintError):
    """The transparency log or its storage refused an operation or found itself inconsistent."""


class DQPError(FieldprintError):
    """A tensor cannot be quantized canonically (NaN/Inf, bad profile, bad shape)."""


class CommitError(FieldprintError):
    """The asynchronous committer failed; raised to the caller on flush."""


class StateError(FieldprintError):
    """A memory state is malformed: unknown type, missing parent, bad content."""


class PolicyError(FieldprintError):
    """A promotion, override or revocation is malformed or not allowed."""


class KernelInputError(FieldprintError, ValueError):
    """Tensors given to an attention kernel have inconsistent shapes, dtypes or devices."""


class ModelError(FieldprintError):
    """Model weights, configuration or tokenizer cannot be loaded or are not supported."""


class EngineError(FieldprintError):
    """A generation request or the engine's cache refused an operation (bad request, pool full)."""


class AnchorError(FieldprintError):
    """An anchor set cannot be compiled, or its stored bytes do not match what was committed."""


class ReceiptError(FieldprintError):
    """A generation receipt is malformed or does not verify; the message names the first failure."""
