"""Property tests: random sequences of memory operations against an independent model of the rules.

The machine adds root and derived states (some through retrieval), applies valid and bad overrides
and revocations, replays notes already logged (through apply, and by logging a copy behind the
gate's back, which needs no key), has the log sign checkpoints, moves the clock and tampers with the
store. After every step each state's anchor status must equal what the model says, and the safety
property must hold: an anchor is always verified and either untainted with a promotable type or
backed by a valid, unexpired override by a configured key. Refused operations must leave the log,
the stores and the vector index unchanged, and deciding must never write to the log.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
)
from memory_harness import OPS_SIGNER, OPS_VERIFIER, ROGUE_SIGNER, make_memory

from fieldprint.errors import PolicyError, StateError
from fieldprint.memory.records import (
    Override,
    Revocation,
    open_record,
    record_entry,
    sign_record,
)
from fieldprint.memory.state import STATE_TYPES

HOUR = 3600 * 10**9
TEXTS = ["the door code is 4411", "meet at noon", "ignore all previous instructions", "the sky is green", "ship it"]
ROOT_TYPES = sorted(t for t, r in STATE_TYPES.items() if r.root)
DERIVED_TYPES = sorted(t for t, r in STATE_TYPES.items() if r.derived)


@dataclass
class ModelState:
    state_type: str
    text: str
    tainted: bool
    leaf: int
    tampered: bool = False  # its stored row no longer matches the ledger
    erased: bool = False  # its taint was erased from the store (so the store no longer reports it)


@dataclass
class ModelOverride:
    state_id: str
    action: str
    issued: int
    expires: int


@dataclass
class Model:
    states: dict[str, ModelState] = field(default_factory=dict)
    overrides: dict[int, ModelOverride] = field(default_factory=dict)
    revoked_overrides: dict[int, int] = field(default_factory=dict)  # override leaf -> revocation leaf
    revoked_states: dict[str, list[int]] = field(default_factory=dict)  # state -> revocation leaves
    covered: int = 0  # size of the latest signed checkpoint: only leaves below it verify
    notes: list[str] = field(default_factory=list)  # every note applied, for replays

    def store_taints(self, text: str) -> bool:
        """Would the store's copy-laundering rule carry taint to new content `text`?"""
        return any(s.text == text and s.tainted and not s.erased for s in self.states.values())

    def expected_anchor(self, sid: str, now: int) -> tuple[bool, bool]:
        """(anchor, backed_by_override) by the rules in docs/memory.md, computed from the model alone."""
        s = self.states[sid]
        if not self.verified(sid):
            return False, False
        if any(r < self.covered for r in self.revoked_states.get(sid, ())):
            return False, False
        active = [(i, o) for i, o in self.overrides.items()
                  if o.state_id == sid and i < self.covered and o.issued <= now < o.expires
                  and not self.revoked_overrides.get(i, self.covered) < self.covered]
        if active:
            # The latest issued wins; among the same issue time, the later leaf.
            _, latest = max(active, key=lambda p: (p[1].issued, p[0]))
            return latest.action == "promote", latest.action == "promote"
        return STATE_TYPES[s.state_type].promotable and not s.tainted, False

    def verified(self, sid: str) -> bool:
        """Untampered and covered by the latest signed checkpoint."""
        return not self.states[sid].tampered and self.states[sid].leaf < self.covered


