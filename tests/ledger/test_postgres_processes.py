"""One log on PostgreSQL shared by real OS processes: four writers adding entries and producing
receipts (inclusion bundles) for a bounded time while the sequencer of the moment is SIGKILLed again
and again (no acknowledged entry lost, every pair of checkpoints consistent, every receipt verifies
offline against the shared log, another process takes over within the lease time),
and a second sequencer meeting a live lease: it refuses, or waits and says for whom."""

import base64
import json
import logging
import random
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from pg import import_psycopg, pg_dsn  # noqa: F401  (pg_dsn: a module fixture, a fresh database)

from fieldprint.errors import LogError
from fieldprint.ledger.bundle import verify_bundle
from fieldprint.ledger.merkle import leaf_hash, verify_consistency, verify_inclusion
from fieldprint.ledger.note import generate_key
from fieldprint.ledger.storage.postgres import PostgresStorage, open_log, open_reader

psycopg = import_psycopg()

LEASE_S = 1.0
CHILD = textwrap.dedent("""
    import json, os, random, sys, threading
    from fieldprint.errors import LogError
    from fieldprint.ledger.bundle import inclusion_bundle
    from fieldprint.ledger.storage.postgres import open_log

    dsn, schema, key_file, results, tag, stop = sys.argv[1:7]
    lease_s = float(sys.argv[7])
    fd = os.open(results, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    receipts = os.open(results + ".receipts", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    log = open_log(dsn, open(key_file).read().strip(), schema=schema, lease_s=lease_s, lease_wait_s=60,
                   batch_size=64, batch_wait_ms=0.5, checkpoint_interval_s=0.1)

    def record(entry):
        def done(fut):  # one O_APPEND write per resolved future: a complete line is an acknowledged entry
            if fut.exception() is None:
                os.write(fd, b"%d %s\\n" % (fut.result(), entry.hex().encode()))
        return done

    def produce(k):
        rng, i = random.Random(f"{tag}-{k}"), 0
        while not os.path.exists(stop):
            entry = f"{tag}-{k}-{i}-".encode() + rng.randbytes(rng.randrange(0, 200))
            log.add(entry).add_done_callback(record(entry))
            i += 1
            if i % 50 == 0:
                log.flush()
                if k == 0:  # a receipt: an inclusion bundle of a fresh entry under a new checkpoint
                    try:
                        entry = f"{tag}-receipt-{i}".encode()
                        index = log.add(entry).result()
                        os.write(fd, b"%d %s\\n" % (index, entry.hex().encode()))
                        bundle = inclusion_bundle(log, index, log.checkpoint())
                        os.write(receipts, json.dumps(bundle).encode() + b"\\n")
                    except LogError:
                        pass

    threads = [threading.Thread(target=produce, args=(k,), daemon=True) for k in range(4)]
    [t.start() for t in threads]
    print("ready", flush=True)
    [t.join() for t in threads]
    log.close()
""")


