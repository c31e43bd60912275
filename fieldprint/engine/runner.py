"""The model runner: owns the model, the KV pools and the step's buffers; turns a batch into tokens.

A prefill step packs every scheduled sequence's new tokens into one flat batch (chunked: a
sequence may bring only part of its prompt); a decode step brings one token per sequence. On
CUDA, decode steps replay CUDA graphs captured once per batch-size bucket over static buffers
(the routing tensors every layer reads), so a step costs one graph launch and the one host sync
that reads the sampled tokens back.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

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
from fieldprint.engine.sequence import Sequence
from fieldprint.kernels.paged_attention import AnchorRouting, DecodeWorkspace

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)


@dataclass(slots=True)
class StepInputs:
    """One step's inputs on the host: what the runner, and every tensor-parallel rank, runs."""

    graph: int  # the captured batch bucket that runs it (rows padded to it), or 0: eager
    ids: torch.Tensor  # int64 [T]: the new tokens, flat
    pos: torch.Tensor  # int64 [T]: their absolute positions
    slots: torch.Tensor  # int64 [T]: their cache slots
    tables: torch.Tensor  # int32 [B, W]: block tables
    lens: torch.Tensor  # int32 [B]: each sequence's own tokens, the new ones included
    cu: torch.Tensor  # int32 [B + 1]: new tokens per sequence, cumulative
    max_seqlen_q: int
    is_prefill: bool
    atable: torch.Tensor  # int32 [S, W_a]: anchor sets' block tables
    alens: torch.Tensor  # int32 [S]
    which: torch.Tensor  # int32 [B]: each sequence's anchor set row, or -1
    rows: int  # the real sequences (the rest is padding)


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
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict]] = {}
        self._graph_pool = None
        self.use_graphs = config.cuda_graphs and self.device.type == "cuda"
        self.tp = None  # the tensor-parallel leader (fieldprint/engine/tp.py) on rank 0 of a group, else None
        if self.device.type == "cuda" and config.fuse_elementwise:
            fuse_elementwise()

    # -- inputs ------------------------------------------------------------------------------
    def _anchor_routing(self, seqs: list[Sequence], rows: int | None = None):
        """(anchor block table [S, W], lens [S], each sequence's row or -1) for the batch's sets."""
        keys = sorted({s.anchor_key for s in seqs if s.anchor_key is not None})
        row = {k: i for i, k in enumerate(keys)}
        table = torch.zeros((rows or len(keys), self.max_anchor_blocks), dtype=torch.int32)
        lens = torch.zeros(rows or len(keys), dtype=torch.int32)
        for k, i in row.items():
            slot = self.anchor_pool.sets[k]
            table[i, : len(slot.blocks)] = torch.tensor(slot.blocks, dtype=torch.int32)
            lens[i] = slot.length
        which = torch.tensor([row.get(s.anchor_key, -1) for s in seqs], dtype=torch.int32)
        return table, lens, which

    def _tables(self, seqs: list[Sequence], width: int | None = None, rows: int | None = None) -> torch.Tensor:
        w = width or max(len(s.block_table) for s in seqs)
        t = torch.zeros((rows or len(seqs), w), dtype=torch.int32)
        for i, s in enumerate(seqs):
            t[i, : len(s.block_table)] = torch.tensor(s.block_table, dtype=torch.int32)
        return t

    def inputs(self, seqs: list[Sequence], counts: list[int], graphs: bool = True) -> StepInputs:
        """The step's inputs on the host: `counts[i]` new tokens of each sequence (prefill, chunked
        prefill or decode); a decode step that a captured graph runs is padded to its batch bucket."""
        bs = self.config.block_size
        n = len(seqs)
        decode = all(c == 1 and s.num_cached > 0 for s, c in zip(seqs, counts))
        graph = 0
        if decode and graphs and self.use_graphs and n <= GRAPH_BATCH_SIZES[-1] and n <= self.config.max_batch:
            graph = next(x for x in GRAPH_BATCH_SIZES if x >= n)
        rows = graph or n
        ids, pos, slots, cu = [], [], [], [0]
        for s, c in zip(seqs, counts):
            start = s.num_cached
            ids += s.tokens[start : start + c]
            pos += range(s.anchor_len + start, s.anchor_len + start + c)
            slots += [s.block_table[i // bs] * bs + i % bs for i in range(start, start + c)]
            cu.append(cu[-1] + c)
        pad = rows - n  # a captured batch's padding rows write into block 0, never handed out
        table, alens, which = self._anchor_routing(seqs, rows=rows if graph else None)
        return StepInputs(
            graph, torch.tensor(ids + [0] * pad, dtype=torch.int64), torch.tensor(pos + [0] * pad, dtype=torch.int64),
            torch.tensor(slots + [0] * pad, dtype=torch.int64),
            self._tables(seqs, self.max_blocks if graph else None, rows),
            torch.tensor([s.num_cached + c for s, c in zip(seqs, counts)] + [1] * pad, dtype=torch.int32),
            torch.tensor(cu + list(range(cu[-1] + 1, cu[-1] + 1 + pad)), dtype=torch.int32), max(counts),
            not decode, table, alens, torch.cat([which, torch.full((pad,), -1, dtype=torch.int32)]), n)

    def prepare(self, seqs: list[Sequence], counts: list[int]) -> tuple[torch.Tensor, torch.Tensor, AttentionContext]:
        """The step's inputs on the device, run eagerly: (token ids, positions, attention context)."""
        return self._device(self.inputs(seqs, counts, graphs=False))

    def _device(self, x: StepInputs) -> tuple[torch.Tensor, torch.Tensor, AttentionContext]:
        dev = self.device
        to = lambda t: t.to(dev, non_blocking=True)  # noqa: E731
        ctx = AttentionContext(self.cache, x.is_prefill, to(x.slots), to(x.tables), to(x.lens), to(x.cu), x.max_seqlen_q,
                               AnchorRouting(to(x.atable), to(x.alens), to(x.which)), workspace=self.workspace)
        return to(x.ids), to(x.pos), ctx

    # -- running -----------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, seqs: list[Sequence], counts: list[int]) -> torch.Tensor:
        """Run one step; return fp32 logits [B, vocab] at each sequence's last new token."""
        x = self.inputs(seqs, counts)
        if self.tp is not None:
            self.tp.run(x)  # every other rank runs the same step
        return self.run(x)

    @torch.inference_mode()
    def run(self, x: StepInputs) -> torch.Tensor:
        """Run a step's inputs: a captured graph's replay, or the model eagerly."""
        if x.graph:
            return self._replay(x)
        ids, pos, ctx = self._device(x)
        hidden = self.model(ids, pos, ctx)
        if x.is_prefill:
            hidden = hidden[(ctx.cu_seqlens_q[1:] - 1).long()]
        return self.model.logits(hidden)

    def _static(self, b: int) -> dict:
        dev = self.device
        z32 = lambda *shape: torch.zeros(shape, dtype=torch.int32, device=dev)  # noqa: E731
        return {"ids": torch.zeros(b, dtype=torch.int64, device=dev), "pos": torch.zeros(b, dtype=torch.int64, device=dev),
                "slots": torch.zeros(b, dtype=torch.int64, device=dev), "tables": z32(b, self.max_blocks),
                "lens": z32(b), "cu": torch.arange(b + 1, dtype=torch.int32, device=dev),
                "atable": z32(b, self.max_anchor_blocks), "alens": z32(b), "which": torch.full((b,), -1, dtype=torch.int32, device=dev)}

    def _context(self, st: dict) -> AttentionContext:
        return AttentionContext(self.cache, False, st["slots"], st["tables"], st["lens"], st["cu"], 1,
                                AnchorRouting(st["atable"], st["alens"], st["which"]), workspace=self.workspace)

    def _capture(self, b: int) -> tuple[torch.cuda.CUDAGraph, dict]:
        st = self._static(b)
        st["lens"].fill_(1)
        ctx = self._context(st)
        for _ in range(2):  # warm up: compile the kernels outside the capture
            self.model.logits(self.model(st["ids"], st["pos"], ctx))
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            st["out"] = self.model.logits(self.model(st["ids"], st["pos"], self._context(st)))
        return graph, st

    def _replay(self, x: StepInputs) -> torch.Tensor:
        b = x.graph
        if b not in self.graphs:
            if self._graph_pool is None:  # one memory pool for every bucket's graph
                self._graph_pool = torch.cuda.graph_pool_handle()
            self.graphs[b] = self._capture(b)
        graph, st = self.graphs[b]
        for name, host in (("ids", x.ids), ("pos", x.pos), ("slots", x.slots), ("lens", x.lens), ("tables", x.tables),
                           ("atable", x.atable), ("alens", x.alens), ("which", x.which)):
            st[name].copy_(host, non_blocking=True)
        graph.replay()
        return st["out"][: x.rows]

    # -- sampling ----------------------------------------------------------------------------
    def sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        """Next token of each sequence: greedy rows by argmax, the others by their own seeded generator."""
        out = logits.argmax(-1)
        for i, s in enumerate(seqs):
            p = s.params
            if p.greedy:
                continue
            row = logits[i] / p.temperature
            if p.top_k:
                kth = torch.topk(row, min(p.top_k, row.shape[-1])).values[-1]
                row = row.masked_fill(row < kth, float("-inf"))
            probs = torch.softmax(row, -1)
            if p.top_p < 1:
                sp, si = torch.sort(probs, descending=True)
                cut = torch.cumsum(sp, -1) - sp > p.top_p  # keep the smallest prefix whose mass reaches top_p
                probs = torch.zeros_like(probs).scatter_(0, si, sp.masked_fill(cut, 0))
            if s.generator is None:
                s.generator = torch.Generator(device=logits.device)
                # an unseeded request draws its own seed: torch.seed() would reseed the caller's global generator
                s.generator.manual_seed(p.seed if p.seed is not None else secrets.randbits(63))
            out[i] = torch.multinomial(probs, 1, generator=s.generator)[0]
        return out.tolist()
