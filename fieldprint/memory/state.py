"""Typed, content-addressed memory states and the integrity labels that travel with them.

A state is one thing an agent remembers: an observation, a tool's output, what the user said, a
belief, an instruction, a summary. Its identity is a BLAKE3 digest over everything that makes it
what it is (type, content digest, parents, session, creator, time, labels), so the same bytes can
never mean two states and a stored state cannot change without changing its id.

Labels are the taint half of the design: a state carries the set of sources it came from and the
subset of those that are untrusted (its taint). A derived state joins its parents' labels (sources
and taint are unions, integrity the lowest), so a summary of a tainted state is tainted, and
nothing here can remove a source: there is no API that restores authority.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, replace

import blake3

from fieldprint.canon import (
    canonical_json,
    check_label,
    is_int,
    parse_digest,
    tag_digest,
)
from fieldprint.errors import EntryError, StateError
from fieldprint.ledger.entry import StateEntry

MAX_TEXT_BYTES = 1 << 20  # a state is a memory, not a document store; larger text is refused
_ID_DOMAIN = b"fieldprint/state-id/v1\n"
_CONTENT_DOMAIN = b"fieldprint/state-content/v1\n"


@dataclass(frozen=True, slots=True)
class TypeRule:
    """What a state type is allowed to do: be a root, be promoted, become which derived types."""

    root: bool  # may be created with no parents (it enters memory from outside)
    derived: bool  # may be created from parents
    promotable: bool  # may become an anchor without an override (if verified and untainted)
    may_become: tuple[str, ...]  # types a state derived from this one may have


# The type system. The rule that matters most: only what the user or an instruction said may become
# an instruction; observations and tool outputs are data and never turn into control, whatever
# their integrity. Raw tool output is never an anchor on its own: a belief about it can be.
STATE_TYPES: dict[str, TypeRule] = {
    "observation": TypeRule(root=True, derived=False, promotable=True, may_become=("belief", "summary")),
    "tool_output": TypeRule(root=True, derived=False, promotable=False, may_become=("belief", "summary")),
    "user_input": TypeRule(root=True, derived=False, promotable=True,
                            may_become=("belief", "summary", "instruction", "model_output")),
    "belief": TypeRule(root=True, derived=True, promotable=True, may_become=("belief", "summary")),
    "instruction": TypeRule(root=True, derived=True, promotable=True, may_become=("instruction", "belief", "summary")),
    "summary": TypeRule(root=False, derived=True, promotable=True, may_become=("summary", "belief")),
    # What the model said: never an anchor by default, so an agent cannot anchor itself on its own words.
    "model_output": TypeRule(root=True, derived=True, promotable=False, may_become=("belief", "summary")),
}


class Integrity(enum.IntEnum):
    """Integrity levels, ordered: a derived state gets the lowest of its parents'."""

    UNTRUSTED = 0
    TRUSTED = 1


@dataclass(frozen=True, slots=True)
class Label:
    """Where a state's content came from (`sources`) and which of those are untrusted (`taint`)."""

    sources: frozenset[str]
    taint: frozenset[str]

    def __post_init__(self) -> None:
        if not self.taint <= self.sources:
            raise StateError(f"label taint {sorted(self.taint - self.sources)} is not among its sources; "
                             f"every taint source is also a source")

    @property
    def integrity(self) -> Integrity:
        """TRUSTED only when no source is untrusted."""
        return Integrity.UNTRUSTED if self.taint else Integrity.TRUSTED

    @property
    def tainted(self) -> bool:
        """True when any source is untrusted."""
        return bool(self.taint)

    @staticmethod
    def join(labels: Iterable[Label]) -> Label:
        """The label of something derived from all of `labels`: unions, hence the lowest integrity."""
        sources: set[str] = set()
        taint: set[str] = set()
        for label in labels:
            sources |= label.sources
            taint |= label.taint
        return Label(frozenset(sources), frozenset(taint))


@dataclass(frozen=True, slots=True)
class TensorRef:
    """A reference to tensor content held elsewhere: its DQP digest and DQP profile digest."""

    digest: str
    profile: str

    def __post_init__(self) -> None:
        for value, what in ((self.digest, "tensor digest"), (self.profile, "tensor profile")):
            try:
                parse_digest(value)
            except EntryError as e:
                raise StateError(f"{what}: {e}") from None


def content_digest(text: str | None, tensor: TensorRef | None) -> str:
    """The tagged digest of a state's content: BLAKE3 of the UTF-8 text, the DQP digest, or both bound."""
    if text is None and tensor is None:
        raise StateError("a state needs content: give text, a tensor reference, or both")
    if text is not None and not isinstance(text, str):
        raise StateError(f"text must be a str, got {type(text).__name__}")
    if tensor is not None and not isinstance(tensor, TensorRef):
        raise StateError(f"tensor must be a TensorRef, got {type(tensor).__name__}")
    if text == "":
        raise StateError("text is empty; a state needs content (give non-empty text or a tensor reference)")
    if tensor is None:
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:
            raise StateError("text is not valid Unicode (it holds lone surrogates)") from None
        return tag_digest("blake3", blake3.blake3(data).digest())
    if text is None:
        return tensor.digest
    both = canonical_json({"tensor": tensor.digest, "text": content_digest(text, None)})
    return tag_digest("blake3", blake3.blake3(_CONTENT_DOMAIN + both).digest())


