"""Memory benchmark on the embedded store: insert rate and top-k latency at 100k and 1M states.

Vectors for the store measurements are precomputed random 384-d unit vectors (the MiniLM output
dimension), so the store is measured, not the embedder; MiniLM embedding throughput and the full
commit path (state store + ledger + vector store per state) are measured separately. Brute force
(exact) and an IVF-PQ index run side by side on the same table; recall is measured against exact.

    python benchmarks/memory_bench.py                 # 100k and 1M (about 10-15 minutes on 2 cores)
    python benchmarks/memory_bench.py --sizes 20000   # a quick run

With a PostgreSQL server that has pgvector (FIELDPRINT_POSTGRES_DSN, or --postgres DSN) it also
measures PgVectorStore side by side with LanceDB on the same rows and queries: bulk and online insert
rates, HNSW build, top-10 latency and recall@10 against exact search (unfiltered and filtered to one
session), the cost of a rollback, and the full commit path with log, state store and vectors all on
PostgreSQL. 1M rows are not measured by default: the HNSW build alone exceeds ten minutes on 2 cores.

    eval "$(.ci/postgres.sh)"; python benchmarks/memory_bench.py --only-postgres   # the side by side only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from importlib.metadata import version

import numpy as np

from fieldprint.memory.vectors import LanceVectorStore

DIM = 384
K = 10
INSERT_BATCH = 50_000
SESSIONS = 100  # rows are spread over this many sessions; filtered queries ask for one
TUNED_NPROBES, TUNED_REFINE = 64, 10


def cpu_name() -> str:
    """The CPU model string (Linux), else the platform's processor name."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def unit_vectors(n: int, seed: int) -> np.ndarray:
    """n random unit vectors of DIM float32 (generated in chunks to bound peak memory)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, DIM), dtype=np.float32)
    for lo in range(0, n, 100_000):
        chunk = rng.standard_normal((min(100_000, n - lo), DIM), dtype=np.float32)
        out[lo:lo + len(chunk)] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return out


def query_sets(vectors: np.ndarray, queries: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same query sets for every backend: near-duplicates of stored rows (and which rows), random directions."""
    rng = np.random.default_rng(1)
    # Near-duplicate queries (a stored vector plus noise, cosine ~0.9 to it): the nearest row is known.
    picks = rng.choice(len(vectors), size=queries, replace=False)
    noise = rng.standard_normal((queries, DIM), dtype=np.float32)
    near = vectors[picks] + 0.5 * noise / np.linalg.norm(noise, axis=1, keepdims=True)
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    # Random queries: no structure to exploit, the hard case for any ANN index.
    return near, unit_vectors(queries, seed=7), picks


def state_id(i: int) -> str:
    """A well-formed stand-in state id for row i (the store only needs it unique and tagged)."""
    return f"blake3:{i:064x}"


def timed(fn, repeats: int) -> tuple[list[float], list]:
    """Run fn(i) for i in range(repeats); return per-call seconds and results."""
    times, results = [], []
    for i in range(repeats):
        t = time.perf_counter()
        results.append(fn(i))
        times.append(time.perf_counter() - t)
    return times, results


