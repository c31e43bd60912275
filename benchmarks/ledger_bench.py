"""Ledger benchmark: durable appends/s (1, 8, 64 producers) and proof costs at 1M and 10M leaves.

Runs on the CPU (the goals are stated for the 2-core CI machine). Prints a table and writes
benchmarks/results/ledger_bench.json. Every append figure is durable: futures resolve after the
batch's SQLite COMMIT (synchronous=FULL unless the row says otherwise).

With a PostgreSQL server (FIELDPRINT_POSTGRES_DSN, or --postgres DSN) it also measures the shared
log there beside SQLite: durable appends/s with 1, 4 and 16 producer threads and with 4 producer
processes (the sequencer lease passing between them), and proof costs at 1M and 10M leaves. Those
commits are durable too (synchronous_commit = on; the server's fsync settings are recorded).

    python benchmarks/ledger_bench.py            # full run (~5-10 min, ~2 GB of temporary disk)
    python benchmarks/ledger_bench.py --quick    # small sizes, to check the script
    eval "$(.ci/postgres.sh)"; python benchmarks/ledger_bench.py --only-postgres   # the side by side only
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time

from fieldprint.canon import tag_digest
from fieldprint.ledger.entry import StateEntry
from fieldprint.ledger.log import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_BATCH_WAIT_MS,
    TransparencyLog,
    wait_all,
)
from fieldprint.ledger.merkle import leaf_hash, verify_consistency, verify_inclusion
from fieldprint.ledger.note import generate_key

GOALS = {"appends_per_s": 50_000, "proof_generation_ms": 1.0, "proof_verification_us": 50.0}
SIGNER, _ = generate_key("bench.fieldprint/log")


def state_entries(n: int, seed: int) -> list[bytes]:
    """Realistic leaf entries: canonical state records (about 330 bytes each)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        d = [tag_digest("blake3", rng.randbytes(32)) for _ in range(3)]
        out.append(StateEntry(d[0], "observation", d[1], d[2], (), ("web",), f"s-{seed}", 1_700_000_000_000_000_000 + i).encode())
    return out


def appends(tmp: str, producers: int, total: int, mode: str, durability: str, seed: int) -> float:
    """Durable appends/s into a fresh log; `pipelined` producers keep futures, `sync` ones wait each."""
    entries = state_entries(total, seed)
    share = total // producers
    path = os.path.join(tmp, f"app-{producers}-{mode}-{durability}-{seed}.sqlite")
    with TransparencyLog.open(path, SIGNER, durability=durability, checkpoint_interval_s=None) as log:
        barrier = threading.Barrier(producers + 1)

        def produce(k: int) -> None:
            mine = entries[k * share : (k + 1) * share]
            barrier.wait()
            if mode == "pipelined":
                wait_all([log.add(e) for e in mine])
            else:
                for e in mine:
                    log.add(e).result()

        threads = [threading.Thread(target=produce, args=(k,)) for k in range(producers)]
        for t in threads:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        dt = time.perf_counter() - t0
        assert log.size == share * producers
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    return share * producers / dt


def fsync_latency_ms(tmp: str) -> float:
    """Median latency of write+fsync of 4 KiB on this disk (the floor under one durable commit)."""
    path, times = os.path.join(tmp, "fsync.bin"), []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    for _ in range(50):
        t0 = time.perf_counter()
        os.pwrite(fd, os.urandom(4096), 0)
        os.fsync(fd)
        times.append(time.perf_counter() - t0)
    os.close(fd)
    return statistics.median(times) * 1e3


def grow(log: TransparencyLog, target: int) -> float:
    """Bulk path: extend the log to `target` leaves with small synthetic entries; returns leaves/s."""
    t0, start, chunk = time.perf_counter(), log.size, 1 << 20
    while log.size < target:
        n = min(chunk, target - log.size)
        log.extend([b"bench-entry-%012d" % i for i in range(log.size, log.size + n)])
    return (target - start) / (time.perf_counter() - t0)


def timed(fn, args_list: list) -> tuple[float, float, list]:
    """(median us, p99 us, results) of fn(*args) over args_list, each call timed on its own."""
    times, results = [], []
    for args in args_list:
        t0 = time.perf_counter_ns()
        results.append(fn(*args))
        times.append((time.perf_counter_ns() - t0) / 1e3)
    times.sort()
    return statistics.median(times), times[int(0.99 * (len(times) - 1))], results


