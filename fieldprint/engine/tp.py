"""Tensor parallelism for the engine: one process per device; rank 0 serves, the others mirror its steps.

Rank 0 runs the Engine (scheduler, memory, log, committer, sampling). Ranks 1..N-1 run
`worker_main`: the same model shard-wise (loader.build_model takes each rank's share: q/k/v and
gate/up by output rows, o/down by input columns, KV heads split), a paged cache of their heads
with the same blocks as rank 0's, and nothing else. For every step rank 0 broadcasts the step's
host inputs (runner.StepInputs) and all ranks run the same forward, joined by the all-reduces
inside the model; CUDA graphs are captured on every rank at the same step.

Commits stay on rank 0 and whole: a sequence's K/V (a session turn, an anchor set's prefill) is
gathered from every rank's blocks, all heads in order, and committed as one state; an anchor set's
committed codes go back to each rank's anchor pool, its heads only; a check of the pool gathers
them again. The log, the receipts, the set files and the DQP profile are therefore exactly what a
single device makes, and verify without knowing how many devices served them.

Every message is a torch.distributed broadcast from rank 0 on the default group, in the one order
all ranks follow (a step: two int64 tensors; anything else: a pickled tuple); a rank that dies makes
the others' next collective fail (at once over gloo, after `timeout_s` over NCCL at worst).
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fieldprint.engine.kv_cache import read_anchor_states, write_anchor_states
from fieldprint.engine.loader import load_model
from fieldprint.engine.runner import ModelRunner, StepInputs, StepLayout
from fieldprint.errors import EngineError, FieldprintError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, port: int, device: torch.device, timeout_s: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off: not every host supports it
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def _broadcast(message: object = None) -> object:
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# A step travels as two tensors: a header of sizes (int64), then its packed inputs (StepInputs.packed,
# uint8): two plain broadcasts, where broadcast_object_list would pickle its tensors and send their
# sizes first.
_HEADER = 10  # [kind (0: a step; 1: a pickled message follows), graph, T, B, W, S, W_a, max_seqlen_q, is_prefill, rows]


def _send_header(header: list[int], device: torch.device) -> None:
    dist.broadcast(torch.tensor(header, dtype=torch.int64, device=device), src=0)


def _send_step(x: StepInputs, device: torch.device) -> None:
    y = x.layout
    _send_header([0, x.graph, y.tokens, y.seqs, y.width, y.sets, y.anchor_width, x.max_seqlen_q, int(x.is_prefill),
                  x.rows], device)
    dist.broadcast(x.packed.to(device), src=0)


def _receive(device: torch.device) -> StepInputs | tuple:
    """A worker's next message: a step's inputs (on `device`), or an (op, *args) tuple."""
    header = torch.empty(_HEADER, dtype=torch.int64, device=device)
    dist.broadcast(header, src=0)
    kind, graph, t, b, w, s, wa, max_q, prefill, rows = header.tolist()
    if kind:
        return _broadcast()
    layout = StepLayout(t, b, w, s, wa)
    packed = torch.empty(layout.nbytes, dtype=torch.uint8, device=device)
    dist.broadcast(packed, src=0)
    return StepInputs(graph, layout, packed, max_q, bool(prefill), rows)


# -- what every rank does for one message (rank 0 takes part with its own runner) ----------------------
def _gather_heads(local: torch.Tensor) -> torch.Tensor | None:
    """Rank 0: every rank's `local` [..., H/N, D] joined on the head axis in rank order; others: None."""
    world = dist.get_world_size()
    parts = [torch.empty_like(local) for _ in range(world)] if dist.get_rank() == 0 else None
    dist.gather(local.contiguous(), parts, dst=0)
    return torch.cat(parts, dim=-2) if parts is not None else None