def bench_store(n: int, queries: int, partitions: int, sub_vectors: int, build_index: bool, root: str) -> dict:
    """Insert n rows in batches, then exact and (optionally) IVF-PQ top-k latency and recall."""
    vectors = unit_vectors(n, seed=n)
    store = LanceVectorStore(os.path.join(root, f"vectors-{n}"), dim=DIM)
    ids = [state_id(i) for i in range(n)]
    sessions = [f"s{i % SESSIONS}" for i in range(n)]
    t0 = time.perf_counter()
    for lo in range(0, n, INSERT_BATCH):
        hi = min(n, lo + INSERT_BATCH)
        store.add(ids[lo:hi], vectors[lo:hi], sessions[lo:hi], ["belief"] * (hi - lo), [True] * (hi - lo))
    insert_s = time.perf_counter() - t0
    assert len(store) == n
    probe = unit_vectors(1, seed=11)[0]
    raw_t, _ = timed(lambda i: store.search(probe, K, session=f"s{i}", exact=True), 5)
    # Fold the rows into the filter (bitmap) indexes, as the Pacemaker does every few hundred commits.
    t0 = time.perf_counter()
    store.compact()
    compact_s = time.perf_counter() - t0

    near, rand, picks = query_sets(vectors, queries)

    res: dict = {"n": n, "insert_s": insert_s, "insert_rows_per_s": n / insert_s, "compact_s": compact_s,
                 "exact_session_filter_before_compact_ms": 1e3 * statistics.median(raw_t),
                 "queries": queries, "k": K}
    exact_t, exact_near = timed(lambda i: store.search(near[i], K, exact=True), queries)
    _, exact_rand = timed(lambda i: store.search(rand[i], K, exact=True), queries)
    sess_t, sess_hits = timed(lambda i: store.search(near[i], K, session=f"s{picks[i] % SESSIONS}", exact=True), queries)
    assert all(h[0].state_id == ids[picks[i]] for i, h in enumerate(sess_hits))
    res["exact_ms"] = 1e3 * statistics.median(exact_t)
    res["exact_session_filter_ms"] = 1e3 * statistics.median(sess_t)
    res["exact_top1_near"] = sum(h[0].state_id == ids[picks[i]] for i, h in enumerate(exact_near)) / queries
    if build_index:
        t0 = time.perf_counter()
        store.build_index(num_partitions=partitions, num_sub_vectors=sub_vectors)
        res["index_build_s"] = time.perf_counter() - t0
        res["index"] = {"type": "IVF_PQ", "partitions": partitions, "sub_vectors": sub_vectors, "nprobes": "LanceDB default"}
        ann_t, ann_near = timed(lambda i: store.search(near[i], K), queries)
        _, ann_rand = timed(lambda i: store.search(rand[i], K), queries)
        res["ann_ms"] = 1e3 * statistics.median(ann_t)
        res["ann_top1_near"] = sum(h[0].state_id == ids[picks[i]] for i, h in enumerate(ann_near)) / queries
        overlap = [len({h.state_id for h in a} & {h.state_id for h in e}) / K for a, e in zip(ann_rand, exact_rand)]
        res["ann_recall_at_10_random"] = statistics.mean(overlap)
        res["exact_over_ann_latency"] = res["exact_ms"] / res["ann_ms"]
        # The same index searched harder: more partitions probed, candidates re-ranked exactly.
        store.nprobes, store.refine_factor = TUNED_NPROBES, TUNED_REFINE
        tuned_t, tuned_rand = timed(lambda i: store.search(rand[i], K), queries)
        store.nprobes = store.refine_factor = None
        res["ann_tuned"] = {"nprobes": TUNED_NPROBES, "refine_factor": TUNED_REFINE, "ms": 1e3 * statistics.median(tuned_t),
                            "recall_at_10_random": statistics.mean(
                                len({h.state_id for h in a} & {h.state_id for h in e}) / K for a, e in zip(tuned_rand, exact_rand))}
    # The floor for exact search: the same rows as one in-memory numpy matrix, matmul + argpartition.
    np_t, np_hits = timed(lambda i: np.argpartition(-(vectors @ rand[i]), K)[:K], queries)
    res["numpy_exact_in_memory_ms"] = 1e3 * statistics.median(np_t)
    assert all({ids[j] for j in hits} == {h.state_id for h in e} for hits, e in zip(np_hits, exact_rand))
    res["lance_exact_over_numpy"] = res["exact_ms"] / res["numpy_exact_in_memory_ms"]
    return res


def recall_at_k(got: list, want: list) -> float:
    """Share of the exact top-k found by an approximate search."""
    return len({h.state_id for h in got} & {h.state_id for h in want}) / max(1, len(want))


