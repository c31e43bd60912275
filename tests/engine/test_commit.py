"""The asynchronous committer against the real transparency log (CPU path: background thread only)."""

import os
import re
import signal
import threading
import time

import pytest
import torch

from fieldprint.dqp import DQPProfile, quantize, stack_digest
from fieldprint.engine.commit import Committer
from fieldprint.engine.digest_pool import DigestPool, plan_digests
from fieldprint.errors import CommitError, DQPError
from fieldprint.ledger.entry import StateEntry
from fieldprint.ledger.log import TransparencyLog
from fieldprint.ledger.merkle import leaf_hash, verify_inclusion
from fieldprint.ledger.note import Checkpoint, generate_key

L, H, D, T = 3, 2, 16, 21


@pytest.fixture
def profile():
    g = torch.Generator().manual_seed(0)
    sample = {(l, k): torch.randn(40, H, D, generator=g) for l in range(L) for k in "KV"}
    return DQPProfile.calibrate([sample], name="commit-test", num_layers=L, num_kv_heads=H, head_dim=D, block_size=8)


@pytest.fixture
def log(tmp_path):
    signer, verifier = generate_key("test.example/fieldprint-log")
    lg = TransparencyLog.open(tmp_path / "log.sqlite", signer, batch_size=8, batch_wait_ms=1)
    lg.verifier = verifier
    yield lg
    lg.close()  # idempotent: a test may have closed it already; any other error fails the test


@pytest.fixture
def committers(log):
    """Make Committers that are closed even when the test fails: no digest processes or segments outlive it."""
    made = []

    def make(*args, **kwargs) -> Committer:
        made.append(Committer(*args, **kwargs))
        return made[-1]

    yield make
    errors = []
    for c in made:  # close() stops the thread and the digest workers even when its flush raises
        try:
            c.close()
        except CommitError as e:
            errors.append(e)
    if errors:
        raise errors[0]


def _stack(seed: int, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, T, H, D, generator=g).to(dtype), torch.randn(L, T, H, D, generator=g).to(dtype)


def test_commit_logs_a_state_entry_with_reference_digests(profile, log):
    k, v = _stack(1)
    with Committer(log, profile) as c:
        ticket = c.submit_stack(k, v, session="s-1", state_type="observation", taint=("web",))
        (receipt,) = c.flush()
    assert ticket.future.result() is receipt
    refs = {(l, kind): quantize((k if kind == "K" else v)[l], profile, l, kind) for l in range(L) for kind in "KV"}
    for key, ref in refs.items():
        assert receipt.states[key] == ref.digest()
        assert receipt.blocks[key] == ref.blocks and len(ref.blocks) == 3  # 21 tokens in blocks of 8
    assert receipt.digest == stack_digest([(l, kind, d) for (l, kind), d in receipt.states.items()])
    entry = StateEntry.decode(log.entry(receipt.index))
    assert log.entry(receipt.index) == receipt.entry
    assert entry.digest == receipt.digest and entry.profile == profile.digest and entry.taint == ("web",)
    cp = Checkpoint.open(log.checkpoint().note, [log.verifier], origin="test.example/fieldprint-log")
    verify_inclusion(leaf_hash(receipt.entry), receipt.index, cp.size, log.inclusion_proof(receipt.index, cp.size), cp.root_hash)


def test_dict_and_stacked_submits_commit_the_same_digest(profile, log):
    k, v = _stack(2, torch.float16)
    with Committer(log, profile) as c:
        a = c.submit_stack(k, v, session="a")
        b = c.submit({(l, kind): (k if kind == "K" else v)[l] for l in range(L) for kind in "KV"}, session="b")
        c.flush()
    assert a.future.result().digest == b.future.result().digest
    assert a.future.result().index != b.future.result().index


@pytest.mark.parametrize("v_granularity", ["head", "token"])
def test_strided_inputs_commit_like_contiguous_ones(log, v_granularity):
    g = torch.Generator().manual_seed(0)
    sample = {(l, k): torch.randn(40, H, D, generator=g) for l in range(L) for k in "KV"}
    profile = DQPProfile.calibrate([sample], name="strided", num_layers=L, num_kv_heads=H, head_dim=D, block_size=8,
                                   v_granularity=v_granularity)
    cache = torch.randn(L, H, T + 5, D).to(torch.bfloat16)  # a [L, H, T, D] cache; commit a [L, T, H, D] view
    view = cache[:, :, 2 : T + 2].transpose(1, 2)
    with Committer(log, profile) as c:
        x = c.submit_stack(view, view, session="view")
        y = c.submit_stack(view.contiguous(), view.contiguous(), session="copy")
        c.flush()
    assert x.future.result().digest == y.future.result().digest


