"""One memory on PostgreSQL shared by real OS processes: four engines (log, state store, vector index
all in one database) add states for a bounded time while one of them is SIGKILLed again and again.

Afterwards every acknowledged state is stored with its leaf, indexed, and verifies against a signed
checkpoint of the shared log; no two states share a leaf; and taint was never laundered between
engines: among states with the same content, once one carries a taint source every later one does.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import textwrap
import time

from pg import import_psycopg, pg_dsn  # noqa: F401,I001  (a fresh database per module)
from test_postgres_memory import Schemas, require_pgvector

from fieldprint.ledger.note import generate_key
from fieldprint.ledger.storage.postgres import open_log
from fieldprint.memory.pg_store import PostgresStateStore
from fieldprint.memory.pgvector import PgVectorStore
from fieldprint.memory.policy import GateConfig, PromotionGate

psycopg = import_psycopg()

CHILD = textwrap.dedent("""
    import os, random, sys, time
    from fieldprint.errors import StateError
    from fieldprint.ledger.storage.postgres import open_log
    from fieldprint.memory.embed import HashingEmbedderForTests
    from fieldprint.memory.pacemaker import Pacemaker
    from fieldprint.memory.pg_store import PostgresStateStore
    from fieldprint.memory.pgvector import PgVectorStore
    from fieldprint.memory.policy import GateConfig, PromotionGate

    dsn, log_schema, schema, signer, verifier, results, tag, stop = sys.argv[1:9]
    log = open_log(dsn, signer, schema=log_schema, lease_s=1.0, lease_wait_s=60, batch_wait_ms=0,
                   checkpoint_interval_s=None)
    store, vectors = PostgresStateStore(dsn, schema), PgVectorStore(dsn, schema=schema)
    gate = PromotionGate(store, log, GateConfig(log_keys=[verifier], override_keys=[]))
    pm = Pacemaker(store, log, vectors, HashingEmbedderForTests(), gate)
    fd = os.open(results, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    rng = random.Random(tag)
    print("ready", flush=True)
    while not os.path.exists(stop):
        # A few shared contents, some arriving tainted: engines race to store the same content.
        text = f"the door code is {rng.randrange(4)}"
        label = {"taint": [f"web:site{rng.randrange(2)}"]} if rng.random() < 0.3 else {"sources": ["user:alice"]}
        try:
            s = pm.add("observation", session=tag, creator="engine", text=text, time_ns=time.time_ns(), **label)
        except StateError as e:
            if "another writer stored the same content" not in str(e):
                raise
            os.write(fd, b"relabel\\n")  # refused before the ledger; the next add reads the new taint
            continue
        os.write(fd, f"{s.state_id} {s.leaf_index}\\n".encode())  # one write per acknowledged state
""")


def start(dsn, log_schema, schema, signer, verifier, results, tag, stop) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", CHILD, dsn, log_schema, schema, signer, verifier, results, tag, stop],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return child


def test_four_engines_share_one_memory_through_kills(tmp_path, pg_dsn):  # noqa: F811
    dsn = require_pgvector(pg_dsn)
    schemas = Schemas(dsn)
    log_schema, schema = schemas.new(), schemas.new()
    signer, verifier = generate_key("memory.fieldprint.test")
    results, stop = str(tmp_path / "acked"), str(tmp_path / "stop")
    args = (dsn, log_schema, schema, signer, verifier, results)
    open_log(dsn, signer, schema=log_schema, checkpoint_interval_s=None).close()
    # The memory's schema is not: four engines opening at once race to create pgvector and the tables.
    children = {f"e{i}": start(*args, f"e{i}", stop) for i in range(4)}
    kills, rng, deadline = 0, random.Random(7), time.monotonic() + 20
    try:
        for child in children.values():
            assert child.stdout.readline().strip() == "ready", child.stderr.read()
        started = dict.fromkeys(children, time.monotonic())
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(0.2, 0.6))
            # Kill an engine that has been adding for a while (a restarted one needs ~1 s to open).
            busy = [tag for tag, t in started.items() if time.monotonic() - t > 1.5]
            if not busy:
                continue
            tag = rng.choice(busy)
            children[tag].send_signal(signal.SIGKILL)
            children[tag].wait()
            kills += 1
            children[tag], started[tag] = start(*args, tag, stop), time.monotonic()  # the same engine comes back
        open(stop, "w").close()
        for tag, child in children.items():
            _, err = child.communicate(timeout=120)
            assert child.returncode == 0, f"engine {tag} failed:\n{err}"
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()
                child.wait()

    lines = open(results).read().splitlines()
    acked = dict(line.split() for line in lines if line != "relabel")
    assert kills >= 10 and len(acked) > 50, (kills, len(acked))
    log = open_log(dsn, signer, schema=log_schema, checkpoint_interval_s=None)
    store = PostgresStateStore(dsn, schema)
    try:
        log.checkpoint()
        gate = PromotionGate(store, log, GateConfig(log_keys=[verifier], override_keys=[]))
        checkpoint = gate.checkpoint()
        # Every acknowledged state is stored with the leaf it was acknowledged with, and verifies.
        for state_id, leaf in acked.items():
            state = store.get(state_id)
            assert state is not None and state.leaf_index == int(leaf), state_id
        stored = store.state_ids()
        decisions = {sid: gate.explain(sid, checkpoint=checkpoint) for sid in stored}
        assert all(d.verified for d in decisions.values()), [d.sentence for d in decisions.values() if not d.verified][:3]
        leaves = [store.get(sid).leaf_index for sid in stored]
        assert len(set(leaves)) == len(leaves)
        with psycopg.connect(dsn) as db:
            indexed = {r[0] for r in db.execute(f"SELECT state_id FROM {schema}.vectors WHERE removed_in IS NULL")}
            # In commit order (states of one content are written under one lock, so seq order is commit order).
            rows = db.execute(f"SELECT digest, taint FROM {schema}.states ORDER BY seq").fetchall()
        assert set(stored) <= indexed  # a killed add may leave an index row without a state (inert), never the reverse
        vectors = PgVectorStore(dsn, schema=schema)
        assert vectors.sweep(store.stored, older_than_s=0) == len(indexed - set(stored))  # no engine is running now
        assert len(vectors) == len(stored)
        vectors.close()
        seen: dict[str, set[str]] = {}
        for digest, taint in rows:
            taint = set(json.loads(taint))
            assert seen.get(digest, set()) <= taint, f"content {digest} lost taint {seen[digest] - taint}"
            seen[digest] = seen.get(digest, set()) | taint
    finally:
        log.close()
        store.close()
        schemas.drop_all()
