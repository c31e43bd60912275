"""The model runner: owns the model, the KV pools and the step's buffers; turns a batch into tokens.

A prefill step packs every scheduled sequence's new tokens into one flat batch (chunked: a
sequence may bring only part of its prompt); a decode step brings one token per sequence. A step's
inputs travel in one packed buffer (one copy to the device). On CUDA, decode steps replay CUDA
graphs captured once per (batch size, context, anchor set) bucket over static buffers (the
routing tensors every layer reads), so a step costs one copy, one graph launch and the one host
sync that reads the sampled tokens back.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from fieldprint.engine.attention import AttentionContext, KVCache
from fieldprint.engine.kv_cache import (
    AnchorPool,
    BlockManager,
    allocate_cache,
    blocks_for_memory,
    cdiv,
)
from fieldprint.engine.loader import LoadedModel
from fieldprint.engine.model import fuse_elementwise, tp_group
from fieldprint.engine.sampling import next_token_ids
from fieldprint.engine.sequence import Sequence
from fieldprint.errors import EngineError
from fieldprint.kernels.paged_attention import AnchorRouting, DecodeWorkspace

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)


def graph_bucket(need: int, cap: int, smallest: int = 16) -> int:
    """The width a captured decode graph is planned for: the next power of two >= need (at least
    `smallest`), at most `cap`. Graphs are captured per (batch, context, anchor) bucket so that the
    attention kernel splits the context the batch has, not the longest one the engine allows."""
    return min(cap, max(smallest, 1 << (max(need, 1) - 1).bit_length()))


@dataclass(frozen=True, slots=True)
class StepLayout:
    """Where each of a step's input tensors lies in one packed byte buffer (one copy to the device).

    int64 first (ids, positions, slots: [T] each), then int32: block tables [B, W], lengths [B],
    cu_seqlens [B + 1], anchor block tables [S, W_a], anchor lengths [S], each sequence's set row [B].
    """

    tokens: int
    seqs: int
    width: int
    sets: int
    anchor_width: int

    @property
    def sizes(self) -> tuple[int, ...]:
        t, b = self.tokens, self.seqs
        return t, t, t, b * self.width, b, b + 1, self.sets * self.anchor_width, self.sets, b

    @property
    def offsets(self) -> tuple[int, ...]:
        """Each tensor's byte offset: 16-byte aligned, so kernels see the alignment every step."""
        out, at = [], 0
        for i, n in enumerate(self.sizes):
            out.append(at)
            at += -(-n * (8 if i < 3 else 4) // 16) * 16
        return (*out, at)

    @property
    def nbytes(self) -> int:
        return self.offsets[-1]

    def views(self, buf):
        """(ids, pos, slots, tables, lens, cu, atable, alens, which) over a uint8 buffer of nbytes: a
        torch tensor (on any device) or a numpy array (the host side fills one: its views are cheap)."""
        i64, i32 = (np.int64, np.int32) if isinstance(buf, np.ndarray) else (torch.int64, torch.int32)
        out = [buf[at : at + n * (8 if i < 3 else 4)].view(i64 if i < 3 else i32)
               for i, (at, n) in enumerate(zip(self.offsets, self.sizes))]
        out[3] = out[3].reshape(self.seqs, self.width)
        out[6] = out[6].reshape(self.sets, self.anchor_width)
        return tuple(out)


@dataclass(slots=True)
class StepInputs:
    """One step's inputs on the host: what the runner, and every tensor-parallel rank, runs."""

    graph: int  # the captured batch bucket that runs it (rows padded to it), or 0: eager
    layout: StepLayout
    packed: torch.Tensor  # uint8 [layout.nbytes]: ids, positions, slots, tables... (StepLayout)
    max_seqlen_q: int
    is_prefill: bool
    rows: int  # the real sequences (the rest is padding)

    @property
    def graph_key(self) -> tuple[int, int, int, int]:
        """The captured graph that runs this step: (batch bucket, context width, anchor sets, anchor width)."""
        x = self.layout
        return self.graph, x.width, x.sets, x.anchor_width


def _cache_slots(seqs: list[Sequence], at: list[int], bs: int) -> list[int]:
    """The cache slot of token `at[i]` of sequence `seqs[i]`; EngineError if its table lacks that block."""
    try:
        return [s.block_table[i // bs] * bs + i % bs for s, i in zip(seqs, at)]
    except IndexError:
        s, i = next((s, i) for s, i in zip(seqs, at) if i // bs >= len(s.block_table))
        raise EngineError(f"sequence {s.seq_id} has no cache block for token {i} "
                          f"({len(s.block_table)} blocks of {bs}): grow its table before the step") from None


def _fill_tables(rows: np.ndarray, seqs: list[Sequence]) -> np.ndarray:
    """Each sequence's block table into its row of `rows` (blocks past the row's width hold nothing yet)."""
    width = rows.shape[1]
    for i, s in enumerate(seqs):
        bt = s.block_table
        rows[i, : min(len(bt), width)] = bt[:width]
    return rows


@dataclass(frozen=True, slots=True)
class Feed:
    """Input ids a decode step takes from the device: tokens[src[i]] goes to row rows[i]."""

    tokens: torch.Tensor  # int64, on the device: the step before's draw
    rows: list[int]
    src: list[int]

    def write(self, ids: torch.Tensor) -> None:
        """Over the host's placeholders in the step's device ids; queued on the stream, nothing waits."""
        n = len(self.rows)
        if self.rows == self.src == list(range(n)):  # the batch goes on unchanged: one contiguous copy
            ids[:n].copy_(self.tokens[:n])
        else:
            dev = ids.device
            ids[torch.tensor(self.rows).to(dev, non_blocking=True)] = \
                self.tokens[torch.tensor(self.src).to(dev, non_blocking=True)]


@dataclass(slots=True)
class RunnerConfig:
    """What the runner allocates: pool sizes, block size, anchor dtype, graph capture."""

    block_size: int = 16  # tokens per cache block = DQP digest block
    max_model_len: int = 4096  # longest sequence (its own tokens), anchors not counted
    max_anchor_len: int = 4096  # longest anchor set
    num_blocks: int | None = None  # sequence blocks; None: from memory (CUDA) or cpu_cache_tokens (CPU)
    cpu_cache_tokens: int = 32768
    gpu_memory_utilization: float = 0.5  # fraction of free device memory for the sequence pool
    anchor_blocks: int = 1024
    anchor_dtype: str = "int8"  # "int8" (DQP codes) or "model" (the model's dtype, e.g. bf16)
    max_batch: int = 256
    cuda_graphs: bool = True
    fuse_elementwise: bool = True  # CUDA: RMSNorm (with the residual add), RoPE and SiLU-mul compiled


class ModelRunner:
    """Runs steps of the model over the paged cache and samples the next tokens."""

    def __init__(self, lm: LoadedModel, config: RunnerConfig) -> None:
        self.lm, self.config = lm, config
        self.model, self.args, self.device = lm.model, lm.args, lm.device
        bs = config.block_size
        if config.num_blocks is not None:
            num_blocks = config.num_blocks
        elif self.device.type == "cuda":
            num_blocks = blocks_for_memory(self.args, bs, lm.dtype, config.gpu_memory_utilization, self.device,
                                           tp_group()[1])
        else:
            num_blocks = cdiv(config.cpu_cache_tokens, bs) + 1
        anchor_dtype = torch.int8 if config.anchor_dtype == "int8" else lm.dtype
        self.tp_size = tp_group()[1]  # this rank's cache holds 1/tp_size of the KV heads
        self.cache: KVCache = allocate_cache(self.args, block_size=bs, num_blocks=num_blocks,
                                             num_anchor_blocks=config.anchor_blocks, dtype=lm.dtype,
                                             anchor_dtype=anchor_dtype, device=self.device, tp_size=self.tp_size)
        self.blocks = BlockManager(num_blocks, bs)
        self.anchor_pool = AnchorPool(config.anchor_blocks, bs)
        self.max_blocks = cdiv(config.max_model_len, bs)
        self.max_anchor_blocks = cdiv(config.max_anchor_len, bs)
        self.workspace = DecodeWorkspace(self.device)  # attention scratch: allocated once, reused by every step
        self.graphs: dict[tuple[int, int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._graph_pool = None
        self._logits: torch.Tensor | None = None  # the captured graphs' shared output
        self.use_graphs = config.cuda_graphs and self.device.type == "cuda"
        self._rows = None  # the last captured decode step's block tables (_table_rows)
        self._staging: list[list] = [[None, None], [None, None]]  # pinned input buffers (_upload)
        self.tp = None  # the tensor-parallel leader (fieldprint/engine/tp.py) on rank 0 of a group, else None
        if self.device.type == "cuda" and config.fuse_elementwise:
            fuse_elementwise()

    # -- inputs ------------------------------------------------------------------------------
    def inputs(self, seqs: list[Sequence], counts: list[int], graphs: bool = True) -> StepInputs:
        """The step's inputs on the host: `counts[i]` new tokens of each sequence (prefill, chunked
        prefill or decode). A decode step that a captured graph runs is padded to its batch bucket,
        and its block tables to its context bucket (graph_bucket)."""
        bs = self.config.block_size
        n = len(seqs)
        at = [s.num_cached for s in seqs]  # each sequence's first new token
        decode = counts.count(1) == n and min(at) > 0
        need = cdiv(max(at) + 1, bs) if decode else max(cdiv(i + c, bs) for i, c in zip(at, counts))
        keys = sorted({s.anchor_key for s in seqs if s.anchor_key is not None})
        sets = [self.anchor_pool.sets[k] for k in keys]
        anchor_need = max((len(x.blocks) for x in sets), default=0)
        graph = 0
        if (decode and graphs and self.use_graphs and n <= min(GRAPH_BATCH_SIZES[-1], self.config.max_batch)
                and need <= self.max_blocks and anchor_need <= self.max_anchor_blocks):
            graph = next(x for x in GRAPH_BATCH_SIZES if x >= n)
        rows = graph or n
        if graph:
            width = graph_bucket(need, self.max_blocks)
            set_rows, anchor_width = (rows, graph_bucket(anchor_need, self.max_anchor_blocks)) if sets else (0, 1)
        else:
            width = max(len(s.block_table) for s in seqs)
            set_rows, anchor_width = len(sets), max(anchor_need, 1)
        pad = rows - n  # a captured batch's padding rows write into block 0, never handed out
        layout = StepLayout(sum(counts) + pad, rows, width, set_rows, anchor_width)
        packed = np.zeros(layout.nbytes, dtype=np.uint8)
        ids, pos, slots, tables, lens, cu, atable, alens, which = layout.views(packed)
        if graph:
            tables[:n] = self._table_rows(seqs, width)
        else:
            _fill_tables(tables, seqs)
        if decode:  # one token each: no per-token loop
            ids[:n] = [s.token_at(i) for s, i in zip(seqs, at)]
            pos[:n] = [s.anchor_len + i for s, i in zip(seqs, at)]
            slots[:n] = _cache_slots(seqs, at, bs)
            lens[:n] = [i + 1 for i in at]
        else:
            t = 0
            for s, c in zip(seqs, counts):
                start = s.num_cached
                ids[t : t + c] = s.tokens[start : start + c]
                pos[t : t + c] = range(s.anchor_len + start, s.anchor_len + start + c)
                slots[t : t + c] = _cache_slots([s] * c, list(range(start, start + c)), bs)
                t += c
            lens[:n] = [i + c for i, c in zip(at, counts)]
        lens[n:] = 1
        cu[1 : n + 1] = list(itertools.accumulate(counts))
        cu[n + 1 :] = range(cu[n] + 1, cu[n] + 1 + pad)
        row = {}
        for j, (key, slot) in enumerate(zip(keys, sets)):
            atable[j, : len(slot.blocks)] = slot.blocks
            alens[j] = slot.length
            row[key] = j
        which[:n] = [row.get(s.anchor_key, -1) for s in seqs]
        which[n:] = -1
        return StepInputs(graph, layout, torch.from_numpy(packed), max(counts), not decode, n)

    def _table_rows(self, seqs: list[Sequence], width: int) -> np.ndarray:
        """A captured decode step's block tables [B, width], kept from the step before and patched.

        Between two decode steps of the same batch a table can only have grown at its end (blocks
        are replaced only through BlockManager.release, which the count `releases` records), so only
        the rows whose length changed are rewritten: at B=128 filling every row from its list cost
        more than the rest of the step's inputs (host_bench.py)."""
        key = (width, self.blocks.releases, [s.seq_id for s in seqs])
        kept = self._rows
        if kept is None or kept[0] != key:
            rows = _fill_tables(np.zeros((len(seqs), width), np.int32), seqs)
            self._rows = (key, [len(s.block_table) for s in seqs], rows)
            return rows
        _, lens, rows = kept
        for i, s in enumerate(seqs):
            bt = s.block_table
            if len(bt) != lens[i]:
                rows[i, : min(len(bt), width)] = bt[:width]
                lens[i] = len(bt)
        return rows

    def prepare(self, seqs: list[Sequence], counts: list[int]) -> tuple[torch.Tensor, torch.Tensor, AttentionContext]:
        """The step's inputs on the device, run eagerly: (token ids, positions, attention context)."""
        return self._device(self.inputs(seqs, counts, graphs=False))

    def _context(self, x: StepLayout, packed: torch.Tensor, is_prefill: bool, max_seqlen_q: int):
        """(token ids, positions, attention context) over a packed buffer on the device."""
        ids, pos, slots, tables, lens, cu, atable, alens, which = x.views(packed)
        return ids, pos, AttentionContext(self.cache, is_prefill, slots, tables, lens, cu, max_seqlen_q,
                                          AnchorRouting(atable, alens, which), workspace=self.workspace)

    def _device(self, x: StepInputs) -> tuple[torch.Tensor, torch.Tensor, AttentionContext]:
        return self._context(x.layout, self._upload(x.packed), x.is_prefill, x.max_seqlen_q)

    def _upload(self, packed: torch.Tensor, dst: torch.Tensor | None = None) -> torch.Tensor:
        """A step's packed inputs on the device (into dst, if given), through one of two pinned buffers
        used in turn: a copy from pageable memory may wait for the stream, and a step queued behind
        the one before (stepper.py) must not. A buffer is refilled once its last copy has left."""
        if self.device.type != "cuda":
            return packed.to(self.device) if dst is None else dst.copy_(packed)
        self._staging.reverse()
        slot = self._staging[0]  # [pinned buffer or None, the event after its last copy or None]
        if slot[1] is not None:
            slot[1].synchronize()
        n = packed.numel()
        if slot[0] is None or slot[0].numel() < n:
            with torch.inference_mode(False):  # a buffer made in forward() is also filled outside it (prepare)
                slot[0] = torch.empty(max(n, 1 << 16), dtype=torch.uint8, pin_memory=True)
        src = slot[0][:n]
        src.copy_(packed)
        out = src.to(self.device, non_blocking=True) if dst is None else dst.copy_(src, non_blocking=True)
        slot[1] = torch.cuda.Event()
        slot[1].record()
        return out

    # -- running -----------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, seqs: list[Sequence], counts: list[int], feed: Feed | None = None) -> torch.Tensor:
        """Run one step; return fp32 logits [B, vocab] at each sequence's last new token (valid until
        the next step: captured graphs share one output buffer). feed: input ids that are still on the
        device (the step before's draw, not yet read back), written over the host's at those rows."""
        x = self.inputs(seqs, counts)
        if self.tp is not None:
            if feed is not None:
                raise EngineError("a tensor-parallel step takes its input ids from the host: no feed")
            self.tp.run(x)  # every other rank runs the same step
        return self.run(x, feed)

    @torch.inference_mode()
    def run(self, x: StepInputs, feed: Feed | None = None) -> torch.Tensor:
        """Run a step's inputs: a captured graph's replay, or the model eagerly."""
        if x.graph:
            return self._replay(x, feed)
        ids, pos, ctx = self._device(x)
        if feed is not None:
            feed.write(ids)
        hidden = self.model(ids, pos, ctx)
        if x.is_prefill:
            hidden = hidden[(ctx.cu_seqlens_q[1:] - 1).long()]
        return self.model.logits(hidden)

    def _capture(self, x: StepLayout) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """A decode step's graph for this layout, over a packed input buffer of its own (returned)."""
        b = x.seqs
        if self._logits is None:  # every graph's logits land in one buffer: [256, vocab] fp32 is 130 MB
            most = next(g for g in GRAPH_BATCH_SIZES if g >= min(self.config.max_batch, GRAPH_BATCH_SIZES[-1]))
            self._logits = torch.empty((most, self.args.vocab_size), dtype=torch.float32, device=self.device)
        packed = torch.zeros(x.nbytes, dtype=torch.uint8, device=self.device)
        _, _, _, _, lens, cu, _, _, which = x.views(packed)
        lens.fill_(1)
        cu.copy_(torch.arange(b + 1, dtype=torch.int32))
        which.fill_(-1)
        for _ in range(2):  # warm up: compile the kernels outside the capture
            ids, pos, ctx = self._context(x, packed, False, 1)
            self.model.logits(self.model(ids, pos, ctx))
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            ids, pos, ctx = self._context(x, packed, False, 1)
            self.model.logits(self.model(ids, pos, ctx), out=self._logits[:b])
        return graph, packed

    def _replay(self, x: StepInputs, feed: Feed | None = None) -> torch.Tensor:
        key = x.graph_key
        if key not in self.graphs:
            if self._graph_pool is None:  # one memory pool for every bucket's graph
                self._graph_pool = torch.cuda.graph_pool_handle()
            self.graphs[key] = self._capture(x.layout)
        graph, packed = self.graphs[key]
        self._upload(x.packed, packed)
        if feed is not None:
            feed.write(x.layout.views(packed)[0])
        graph.replay()
        return self._logits[: x.rows]

    # -- sampling ----------------------------------------------------------------------------
    def sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        """Next token of each sequence (fieldprint/engine/sampling.py), read back to the host."""
        return self.draw(seqs, logits).tolist()

    def draw(self, seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        """Next token of each sequence, left on the device (int64 [len(seqs)])."""
        return next_token_ids(seqs, logits)