@dataclass(frozen=True, slots=True)
class State:
    """One memory state. Build it with `new_state`; `leaf_index` is set once the ledger sequenced it."""

    state_id: str
    state_type: str
    text: str | None
    tensor: TensorRef | None
    parents: tuple[str, ...]  # sorted, unique state ids
    session: str
    creator: str
    time_ns: int
    label: Label
    leaf_index: int | None = None

    @property
    def digest(self) -> str:
        """The tagged digest of this state's content (recomputed, never stored)."""
        return content_digest(self.text, self.tensor)

    def compute_id(self) -> str:
        """Recompute the content address from the fields; equals `state_id` unless something changed."""
        return state_id_of(
            self.state_type, self.digest, self.tensor.profile if self.tensor else None, self.parents,
            self.session, self.creator, self.time_ns, self.label,
        )

    def entry(self) -> StateEntry:
        """The ledger record of this state, built from its current fields."""
        return StateEntry(
            state_id=self.state_id,
            state_type=self.state_type,
            digest=self.digest,
            profile=self.tensor.profile if self.tensor else None,
            parents=self.parents,
            taint=tuple(sorted(self.label.taint)),
            session=self.session,
            time_ns=self.time_ns,
        )

    def committed(self, leaf_index: int) -> State:
        """This state with its ledger leaf index recorded."""
        if not is_int(leaf_index) or leaf_index < 0:
            raise StateError(f"a leaf index is a non-negative integer, got {leaf_index!r}")
        return replace(self, leaf_index=leaf_index)


def state_id_of(
    state_type: str, digest: str, profile: str | None, parents: Sequence[str], session: str,
    creator: str, time_ns: int, label: Label,
) -> str:
    """The state id: tagged BLAKE3 over the domain tag and the canonical JSON of the state's fields."""
    record = {
        "creator": creator,
        "digest": digest,
        "parents": sorted(set(parents)),
        "profile": profile,
        "session": session,
        "sources": sorted(label.sources),
        "taint": sorted(label.taint),
        "time_ns": time_ns,
        "type": state_type,
    }
    return tag_digest("blake3", blake3.blake3(_ID_DOMAIN + canonical_json(record)).digest())


def _label(value: str, what: str) -> str:
    try:
        return check_label(value, what)
    except EntryError as e:
        raise StateError(str(e)) from None


def check_collection(values: object, what: str) -> None:
    """Refuse anything but a list, tuple or set: a bare string would be split into one-letter labels."""
    if not isinstance(values, (list, tuple, set, frozenset)):
        hint = f"; write [{values!r}]" if isinstance(values, str) else ""
        raise StateError(f"{what} must be a list or tuple, got {type(values).__name__} {values!r:.80}{hint}")


def label_set(values: object, what: str) -> frozenset[str]:
    """Validate a collection of source labels (`what` names them, plural) into a frozenset."""
    check_collection(values, what)
    return frozenset(_label(v, what.removesuffix("s")) for v in values)


def new_state(
    state_type: str,
    *,
    session: str,
    creator: str,
    text: str | None = None,
    tensor: TensorRef | None = None,
    parents: Sequence[State] = (),
    sources: Collection[str] = (),
    taint: Collection[str] = (),
    time_ns: int | None = None,
) -> State:
    """Build a state, checking its type rules; its label joins the parents' with `sources` and `taint`.

    `sources` are where this state's own content came from (trusted ones); `taint` are untrusted
    sources (they count as sources too); each is a list or tuple of labels, never a bare string.
    A root state needs at least one source of either kind.
    """
    rule = STATE_TYPES.get(state_type)
    if rule is None:
        raise StateError(f"unknown state type {state_type!r}; use one of {sorted(STATE_TYPES)}")
    _label(session, "session")
    _label(creator, "creator")
    own_taint = label_set(taint, "taint sources")
    own_sources = label_set(sources, "sources") | own_taint
    digest = content_digest(text, tensor)  # also checks the content's types
    if text is not None and len(text.encode("utf-8")) > MAX_TEXT_BYTES:
        raise StateError(f"text is over {MAX_TEXT_BYTES} bytes; store large content as a tensor reference")
    if parents:
        if not rule.derived:
            raise StateError(f"a {state_type} enters memory from outside and cannot have parents; "
                             f"derive a belief or summary instead")
        for parent in parents:
            if not isinstance(parent, State):
                raise StateError(f"parents must be States (resolve ids through the store), got {type(parent).__name__}")
            if state_type not in STATE_TYPES[parent.state_type].may_become:
                raise StateError(
                    f"a {parent.state_type} may become {'/'.join(STATE_TYPES[parent.state_type].may_become)}, not {state_type} "
                    f"(parent {parent.state_id})"
                )
            if parent.leaf_index is None:
                raise StateError(f"parent {parent.state_id} is not committed to the ledger yet; commit it first")
    else:
        if not rule.root:
            raise StateError(f"a {state_type} is derived: give at least one parent")
        if not own_sources:
            raise StateError(f"a root {state_type} needs at least one source (who or what it came from)")
    label = Label.join([p.label for p in parents] + [Label(own_sources, own_taint)])
    if time_ns is None:
        time_ns = time.time_ns()
    if not is_int(time_ns) or not 0 <= time_ns < 2**63:
        raise StateError(f"time_ns must be a non-negative 64-bit integer, got {time_ns!r}")
    parent_ids = tuple(sorted({p.state_id for p in parents}))
    profile = tensor.profile if tensor else None
    sid = state_id_of(state_type, digest, profile, parent_ids, session, creator, time_ns, label)
    return State(sid, state_type, text, tensor, parent_ids, session, creator, time_ns, label)