def bench_pgvector(n: int, queries: int, dsn: str, online_rows: int = 2000, online_batch: int = 100) -> dict:
    """PgVectorStore at n rows: bulk load + HNSW build, online inserts into the index, exact vs HNSW search, rollback."""
    import psycopg

    from fieldprint.memory.pgvector import PgVectorStore

    schema = f"memory_bench_{n}"
    with psycopg.connect(dsn, autocommit=True) as db:
        db.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    store = PgVectorStore(dsn, dim=DIM, schema=schema)
    try:
        vectors = unit_vectors(n + online_rows, seed=n)  # the first n are the rows LanceDB gets
        ids = [state_id(i) for i in range(n + online_rows)]
        sessions = [f"s{i % SESSIONS}" for i in range(n + online_rows)]
        # Bulk: COPY without the graph, then one index build (what an import or a restore does).
        store.drop_index()
        t0 = time.perf_counter()
        for lo in range(0, n, INSERT_BATCH):
            hi = min(n, lo + INSERT_BATCH)
            store.add(ids[lo:hi], vectors[lo:hi], sessions[lo:hi], ["belief"] * (hi - lo), [True] * (hi - lo))
        bulk_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        store.build_index()
        build_s = time.perf_counter() - t0
        store.compact()
        before_online = store.version()
        # Online: small batches into the indexed table (what engines do while serving).
        t0 = time.perf_counter()
        for lo in range(n, n + online_rows, online_batch):
            hi = lo + online_batch
            store.add(ids[lo:hi], vectors[lo:hi], sessions[lo:hi], ["belief"] * online_batch, [True] * online_batch)
        online_s = time.perf_counter() - t0
        assert len(store) == n + online_rows

        near, rand, picks = query_sets(vectors, queries)
        res: dict = {"n": n, "bulk_insert_rows_per_s": n / bulk_s, "index_build_s": build_s,
                     "index": {"type": "HNSW", "m": store.m, "ef_construction": store.ef_construction,
                               "build_memory_mb": store.build_memory_mb},
                     "online_insert_rows_per_s": online_rows / online_s, "online_rows": online_rows,
                     "online_batch": online_batch, "queries": queries, "k": K}
        exact_t, exact_rand = timed(lambda i: store.search(rand[i], K, exact=True), queries)
        sess_exact_t, sess_exact = timed(lambda i: store.search(rand[i], K, session=f"s{i % SESSIONS}", exact=True), queries)
        res["exact_ms"] = 1e3 * statistics.median(exact_t)
        res["exact_session_filter_ms"] = 1e3 * statistics.median(sess_exact_t)
        res["hnsw"] = []
        for ef in (40, 100, 200):
            store.ef_search = ef
            ann_t, ann_rand = timed(lambda i: store.search(rand[i], K), queries)
            _, ann_near = timed(lambda i: store.search(near[i], K), queries)
            sess_t, sess_ann = timed(lambda i: store.search(rand[i], K, session=f"s{i % SESSIONS}"), queries)
            res["hnsw"].append({
                "ef_search": ef, "ms": 1e3 * statistics.median(ann_t),
                "recall_at_10_random": statistics.mean(recall_at_k(a, e) for a, e in zip(ann_rand, exact_rand)),
                "top1_near": sum(h[0].state_id == ids[picks[i]] for i, h in enumerate(ann_near)) / queries,
                "session_filter_ms": 1e3 * statistics.median(sess_t),
                "session_filter_recall_at_10": statistics.mean(recall_at_k(a, e) for a, e in zip(sess_ann, sess_exact)),
                "session_filter_full_k": all(len(a) == K for a in sess_ann)})
        store.ef_search = 100
        # Rollback ends the online rows (and reverts them back): its cost follows what changed, not n.
        t0 = time.perf_counter()
        store.rollback(before_online)
        res["rollback_of_online_rows_ms"] = 1e3 * (time.perf_counter() - t0)
        assert len(store) == n
        return res
    finally:
        store.close()
        with psycopg.connect(dsn, autocommit=True) as db:
            db.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def bench_commit_path_postgres(n_single: int, n_batched: int, batch: int, dsn: str) -> dict:
    """Pacemaker.add and add_many with the log, the state store and the vectors all in one PostgreSQL."""
    import psycopg

    from fieldprint.ledger.note import generate_key
    from fieldprint.ledger.storage.postgres import open_log
    from fieldprint.memory.pg_store import PostgresStateStore
    from fieldprint.memory.pgvector import PgVectorStore
    from fieldprint.memory.policy import GateConfig, PromotionGate

    log_schema, schema = "memory_bench_log", "memory_bench_commit"
    with psycopg.connect(dsn, autocommit=True) as db:
        for name in (log_schema, schema):
            db.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
    signer, verifier = generate_key("bench.fieldprint/log")
    log = open_log(dsn, signer, schema=log_schema, batch_wait_ms=0, checkpoint_interval_s=None)
    store, vectors = PostgresStateStore(dsn, schema), PgVectorStore(dsn, schema=schema)
    gate = PromotionGate(store, log, GateConfig(log_keys=[verifier], override_keys=[]))
    try:
        timings = time_commit_path(store, log, vectors, gate, n_single, n_batched, batch)
    finally:
        log.close()
        store.close()
        vectors.close()
        with psycopg.connect(dsn, autocommit=True) as db:
            for name in (log_schema, schema):
                db.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
    return {**timings, "ledger_durability": "full (synchronous_commit on)"}


