"""Oracles and baselines for PagedFieldprintAttention: the naive unfused v2.5 equation, SDPA.

Everything here materializes what the fused kernels never do (scores, gathered contiguous K/V),
which is what makes it a trustworthy oracle (fp64 on the CPU) and an honest baseline (on the GPU).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from fieldprint.kernels.paged_attention import AnchorPool, AnchorRouting


def gather_pages(cache: torch.Tensor, table_row: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens named by one block-table row, as a contiguous [L, H_kv, D]."""
    bs = cache.shape[1]
    nblk = -(-length // bs)
    pages = cache[table_row[:nblk].long()]  # [nblk, bs, H, D]
    return pages.reshape(nblk * bs, *cache.shape[2:])[:length]


def anchor_kv(anchors: AnchorPool, routing: AnchorRouting, set_id: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized (code * scale, as the DQP defines) anchor K and V of one set, [A, H_kv, D]."""
    n = int(routing.lens[set_id])
    k = gather_pages(anchors.k, routing.block_table[set_id], n).to(dtype)
    v = gather_pages(anchors.v, routing.block_table[set_id], n).to(dtype)
    if anchors.k.dtype == torch.int8:
        k = k * anchors.k_scale.to(dtype)
        e = gather_pages(anchors.v_exp[..., None], routing.block_table[set_id], n)
        v = v * torch.pow(2.0, e.to(dtype))
    return k, v


def naive_dual_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ka: torch.Tensor | None,
    va: torch.Tensor | None,
    *,
    mode: str = "concat",
    gamma: float | torch.Tensor = 0.0,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """The v2.5 equation for one sequence with materialized scores; q [N, H_q, D] are the last N of k.

    concat: softmax over [K_a; K] (queries see every anchor, causal over the sequence).
    gamma:  (1-g) softmax(QK^T)V + g softmax(QK_a^T)V_a; without anchors (ka None or empty) the
            anchor term is absent and the result is plain attention.
    """
    n, hq, d = q.shape
    length, hkv = k.shape[0], k.shape[1]
    rep = hq // hkv
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    kq = k.repeat_interleave(rep, dim=1).transpose(0, 1)  # [H_q, L, D]
    vq = v.repeat_interleave(rep, dim=1).transpose(0, 1)
    qh = q.transpose(0, 1)  # [H_q, N, D]
    s = qh @ kq.transpose(1, 2) * scale  # [H_q, N, L]
    pos = torch.arange(length - n, length, device=q.device)
    causal = torch.arange(length, device=q.device)[None, :] <= pos[:, None]
    s = s.masked_fill(~causal, float("-inf"))
    has_anchor = ka is not None and ka.shape[0] > 0
    if not has_anchor:
        return (torch.softmax(s, dim=-1) @ vq).transpose(0, 1)
    kaq = ka.repeat_interleave(rep, dim=1).transpose(0, 1)
    vaq = va.repeat_interleave(rep, dim=1).transpose(0, 1)
    sa = qh @ kaq.transpose(1, 2) * scale  # [H_q, N, A]
    if mode == "concat":
        p = torch.softmax(torch.cat([sa, s], dim=-1), dim=-1)
        return (p @ torch.cat([vaq, vq], dim=1)).transpose(0, 1)
    g = torch.as_tensor(gamma, dtype=q.dtype, device=q.device).reshape(-1, 1, 1)
    own = torch.softmax(s, dim=-1) @ vq
    anc = torch.softmax(sa, dim=-1) @ vaq
    return ((1 - g) * own + g * anc).transpose(0, 1)


def reference_paged(
    q: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    anchors: AnchorPool | None = None,
    routing: AnchorRouting | None = None,
    *,
    mode: str = "concat",
    gamma: float | torch.Tensor = 0.0,
    sm_scale: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The naive equation over the paged inputs, one sequence at a time, in `dtype` (the oracle).

    cu_seqlens_q None means decode: q is [B, H_q, D], one query per sequence.
    """
    decode = cu_seqlens_q is None
    bsz = block_tables.shape[0]
    cu = list(range(bsz + 1)) if decode else [int(x) for x in cu_seqlens_q.tolist()]
    qq = q.to(dtype)
    g = gamma.to(dtype) if isinstance(gamma, torch.Tensor) else gamma
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    for b in range(bsz):
        length = int(context_lens[b])
        k = gather_pages(k_cache, block_tables[b], length).to(dtype)
        v = gather_pages(v_cache, block_tables[b], length).to(dtype)
        ka = va = None
        if anchors is not None and int(routing.seq_anchor_set[b]) >= 0:
            ka, va = anchor_kv(anchors, routing, int(routing.seq_anchor_set[b]), dtype)
        qb = qq[cu[b] : cu[b + 1]]
        out[cu[b] : cu[b + 1]] = naive_dual_attention(
            qb, k, v, ka, va, mode=mode, gamma=g, sm_scale=sm_scale
        )
    return out


def sdpa_decode_contiguous(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA decode baseline: q [B, H_q, D] over contiguous k, v [B, H_kv, L, D] (GQA via enable_gqa)."""
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True)
    return out.squeeze(2)


def naive_decode_batched(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ka: torch.Tensor | None, va: torch.Tensor | None,
    *, mode: str = "concat", gamma: float = 0.0,
) -> torch.Tensor:
    """Naive unfused dual attention for a batch on contiguous [B, H_kv, L, D] K/V (GPU baseline).

    Scores are materialized ([B, H_kv, G, L] and [B, H_kv, G, A]) and softmaxed in fp32.
    """
    bsz, hq, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(bsz, hkv, hq // hkv, d)
    scale = 1.0 / math.sqrt(d)
    s = (qg @ k.transpose(-1, -2)).float() * scale
    if ka is None:
        return (torch.softmax(s, dim=-1).to(q.dtype) @ v).reshape(bsz, hq, d)
    sa = (qg @ ka.transpose(-1, -2)).float() * scale
    if mode == "concat":
        p = torch.softmax(torch.cat([sa, s], dim=-1), dim=-1).to(q.dtype)
        out = p[..., : sa.shape[-1]] @ va + p[..., sa.shape[-1]:] @ v
        return out.reshape(bsz, hq, d)
    own = torch.softmax(s, dim=-1).to(q.dtype) @ v
    anc = torch.softmax(sa, dim=-1).to(q.dtype) @ va
    return ((1 - gamma) * own + gamma * anc).reshape(bsz, hq, d)
