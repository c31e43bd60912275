"""The engine's view of one data folder: log, memory (store, vectors, gate, Pacemaker), sessions.

Sessions: each turn's user input is a `user_input` state and the model's answer a `model_output`
state (not promotable by default: an agent does not anchor itself on its own words without an
override), and the turn's K/V goes through the asynchronous committer. `rollback(session, turns)`
returns a session to an earlier committed turn: its history is cut back, the states of the dropped
turns are withdrawn from retrieval (their rows are flagged, never deleted: the log is append-only,
and no other session's rows are touched, unlike a table-wide version restore), and a `rollback`
entry records it in the log.

Withdrawals are read back from the log: the gate asks `why_withdrawn`, which first takes in the
rollback entries logged since it last looked, so engines sharing one log (PostgreSQL) all refuse a
state any of them withdrew. `withdrawn.json` caches the set and the log size it covers, so a
restart reads only what came after; without it the whole log is read once.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field

from fieldprint.atomic import replace_file, sweep_temporaries
from fieldprint.canon import check_label, is_int
from fieldprint.config import DEFAULT_ORIGIN, LEDGER_DB, LEDGER_KEY_STEM
from fieldprint.dqp_profile import DQPProfile
from fieldprint.errors import DQPError, EngineError, EntryError, FieldprintError
from fieldprint.ledger.entry import decode_entry, encode_entry

OPERATOR_STEM, OPERATOR_NAME = "operator", "fieldprint.local/operator"
WITHDRAWN_FILE, SESSIONS_FILE = "withdrawn.json", "sessions.json"
RESCAN_LIMIT = 10_000  # log entries a restart may read again to bring the withdrawn set up to date


@dataclass(slots=True)
class Turn:
    user_state: str
    output_state: str
    receipt_entry: str  # the generation entry (base64) of the turn's receipt
    kv_future: object = None  # the committer's future for the turn's K/V (None: not committed)
    kv_index: int | None = None  # the K/V commit's leaf index, once known (what a restart keeps)

    def kv_commit(self, timeout: float = 60.0) -> int | None:
        """The leaf index of this turn's K/V commit (waiting for it if still running), or None."""
        if self.kv_index is None and self.kv_future is not None:
            self.kv_index = self.kv_future.result(timeout).index
        return self.kv_index


@dataclass(slots=True)
class Session:
    name: str
    history: list[dict] = field(default_factory=list)  # chat messages of the kept turns
    turns: list[Turn] = field(default_factory=list)


def _session_from_record(name: str, record: dict) -> Session:
    """A session from sessions.json; TypeError or KeyError when a field has the wrong shape or type."""
    history, turns = record["history"], record["turns"]
    if not isinstance(history, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in history):
        raise TypeError(f"session {name!r}: history must be a list of chat messages")
    if not isinstance(turns, list) or not all(
            isinstance(t, dict) and isinstance(t["user_state"], str) and isinstance(t["output_state"], str)
            and (t["kv_index"] is None or is_int(t["kv_index"])) for t in turns):
        raise TypeError(f"session {name!r}: turns must be a list of turn records")
    return Session(name, list(history), [Turn(t["user_state"], t["output_state"], t["receipt_entry"], None, t["kv_index"])
                                         for t in turns])


def load_or_calibrate_profile(data_dir: str, model_id: str, calibrate, recipe: str) -> DQPProfile:
    """The model's DQP profile: calibrated once, stored as `profiles/<model id>.<recipe>.json`, reused after.

    The recipe (which granularities) is in the name, so a profile made by another recipe is kept
    beside (old commits name it) rather than taken or overwritten.
    """
    folder = os.path.join(data_dir, "profiles")
    path = os.path.join(folder, f"{model_id.replace(':', '-')}.{recipe}.json")
    try:
        with open(path, "rb") as f:
            return DQPProfile.decode(f.read())
    except FileNotFoundError:
        pass
    except DQPError as e:
        raise EngineError(f"the stored DQP profile {path} is damaged ({e}); delete it to recalibrate "
                          "(anchor sets compiled with it will then recompile)") from None
    profile = calibrate()
    os.makedirs(folder, exist_ok=True)
    sweep_temporaries(folder)
    replace_file(path, profile.encode())
    return profile