def bench_minilm(n_texts: int) -> dict:
    """Sentences per second through the offline MiniLM-L6 embedder (after a warm-up batch)."""
    from fieldprint.memory.embed import MiniLMEmbedder

    texts = [f"Memory note {i}: the agent observed that item {i % 97} moved to shelf {i % 13} at step {i}." for i in range(n_texts)]
    emb = MiniLMEmbedder()
    t0 = time.perf_counter()
    emb.embed(texts[:8])
    load_s = time.perf_counter() - t0
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        out = emb.embed(texts)
        runs.append(time.perf_counter() - t0)
    assert out.shape == (n_texts, DIM)
    med = statistics.median(runs)
    return {"texts": n_texts, "batch_size": emb.batch_size, "load_and_first_batch_s": load_s,
            "median_s": med, "texts_per_s": n_texts / med}


def bench_commit_path(n_single: int, n_batched: int, batch: int, root: str) -> dict:
    """Pacemaker.add one at a time and add_many in batches (state store + ledger + LanceDB), then explain and anchor search."""
    from fieldprint.ledger.log import TransparencyLog
    from fieldprint.ledger.note import generate_key
    from fieldprint.memory.policy import GateConfig, PromotionGate
    from fieldprint.memory.store import SQLiteStateStore

    signer, verifier = generate_key("bench.fieldprint/log")
    log = TransparencyLog.open(os.path.join(root, "log.db"), signer, batch_wait_ms=0, checkpoint_interval_s=None)
    store = SQLiteStateStore(os.path.join(root, "states.db"))
    vectors = LanceVectorStore(os.path.join(root, "commit-vectors"))
    gate = PromotionGate(store, log, GateConfig(log_keys=[verifier], override_keys=[]))
    try:
        timings = time_commit_path(store, log, vectors, gate, n_single, n_batched, batch)
    finally:
        log.close()
        store.close()
    return {**timings, "ledger_durability": "full (fsync per ledger batch)"}


def time_commit_path(store, log, vectors, gate, n_single: int, n_batched: int, batch: int) -> dict:
    """Pacemaker.add one at a time, add_many in batches, then explain every state and search anchors."""
    from fieldprint.memory.embed import HashingEmbedderForTests
    from fieldprint.memory.pacemaker import Pacemaker, StateSpec

    # The test-only embedder keeps the embedder out of these numbers (MiniLM is measured on its own).
    pm = Pacemaker(store, log, vectors, HashingEmbedderForTests(), gate)
    t0 = time.perf_counter()
    ids = [pm.add("user_input", session="bench", creator="bench", text=f"note {i}", sources=["user:bench"]).state_id
           for i in range(n_single)]
    single_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for lo in range(0, n_batched, batch):
        specs = [StateSpec("observation", "bench", "bench", text=f"observed item {i} on shelf {i % 13}",
                           taint=["web:bench"] if i % 2 else (), sources=["sensor:bench"]) for i in range(lo, lo + batch)]
        ids += [s.state_id for s in pm.add_many(specs)]
    batched_s = time.perf_counter() - t0
    log.checkpoint()  # the gate only reads checkpoints; sign one covering every state
    cp = gate.checkpoint()
    t0 = time.perf_counter()
    anchors = sum(gate.explain(sid, checkpoint=cp).anchor for sid in ids)
    explain_s = time.perf_counter() - t0
    assert anchors == n_single + n_batched // 2
    search_t, hits = timed(lambda i: pm.search(f"observed item {i * 37} on shelf", K, session="bench", anchors_only=True), 20)
    assert all(len(h) == K and all(not r.state.label.tainted for r in h) for h in hits)
    return {"single_adds": n_single, "single_adds_per_s": n_single / single_s, "compact_every": pm.compact_every,
            "batched_adds": n_batched, "batch": batch, "batched_adds_per_s": n_batched / batched_s,
            "batched_over_single": (n_batched / batched_s) / (n_single / single_s),
            "explain_per_s": len(ids) / explain_s, "anchor_search_k10_ms": 1e3 * statistics.median(search_t),
            "states": len(ids)}


