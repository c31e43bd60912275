"""What the promotion gate decides from the records that count, and how it says so (pure rules, no I/O).

The gate (policy.py) verifies the ledger and collects the valid override and revocation records;
the functions here turn those into a decision: the state's withdrawal beats everything, then its
revocation; a revoked override no longer counts; among the active overrides the latest issued
decides; otherwise the state's type and taint do.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from fieldprint.memory.records import Override, Revocation, utc_text
from fieldprint.memory.state import State


@dataclass(frozen=True, slots=True)
class Check:
    """One step of a decision: its name (ledger, type, taint, override, revocation, withdrawal), outcome, detail."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class Decision:
    """Why a state is or is not an anchor; `sentence` says it in one line for people."""

    state_id: str
    anchor: bool
    verified: bool  # check (1): the ledger entry verifies against a signed checkpoint
    eligible: bool  # the policy part, rules (2)+(3) or (4) of policy.py, ignoring verification
    basis: str  # "default" (type + taint), "override", "revocation", "withdrawn" or "unknown"
    record_index: int | None  # leaf index of the override or revocation that decided, if any
    checks: tuple[Check, ...]
    rejected: tuple[Check, ...] = field(default=())  # override/revocation records that did not count, and why
    sentence: str = ""

    def to_dict(self) -> dict:
        """A JSON-ready form of the decision."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class ValidRecord:
    """An override or revocation that counts: signed by a configured key, logged, in its time window."""

    index: int
    record: Override | Revocation


def decide(state: State, promotable_types: frozenset[str], valid: list[ValidRecord], ids_at: dict[int, str],
           rejected: list[Check], *, withdrawal: str | None = None,
           ) -> tuple[bool, str, ValidRecord | None, Check | None, list[Check]]:
    """(eligible, basis, deciding record, its check, rejected records) from the records that count.

    `ids_at` maps every verified record leaf (copies too) to its record id; the overrides that a
    revocation withdrew are added to `rejected`. `withdrawal` says why the state itself was withdrawn
(None: it was not).
    """
    type_ok = state.state_type in promotable_types
    # A revocation withdraws the override record at its target leaf, and with it every copy of that record.
    withdrawn = {ids_at[v.record.override_index] for v in valid
                 if isinstance(v.record, Revocation) and v.record.override_index in ids_at}
    revocations = [v for v in valid if isinstance(v.record, Revocation) and v.record.override_index is None]
    overrides = [v for v in valid if isinstance(v.record, Override) and v.record.record_id not in withdrawn]
    for v in valid:
        if isinstance(v.record, Override) and v.record.record_id in withdrawn:
            rejected.append(Check("override", False, f"override at leaf {v.index} was withdrawn by a revocation"))
    if withdrawal is not None:
        # Withdrawal is for good: no record, not even a signed promote override, brings the state back.
        return False, "withdrawn", None, Check("withdrawal", False, withdrawal), rejected
    if revocations:
        v = revocations[0]
        return False, "revocation", v, Check("revocation", False, f"revoked by {v.record.who} at leaf {v.index}: "
                                             f"{v.record.reason}"), rejected
    if overrides:
        # The latest issued decides (signed time, so a copy's position in the ledger cannot matter).
        v = max(overrides, key=lambda v: (v.record.issued_ns, v.index))
        ok = v.record.action == "promote"
        return ok, "override", v, Check("override", ok, f"{v.record.action}d by {v.record.who} at leaf {v.index} "
                                        f"until {utc_text(v.record.expires_ns)}: {v.record.reason}"), rejected
    return type_ok and not state.label.tainted, "default", None, None, rejected


def sentence(state: State, anchor: bool, ledger: Check, checks: list[Check], basis: str) -> str:
    """The decision in one line for people: what decided, and what failed."""
    what = f"this {state.state_type}"
    if basis == "withdrawn":  # said first: the one refusal nothing can undo
        return f"not an anchor: {what} was {checks[-1].detail}; a withdrawn state is never an anchor again, not even by override"
    if not ledger.ok:
        return f"not an anchor: {what} does not verify against the ledger ({ledger.detail})"
    last = checks[-1]
    if basis == "revocation":
        return f"not an anchor: {what} is {last.detail}"
    if basis == "override":
        verdict = "an anchor" if anchor else "not an anchor"
        return f"{verdict} by override: {what} was {last.detail}; it verifies ({ledger.detail})"
    failed = [c.detail for c in checks[1:3] if not c.ok]
    if failed:
        return f"not an anchor: {what} verifies, but {' and '.join(failed)}; only a signed override could promote it"
    return f"an anchor: {what} verifies ({ledger.detail}), its type is promotable and it is untainted"
