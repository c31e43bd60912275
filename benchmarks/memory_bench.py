"""Memory benchmark on the embedded store: insert rate and top-k latency at 100k and 1M states.

Vectors for the store measurements are precomputed random 384-d unit vectors (the MiniLM output
dimension), so the store is measured, not the embedder; MiniLM embedding throughput and the full
commit path (state store + ledger + vector store per state) are measured separately. Brute force
(exact) and an IVF-PQ index run side by side on the same table; recall is measured against exact.

    python benchmarks/memory_bench.py                 # 100k and 1M (about 10-15 minutes on 2 cores)
    python benchmarks/memory_bench.py --sizes 20000   # a quick run
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

    rng = np.random.default_rng(1)
    # Near-duplicate queries (a stored vector plus noise, cosine ~0.9 to it): the nearest row is known.
    picks = rng.choice(n, size=queries, replace=False)
    noise = rng.standard_normal((queries, DIM), dtype=np.float32)
    near = vectors[picks] + 0.5 * noise / np.linalg.norm(noise, axis=1, keepdims=True)
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    # Random queries: no structure to exploit, the hard case for any ANN index.
    rand = unit_vectors(queries, seed=7)

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
    from fieldprint.memory.embed import HashingEmbedderForTests
    from fieldprint.memory.pacemaker import Pacemaker, StateSpec
    from fieldprint.memory.policy import GateConfig, PromotionGate
    from fieldprint.memory.store import SQLiteStateStore

    signer, verifier = generate_key("bench.fieldprint/log")
    log = TransparencyLog.open(os.path.join(root, "log.db"), signer, batch_wait_ms=0, checkpoint_interval_s=None)
    store = SQLiteStateStore(os.path.join(root, "states.db"))
    vectors = LanceVectorStore(os.path.join(root, "commit-vectors"))
    gate = PromotionGate(store, log, GateConfig(log_keys=[verifier], override_keys=[]))
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
    log.close()
    store.close()
    return {"single_adds": n_single, "single_adds_per_s": n_single / single_s, "compact_every": pm.compact_every,
            "batched_adds": n_batched, "batch": batch, "batched_adds_per_s": n_batched / batched_s,
            "batched_over_single": (n_batched / batched_s) / (n_single / single_s),
            "explain_per_s": len(ids) / explain_s, "anchor_search_k10_ms": 1e3 * statistics.median(search_t),
            "states": len(ids), "ledger_durability": "full (fsync per ledger batch)"}


def main() -> None:
    """Run the benchmark, print a table, write benchmarks/results/memory_bench.json."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--no-index", action="store_true", help="skip the IVF-PQ index")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "memory_bench.json"))
    args = ap.parse_args()
    started = time.time()
    load_before = os.getloadavg()
    root = tempfile.mkdtemp(prefix="memory-bench-")
    try:
        minilm = bench_minilm(512)
        commit = bench_commit_path(300, 5000, 100, root)
        stores = []
        for n in args.sizes:
            # ~n/4000 partitions (LanceDB's guidance is a few thousand rows each); 24 sub-vectors of 16 dims.
            stores.append(bench_store(n, args.queries, partitions=max(16, n // 4000), sub_vectors=24,
                                      build_index=not args.no_index, root=root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "benchmark": "memory_bench",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "device": f"CPU: {cpu_name()} ({os.cpu_count()} logical cores)",
        "load_average_before_after": [load_before[0], os.getloadavg()[0]],
        "versions": {p: version(p) for p in ("lancedb", "pyarrow", "numpy", "torch", "sentence-transformers")},
        "python": platform.python_version(),
        "shapes": {"dim": DIM, "k": K, "insert_batch": INSERT_BATCH, "sessions": SESSIONS, "metric": "cosine"},
        "minilm": minilm,
        "commit_path": commit,
        "store": stores,
        "total_s": time.time() - started,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"device: {result['device']}; load avg {load_before[0]:.1f}; total {result['total_s']:.0f} s")
    print(f"MiniLM-L6 embedding: {minilm['texts_per_s']:.0f} texts/s (batch {minilm['batch_size']})")
    print(f"commit path (store+ledger+vectors): {commit['single_adds_per_s']:.0f} states/s one by one, "
          f"{commit['batched_adds_per_s']:.0f} states/s in batches of {commit['batch']} "
          f"({commit['batched_over_single']:.1f}x); explain(): {commit['explain_per_s']:.0f}/s; "
          f"anchor search k=10 over {commit['states']} states: {commit['anchor_search_k10_ms']:.1f} ms")
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