def print_side_by_side(lance: list[dict], pg: list[dict]) -> None:
    """LanceDB and pgvector on the same rows and queries, one line per backend and size."""
    print(f"{'backend':>9} {'rows':>8} {'insert/s':>9} {'online/s':>9} {'index s':>8} {'exact ms':>9} "
          f"{'ann ms':>7} {'recall@10':>9} {'sess ann ms':>11} {'sess recall':>11}")
    for r in lance:
        print(f"{'lancedb':>9} {r['n']:>8} {r['insert_rows_per_s']:>9.0f} {'':>9} {r.get('index_build_s', float('nan')):>8.1f} "
              f"{r['exact_ms']:>9.1f} {r.get('ann_ms', float('nan')):>7.2f} {r.get('ann_recall_at_10_random', float('nan')):>9.2f} "
              f"{'':>11} {'':>11}")
        if "ann_tuned" in r:
            t = r["ann_tuned"]
            print(f"{'  tuned':>9} {'':>8} {'':>9} {'':>9} {'':>8} {'':>9} {t['ms']:>7.2f} {t['recall_at_10_random']:>9.2f}")
    for r in pg:
        first = [f"{r['n']}", f"{r['bulk_insert_rows_per_s']:.0f}", f"{r['online_insert_rows_per_s']:.0f}",
                 f"{r['index_build_s']:.1f}", f"{r['exact_ms']:.1f}"]
        for h in r["hnsw"]:
            n, bulk, online, build, exact = first
            print(f"{'pgvector':>9} {n:>8} {bulk:>9} {online:>9} {build:>8} {exact:>9} {h['ms']:>7.2f} "
                  f"{h['recall_at_10_random']:>9.2f} {h['session_filter_ms']:>11.2f} "
                  f"{h['session_filter_recall_at_10']:>11.2f}  (ef_search {h['ef_search']})")
            first = [""] * 5
        print(f"{'':>9} rollback of {r['online_rows']} online rows at {r['n']} rows: {r['rollback_of_online_rows_ms']:.0f} ms")