def proofs(log: TransparencyLog, samples: int, seed: int) -> dict:
    """Inclusion and consistency proof generation and verification at the log's current size."""
    rng, n = random.Random(seed), log.size
    root = log.root_hash(n)
    idx = [(rng.randrange(n), n) for _ in range(samples)]
    inc_med, inc_p99, inc = timed(log.inclusion_proof, idx)
    hashes = [leaf_hash(log.entry(i)) for i, _ in idx]
    ver_med, ver_p99, _ = timed(verify_inclusion, [(h, i, n, p, root) for h, (i, _), p in zip(hashes, idx, inc)])
    sizes = [(rng.randrange(1, n), n) for _ in range(samples)]
    con_med, con_p99, con = timed(log.consistency_proof, sizes)
    roots = [log.root_hash(m) for m, _ in sizes]
    cver_med, cver_p99, _ = timed(verify_consistency, [(m, n, p, r, root) for (m, _), p, r in zip(sizes, con, roots)])
    return {
        "size": n,
        "samples": samples,
        "inclusion_generate_us": {"median": inc_med, "p99": inc_p99},
        "inclusion_verify_us": {"median": ver_med, "p99": ver_p99},
        "inclusion_proof_len_median": statistics.median(len(p) for p in inc),
        "consistency_generate_us": {"median": con_med, "p99": con_p99},
        "consistency_verify_us": {"median": cver_med, "p99": cver_p99},
        "consistency_proof_len_median": statistics.median(len(p) for p in con),
    }


PG_GOAL_APPENDS_PER_S = 20_000  # issue 12: the shared log on PostgreSQL, on the 2-core machine


def pg_appends(dsn: str, schema: str, producers: int, total: int, seed: int, processes: int = 1) -> float:
    """Durable appends/s into a fresh shared log: `producers` threads in each of `processes` processes."""
    entries = state_entries(total, seed)
    share = total // (producers * processes)
    if processes == 1:
        queue_: multiprocessing.SimpleQueue = multiprocessing.SimpleQueue()
        t0 = time.time()
        _pg_producer_process(dsn, schema, entries[: share * producers], producers, None, queue_)
        return share * producers / (queue_.get() - t0)
    ctx = multiprocessing.get_context("fork")  # forked before any connection is opened
    barrier, ends = ctx.Barrier(processes + 1), ctx.SimpleQueue()
    mine = [entries[p * producers * share : (p + 1) * producers * share] for p in range(processes)]
    children = [ctx.Process(target=_pg_producer_process, args=(dsn, schema, mine[p], producers, barrier, ends))
                for p in range(processes)]
    for c in children:
        c.start()
    barrier.wait()
    t0 = time.time()
    finished = [ends.get() for _ in children]
    for c in children:
        c.join()
        if c.exitcode != 0:
            raise RuntimeError(f"a producer process failed (exit {c.exitcode})")
    return share * producers * processes / (max(finished) - t0)


def _pg_producer_process(dsn: str, schema: str, entries: list[bytes], producers: int, barrier, ends) -> None:
    """Open the shared log, add `entries` from `producers` threads once all processes are ready; put the end time."""
    from fieldprint.ledger.storage.postgres import open_log

    share = len(entries) // producers
    with open_log(dsn, SIGNER, schema=schema, checkpoint_interval_s=None) as log:
        ready = threading.Barrier(producers + 1)

        def produce(k: int) -> None:
            ready.wait()
            wait_all([log.add(e) for e in entries[k * share : (k + 1) * share]])

        threads = [threading.Thread(target=produce, args=(k,)) for k in range(producers)]
        for t in threads:
            t.start()
        if barrier is not None:
            barrier.wait()
        ready.wait()
        for t in threads:
            t.join()
        ends.put(time.time())


