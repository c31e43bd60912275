"""The engine's view of one data folder: log, memory (store, vectors, gate, Pacemaker), sessions.

Sessions: each turn's user input is a `user_input` state and the model's answer a `model_output`
state (not promotable by default: an agent does not anchor itself on its own words without an
override), and the turn's K/V goes through the asynchronous committer. `rollback(session, turns)`
returns a session to an earlier committed turn: its history is cut back, the states of the dropped
turns are withdrawn from retrieval (their rows are flagged, never deleted: the log is append-only,
and no other session's rows are touched, unlike a table-wide version restore), and a `rollback`
entry records it in the log. Where sessions are kept (a file, or PostgreSQL for engines sharing a
memory): fieldprint/engine/sessions.py.

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

from fieldprint.atomic import replace_file, sweep_temporaries
from fieldprint.canon import check_label, is_int
from fieldprint.config import DEFAULT_ORIGIN, LEDGER_DB, LEDGER_KEY_STEM
from fieldprint.dqp_profile import DQPProfile
from fieldprint.engine.sessions import FileSessions, PostgresSessions, Session, Turn
from fieldprint.errors import DQPError, EngineError, EntryError, FieldprintError
from fieldprint.ledger.entry import decode_entry, encode_entry

OPERATOR_STEM, OPERATOR_NAME = "operator", "fieldprint.local/operator"
WITHDRAWN_FILE, SESSIONS_FILE = "withdrawn.json", "sessions.json"
RESCAN_LIMIT = 10_000  # log entries a restart may read again to bring the withdrawn set up to date


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

    def __init__(self, log, store, pacemaker, gate, operator_key: str | None = None, data_dir: str | None = None,
                 sessions: PostgresSessions | None = None) -> None:
        self.log, self.store, self.pacemaker, self.gate = log, store, pacemaker, gate
        self.operator_key = operator_key  # signs overrides in the demo; a deployment keeps it elsewhere
        # Sessions (in the folder's sessions.json, or `sessions` shared on PostgreSQL) and the states of
        # rolled-back turns (never anchor candidates again) survive a restart; each file is rewritten
        # whole after every change (the log remains the record).
        self._dir = data_dir
        if data_dir is not None:
            sweep_temporaries(data_dir)  # records a killed writer left half-written
        saved, withdrawn = self._read(SESSIONS_FILE, {}), self._read(WITHDRAWN_FILE, {"through": 0, "states": []}, list)
        if isinstance(withdrawn, list):  # the earlier form, a bare list: kept, and the log read again from 0
            withdrawn = {"through": 0, "states": withdrawn}
        try:
            if sessions is None:
                self.sessions = FileSessions(saved, lambda records: self._write(SESSIONS_FILE, records))
            else:  # a folder's sessions from before it moved to the shared database go there, once
                if saved:
                    sessions.import_records(saved)
                    path = os.path.join(data_dir, SESSIONS_FILE)  # kept under another name, not read again
                    try:
                        os.replace(path, path.removesuffix(".json") + ".imported.json")
                    except FileNotFoundError:  # another engine on this folder moved it first
                        pass
                self.sessions = sessions
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
        self._kv_pending: dict[str, object] = {}  # a turn's output state -> its K/V commit's future, until it lands
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
        store = sessions = None
        try:
            if database:
                from fieldprint.memory.pg_store import PostgresStateStore
                from fieldprint.memory.pgvector import PgVectorStore

                store, vectors = PostgresStateStore(database), PgVectorStore(database)
                sessions = PostgresSessions(database)
            else:
                store = SQLiteStateStore(os.path.join(data_dir, "states.sqlite"))
                vectors = LanceVectorStore(os.path.join(data_dir, "vectors"))
            gate = PromotionGate(store, log, GateConfig(log_keys=[log_verifier], override_keys=[op_verifier]))
            pm = Pacemaker(store, log, vectors, embedder or MiniLMEmbedder(), gate)
            return cls(log, store, pm, gate, op_signer, data_dir, sessions)
        except BaseException:  # nothing stays open (the log's writer lock above all)
            if sessions is not None:
                sessions.close()
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
        self.sessions.create(name)
        return name

    def session(self, name: str) -> Session:
        """The session as stored now (a copy); EngineError if there is none of that name."""
        return self._as_logged(self._stored(name))

    def _stored(self, name: str) -> Session:
        if not isinstance(name, str):
            raise EngineError(f"a session is named by a string, got {type(name).__name__}")
        s = self.sessions.get(name)
        if s is None:
            raise EngineError(f"session {name!r} does not exist; create it with new_session({name!r})")
        return s

    def _as_logged(self, s: Session) -> Session:
        """The session cut where the log says it was rolled back: a rollback is logged before the stored
        session is cut, so a write that failed in between (a full disk, a lost connection) leaves turns
        whose states the log withdrew; they are dropped here, on every read and before every change."""
        self._catch_up()
        cut = next((i for i, t in enumerate(s.turns) if t.user_state in self.withdrawn), None)
        if cut is not None:
            s.turns, s.history = s.turns[:cut], s.history[: 2 * cut]
        return s

    def record_turn(self, session: str, user_text: str, output_text: str, receipt: dict, kv_future) -> Turn:
        """The turn's user input and model output become states; the history grows by one exchange.

        kv_future: the turn's K/V commit (a future of its CommitResult), or None; its leaf index is
        stored with the turn once it lands."""
        self._stored(session)  # refused before any state is added
        user = self.pacemaker.add("user_input", session=session, creator="user", sources=["user"], text=user_text)
        out = self.pacemaker.add("model_output", session=session, creator="model", parents=[user.state_id],
                                 text=output_text or "(empty answer)")
        turn = Turn(user.state_id, out.state_id, receipt["generation"]["entry"])

        def append(s: Session) -> None:
            self._as_logged(s)
            s.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": output_text}]
            s.turns.append(turn)

        self.sessions.change(session, append)
        if kv_future is not None:
            self._kv_pending[turn.output_state] = kv_future
            kv_future.add_done_callback(lambda f: self._kv_landed(session, turn, f))
        return turn

    def _kv_landed(self, session: str, turn: Turn, future) -> None:
        """Store a turn's K/V commit index with the turn (on the committer's thread, when the commit is logged)."""
        if future.cancelled() or future.exception() is not None:
            return  # kv_commit() reports the failure to whoever rolls back to this turn here
        index = turn.kv_index = future.result().index
        output_state = turn.output_state

        def note(s: Session) -> None:
            for t in s.turns:
                if t.output_state == output_state:
                    t.kv_index = index

        try:
            self.sessions.change(session, note)
            self._kv_pending.pop(output_state, None)
        except FieldprintError:
            pass  # not stored (the database is unreachable?): this process still knows it from the future

    def kv_commit(self, turn: Turn, timeout: float = 60.0) -> int | None:
        """The leaf index of a turn's K/V commit: stored, or awaited when this process's commit is still
        running; None when the turn had none (or another engine's commit has not been stored yet)."""
        if turn.kv_index is not None:
            return turn.kv_index
        future = self._kv_pending.get(turn.output_state)
        return None if future is None else future.result(timeout).index

    def rollback(self, session: str, turns: int = 1) -> dict:
        """Drop the session's last `turns` turns; the turn it returns to must have its K/V committed."""
        s = self.session(session)
        if not isinstance(turns, int) or isinstance(turns, bool) or not 1 <= turns <= len(s.turns):
            raise EngineError(f"turns must be an integer in [1, {len(s.turns)}] for session {session!r}")
        keep = len(s.turns) - turns
        try:  # waited for here, before the session is locked: a commit may take a while
            kv_index = self.kv_commit(s.turns[keep - 1]) if keep else None
        except FieldprintError as e:
            raise EngineError(f"turn {keep} of session {session!r} was never committed ({e}); cannot return to it") from None
        seen = [t.output_state for t in s.turns]

        def cut(cur: Session) -> tuple[int, list[str]]:
            if [t.output_state for t in self._as_logged(cur).turns] != seen:
                raise EngineError(f"session {session!r} changed (a turn was added or rolled back elsewhere) while this "
                                  "rollback was prepared; nothing was rolled back: look at it again and retry")
            dropped = [sid for t in cur.turns[keep:] for sid in (t.user_state, t.output_state)]
            entry = encode_entry("rollback", {"session": session, "to_turn": keep, "kv_commit": kv_index,
                                              "withdrawn": dropped, "time_ns": time.time_ns()})
            index = self.log.add(entry).result()  # logged before the session is cut: the log is the record
            cur.turns = cur.turns[:keep]
            cur.history = cur.history[: 2 * keep]
            return index, dropped

        index, dropped = self.sessions.change(session, cut)
        self.pacemaker.vectors.set_promotable(dropped, False)
        self._catch_up()  # the rollback entry is integrated: it withdraws its states here as everywhere
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

    def close(self) -> None:
        try:
            self.sessions.close()
            self.store.close()
        finally:
            self.log.close()

    def __enter__(self) -> Memory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