def main() -> None:
    """Run the benchmark, print a table, write benchmarks/results/memory_bench.json."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--no-index", action="store_true", help="skip the IVF-PQ index")
    ap.add_argument("--postgres", default=os.environ.get("FIELDPRINT_POSTGRES_DSN"),
                    help="PostgreSQL with pgvector for the side by side (default: $FIELDPRINT_POSTGRES_DSN)")
    ap.add_argument("--pg-sizes", type=int, nargs="+", default=[100_000])
    ap.add_argument("--only-postgres", action="store_true",
                    help="only the side by side: LanceDB and pgvector at --pg-sizes, and the commit path on PostgreSQL")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/memory_bench.json "
                                                "(memory_bench_postgres.json with --only-postgres)")
    args = ap.parse_args()
    if args.only_postgres and not args.postgres:
        ap.error("--only-postgres needs --postgres DSN or FIELDPRINT_POSTGRES_DSN")
    name = "memory_bench_postgres.json" if args.only_postgres else "memory_bench.json"
    out = args.out or os.path.join(os.path.dirname(__file__), "results", name)
    started = time.time()
    load_before = os.getloadavg()
    root = tempfile.mkdtemp(prefix="memory-bench-")
    minilm = commit = commit_pg = None
    stores, pg_stores = [], []
    try:
        if not args.only_postgres:
            minilm = bench_minilm(512)
            commit = bench_commit_path(300, 5000, 100, root)
        for n in (args.pg_sizes if args.only_postgres else args.sizes):
            # ~n/4000 partitions (LanceDB's guidance is a few thousand rows each); 24 sub-vectors of 16 dims.
            stores.append(bench_store(n, args.queries, partitions=max(16, n // 4000), sub_vectors=24,
                                      build_index=not args.no_index, root=root))
        if args.postgres:
            for n in args.pg_sizes:
                pg_stores.append(bench_pgvector(n, args.queries, args.postgres))
            commit_pg = bench_commit_path_postgres(300, 5000, 100, args.postgres)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    packages = ["lancedb", "pyarrow", "numpy"] + ([] if args.only_postgres else ["torch", "sentence-transformers"])
    packages += ["psycopg", "pgvector"] if args.postgres else []
    result = {
        "benchmark": "memory_bench",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "device": f"CPU: {cpu_name()} ({os.cpu_count()} logical cores)",
        "load_average_before_after": [load_before[0], os.getloadavg()[0]],
        "versions": {p: version(p) for p in packages},
        "python": platform.python_version(),
        "shapes": {"dim": DIM, "k": K, "insert_batch": INSERT_BATCH, "sessions": SESSIONS, "metric": "cosine"},
        "minilm": minilm,
        "commit_path": commit,
        "store": stores,
        "pgvector": pg_stores,
        "commit_path_postgres": commit_pg,
        "total_s": time.time() - started,
    }
    if args.postgres:
        import psycopg

        with psycopg.connect(args.postgres) as db:
            result["versions"]["postgresql_server"] = db.execute("SHOW server_version").fetchone()[0]
            result["versions"]["pgvector_extension"] = db.execute(
                "SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()[0]
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"device: {result['device']}; load avg {load_before[0]:.1f}; total {result['total_s']:.0f} s")
    if minilm:
        print(f"MiniLM-L6 embedding: {minilm['texts_per_s']:.0f} texts/s (batch {minilm['batch_size']})")
    for what, c in (("commit path (SQLite, SQLite, LanceDB)", commit), ("commit path (all on PostgreSQL)", commit_pg)):
        if c:
            print(f"{what}: {c['single_adds_per_s']:.0f} states/s one by one, {c['batched_adds_per_s']:.0f} states/s in "
                  f"batches of {c['batch']}; explain(): {c['explain_per_s']:.0f}/s; anchor search k=10 over "
                  f"{c['states']} states: {c['anchor_search_k10_ms']:.1f} ms")
    if not args.only_postgres:
        print_lance_tables(stores)
    print_side_by_side([r for r in stores if r["n"] in args.pg_sizes], pg_stores)


def print_lance_tables(stores: list[dict]) -> None:
    """The LanceDB tables: exact, IVF-PQ, tuned, numpy floor, compaction."""
    print(f"{'rows':>9} {'insert/s':>10} {'exact ms':>9} {'exact+sess ms':>13} {'index s':>8} {'ann ms':>7} "
          f"{'exact/ann':>9} {'top1 near':>9} {'recall@10 rand':>14}")
    for r in stores:
        print(f"{r['n']:>9} {r['insert_rows_per_s']:>10.0f} {r['exact_ms']:>9.1f} {r['exact_session_filter_ms']:>13.1f} "
              f"{r.get('index_build_s', float('nan')):>8.1f} {r.get('ann_ms', float('nan')):>7.2f} "
              f"{r.get('exact_over_ann_latency', float('nan')):>9.1f} {r.get('ann_top1_near', float('nan')):>9.2f} "
              f"{r.get('ann_recall_at_10_random', float('nan')):>14.2f}")
    print(f"{'rows':>9} {'numpy exact ms':>14} {'lance/numpy':>11} {'tuned ann ms':>12} {'tuned recall@10':>15} "
          f"{'compact s':>9} {'sess ms before compact':>22}")
    for r in stores:
        t = r.get("ann_tuned", {})
        print(f"{r['n']:>9} {r['numpy_exact_in_memory_ms']:>14.1f} {r['lance_exact_over_numpy']:>11.1f} "
              f"{t.get('ms', float('nan')):>12.2f} {t.get('recall_at_10_random', float('nan')):>15.2f} "
              f"{r['compact_s']:>9.1f} {r['exact_session_filter_before_compact_ms']:>22.1f}")


if __name__ == "__main__":
    main()