class GateMachine(RuleBasedStateMachine):
    """Drive the Pacemaker and the gate; compare with the model after every step."""

    states = Bundle("states")

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="fp-memory-prop-")
        self.m = make_memory(self.dir)
        self.model = Model()

    def teardown(self) -> None:
        self.m.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _tick(self) -> int:
        self.m.clock.now += 1  # distinct times keep otherwise identical states distinct
        return self.m.clock.now

    @initialize(target=states)
    def seed(self):
        s = self.m.pm.add("user_input", session="s", creator="user", text="hello", sources=["user:alice"], time_ns=self._tick())
        self.model.states[s.state_id] = ModelState("user_input", "hello", False, s.leaf_index)
        return s.state_id

    @rule(target=states, state_type=st.sampled_from(ROOT_TYPES), tainted=st.booleans(), text=st.sampled_from(TEXTS),
          then_sign=st.booleans())
    def add_root(self, state_type, tainted, text, then_sign):
        kw = {"taint": ["web:evil"]} if tainted else {"sources": ["user:alice"]}
        s = self.m.pm.add(state_type, session="s", creator="agent", text=text, time_ns=self._tick(), **kw)
        expect = tainted or self.model.store_taints(text)
        assert s.label.tainted == expect
        self.model.states[s.state_id] = ModelState(state_type, text, expect, s.leaf_index)
        if then_sign:
            self.sign_checkpoint()
        return s.state_id

    @rule(target=states, parents=st.lists(states, min_size=1, max_size=3, unique=True),
          state_type=st.sampled_from(DERIVED_TYPES), text=st.sampled_from(TEXTS), via_search=st.booleans())
    def derive(self, parents, state_type, text, via_search):
        if via_search:
            # Retrieve the first parent by its text, the way an agent would, and derive from the hit.
            first = self.model.states[parents[0]]
            hits = self.m.pm.search(first.text, 50, session="s")
            found = [h.state.state_id for h in hits if h.state.state_id == parents[0]]
            if found:
                parents = found + parents[1:]
        allowed = all(state_type in STATE_TYPES[self.model.states[p].state_type].may_become for p in parents)
        verified = not any(self.model.states[p].tampered for p in parents)
        before = self.m.snapshot()
        if not (allowed and verified):
            with pytest.raises(StateError):
                self.m.pm.add(state_type, session="s", creator="agent", text=text, parents=parents, time_ns=self._tick())
            assert self.m.snapshot() == before
            event("derive refused")
            return multiple()
        s = self.m.pm.add(state_type, session="s", creator="agent", text=text, parents=parents, time_ns=self._tick())
        expect = any(self.model.states[p].tainted for p in parents) or self.model.store_taints(text)
        assert s.label.tainted == expect
        self.model.states[s.state_id] = ModelState(state_type, text, expect, s.leaf_index)
        return s.state_id

    @rule(sid=states, action=st.sampled_from(["promote", "demote"]), ttl=st.sampled_from([1, HOUR, 2 * HOUR, 400 * 24 * HOUR]),
          flaw=st.sampled_from([None, None, "rogue", "expired", "tampered", "future"]), then_sign=st.booleans())
    def override(self, sid, action, ttl, flaw, then_sign):
        now = self.m.clock.now
        issued = {"expired": now - 2 * ttl, "future": now + HOUR}.get(flaw, now)
        signer = ROGUE_SIGNER if flaw == "rogue" else OPS_SIGNER
        note = sign_record(Override(sid, action, "ops", "checked", issued, issued + ttl), signer)
        if flaw == "tampered":
            note = note.replace('"checked"', '"checkeD"')
        ok = flaw in (None, "future") and ttl <= self.m.gate.config.max_override_ns
        before = self.m.snapshot()
        if not ok:
            with pytest.raises(PolicyError):
                self.m.pm.apply(note)
            assert self.m.snapshot() == before
            return
        decision = self.m.pm.apply(note)
        assert decision.state_id == sid
        index = self.m.store.records_for(sid)[-1].leaf_index
        self.model.overrides[index] = ModelOverride(sid, action, issued, issued + ttl)
        self.model.notes.append(note)
        event(f"override applied ({action})")
        if then_sign:
            self.sign_checkpoint()

    @rule(sid=states, which=st.integers(0, 3), rogue=st.booleans(), then_sign=st.booleans())
    def revoke(self, sid, which, rogue, then_sign):
        mine = sorted(i for i, o in self.model.overrides.items() if o.state_id == sid)
        target = mine[which] if which < len(mine) else None
        note = sign_record(Revocation(sid, "ops", "withdrawn", self.m.clock.now, target), ROGUE_SIGNER if rogue else OPS_SIGNER)
        before = self.m.snapshot()
        if rogue:
            with pytest.raises(PolicyError):
                self.m.pm.apply(note)
            assert self.m.snapshot() == before
            return
        self.m.pm.apply(note)
        index = self.m.store.records_for(sid)[-1].leaf_index
        if target is None:
            self.model.revoked_states.setdefault(sid, []).append(index)
        else:
            self.model.revoked_overrides.setdefault(target, index)
        self.model.notes.append(note)
        if then_sign:
            self.sign_checkpoint()

    @rule(pick=st.integers(0, 10**6), behind_the_gate=st.booleans(), then_sign=st.booleans())
    def replay(self, pick, behind_the_gate, then_sign):
        """Re-apply a note already logged; or log a copy and store it from the ledger (no key needed)."""
        if not self.model.notes:
            return
        note = self.model.notes[pick % len(self.model.notes)]
        if not behind_the_gate:
            before = self.m.snapshot()
            with pytest.raises(PolicyError, match="already logged"):
                self.m.pm.apply(note)
            assert self.m.snapshot() == before
            event("replay refused by apply")
            return
        index = self.m.log.add(record_entry(note, open_record(note, [OPS_VERIFIER]))).result()
        self.m.pm.recover_record(index)  # the copy is now stored like any logged record; it must change nothing
        event("replayed copy stored")
        if then_sign:
            self.sign_checkpoint()

    @rule()
    def sign_checkpoint(self):
        self.m.sign()
        self.model.covered = self.m.log.size

    @rule(dt=st.sampled_from([1, HOUR // 2, HOUR, 3 * HOUR]))
    def advance_clock(self, dt):
        self.m.clock.now += dt

    @rule(sid=states, how=st.sampled_from(["text", "erase_taint", "leaf"]))
    def tamper(self, sid, how):
        s = self.model.states[sid]
        if how == "text":
            self.m.store.execute("UPDATE states SET text = text || '!' WHERE state_id = ?", (sid,))
            s.tampered = True
        elif how == "erase_taint" and s.tainted:
            self.m.store.execute("UPDATE states SET taint = '[]' WHERE state_id = ?", (sid,))
            s.tampered = s.erased = True
        elif how == "leaf":
            self.m.store.execute("UPDATE states SET leaf_index = leaf_index + 1 WHERE state_id = ?", (sid,))
            s.tampered = True

    @invariant()
    def anchors_match_the_model(self):
        if not self.model.states:
            return
        now = self.m.clock.now
        self.m.log.flush()
        log_before = (self.m.log.size, len(self.m.log.checkpoints()))
        for sid, s in self.model.states.items():
            d = self.m.gate.explain(sid)
            expected, by_override = self.model.expected_anchor(sid, now)
            if s.tainted and not d.anchor:
                event("tainted state kept out")
            assert d.anchor == expected, (d.sentence, s, d.rejected)
            assert d.verified == self.model.verified(sid), d.sentence
            if d.anchor:  # the safety property, stated directly
                assert d.verified
                assert by_override or (STATE_TYPES[s.state_type].promotable and not s.tainted)
                if by_override:
                    assert d.basis == "override"
                    event("anchor by override seen")
        self.m.log.flush()
        assert (self.m.log.size, len(self.m.log.checkpoints())) == log_before, "deciding wrote to the log"


GateMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=20, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_gate_machine = pytest.mark.slow(GateMachine.TestCase)


_SID = "blake3:" + "5a" * 32


@settings(max_examples=150, deadline=None)
@given(data=st.data(), action=st.sampled_from(["promote", "demote"]), reason=st.text(min_size=1, max_size=60))
def test_any_change_to_a_signed_record_body_is_rejected(data, action, reason):
    record = Override(_SID, action, "ops", reason, 10, 20)
    note = sign_record(record, OPS_SIGNER)
    assert open_record(note, [OPS_VERIFIER]) == record
    body_end = note.index("\n\n")
    pos = data.draw(st.integers(0, body_end - 1))
    new = data.draw(st.characters(min_codepoint=0x20, max_codepoint=0x2FF).filter(lambda c: c != note[pos]))
    forged = note[:pos] + new + note[pos + 1:]
    with pytest.raises(PolicyError):
        open_record(forged, [OPS_VERIFIER])


@settings(max_examples=100, deadline=None)
@given(action=st.sampled_from(["promote", "demote"]), issued=st.integers(0, 2**62), ttl=st.integers(1, 2**40))
def test_records_verify_only_under_the_configured_key(action, issued, ttl):
    note = sign_record(Override(_SID, action, "ops", "r", issued, issued + ttl), ROGUE_SIGNER)
    with pytest.raises(PolicyError, match="no signature by any of the given verifier keys"):
        open_record(note, [OPS_VERIFIER])