class Memory:
    """Log, state store, vectors, embedder, gate and Pacemaker of one data folder, opened together."""

    def __init__(self, log, store, pacemaker, gate, operator_key: str | None = None, data_dir: str | None = None) -> None:
        self.log, self.store, self.pacemaker, self.gate = log, store, pacemaker, gate
        self.operator_key = operator_key  # signs overrides in the demo; a deployment keeps it elsewhere
        # Sessions and the states of rolled-back turns (never anchor candidates again) survive a
        # restart: each file is rewritten whole after every change (the log remains the record).
        self._dir = data_dir
        if data_dir is not None:
            sweep_temporaries(data_dir)  # records a killed writer left half-written
        saved, withdrawn = self._read(SESSIONS_FILE, {}), self._read(WITHDRAWN_FILE, {"through": 0, "states": []}, list)
        if isinstance(withdrawn, list):  # the earlier form, a bare list: kept, and the log read again from 0
            withdrawn = {"through": 0, "states": withdrawn}
        try:
            self.sessions: dict[str, Session] = {name: _session_from_record(name, v) for name, v in saved.items()}
            through, states = withdrawn["through"], withdrawn["states"]
            if not (is_int(through) and 0 <= through <= log.size and isinstance(states, list)
                    and all(isinstance(i, str) for i in states)):
                raise TypeError("withdrawn.json holds {'through': a log size, 'states': [state ids]}")
        except (KeyError, TypeError) as e:
            raise EngineError(f"the session records in {data_dir} are damaged ({e!r}); the log's generation and "
                              "rollback entries record what they held: restore them from it or remove the files") from None
        self.withdrawn: set[str] = set(states)
        self._withdrawn_through = self._saved_through = through  # the log size the set covers, and the file
        self._lock = threading.Lock()
        self._catch_up()
        # The gate refuses withdrawn states itself, on every path to an anchor, and asks each time.
        gate.why_withdrawn = self.why_withdrawn

    @classmethod
    def open(cls, data_dir: str, embedder=None, database: str | None = None) -> Memory:
        """Open (or create) the memory of `data_dir`: embedded (SQLite log and store, LanceDB vectors), or,
        with `database` (a postgresql:// URL), the log, store and pgvector index many engines share there.
        Keys stay in `data_dir` either way."""
        from fieldprint.ledger.keys import ensure_key_pair
        from fieldprint.ledger.log import TransparencyLog
        from fieldprint.memory.embed import MiniLMEmbedder
        from fieldprint.memory.pacemaker import Pacemaker
        from fieldprint.memory.policy import GateConfig, PromotionGate
        from fieldprint.memory.store import SQLiteStateStore
        from fieldprint.memory.vectors import LanceVectorStore

        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        log_signer, log_verifier = ensure_key_pair(data_dir, LEDGER_KEY_STEM, DEFAULT_ORIGIN)
        op_signer, op_verifier = ensure_key_pair(data_dir, OPERATOR_STEM, OPERATOR_NAME)
        log = TransparencyLog.open(database or os.path.join(data_dir, LEDGER_DB), log_signer, checkpoint_interval_s=None)
        store = None
        try:
            if database:
                from fieldprint.memory.pg_store import PostgresStateStore
                from fieldprint.memory.pgvector import PgVectorStore

                store, vectors = PostgresStateStore(database), PgVectorStore(database)
            else:
                store = SQLiteStateStore(os.path.join(data_dir, "states.sqlite"))
                vectors = LanceVectorStore(os.path.join(data_dir, "vectors"))
            gate = PromotionGate(store, log, GateConfig(log_keys=[log_verifier], override_keys=[op_verifier]))
            pm = Pacemaker(store, log, vectors, embedder or MiniLMEmbedder(), gate)
            return cls(log, store, pm, gate, op_signer, data_dir)
        except BaseException:  # nothing stays open (the log's writer lock above all)
            if store is not None:
                store.close()
            log.close()
            raise

    def why_withdrawn(self, state_id: str) -> str | None:
        """Why `state_id` may never be an anchor again (a rollback, by any engine on this log, dropped its turn)."""
        self._catch_up()
        return "withdrawn by a session rollback" if state_id in self.withdrawn else None

    def _catch_up(self) -> None:
        """Take in the rollback entries logged since the set was last brought up to date, and save it."""
        with self._lock:
            size = self.log.size
            if size == self._withdrawn_through:
                return
            added: set[str] = set()
            for _, data in self.log.entries(self._withdrawn_through, size):
                # Only rollback entries are parsed: inside a JSON string these bytes would be escaped.
                if b'"kind":"rollback"' not in data:
                    continue
                try:
                    record = decode_entry(data)
                except EntryError:  # raw bytes someone logged (`ledger add --raw`): no rollback of ours
                    continue
                ids = record.get("withdrawn") if record["kind"] == "rollback" else None
                # A malformed rollback entry withdraws nothing; raising here would refuse every later
                # decision of every engine on the log, for good (the log keeps the entry).
                if isinstance(ids, list):
                    added.update(i for i in ids if isinstance(i, str))
            grew = not added <= self.withdrawn
            self.withdrawn |= added
            self._withdrawn_through = size
            # Saved when the set grew, and otherwise every RESCAN_LIMIT entries read: a restart then
            # re-reads at most that many, and a busy log costs no file write per decision.
            if grew or size - self._saved_through >= RESCAN_LIMIT:
                self._write(WITHDRAWN_FILE, {"through": size, "states": sorted(self.withdrawn)})
                self._saved_through = size

    @property
    def log_key(self) -> str:
        return self.log.verifier_key

    def ensure_checkpoint(self) -> None:
        """Sign a checkpoint if the latest one does not cover the whole log (an explicit call, by a writer)."""
        cp = self.log.latest_checkpoint()
        if cp is None or cp.size < self.log.size:
            self.log.checkpoint()

    # -- sessions --------------------------------------------------------------------------------
    def new_session(self, name: str) -> str:
        try:
            check_label(name, "session")
        except EntryError as e:
            raise EngineError(str(e)) from None
        with self._lock:
            if name in self.sessions:
                raise EngineError(f"session {name!r} already exists")
            self.sessions[name] = Session(name)
            self._save_sessions()
        return name

    def record_turn(self, session: str, user_text: str, output_text: str, receipt: dict, kv_future) -> Turn:
        """The turn's user input and model output become states; the history grows by one exchange."""
        s = self.sessions[session]
        user = self.pacemaker.add("user_input", session=session, creator="user", sources=["user"], text=user_text)
        out = self.pacemaker.add("model_output", session=session, creator="model", parents=[user.state_id],
                                 text=output_text or "(empty answer)")
        turn = Turn(user.state_id, out.state_id, receipt["generation"]["entry"], kv_future)
        s.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": output_text}]
        s.turns.append(turn)
        self._save_sessions()
        return turn

    def rollback(self, session: str, turns: int = 1) -> dict:
        """Drop the session's last `turns` turns; the turn it returns to must have its K/V committed."""
        s = self.sessions.get(session)
        if s is None:
            raise EngineError(f"session {session!r} does not exist")
        if not isinstance(turns, int) or isinstance(turns, bool) or not 1 <= turns <= len(s.turns):
            raise EngineError(f"turns must be an integer in [1, {len(s.turns)}] for session {session!r}")
        keep = len(s.turns) - turns
        to = s.turns[keep - 1] if keep else None
        try:
            kv_index = to.kv_commit() if to is not None else None
        except FieldprintError as e:
            raise EngineError(f"turn {keep} of session {session!r} was never committed ({e}); cannot return to it") from None
        dropped = [sid for t in s.turns[keep:] for sid in (t.user_state, t.output_state)]
        entry = encode_entry("rollback", {"session": session, "to_turn": keep, "kv_commit": kv_index,
                                          "withdrawn": dropped, "time_ns": time.time_ns()})
        index = self.log.add(entry).result()
        self.pacemaker.vectors.set_promotable(dropped, False)
        self._catch_up()  # the rollback entry is integrated: it withdraws its states here as everywhere
        s.turns = s.turns[:keep]
        s.history = s.history[: 2 * keep]
        self._save_sessions()
        return {"session": session, "to_turn": keep, "log_index": index, "withdrawn": dropped, "kv_commit": kv_index}

    def _read(self, name: str, empty, older: type | None = None):
        """One of the folder's JSON records (of empty's type, or an `older` one), or `empty` when absent;
        EngineError when damaged."""
        path = os.path.join(self._dir, name) if self._dir else None
        if path is None or not os.path.exists(path):
            return empty
        try:
            with open(path, encoding="utf-8") as f:
                value = json.load(f)
            if type(value) is not type(empty) and type(value) is not older:
                raise ValueError(f"a JSON {type(empty).__name__} was expected")
        except (OSError, ValueError) as e:
            raise EngineError(f"{path} is unreadable or damaged ({e}); the log's rollback and generation entries "
                              "record what it held: restore it from them or remove it") from None
        return value

    def _write(self, name: str, value) -> None:
        """Replace one of the folder's JSON records whole (a crash leaves the old one or the new one)."""
        if self._dir is None:
            return
        replace_file(os.path.join(self._dir, name), json.dumps(value))

    def _save_sessions(self) -> None:
        for s in self.sessions.values():
            for t in s.turns:  # keep the K/V commits that have landed; a pending one is read again later
                if t.kv_index is None and t.kv_future is not None and t.kv_future.done() and not t.kv_future.exception():
                    t.kv_index = t.kv_future.result().index
        self._write(SESSIONS_FILE, {n: {"history": s.history, "turns": [
            {"user_state": t.user_state, "output_state": t.output_state, "receipt_entry": t.receipt_entry,
             "kv_index": t.kv_index} for t in s.turns]} for n, s in self.sessions.items()})

    def close(self) -> None:
        try:
            self.store.close()
        finally:
            self.log.close()

    def __enter__(self) -> Memory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
