"""Attention over the paged cache for one step: one routing object that every layer shares.

`AttentionContext` is built once per step by the runner: where each new token's K/V goes
(`slot_mapping` into the sequence pool), each sequence's block table and length, and which anchor
set each sequence reads. The pools themselves (`KVCache`: the sequences' blocks and the anchors'
blocks of every layer) are fixed for the engine's life. `paged_attention` writes a layer's new K/V
and attends:

- on CUDA through PagedFieldprintAttention (the fused Triton kernels: prefill and decode, the
  anchors read in place, int8 codes dequantized in registers);
- on the CPU through a torch path over the very same block tables, pools and anchor codes: the
  Triton interpreter is far too slow to run a model, and the two are tested against each other.

Semantics are the kernels' `concat` mode: each new token attends to its anchor set's tokens
(positions 0..A-1), its sequence's earlier tokens and, causally, the new ones. With bf16 anchors
this is exactly attending to the anchor text as a prompt prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fieldprint.dqp import dequantize_rows
from fieldprint.kernels.paged_attention import (
    AnchorPool,
    AnchorRouting,
    DecodePlan,
    DecodeWorkspace,
    paged_attention_prefill,
    plan_decode,
)
from fieldprint.kernels.store_kv import paged_store_kv


@dataclass(slots=True)
class KVCache:
    """Every layer's block pools: sequences' K/V, anchors' K/V (cache dtype or int8 codes) and scales.

    k, v: [L, num_blocks, block_size, H_kv, D]; block 0 is never handed out (padding slots of a
    captured batch write there). anchor_k, anchor_v: [L, num_anchor_blocks, block_size, H_kv, D].
    int8 anchors (else None): anchor_k_scale float32 [L, H_kv, D] powers of two (the profile's, per
    channel); anchor_v_exp int8 [L, num_anchor_blocks, block_size, H_kv], each V row's exponent.
    """

    k: torch.Tensor
    v: torch.Tensor
    anchor_k: torch.Tensor
    anchor_v: torch.Tensor
    anchor_k_scale: torch.Tensor | None = None
    anchor_v_exp: torch.Tensor | None = None
    pools: list[AnchorPool] = field(default_factory=list)  # each layer's kernel view of the anchor pool

    def __post_init__(self) -> None:
        int8 = self.anchor_k.dtype == torch.int8
        self.pools = [AnchorPool(self.anchor_k[layer], self.anchor_v[layer],
                                 self.anchor_k_scale[layer] if int8 else None, self.anchor_v_exp[layer] if int8 else None)
                      for layer in range(self.anchor_k.shape[0])]

    @property
    def block_size(self) -> int:
        return self.k.shape[2]


@dataclass(slots=True)
class AttentionContext:
    """Per-step routing shared by all layers (tensors on the model's device)."""

    cache: KVCache
    is_prefill: bool
    slot_mapping: torch.Tensor  # int64 [T]: flat slot (block * block_size + offset) of each new token
    block_tables: torch.Tensor  # int32 [B, max_blocks]
    context_lens: torch.Tensor  # int32 [B]: the sequence's own tokens, the new ones included
    cu_seqlens_q: torch.Tensor  # int32 [B+1]: new tokens per sequence, cumulative (decode: 0..B)
    max_seqlen_q: int
    # block_table [S, max_anchor_blocks], lens [S], seq_anchor_set [B] (-1: none); it keeps the decode
    # plan, so the layers after the first reuse it
    routing: AnchorRouting
    check: bool = False  # the kernels' data-dependent input checks (one host sync each): tests only
    workspace: DecodeWorkspace | None = None  # the runner's decode scratch memory (None: the kernel's default)
    decode_plan: DecodePlan | None = None  # made by the first layer's decode, run by every layer

    def anchors(self, layer: int) -> tuple[AnchorPool | None, AnchorRouting | None]:
        """The kernels' anchor arguments for this layer: its pool and the step's routing (None, None: no sets)."""
        if self.routing.lens.numel() == 0:
            return None, None
        return self.cache.pools[layer], self.routing


def store_kv(ctx: AttentionContext, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """Write the new tokens' K/V [T, H_kv, D] (strided views too) into their slots of this layer's pool."""
    c = ctx.cache
    if k.is_cuda:  # K and V in one launch
        paged_store_kv(k, v, c.k[layer], c.v[layer], ctx.slot_mapping)
        return
    _, nb, bs, h, d = c.k.shape
    c.k[layer].view(nb * bs, h, d).index_copy_(0, ctx.slot_mapping, k)
    c.v[layer].view(nb * bs, h, d).index_copy_(0, ctx.slot_mapping, v)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, ctx: AttentionContext) -> torch.Tensor:
    """Store this layer's new K/V, then attend: q [T, H_q, D] -> [T, H_q, D]."""
    store_kv(ctx, layer, k, v)
    c = ctx.cache
    if q.is_cuda:
        pool, routing = ctx.anchors(layer)
        if ctx.is_prefill:
            return paged_attention_prefill(q, ctx.cu_seqlens_q, c.k[layer], c.v[layer], ctx.block_tables,
                                           ctx.context_lens, pool, routing, max_seqlen_q=ctx.max_seqlen_q, check=ctx.check)
        if ctx.decode_plan is None:  # checks, splits and the anchor plan once per step, not per layer
            ctx.decode_plan = plan_decode(q, c.k[layer], c.v[layer], ctx.block_tables, ctx.context_lens, pool,
                                          routing, check=ctx.check, workspace=ctx.workspace)
        return ctx.decode_plan.run(q, c.k[layer], c.v[layer], pool)
    return torch_paged_attention(q, layer, ctx)


def gather_anchor_kv(cache: KVCache, layer: int, block_row: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One anchor set's K/V [A, H_kv, D] of a layer, dequantized to float32 when stored as int8 codes."""
    ak, av = cache.anchor_k[layer][block_row], cache.anchor_v[layer][block_row]
    ak = ak.reshape(-1, *ak.shape[2:])[:length]
    av = av.reshape(-1, *av.shape[2:])[:length]
    if ak.dtype == torch.int8:
        ve = cache.anchor_v_exp[layer][block_row].reshape(-1, av.shape[1])[:length]
        return ak.float() * cache.anchor_k_scale[layer], dequantize_rows(torch.cat([av, ve[..., None]], dim=-1))
    return ak, av


def torch_paged_attention(q: torch.Tensor, layer: int, ctx: AttentionContext) -> torch.Tensor:
    """The CPU path: per sequence, gather [anchors ; own blocks] and run SDPA with a causal offset."""
    c = ctx.cache
    bs = c.block_size
    out = torch.empty_like(q)
    cu = ctx.cu_seqlens_q.tolist()
    lens = ctx.context_lens.tolist()
    r = ctx.routing
    sets = r.seq_anchor_set.tolist() if r.seq_anchor_set.numel() else [-1] * len(lens)
    alens = r.lens.tolist()
    gqa = q.shape[1] // c.k.shape[3]
    for i, n in enumerate(lens):
        lo, hi = cu[i], cu[i + 1]
        if hi == lo:
            continue
        blocks = ctx.block_tables[i, : -(-n // bs)]
        k = c.k[layer][blocks].reshape(-1, *c.k.shape[3:])[:n]
        v = c.v[layer][blocks].reshape(-1, *c.v.shape[3:])[:n]
        a = 0
        if sets[i] >= 0 and alens[sets[i]] > 0:
            a = alens[sets[i]]
            nblk = -(-a // bs)
            ak, av = gather_anchor_kv(c, layer, r.block_table[sets[i], :nblk], a)
            k, v = torch.cat([ak.to(k.dtype), k]), torch.cat([av.to(v.dtype), v])
        # query j (of hi-lo new tokens) sits at key position a + n - (hi-lo) + j and sees keys up to it
        qpos = torch.arange(a + n - (hi - lo), a + n, device=q.device)
        mask = torch.arange(a + n, device=q.device)[None, :] <= qpos[:, None]
        qi = q[lo:hi].transpose(0, 1).float()
        ki = k.transpose(0, 1).float().repeat_interleave(gqa, dim=0)
        vi = v.transpose(0, 1).float().repeat_interleave(gqa, dim=0)
        o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask)
        out[lo:hi] = o.transpose(0, 1).to(q.dtype)
    return out