def _scatter_heads(runner, full: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Each rank's heads of rank 0's `full` [..., H, D]: `shape` is one rank's share."""
    out = torch.empty(shape, dtype=dtype, device=runner.device)
    parts = list(full.chunk(dist.get_world_size(), dim=-2)) if full is not None else None
    dist.scatter(out, [p.contiguous() for p in parts] if parts is not None else None, src=0)
    return out


def sequence_kv(runner, table: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every layer's K and V [L, length, H, D] of the sequence in `table`, all heads (rank 0 of a group
    gathers every rank's; a copy either way)."""
    blocks, c = torch.tensor(table, device=runner.device), runner.cache
    k = c.k[:, blocks].flatten(1, 2)[:, :length]
    v = c.v[:, blocks].flatten(1, 2)[:, :length]
    if runner.tp_size == 1:
        return k, v
    if runner.tp is not None:
        runner.tp.send(("sequence_kv", table, length))
    kv = _gather_heads(torch.stack([k, v]))
    return (kv[0], kv[1]) if kv is not None else (None, None)


def anchor_states(runner, blocks: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An anchor set's K and V [L, length, H, D(+1)] in their canonical forms, all heads, read from the pool."""
    k, v = read_anchor_states(runner.cache, blocks, length)
    if runner.tp_size == 1:
        return k, v
    if runner.tp is not None:
        runner.tp.send(("anchor_states", blocks, length))
    return _gather_heads(k), _gather_heads(v)


def put_anchor_states(runner, blocks: list[int], k: torch.Tensor | None, v: torch.Tensor | None,
                      length: int | None = None) -> None:
    """Write an anchor set's K and V (canonical forms, all heads) into the pool: each rank its heads."""
    if runner.tp_size == 1:
        write_anchor_states(runner.cache, blocks, k, v)
        return
    if runner.tp is not None:
        length = k.shape[1]
        runner.tp.send(("put_anchor_states", blocks, length))
    c = runner.cache
    layers, _, _, h, d = c.anchor_k.shape
    rows = c.anchor_v_exp is not None
    k_part = _scatter_heads(runner, k, (layers, length, h, d), c.anchor_k.dtype)
    v_part = _scatter_heads(runner, v, (layers, length, h, d + rows), c.anchor_k.dtype)
    write_anchor_states(c, blocks, k_part, v_part)


def set_anchor_k_scales(runner, scales: torch.Tensor | None) -> None:
    """The int8 anchors' per-channel K scales [L, H, D] (every rank's heads) into the cache: each rank its heads."""
    c = runner.cache
    if runner.tp_size == 1:
        c.anchor_k_scale.copy_(scales)
        return
    if runner.tp is not None:
        runner.tp.send(("set_anchor_k_scales",))
    c.anchor_k_scale.copy_(_scatter_heads(runner, scales, tuple(c.anchor_k_scale.shape), c.anchor_k_scale.dtype))


def copy_blocks(runner, src: list[int], dst: list[int]) -> None:
    """Copy sequence blocks into anchor-pool blocks as they are (model-dtype anchors), on every rank."""
    if runner.tp is not None:
        runner.tp.send(("copy_blocks", src, dst))
    c = runner.cache
    s, d = torch.tensor(src, device=c.k.device), torch.tensor(dst, device=c.k.device)
    c.anchor_k[:, d] = c.k[:, s]
    c.anchor_v[:, d] = c.v[:, s]


_OPS = {"sequence_kv": sequence_kv, "anchor_states": anchor_states, "copy_blocks": copy_blocks,
        "set_anchor_k_scales": lambda runner: set_anchor_k_scales(runner, None),
        "put_anchor_states": lambda runner, blocks, length: put_anchor_states(runner, blocks, None, None, length)}


def worker_main(rank: int, world: int, port: int, model: str, device: str, config, timeout_s: float, loader) -> None:
    """Rank `rank`'s process: load its shard, build its runner, then run what rank 0 sends until 'stop'."""

    dev = torch.device(device)
    _init(rank, world, port, dev, timeout_s)
    try:
        try:
            lm = loader(model, device=dev)
        except FieldprintError as e:  # rank 0 meets the same error in its own load and reports it: one line here
            print(f"fieldprint: tensor-parallel rank {rank}: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        runner = ModelRunner(lm, replace(config, num_blocks=_broadcast()))
        while True:
            message = _receive(dev)
            if isinstance(message, StepInputs):
                runner.run(message)
                continue
            op, *args = message
            if op == "stop":
                return
            _OPS[op](runner, *args)
    finally:
        dist.destroy_process_group()


class TensorParallel:
    """Rank 0's side of a tensor-parallel group: starts the other ranks and sends them every step."""

    def __init__(self, model: str, size: int, device: torch.device, config, timeout_s: float = 600.0,
                 loader=None) -> None:
        """Start ranks 1..size-1, each loading `model` with `loader` (a module-level function like
        loader.load_model, the default: it crosses to the new processes by name) on its device."""
        if dist.is_initialized():
            raise EngineError("a torch.distributed group already exists in this process; one engine per process "
                              "may use tensor parallelism")
        if device.type == "cuda" and torch.cuda.device_count() < size:
            raise EngineError(f"tensor parallelism over {size} GPUs, but {torch.cuda.device_count()} are visible")
        self.size = size
        port = _free_port()
        ctx = mp.get_context("spawn")
        devices = [torch.device("cuda", r) if device.type == "cuda" else device for r in range(size)]
        args = [(r, size, port, model, str(devices[r]), config, timeout_s, loader or load_model) for r in range(1, size)]
        self.procs = [ctx.Process(target=worker_main, args=a, name=f"fieldprint-tp-{a[0]}", daemon=True) for a in args]
        for p in self.procs:
            p.start()
        self.device = devices[0]
        try:
            _init(0, size, port, devices[0], timeout_s)
        except BaseException:
            self._stop_procs()
            raise
        self._open = True

    def attach(self, runner) -> None:
        """Give the other ranks rank 0's pool size (their caches hold the same blocks) and mirror `runner`."""
        _broadcast(runner.blocks.num_blocks)
        runner.tp = self

    def _check(self) -> None:
        if not self._open:
            raise EngineError("the tensor-parallel group is closed")
        dead = [p.name for p in self.procs if not p.is_alive()]
        if dead:
            raise EngineError(f"tensor-parallel rank process(es) {dead} died; the engine cannot run without them")

    def send(self, message: tuple) -> None:
        """An (op, *args) message every other rank runs (its part of a gather or scatter, a block copy, 'stop')."""
        self._check()
        _send_header([1] + [0] * (_HEADER - 1), self.device)
        _broadcast(message)

    def run(self, inputs: StepInputs) -> None:
        """A step every other rank runs with its shard."""
        self._check()
        _send_step(inputs, self.device)

    def _stop_procs(self) -> None:
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        try:
            if all(p.is_alive() for p in self.procs):
                _send_header([1] + [0] * (_HEADER - 1), self.device)
                _broadcast(("stop",))
        except RuntimeError:
            pass  # a rank already failed (its own error is what the caller sees): it is stopped below
        finally:
            self._stop_procs()
            dist.destroy_process_group()
