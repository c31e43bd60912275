"""Digest worker processes: BLAKE3 state and block digests of DQP codes, off the serving process.

The committer (fieldprint/engine/commit.py) places each commit's int8 codes in one shared-memory
segment and hands every worker an equal share of the bytes to hash: whole-state digests and
contiguous runs of per-block digests (plan_digests). Workers write block digests back into the
same segment, after the codes, and answer with the few state digests, so the serving process
neither hashes nor builds thousands of objects per commit. The digests are those of
fieldprint.dqp (state_digest, block_digests), computed by the same functions.

A worker that stops answering (stopped, deadlocked, swapped out) fails its commit at a deadline
that grows with the commit's bytes, and the committer then starts new workers; one that dies
fails it at once. A segment that no longer fits is unlinked and unmapped in every worker before
a larger one is made, and all live segments together stay under `max_bytes`: a commit that would
pass it is hashed in the serving process instead.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from multiprocessing import shared_memory

import numpy as np
import torch

from fieldprint.canon import is_int
from fieldprint.dqp import block_digests, state_digest
from fieldprint.errors import CommitError

DIGEST_SIZE = 32  # bytes of one BLAKE3 block digest


def plan_digests(sizes: list[int], strides: list[int], workers: int, blocks: bool) -> list[list[tuple[int, bool, int, int]]]:
    """Split the state and block digests of states over `workers`, about equal bytes to hash each.

    sizes[i] is the byte size of state i and strides[i] the bytes of one of its blocks. Returns
    per worker its (state, whole-state digest?, first block, end block) tasks, by state. Whole-
    state digests go to workers in state order; block ranges then fill each worker up to an
    equal share in the same order, so a worker mostly re-reads the states it digests whole, and
    the block ranges of one state, taken in worker order, are its blocks in order.
    """
    if not is_int(workers) or workers < 1 or len(sizes) != len(strides):
        raise CommitError(f"plan_digests needs workers >= 1 and one stride per size, got {workers!r} workers, "
                          f"{len(sizes)} sizes and {len(strides)} strides")
    total = sum(sizes)
    nblocks = [-(-n // s) if blocks and n else 0 for n, s in zip(sizes, strides)]
    tasks: list[dict[int, list]] = [{} for _ in range(workers)]
    load = [0] * workers
    prefix = 0
    for i, n in enumerate(sizes):
        w = min(workers - 1, (2 * prefix + n) * workers // (2 * total)) if total else 0
        tasks[w][i] = [True, 0, 0]
        load[w] += n
        prefix += n
    share = -(-(total + sum(sizes[i] for i, nb in enumerate(nblocks) if nb)) // workers)
    w = 0
    for i, (nb, stride) in enumerate(zip(nblocks, strides)):
        b = 0
        while b < nb:
            if w < workers - 1 and load[w] >= share:
                w += 1
                continue
            take = nb - b if w == workers - 1 else min(nb - b, -(-(share - load[w]) // stride))
            task = tasks[w].setdefault(i, [False, 0, 0])
            if task[2] != 0:  # the fill moves w forward only, so a state's range per worker is contiguous
                raise CommitError(f"digest plan gave state {i} two block ranges on worker {w}; this is a bug, please report it")
            task[1:] = [b, b + take]
            load[w] += take * stride
            b += take
    return [[(i, *t) for i, t in sorted(ts.items())] for ts in tasks]


def _digest_tasks(seg: shared_memory.SharedMemory, block_size: int, threads: int, tasks: list) -> list[str | None]:
    """State digests of `tasks` over the codes in `seg`; block digests are written into `seg` after the codes."""
    buf = seg.buf
    out = []
    for offset, shape, header, b0, b1, slot in tasks:
        arr = np.frombuffer(buf, dtype=np.int8, count=int(np.prod(shape)), offset=offset).reshape(shape)
        out.append(None if header is None else state_digest(header, arr, threads))
        if b1 > b0:
            part = b"".join(block_digests(arr[b0 * block_size : b1 * block_size], block_size))
            if len(part) != (b1 - b0) * DIGEST_SIZE:
                raise CommitError(f"blocks {b0}..{b1 - 1} gave {len(part)} digest bytes, not {(b1 - b0) * DIGEST_SIZE}")
            buf[slot : slot + len(part)] = part
        del arr
    return out


def _digest_server(conn: object) -> None:
    """Worker process: digest the code runs its tasks name; block digests go straight into shared memory.

    Messages: ("digest", segment, block size, threads, tasks), answered with the state digests
    (or an error string); ("unmap", segment names), not answered: the parent dropped those
    segments, so this process lets go of its mappings too (an unlinked segment's memory stays
    taken while any process maps it); None: exit.
    """
    conn.send("ready")  # imports are done: the parent's digest deadlines start counting from here
    segments: dict[str, shared_memory.SharedMemory] = {}
    while True:
        msg = conn.recv()
        if msg is None:
            break
        if msg[0] == "unmap":
            for name in msg[1]:
                seg = segments.pop(name, None)
                if seg is not None:
                    seg.close()
            continue
        _, name, block_size, threads, tasks = msg
        try:
            if name not in segments:
                # Spawned children share the parent's resource tracker, so the parent's unlink stays the only one.
                segments[name] = shared_memory.SharedMemory(name=name)
            out = _digest_tasks(segments[name], block_size, threads, tasks)
        except BaseException as e:  # reported to the parent, which fails the commit
            conn.send(f"{type(e).__name__}: {e}")
        else:
            conn.send(out)
    for seg in segments.values():
        seg.close()


class DigestPool:
    """Worker processes that hash code buffers the parent places in shared memory: no hashing holds our GIL.

    Processes, not threads: a per-block digest is one BLAKE3 call per 16 KB block, and threads
    of one interpreter pass the GIL back and forth between such calls (2 threads ran slower than
    1). Each worker gets an equal share of the bytes to hash (plan_digests); block digests come
    back through shared memory, so a reply is a few state digests, not thousands of objects.
    """

    def __init__(self, workers: int, timeout: float = 60.0, max_bytes: int | None = None) -> None:
        ctx = mp.get_context("spawn")  # never fork a process that holds a CUDA context
        self._conns, self._procs = [], []
        for i in range(workers):
            conn, child = ctx.Pipe()
            proc = ctx.Process(target=_digest_server, args=(child,), name=f"fieldprint-digest-{i}", daemon=True)
            proc.start()
            child.close()
            self._conns.append(conn)
            self._procs.append(proc)
        self._stuck: set[int] = set(range(workers))  # until each one reports ready
        start = time.monotonic()
        for w, (conn, proc) in enumerate(zip(self._conns, self._procs)):
            while not conn.poll(0.5) and proc.is_alive() and time.monotonic() - start < max(120.0, timeout):
                pass
            try:
                ready = conn.poll(0) and conn.recv() == "ready"
            except (EOFError, OSError):  # it died while starting
                ready = False
            if not ready:
                self._free, self._all = [], []
                self.close()
                raise CommitError(f"digest worker {w} did not start (exit code {proc.exitcode}) within "
                                  f"{time.monotonic() - start:.0f}s; nothing was committed: the next commit tries again")
            self._stuck.discard(w)
        self.broken = False  # a worker died, hung or its pipe broke: the committer starts a new pool
        # self._stuck: workers that did not answer in time, killed on close and never waited for
        # A commit's digests may take `timeout` seconds plus one per 20 MiB before its workers count as stuck.
        self.timeout = timeout
        if max_bytes is None:  # half of /dev/shm: the rest stays for everything else on the machine
            try:
                st = os.statvfs("/dev/shm")
                max_bytes = st.f_blocks * st.f_frsize // 2
            except OSError:
                max_bytes = 0  # no /dev/shm: every commit takes the in-process path
        self.max_bytes = max_bytes  # cap on the bytes of all live segments together
        self._free: list[shared_memory.SharedMemory] = []
        self._all: list[shared_memory.SharedMemory] = []

    def _reusable(self, nbytes: int) -> list[shared_memory.SharedMemory]:
        return [s for s in self._free if nbytes <= s.size <= 2 * nbytes + (1 << 20)]

    @property
    def live_bytes(self) -> int:
        """Bytes of shared memory this pool holds now."""
        return sum(s.size for s in self._all)

    def can_take(self, nbytes: int) -> bool:
        """Whether `nbytes` of shared memory is at hand: writing past a full /dev/shm kills the process."""
        if self._reusable(nbytes):
            return True
        dropped = sum(s.size for s in self._free)  # no free segment fits: _take unlinks them all first
        if self.live_bytes - dropped + max(nbytes, 1) > self.max_bytes:
            return False
        try:
            st = os.statvfs("/dev/shm")
        except OSError:
            return False
        return st.f_bavail * st.f_frsize + dropped >= nbytes + (64 << 20)

    def _take(self, nbytes: int) -> shared_memory.SharedMemory:
        fits = self._reusable(nbytes)
        if fits:
            seg = min(fits, key=lambda s: s.size)
            self._free.remove(seg)
            return seg
        self._drop(list(self._free))  # none fits: keeping them would only fill /dev/shm
        if self.live_bytes + max(nbytes, 1) > self.max_bytes:
            raise CommitError(f"a {nbytes}-byte segment would pass the {self.max_bytes}-byte shared-memory cap "
                              f"({self.live_bytes} live); ask can_take() first and hash in-process when it says no")
        seg = shared_memory.SharedMemory(create=True, size=max(nbytes, 1))
        self._all.append(seg)
        return seg

    def _drop(self, segs: list[shared_memory.SharedMemory]) -> None:
        """Unlink free segments here and have every worker unmap them (their memory is freed once none maps it)."""
        if not segs:
            return
        for seg in segs:
            self._free.remove(seg)
            self._all.remove(seg)
            seg.close()
            seg.unlink()
        for conn in self._conns:
            try:
                conn.send(("unmap", [seg.name for seg in segs]))
            except (OSError, ValueError):  # the worker is gone: the next dispatch reports it
                self.broken = True

    def digest(self, groups: list[tuple[list[bytes], torch.Tensor]], blocks: bool, threads: int,
               block_size: int) -> list[tuple[str, list[bytes]]]:
        """(state digest, block digests) of every state of each [N, T, H, D] code group, given its N headers."""
        states = []  # [codes offset, (T, H, D), header, block stride, blocks, digest slot]
        offset = 0
        for headers, codes in groups:
            n, t, h, d = codes.shape
            if len(headers) != n:
                raise CommitError(f"a group of {n} code states came with {len(headers)} headers; give one header per state")
            states += [[offset + i * t * h * d, (t, h, d), headers[i], block_size * h * d, -(-t // block_size) if blocks else 0]
                       for i in range(n)]
            offset += codes.numel()
        slot = offset  # block digests follow the codes
        for s in states:
            s.append(slot)
            slot += s[4] * DIGEST_SIZE
        seg = self._take(slot)
        self._limit = self.timeout + slot / (20 << 20)
        deadline = time.monotonic() + self._limit
        sent: list[tuple[int, list[int | None]]] = []  # (worker, state of each task's digest)
        errors: list[str] = []
        digests: dict[int, str] = {}
        try:
            first = copied = count = 0
            for gi, (_, codes) in enumerate(groups):
                if codes.numel():
                    dst = torch.frombuffer(seg.buf, dtype=torch.int8, count=codes.numel(), offset=copied)
                    dst.copy_(codes.reshape(-1))  # a torch copy: runs without the GIL
                    del dst
                copied += codes.numel()
                count += codes.shape[0]
                # Hand out the first half once it is copied: its hashing overlaps the copy of the rest.
                if (not sent and 2 * copied >= offset) or gi == len(groups) - 1:
                    self._dispatch(seg.name, states, first, count, blocks, threads, block_size, sent, errors)
                    first = count
                    if errors:
                        break
        finally:
            self._collect(sent, errors, digests, deadline)  # every worker is idle again before the segment is reused
            area = bytes(seg.buf[offset:slot]) if not errors else b""
            self._free.append(seg)
        if errors:
            raise CommitError(f"digest worker failed, nothing was committed: {'; '.join(errors)}")
        out = []
        for j, s in enumerate(states):
            lo = s[5] - offset
            out.append((digests[j], [area[p : p + DIGEST_SIZE] for p in range(lo, lo + s[4] * DIGEST_SIZE, DIGEST_SIZE)]))
        return out

    def _dispatch(self, name: str, states: list, first: int, end: int, blocks: bool, threads: int, block_size: int,
                  sent: list, errors: list[str]) -> None:
        batch = states[first:end]
        plan = plan_digests([int(np.prod(s[1])) for s in batch], [s[3] for s in batch], len(self._procs), blocks)
        for w, tasks in enumerate(plan):
            if not tasks:
                continue
            msg = [(s[0], s[1], s[2] if whole else None, b0, b1, s[5] + b0 * DIGEST_SIZE)
                   for i, whole, b0, b1 in tasks for s in [batch[i]]]
            try:
                self._conns[w].send(("digest", name, block_size, threads, msg))
            except (OSError, ValueError) as e:  # the worker is gone (BrokenPipeError) or its pipe closed
                self.broken = True
                errors.append(f"worker {w} could not be reached ({type(e).__name__}: {e})")
                return
            sent.append((w, [first + i if whole else None for i, whole, _, _ in tasks]))

    def _collect(self, sent: list, errors: list[str], digests: dict[int, str], deadline: float) -> None:
        dead = set()
        for w, states in sent:
            if w in dead:
                continue
            conn, proc = self._conns[w], self._procs[w]
            try:
                # poll() wakes up on a reply or a closed pipe; the liveness check and the deadline
                # cover a worker that is alive but stuck (stopped, swapped out, deadlocked).
                while not conn.poll(max(0.0, min(0.5, deadline - time.monotonic()))):
                    if not proc.is_alive():
                        raise EOFError("worker exited")
                    if time.monotonic() >= deadline:
                        raise TimeoutError
                reply = conn.recv()
            except TimeoutError:
                self.broken = True
                dead.add(w)
                self._stuck.add(w)
                errors.append(f"worker {w} (pid {proc.pid}) did not answer within this commit's {self._limit:.1f}s "
                              "digest deadline and is taken as stuck; the next commit starts new workers")
                continue
            except (EOFError, OSError) as e:
                self.broken = True
                dead.add(w)
                proc.join(timeout=1)
                errors.append(f"worker {w} died (exit code {proc.exitcode}, {type(e).__name__})")
                continue
            if isinstance(reply, str):
                errors.append(f"worker {w}: {reply}")
                continue
            for j, d in zip(states, reply, strict=True):
                if j is not None:
                    digests[j] = d
        sent.clear()

    def close(self) -> None:
        """Stop the workers (stuck ones are killed, not waited for) and free the shared memory."""
        for w, conn in enumerate(self._conns):
            if w in self._stuck:
                continue
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for w, proc in enumerate(self._procs):
            if w in self._stuck:
                proc.kill()  # SIGKILL ends a stopped process too
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
        for conn in self._conns:
            conn.close()
        for seg in self._all:
            seg.close()
            seg.unlink()
        self._all, self._free = [], []


__all__ = ["DIGEST_SIZE", "DigestPool", "plan_digests"]