def _drop_schema(dsn: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def postgres_side_by_side(dsn: str, tmp: str, scale: float, repeats: int, sizes: list[int], samples: int) -> dict:
    """The shared log on PostgreSQL beside SQLite: appends/s with 1/4/16 producers (+4 processes), proofs."""
    import psycopg

    from fieldprint.ledger.storage.postgres import open_log

    with psycopg.connect(dsn, autocommit=True) as conn:
        settings = {k: conn.execute(f"SHOW {k}").fetchone()[0] for k in
                    ("server_version", "fsync", "synchronous_commit", "wal_sync_method", "shared_buffers")}
    out = {"server": settings, "goal_appends_per_s": PG_GOAL_APPENDS_PER_S, "appends": [], "proofs": [], "bulk_build": []}
    total = int(40_000 * max(scale, 0.25))
    configs = [("sqlite", p, 1) for p in (1, 4, 16)] + [("postgres", p, 1) for p in (1, 4, 16)] + [("postgres", 1, 4)]
    runs: dict[tuple, list[float]] = {c: [] for c in configs}
    for seed in range(repeats):  # repeat-major, as above: outside load hits every configuration alike
        for backend, producers, processes in configs:
            n = total - total % (producers * processes)
            if backend == "sqlite":
                rate = appends(tmp, producers, n, "pipelined", "full", seed)
            else:
                schema = f"bench_{producers}_{processes}_{seed}"
                _drop_schema(dsn, schema)
                rate = pg_appends(dsn, schema, producers, n, seed, processes)
                _drop_schema(dsn, schema)
            runs[(backend, producers, processes)].append(rate)
    rows = []
    for (backend, producers, processes), r in runs.items():
        med = statistics.median(r)
        out["appends"].append({"backend": backend, "producers": producers, "processes": processes,
                               "appends_per_s_median": med, "runs": r})
        who = f"{processes} processes x {producers}" if processes > 1 else f"producers={producers}"
        goal = f"  ({med / PG_GOAL_APPENDS_PER_S:.2f}x the PostgreSQL goal)" if backend == "postgres" else ""
        rows.append(f"appends  {backend:8s} full pipelined {who:<22s} {med:>10,.0f} /s{goal}")
        print(rows[-1], flush=True)
    schema = "bench_proofs"
    _drop_schema(dsn, schema)
    try:
        with open_log(dsn, SIGNER, schema=schema, checkpoint_interval_s=None) as log:
            for target in sizes:
                rate = grow(log, target)
                out["bulk_build"].append({"to_size": target, "leaves_per_s": rate})
                print(f"postgres bulk build to {target:,} leaves: {rate:,.0f} leaves/s", flush=True)
                p = proofs(log, samples, seed=target)
                with psycopg.connect(dsn, autocommit=True) as conn:
                    p["schema_bytes"] = int(conn.execute(
                        "SELECT SUM(pg_total_relation_size(c.oid)) FROM pg_class c JOIN pg_namespace n "
                        "ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relkind = 'r'", (schema,)).fetchone()[0])
                out["proofs"].append(p)
                for proof in ("inclusion", "consistency"):
                    m, p99 = p[f"{proof}_generate_us"]["median"], p[f"{proof}_generate_us"]["p99"]
                    rows.append(f"postgres {proof:11s} generate n={target:<10,d} median {m:8.1f} us  p99 {p99:8.1f} us")
                    print(rows[-1], flush=True)
    finally:
        _drop_schema(dsn, schema)
    out["rows"] = rows
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "ledger_bench.json"))
    ap.add_argument("--postgres", default=os.environ.get("FIELDPRINT_POSTGRES_DSN"),
                    help="DSN of a PostgreSQL database for the shared-log rows (default: $FIELDPRINT_POSTGRES_DSN)")
    ap.add_argument("--pg-max-size", type=int, default=10_000_000, help="largest PostgreSQL log built for proofs")
    ap.add_argument("--only-postgres", action="store_true", help="run only the PostgreSQL/SQLite side by side; "
                    "merge it into the existing results file")
    args = ap.parse_args()
    scale = 0.05 if args.quick else 1.0
    sizes = [int(1_000_000 * scale), int(10_000_000 * scale)]
    tmp = tempfile.mkdtemp(prefix="ledger-bench-", dir=os.environ.get("LEDGER_BENCH_TMP"))
    result = {
        "benchmark": "ledger_bench",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": {"cpu": platform.processor() or _cpu_name(), "cores": os.cpu_count(), "machine": platform.machine()},
        "versions": {"python": platform.python_version(), "sqlite": sqlite3.sqlite_version},
        "config": {"batch_size": DEFAULT_BATCH_SIZE, "batch_wait_ms": DEFAULT_BATCH_WAIT_MS, "repeats": args.repeats},
        "goals": GOALS,
        "fsync_4k_ms_median": fsync_latency_ms(tmp),
        # The CI-class machine is shared: a load average above ~0.5 before the run means other
        # processes competed for the two cores and the figures are lower bounds.
        "load_average_1m_before": os.getloadavg()[0],
        "appends": [],
    }
    if args.postgres:
        pg_sizes = [n for n in sizes if n <= args.pg_max_size]
        result["postgres"] = postgres_side_by_side(args.postgres, tmp, scale, args.repeats, pg_sizes,
                                                   2000 if not args.quick else 200)
        if args.only_postgres:
            shutil.rmtree(tmp)
            if not args.quick:
                previous = {}
                if os.path.exists(args.out):
                    with open(args.out) as f:
                        previous = json.load(f)
                previous["postgres"] = {**result["postgres"], "date_utc": result["date_utc"],
                                        "load_average_1m_before": result["load_average_1m_before"],
                                        "load_average_1m_after": os.getloadavg()[0]}
                with open(args.out + ".tmp", "w") as f:  # a failure never leaves a half-written results file
                    json.dump(previous, f, indent=2)
                os.replace(args.out + ".tmp", args.out)
            print("\n" + "\n".join(result["postgres"]["rows"]))
            return
    elif args.only_postgres:
        ap.error("--only-postgres needs --postgres DSN or FIELDPRINT_POSTGRES_DSN")
    rows = []
    configs = [
        (durability, mode, producers)
        for durability in ("full", "normal")
        for mode in ("pipelined", "sync")
        for producers in (1, 8, 64)
        if not (durability == "normal" and mode == "sync")
    ]
    runs: dict[tuple, list[float]] = {c: [] for c in configs}
    # Repeat-major order: a burst of outside load on the shared machine hits every configuration,
    # not all repeats of one, so the side-by-side ratios stay fair.
    for seed in range(args.repeats):
        for durability, mode, producers in configs:
            total = int((40_000 if mode == "pipelined" else (1_000 if producers == 1 else 8_000)) * max(scale, 0.25))
            total -= total % producers
            runs[(durability, mode, producers)].append(appends(tmp, producers, total, mode, durability, seed))
    for (durability, mode, producers), r in runs.items():
        med = statistics.median(r)
        result["appends"].append(
            {"durability": durability, "mode": mode, "producers": producers,
             "appends_per_s_median": med, "runs": r, "ratio_to_goal": med / GOALS["appends_per_s"]}
        )
        extra = f"  ({med / GOALS['appends_per_s']:.2f}x goal)" if mode == "pipelined" else f"  ({producers / med * 1e3:.2f} ms per add)"
        rows.append(f"appends  {durability:6s} {mode:9s} producers={producers:<3d} {med:>10,.0f} /s{extra}")
        print(rows[-1], flush=True)
    full = {(e["mode"], e["producers"]): e["appends_per_s_median"] for e in result["appends"] if e["durability"] == "full"}
    for e in result["appends"]:
        if e["durability"] == "normal":
            e["ratio_normal_over_full"] = e["appends_per_s_median"] / full[(e["mode"], e["producers"])]
    path = os.path.join(tmp, "big.sqlite")
    result["proofs"], result["bulk_build"] = [], []
    with TransparencyLog.open(path, SIGNER, checkpoint_interval_s=None) as log:
        for target in sizes:
            rate = grow(log, target)
            result["bulk_build"].append({"to_size": target, "leaves_per_s": rate})
            print(f"bulk build to {target:,} leaves: {rate:,.0f} leaves/s", flush=True)
            p = proofs(log, 2000 if not args.quick else 200, seed=target)
            p["db_bytes"] = os.path.getsize(path)
            result["proofs"].append(p)
            for kind, goal_key in (("generate", "proof_generation_ms"), ("verify", "proof_verification_us")):
                for proof in ("inclusion", "consistency"):
                    m = p[f"{proof}_{kind}_us"]["median"]
                    goal = GOALS[goal_key] * (1000 if goal_key.endswith("_ms") else 1)
                    p99 = p[f"{proof}_{kind}_us"]["p99"]
                    rows.append(f"{proof:11s} {kind:8s} n={target:<10,d} median {m:8.1f} us  p99 {p99:8.1f} us  (goal <= {goal:.0f} us)")
                    print(rows[-1], flush=True)
    result["load_average_1m_after"] = os.getloadavg()[0]
    for f in os.listdir(tmp):
        os.remove(os.path.join(tmp, f))
    os.rmdir(tmp)
    if not args.quick:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print("\n" + "\n".join(rows + result.get("postgres", {}).get("rows", [])))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