def test_nan_fails_only_that_commit_and_flush_reports_it(profile, log, committers):
    k, v = _stack(3)
    bad_v = v.clone()
    bad_v[2, 5, 1, 7] = float("nan")
    c = committers(log, profile, max_pending=2)
    good1 = c.submit_stack(k, v, session="good-1")
    bad = c.submit_stack(k, bad_v, session="bad")
    good2 = c.submit_stack(v, k, session="good-2")
    with pytest.raises(CommitError, match=r"session 'bad'.*NaN") as info:
        c.flush()
    assert isinstance(info.value.__cause__, DQPError)
    assert sorted(r.session for r in info.value.receipts) == ["good-1", "good-2"]
    with pytest.raises(CommitError):
        bad.future.result()
    assert log.size == 2 and good1.future.result().index != good2.future.result().index
    assert c.flush() == []  # failures are reported once
    c.close()


def test_log_failure_surfaces_on_flush(profile, log, committers):
    k, v = _stack(4)
    c = committers(log, profile)
    log.close()
    c.submit_stack(k, v, session="after-close")
    with pytest.raises(CommitError, match="after-close"):
        c.flush()
    c.close()


@pytest.mark.parametrize("limit", [{"max_pending": 1}, {"max_pending": None, "max_pending_bytes": 2 * L * T * H * (D + 1)}],
                         ids=["one queued commit", "one commit's bytes"])
def test_back_pressure_loses_nothing_under_concurrent_submitters(profile, log, committers, limit):
    k, v = _stack(5)
    c = committers(log, profile, **limit)  # every submit beyond one queued (or committing) commit blocks
    errors = []

    def worker(i: int) -> None:
        try:
            for j in range(4):
                c.submit_stack(k, v, session=f"t{i}-{j}")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    receipts = c.flush()
    c.close()
    assert not errors
    assert [r.index for r in receipts] == list(range(12)) and log.size == 12
    assert len({r.session for r in receipts}) == 12


def test_wait_quantized_and_bad_submits(profile, log):
    k, v = _stack(6)
    with Committer(log, profile) as c:
        ticket = c.submit_stack(k, v, session="w")
        ticket.wait_quantized()  # the CPU path has read the inputs once this returns
        k.zero_()  # so overwriting them now cannot change what is committed
        with pytest.raises(CommitError, match="shape"):
            c.submit_stack(k[:, :, :1], v, session="x")
        with pytest.raises(CommitError, match="tensor"):
            c.submit({(0, "K"): torch.randn(T, H, D + 1)}, session="x")
        with pytest.raises(DQPError, match="outside"):
            c.submit({(L, "K"): torch.randn(T, H, D)}, session="x")
        with pytest.raises(CommitError, match="at least one"):
            c.submit({}, session="x")
        (receipt,) = c.flush()
    k2, _ = _stack(6)
    assert receipt.states[(0, "K")] == quantize(k2[0], profile, 0, "K").digest()
    with pytest.raises(CommitError, match="closed"):
        c.submit_stack(k, v, session="late")


def test_lean_mode_skips_block_digests_but_not_the_digest(profile, log):
    k, v = _stack(7)
    with Committer(log, profile, block_digests=False, digest_threads=2) as c:
        c.submit_stack(k, v, session="lean")
        (receipt,) = c.flush()
    assert receipt.blocks[(1, "K")] == []
    assert receipt.states[(1, "K")] == quantize(k[1], profile, 1, "K").digest()


@pytest.mark.slow
def test_digest_process_gives_the_same_receipts_and_reports_nan(profile, log, committers):
    k, v = _stack(8)
    bad_k = k.clone()
    bad_k[1, 0, 0, 0] = float("inf")
    with Committer(log, profile, digest_process=False) as here:
        here.submit_stack(k, v, session="thread")
        (ref,) = here.flush()
    c = committers(log, profile, digest_process=True, max_pending=2)
    for i in range(3):  # the shared-memory segment is reused between commits
        c.submit_stack(k, v, session=f"proc-{i}")
    c.submit_stack(bad_k, v, session="proc-bad")
    with pytest.raises(CommitError, match="proc-bad") as info:
        c.flush()
    c.close()
    got = info.value.receipts
    assert len(got) == 3 and all(r.states == ref.states and r.blocks == ref.blocks and r.digest == ref.digest for r in got)