class Writers:
    """The writer processes of one test, their result files, and the reading side."""

    def __init__(self, dsn, schema, tmp_path):
        self.dsn, self.schema, self.tmp = dsn, schema, tmp_path
        self.signer, self.verifier = generate_key("test.fieldprint/shared")
        self.key_file = tmp_path / "signer.key"
        self.key_file.write_text(self.signer)
        self.stop = tmp_path / "stop"
        self.results: list[str] = []
        self.storage = PostgresStorage(dsn, schema=schema, readonly=False)  # creates the schema; reads the lease

    def start(self, tag):
        results = str(self.tmp / f"acked-{tag}")
        self.results.append(results)
        child = subprocess.Popen([sys.executable, "-c", CHILD, self.dsn, self.schema, str(self.key_file), results, tag,
                                  str(self.stop), str(LEASE_S)], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        return child

    def holder_pid(self):
        holder, _ = self.storage.lease()
        found = re.search(r" pid (\d+) ", holder or "")
        return int(found.group(1)) if found else None

    def acknowledged(self):
        acked = {}
        for path in self.results:
            with open(path, "rb") as f:
                # Only whole lines: a kill can cut a write() between pages, leaving the last line without
                # its newline and its hex cut short; such a line is not an acknowledgement.
                for line in f.read().split(b"\n")[:-1]:
                    parts = line.split(b" ")
                    if len(parts) == 2 and parts[1]:
                        index, entry = int(parts[0]), bytes.fromhex(parts[1].decode())
                        assert index not in acked, f"index {index} acknowledged twice"
                        acked[index] = entry
        return acked

    def check_log(self, acked):
        """Every acknowledged entry is where it was acknowledged; checkpoints are consistent; receipts verify."""
        with open_reader(self.dsn, self.verifier, schema=self.schema) as reader:
            report = reader.audit()
            assert report.ok, report.problems[:5]
            n = report.size
            stored = {i: data for i, data, _ in reader._storage.leaves(0, n)}
            lost = [i for i, e in acked.items() if stored.get(i) != e]
            assert not lost, f"{len(lost)} acknowledged entries are not in the log, e.g. index {lost[0]}"
            cps = reader.checkpoints()
            assert len(cps) >= 5
            latest = cps[-1]
            for a, b in zip(cps, cps[1:]):  # consecutive pairs, and (below) each one against the latest
                verify_consistency(a.size, b.size, reader.consistency_proof(a.size, b.size), a.root_hash, b.root_hash)
            for a in cps:
                verify_consistency(a.size, latest.size, reader.consistency_proof(a.size, latest.size), a.root_hash,
                                   latest.root_hash)
            for i in random.Random(7).sample(sorted(i for i in acked if i < latest.size), 200):
                verify_inclusion(leaf_hash(acked[i]), i, latest.size, reader.inclusion_proof(i, latest.size),
                                 latest.root_hash)
            receipts = self.receipts()
            assert len(receipts) >= 10, f"only {len(receipts)} receipts were produced"
            for bundle in receipts:  # verified offline, and their checkpoints are prefixes of the final tree
                cp = verify_bundle(bundle, self.verifier)
                assert acked[bundle["index"]] == base64.b64decode(bundle["entry"])
                verify_consistency(cp.size, n, reader.consistency_proof(cp.size, n), cp.root_hash, reader.root_hash(n))
            return n

    def receipts(self):
        found = []
        for path in self.results:
            with open(path + ".receipts", "rb") as f:
                found += [json.loads(line) for line in f.read().split(b"\n") if line.endswith(b"}")]
        return found

    def finish(self, children):
        self.stop.write_text("")
        for child in children:
            try:
                assert child.wait(timeout=60) == 0
            finally:
                child.kill()
        self.storage.close()


@pytest.mark.slow
def test_four_processes_and_sigkilled_sequencers_lose_no_acknowledged_entry(pg_dsn, tmp_path):  # noqa: F811
    w = Writers(pg_dsn, "shared_kill", tmp_path)
    slots = [w.start(f"s{k}g0") for k in range(4)]
    kills, takeovers, rng = 0, [], random.Random(1)
    deadline = time.monotonic() + 60
    try:
        while kills < 12 and time.monotonic() < deadline:
            time.sleep(rng.uniform(0.3, 0.7))
            # The sequencer of the moment: kill it mid-batch. Between batches nobody may hold the
            # lease (or a killed process's lease still stands), so wait up to 2 s for a live holder;
            # on a loaded machine a single look found one too rarely to test takeovers.
            looked_until, pid = time.monotonic() + 2.0, None
            while not any(c.pid == pid for c in slots) and time.monotonic() < looked_until:
                pid = w.holder_pid()
                time.sleep(0.005)
            slot = next((k for k, c in enumerate(slots) if c.pid == pid), rng.randrange(4))
            before = w.storage.size()
            slots[slot].send_signal(signal.SIGKILL)
            slots[slot].wait(timeout=30)
            killed_at, kills = time.monotonic(), kills + 1
            if pid == slots[slot].pid:
                while w.storage.size() == before and time.monotonic() - killed_at < 30:
                    time.sleep(0.01)
                takeovers.append(time.monotonic() - killed_at)
            slots[slot] = w.start(f"s{slot}g{kills}")
        time.sleep(1.0)
    finally:
        w.finish(slots)
    acked = w.acknowledged()
    size = w.check_log(acked)
    assert kills >= 10, f"only {kills} kills in the time given"
    assert len(takeovers) >= 5, f"the lease holder was killed only {len(takeovers)} times"
    assert max(takeovers) < LEASE_S + 2.0, f"another process took over only after {max(takeovers):.2f} s"
    assert len(acked) > 1000 and size >= len(acked)


@pytest.mark.slow
def test_second_sequencer_refuses_or_waits_and_names_the_holder(pg_dsn, tmp_path, caplog):  # noqa: F811
    w = Writers(pg_dsn, "shared_second", tmp_path)
    first = w.start("first")
    try:
        deadline = time.monotonic() + 30
        while True:  # stop the first process while it holds the lease (a hung sequencer)
            assert time.monotonic() < deadline, "the first process never held the lease"
            first.send_signal(signal.SIGSTOP)
            if w.holder_pid() == first.pid and w.storage.lease()[1] > 0.3:
                break
            first.send_signal(signal.SIGCONT)
            time.sleep(0.005)
        stopped_at = time.monotonic()
        with open_log(pg_dsn, w.signer, schema=w.schema, lease_s=LEASE_S, lease_wait_s=0, checkpoint_interval_s=None) as refuser:
            with pytest.raises(LogError, match=rf"another sequencer holds the lease .*pid {first.pid} .*refuses to "
                                               rf"sequence this batch, nothing was written"):
                refuser.add(b"refused").result(timeout=30)
        with caplog.at_level(logging.WARNING, logger="fieldprint.ledger.postgres"), \
                open_log(pg_dsn, w.signer, schema=w.schema, lease_s=LEASE_S, lease_wait_s=30, checkpoint_interval_s=None) as waiter:
            index = waiter.add(b"waited").result(timeout=60)
            waited = time.monotonic() - stopped_at
        messages = [r.getMessage() for r in caplog.records]
        assert any(re.search(rf"waiting for the sequencer lease held by .*pid {first.pid} ", m) for m in messages), messages
        assert any(re.search(rf"took over the sequencer lease from .*pid {first.pid} ", m) for m in messages), messages
        assert waited < LEASE_S + 2.0, f"took over only after {waited:.2f} s"
        first.send_signal(signal.SIGCONT)  # the hung sequencer resumes: its next turn starts from the new head
        time.sleep(1.5)
    finally:
        first.send_signal(signal.SIGCONT)
        w.finish([first])
    acked = w.acknowledged()
    acked[index] = b"waited"
    w.check_log(acked)
    with open_reader(pg_dsn, w.verifier, schema=w.schema) as reader:
        assert b"refused" not in {data for _, data, _ in reader._storage.leaves(0, reader.size)}
        assert max(acked) > index, "the first process made no progress after it resumed"