@pytest.mark.parametrize("workers", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("sizes", [[4096] * 6, [4096], [1000, 5000, 64, 0, 333], [256] * 40])
def test_digest_plan_covers_each_digest_once_and_shares_the_bytes(sizes, workers):
    strides = [256] * len(sizes)
    for blocks in (True, False):
        plan = plan_digests(sizes, strides, workers, blocks)
        assert len(plan) == workers
        wholes = sorted(i for tasks in plan for i, whole, _, _ in tasks if whole)
        assert wholes == list(range(len(sizes)))
        for i, n in enumerate(sizes):  # block ranges of a state, in worker order, tile its blocks
            ranges = [(b0, b1) for tasks in plan for j, _, b0, b1 in tasks if j == i and b1 > b0]
            edges = [0] + [b for r in ranges for b in r] + [-(-n // 256) if blocks else 0]
            assert edges[0::2] == edges[1::2]
        loads = [sum(sizes[i] * whole + 256 * (b1 - b0) for i, whole, b0, b1 in tasks) for tasks in plan]
        work = sum(sizes) * (2 if blocks else 1)
        assert max(loads) <= work / workers + max(sizes) + 256  # even, up to one whole state and a block
        if len(set(sizes)) == 1 and len(sizes) % workers == 0:
            assert len(set(loads)) == 1  # the benchmark's case: K/V of all layers, equal shares


@pytest.mark.slow
def test_digest_workers_give_the_reference_digests_for_any_split(profile, log, committers):
    k, v = _stack(9)
    g = torch.Generator().manual_seed(10)
    one = torch.randn(5 * 8 + 3, H, D, generator=g).to(torch.bfloat16)  # 6 blocks, the last partial
    c = committers(log, profile, digest_process=True, digest_workers=3)
    c.submit_stack(k, v, session="stack")  # 6 states for 3 workers: whole states and their blocks
    c.submit({(l, kind): (k if kind == "K" else v)[l] for l in range(L) for kind in "KV"}, session="dict")
    c.submit({(2, "V"): one}, session="one")  # fewer states than workers: one state's blocks are split
    receipts = c.flush()
    c.close()
    assert c.shm_fallbacks == 0  # every commit went through the workers
    refs = {(l, kind): quantize((k if kind == "K" else v)[l], profile, l, kind) for l in range(L) for kind in "KV"}
    ref_one = quantize(one, profile, 2, "V")
    for r in receipts[:2]:
        assert r.states == {key: ref.digest() for key, ref in refs.items()}
        assert r.blocks == {key: ref.blocks for key, ref in refs.items()}
    assert receipts[2].states == {(2, "V"): ref_one.digest()} and receipts[2].blocks == {(2, "V"): ref_one.blocks}
    assert len(ref_one.blocks) == 6 and len(set(ref_one.blocks)) == 6


@pytest.mark.slow
def test_a_dead_digest_worker_fails_the_commit_and_the_next_one_starts_afresh(profile, log, committers):
    k, v = _stack(11)
    c = committers(log, profile, digest_process=True, digest_workers=2)
    c.submit_stack(k, v, session="first")
    (first,) = c.flush()
    worker = c._proc._procs[1]
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(timeout=10)
    c.submit_stack(k, v, session="lost")
    with pytest.raises(CommitError, match=r"session 'lost'.*digest worker.*worker 1") as info:
        c.flush()
    assert info.value.receipts == [] and log.size == 1
    c.submit_stack(k, v, session="again")
    (again,) = c.flush()
    c.close()
    assert again.states == first.states and again.blocks == first.blocks and again.index == 1
    with pytest.raises(CommitError, match="digest_workers"):
        Committer(log, profile, digest_workers=0)


@pytest.mark.slow
def test_a_stuck_digest_worker_times_out_flush_and_the_next_commit_starts_afresh(profile, log, committers):
    k, v = _stack(12)
    c = committers(log, profile, digest_process=True, digest_workers=2, digest_timeout=2.0)
    c.submit_stack(k, v, session="first")
    (first,) = c.flush()
    stuck = c._proc._procs[1]
    os.kill(stuck.pid, signal.SIGSTOP)  # alive but never answers: its pipe stays open
    try:
        c.submit_stack(k, v, session="stuck")
        start = time.monotonic()
        with pytest.raises(CommitError, match="timed out after 0.3s"):
            c.flush(timeout=0.3)  # bounds the wait for the queue too, not only for the log
        assert time.monotonic() - start < 1.5
        c.submit_stack(k, v, session="again")
        with pytest.raises(CommitError, match=r"session 'stuck'.*worker 1 .*did not answer") as info:
            c.flush(timeout=30)  # the stuck commit fails at its digest deadline; "again" gets new workers
    finally:
        if stuck.exitcode is None:
            os.kill(stuck.pid, signal.SIGCONT)
    (again,) = info.value.receipts
    assert again.session == "again" and again.states == first.states and again.blocks == first.blocks
    assert log.size == 2 and c._proc._procs[1] is not stuck
    stuck.join(timeout=10)
    assert stuck.exitcode == -signal.SIGKILL  # killed when its pool closed, not waited for
    with pytest.raises(CommitError, match="digest_timeout"):
        Committer(log, profile, digest_timeout=0)


def _mapped_segments(pid: int) -> set[str]:
    with open(f"/proc/{pid}/maps") as f:
        return set(re.findall(r"/dev/shm/(\S+)", f.read()))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads worker mappings from /proc")
def test_growing_commits_keep_shared_memory_bounded_in_parent_and_workers(profile, log, committers):
    c = committers(log, profile, digest_process=True, digest_workers=2)
    g = torch.Generator().manual_seed(13)
    for i, t in enumerate([5, 11, 23, 47, 95, 191]):  # each commit outgrows the segment of the one before
        k, v = (torch.randn(L, t, H, D, generator=g).to(torch.bfloat16) for _ in "KV")
        c.submit_stack(k, v, session=f"grow-{i}")
        (receipt,) = c.flush()
        for (layer, kind), digest in receipt.states.items():
            ref = quantize((k if kind == "K" else v)[layer], profile, layer, kind)
            assert digest == ref.digest() and receipt.blocks[(layer, kind)] == ref.blocks
        live = {seg.name.lstrip("/") for seg in c._proc._all}
        assert len(live) == 1  # the outgrown segment was unlinked, not kept until close()
        for proc in c._proc._procs:  # and no worker maps a dropped one (its memory stays taken while mapped)
            assert _mapped_segments(proc.pid) <= live
    assert c.shm_fallbacks == 0
    c._proc.max_bytes = c._proc.live_bytes  # a cap the next, larger commit would pass
    k, v = (torch.randn(L, 300, H, D, generator=g).to(torch.bfloat16) for _ in "KV")
    c.submit_stack(k, v, session="over-cap")
    (receipt,) = c.flush()
    assert c.shm_fallbacks == 1 and len(c._proc._all) <= 1  # hashed in-process, same digests
    assert receipt.states[(2, "V")] == quantize(v[2], profile, 2, "V").digest()


@pytest.mark.parametrize(
    "meta, match",
    [
        ({"session": "has space"}, "session"),
        ({"state_type": ""}, "state_type"),
        ({"parents": ("not-a-digest",)}, "digest"),
        ({"parents": "blake3:" + "00" * 32}, "parents must be a tuple"),
        ({"taint": ("web page",)}, "taint source"),
        ({"taint": "web"}, "taint must be a tuple"),  # not ('w', 'e', 'b')
        ({"state_id": "blake3:00"}, "32 bytes"),
        ({"time_ns": True}, "time_ns"),
        ({"time_ns": -1}, "time_ns"),
        ({"time_ns": 1.5e18}, "time_ns"),
    ],
)
def test_bad_entry_fields_fail_submit_and_queue_nothing(profile, log, meta, match):
    k, v = _stack(14)
    with Committer(log, profile) as c:
        with pytest.raises(CommitError, match=f"nothing was queued.*{match}"):
            c.submit_stack(k, v, **{"session": "ok", **meta})
        assert c.flush() == [] and log.size == 0
        c.submit_stack(k, v, session="ok", parents=["blake3:" + "ab" * 32], taint=["web"], time_ns=5)
        (receipt,) = c.flush()
    entry = StateEntry.decode(receipt.entry)
    assert entry.parents == ("blake3:" + "ab" * 32,) and entry.taint == ("web",) and entry.time_ns == 5


def test_a_submit_racing_close_is_refused_not_stranded(profile, log, monkeypatch):
    """submit() passes its first closed-check, close() runs to the end, then the submit goes on."""
    from fieldprint.engine import commit

    k, v = _stack(15)
    checked, go = threading.Event(), threading.Event()
    real_check = commit._check_meta

    def paused_check(*args):  # runs after submit()'s first look at _closed, before it queues
        checked.set()
        go.wait()
        return real_check(*args)

    monkeypatch.setattr(commit, "_check_meta", paused_check)
    c = Committer(log, profile)
    outcome = {}

    def submitter() -> None:
        try:
            outcome["ticket"] = c.submit_stack(k, v, session="late")
        except CommitError as e:
            outcome["error"] = e

    t = threading.Thread(target=submitter)
    t.start()
    assert checked.wait(10)
    c.close()  # the worker has stopped: a job queued from here on would never run
    go.set()
    t.join(10)
    assert not t.is_alive()
    if "ticket" in outcome:  # the old committer queued it behind the stop: its future never resolved
        try:
            outcome["ticket"].future.result(timeout=5)
        except TimeoutError:
            pytest.fail("a submit racing close() returned a future that never resolves")
    assert "closed" in str(outcome["error"]) and log.size == 0


def test_a_submit_inside_its_queueing_step_finishes_before_close_stops_the_worker(profile, log, monkeypatch):
    """close() waits for a submit that is inside its queueing step; that commit is logged, not stranded."""
    k, v = _stack(16)
    c = Committer(log, profile, max_pending=1)
    queued, go = threading.Event(), threading.Event()
    real_put = c._queue.put

    def paused_put(item, *args, **kwargs):  # the submit holds its place in the queueing step
        if item is not None:
            queued.set()
            go.wait()
        return real_put(item, *args, **kwargs)

    monkeypatch.setattr(c._queue, "put", paused_put)
    t = threading.Thread(target=lambda: c.submit_stack(k, v, session="inside"))
    t.start()
    assert queued.wait(10)
    closer = threading.Thread(target=c.close)
    closer.start()
    go.set()  # whichever runs first, the commit is queued before the stop or refused: never stranded
    t.join(10)
    closer.join(30)
    assert not t.is_alive() and not closer.is_alive()
    assert log.size == 1 and StateEntry.decode(log.entry(0)).session == "inside"


def test_flush_returns_and_raises_only_the_sessions_own_results(profile, log, committers):
    k, v = _stack(17)
    bad_k = k.clone()
    bad_k[0, 0, 0, 0] = float("nan")
    c = committers(log, profile, max_pending=8)
    a1 = c.submit_stack(k, v, session="a")
    b_bad = c.submit_stack(bad_k, v, session="b")
    a2 = c.submit_stack(v, k, session="a")
    b_ok = c.submit_stack(k, v, session="b")
    mine = c.flush("a")  # b's failure is b's to collect
    assert mine == sorted([a1.future.result(), a2.future.result()], key=lambda r: r.index)
    assert {r.session for r in mine} == {"a"}
    assert c.flush("a") == [] and c.flush("nobody") == []
    with pytest.raises(CommitError, match=r"1 commit\(s\) failed.*session 'b'.*NaN") as info:
        c.flush("b")
    assert [s for s, _ in info.value.failures] == ["b"]
    assert info.value.receipts == [b_ok.future.result()]
    with pytest.raises(CommitError):
        b_bad.future.result()
    assert c.flush() == []  # each result is handed out once
    c.submit_stack(k, v, session="c")
    c.submit_stack(k, v, session="d")
    assert [r.session for r in c.flush()] == ["c", "d"]  # None: every session
    with pytest.raises(CommitError, match="session name or None"):
        c.flush(5)


@pytest.mark.parametrize("state_type", ["bogus", "OBSERVATION", "kv"])
def test_unknown_state_types_are_refused(profile, log, state_type):
    k, v = _stack(18)
    with Committer(log, profile) as c:
        with pytest.raises(CommitError, match=f"nothing was queued.*unknown state_type '{state_type}'"):
            c.submit_stack(k, v, session="s", state_type=state_type)
        assert c.flush() == [] and log.size == 0


@pytest.mark.parametrize("state_type", ["anchor_kv", "session_kv", "belief", "tool_output"])
def test_memory_and_kv_state_types_are_logged(profile, log, state_type):
    k, v = _stack(19)
    with Committer(log, profile) as c:
        c.submit_stack(k, v, session="s", state_type=state_type)
        (receipt,) = c.flush()
    assert StateEntry.decode(receipt.entry).state_type == state_type


@pytest.mark.slow
def test_digest_pool_contracts_raise_commit_errors_not_asserts():
    """They held under `python -O` only as asserts, which -O strips."""
    with pytest.raises(CommitError, match="workers >= 1"):
        plan_digests([256], [256], 0, True)
    with pytest.raises(CommitError, match="one stride per size"):
        plan_digests([256, 256], [256], 2, True)
    pool = DigestPool(1)
    try:
        codes = torch.zeros(2, 8, H, D, dtype=torch.int8)
        with pytest.raises(CommitError, match="2 code states came with 1 headers"):
            pool.digest([([b"h"], codes)], True, 1, 8)
        pool.max_bytes = 0  # digest() without asking can_take() first
        with pytest.raises(CommitError, match="shared-memory cap"):
            pool.digest([([b"h", b"h"], codes)], True, 1, 8)
        assert pool.live_bytes == 0
    finally:
        pool.close()


@pytest.mark.parametrize("digest_process", [False, True])
def test_per_row_v_commits_the_reference_row_layout(log, committers, digest_process):
    g = torch.Generator().manual_seed(3)
    sample = {(l, k): torch.randn(40, H, D, generator=g) for l in range(L) for k in "KV"}
    rows = DQPProfile.calibrate([sample], name="rows", num_layers=L, num_kv_heads=H, head_dim=D, block_size=8,
                                v_granularity="token")
    k, v = _stack(4)
    c = committers(log, rows, digest_process=digest_process, digest_workers=2)
    receipt = c.submit_stack(k, v, session="rows").future.result(timeout=60)
    for l in range(L):
        for kind, x in (("K", k), ("V", v)):
            ref = quantize(x[l], rows, l, kind)
            assert receipt.states[(l, kind)] == ref.digest() and receipt.blocks[(l, kind)] == ref.blocks
    assert quantize(v[0], rows, 0, "V").codes.shape == (T, H, D + 1)
    v[1, 7, 1, 3] = float("nan")
    c.submit_stack(k, v, session="nan-rows")
    with pytest.raises(CommitError, match="layer 1 V of session 'nan-rows' holds 1 NaN"):
        c.flush("nan-rows")


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("v_granularity", ["head", "token"])
def test_paged_submit_reads_blocks_through_the_table_and_commits_like_the_gathered_stack(log, committers, v_granularity):
    """On a GPU the side stream reads the blocks in place; once wait_quantized() ordered this stream after
    that read, overwriting the blocks cannot change what is committed."""
    g = torch.Generator().manual_seed(5)
    sample = {(l, k): torch.randn(40, H, D, generator=g) for l in range(L) for k in "KV"}
    profile = DQPProfile.calibrate([sample], name="paged", num_layers=L, num_kv_heads=H, head_dim=D, block_size=8,
                                   v_granularity=v_granularity)
    k_pool, v_pool = (torch.randn(L, 7, 8, H, D, generator=g).to(torch.bfloat16) for _ in "KV")
    table = [5, 1, 3]  # 21 tokens: the last block partly used
    gathered = [pool[:, table].flatten(1, 2)[:, :T] for pool in (k_pool, v_pool)]
    c = committers(log, profile)
    pk, pv = k_pool.to(DEVICE), v_pool.to(DEVICE)
    paged = c.submit_paged(pk, pv, table, T, session="paged")
    paged.wait_quantized()
    pk.fill_(float("nan"))
    pv.fill_(float("nan"))
    stacked = c.submit_stack(*gathered, session="gathered")
    a, b = paged.future.result(timeout=60), stacked.future.result(timeout=60)
    assert a.digest == b.digest and a.blocks == b.blocks and a.states == b.states
    for l in range(L):
        for kind, x in zip("KV", gathered):
            assert torch.equal(paged.codes[(l, kind)].cpu(), quantize(x[l], profile, l, kind).codes)


def test_bad_paged_submits_are_refused_before_anything_is_queued(profile, log, committers):
    c = committers(log, profile)
    k_pool = torch.randn(L, 4, 8, H, D)
    for args, match in [((k_pool, k_pool[:, :3], [1], 8), "one shape"),
                        ((k_pool[0], k_pool[0], [1], 8), "one shape"),
                        ((k_pool, k_pool, [4], 8), "block ids below 4"),
                        ((k_pool, k_pool, [-1], 8), "block ids below 4"),
                        ((k_pool, k_pool, (1, 2), 8), "list of block ids"),
                        ((k_pool, k_pool, "12", 8), "list of block ids"),
                        ((k_pool, k_pool, [1, "2"], 8), "list of block ids"),
                        ((k_pool, k_pool, [1, 2], 17), "holding 17 tokens"),
                        ((k_pool, k_pool, [1, 2], 0), "holding 0 tokens"),
                        ((k_pool, k_pool, [1, 2], True), "holding True tokens")]:
        with pytest.raises(CommitError, match=match):
            c.submit_paged(*args, session="bad")
    assert c.flush() == [] and log.size == 0


def test_state_id_may_be_made_from_the_commits_block_digests(profile, log, committers):
    """The anchor compiler's entry names its manifest, which binds the very block digests the committer makes."""
    from fieldprint.canon import tag_digest

    k, v = _stack(6)
    c = committers(log, profile)
    seen = {}

    def state_id(blocks):
        seen.update(blocks)
        return tag_digest("blake3", b"".join(d for key in sorted(blocks) for d in blocks[key])[:32])

    receipt = c.submit_stack(k, v, session="made", state_id=state_id).future.result(timeout=60)
    assert seen == receipt.blocks and StateEntry.decode(receipt.entry).state_id == state_id(receipt.blocks)
    size = log.size
    c.submit_stack(k, v, session="bad-id", state_id=lambda blocks: "not a digest")
    with pytest.raises(CommitError, match="bad-id"):
        c.flush("bad-id")
    assert log.size == size  # nothing logged


def test_without_kept_receipts_results_come_through_tickets_and_failures_still_reach_flush(profile, log, committers):
    """An engine's committer runs for days: it keeps no receipt nobody flushes, and still loses no failure."""
    k, v = _stack(7)
    c = committers(log, profile, keep_receipts=False)
    tickets = [c.submit_stack(k, v, session="long") for _ in range(3)]
    assert c.flush("long") == [] and not c._receipts
    assert [t.future.result().index for t in tickets] == sorted({t.future.result().index for t in tickets})
    bad_v = v.clone()
    bad_v[0, 0, 0, 0] = float("inf")
    c.submit_stack(k, bad_v, session="long")
    with pytest.raises(CommitError, match="layer 0 V of session 'long'"):
        c.flush("long")


def test_a_byte_budget_holds_back_what_does_not_fit_and_always_lets_one_in(profile, log, committers, monkeypatch):
    """max_pending_bytes counts the codes of queued and committing stacks: a commit larger than the
    whole budget still goes in alone, the next waits until it is done (or its timeout says so), and
    nothing refused is logged or reported."""
    k, v = _stack(17)
    one = 2 * L * T * H * (D + 1)  # a stack's codes: a byte per value and one per row, K and V
    c = committers(log, profile, max_pending=None, max_pending_bytes=one // 2)
    release = threading.Event()
    commit = c._commit
    monkeypatch.setattr(c, "_commit", lambda job: (release.wait(30), commit(job)))
    first = c.submit_stack(k, v, session="first")
    with pytest.raises(CommitError, match=r"still full after 0.2s .*max_pending_bytes 2142"):
        c.submit_stack(k, v, session="refused", timeout=0.2)
    later = []
    t = threading.Thread(target=lambda: later.append(c.submit_stack(v, k, session="later")))
    t.start()
    t.join(0.3)
    assert t.is_alive()  # waiting for room, not refused
    release.set()
    t.join(30)
    receipts = c.flush()
    assert sorted(r.session for r in receipts) == ["first", "later"] and log.size == 2
    assert first.future.result().index == 0 and later[0].future.result().index == 1
    for bad in (-1, 1.5, True):
        with pytest.raises(CommitError, match="max_pending_bytes must be None or a non-negative int"):
            Committer(log, profile, max_pending_bytes=bad)
    with pytest.raises(CommitError, match="max_pending must be None or an int >= 1"):
        Committer(log, profile, max_pending=0)
