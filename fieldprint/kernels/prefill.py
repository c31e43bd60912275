"""Triton prefill / chunked-prefill kernel over the paged cache with anchors, concat or gamma.

One program per (sequence, tile of BLOCK_M new tokens, query head). The new tokens sit at the end
of their sequence (positions context_len - q_len ... context_len - 1) and attend to every anchor
token, every earlier token, and causally among themselves.

concat is one softmax over [anchors; context], so it keeps ONE online-softmax state: the anchors
are attended first (INT8: with the K scale folded into q and each V row's power-of-two scale
applied to V's rows, or to P's columns for fp16, all exact), then the context continues the same
state: one [BLOCK_M, D] fp32 accumulator instead of two, which keeps the 128x128 kernel's
registers out of the loops' spills (docs/attention-notes.md, v6). gamma needs two states.

The tile loop is the decode kernel's (fieldprint/kernels/decode.py, _attend_range); when a page
holds at least BLOCK_N tokens, prefill reads a K/V tile, one page of one head, through a tensor
descriptor (TMA on the H100: v7) instead of gathering it row by row through the block table.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fieldprint.kernels.decode import NEG, _attend_range


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, cu_ptr,
    ak_ptr, av_ptr, abt_ptr, alen_ptr, seqset_ptr, ks_ptr, ve_ptr,
    gamma_ptr, gamma_val, out_ptr,
    H_KV, max_blocks, max_ablocks, scale_log2, sq_t, sq_h, so_t, so_h,
    D: tl.constexpr, GQA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BS: tl.constexpr, BSA: tl.constexpr, HAS_ANCHORS: tl.constexpr, INT8: tl.constexpr,
    MODE_GAMMA: tl.constexpr, GAMMA_PER_HEAD: tl.constexpr, TMA_KV: tl.constexpr,
    TMA_A: tl.constexpr,
):
    b = tl.program_id(0)
    # Longest tiles (last rows, most causal work) first, so the tail of the grid is short ones.
    mt = tl.num_programs(1) - 1 - tl.program_id(1)
    hq = tl.program_id(2)
    h = hq // GQA
    q0 = tl.load(cu_ptr + b)
    q_len = tl.load(cu_ptr + b + 1) - q0
    if mt * BLOCK_M < q_len:
        ctx = tl.load(ctx_ptr + b)
        prefix = ctx - q_len
        m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        mmask = m < q_len
        pos = prefix + m
        d = tl.arange(0, D)
        q_rows = (q0 + m).to(tl.int64)
        q = tl.load(q_ptr + q_rows[:, None] * sq_t + hq * sq_h + d[None, :], mask=mmask[:, None],
                    other=0)
        m_i = tl.full([BLOCK_M], NEG, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        t_row = bt_ptr + b.to(tl.int64) * max_blocks
        # Tokens before this tile's first position are visible to all its rows: no causal mask.
        diag = prefix + mt * BLOCK_M
        # Start the causal part on a BLOCK_N boundary so that page-sized tiles stay in one page.
        diag_lo = diag // BLOCK_N * BLOCK_N
        hi = tl.minimum(diag + BLOCK_M, ctx)
        if HAS_ANCHORS:
            set_b = tl.load(seqset_ptr + b)
            alen = tl.load(alen_ptr + tl.maximum(set_b, 0))
            alen = tl.where(set_b >= 0, alen, 0)
            qa = q
            if INT8:
                # q.(code*s_k) == (q*s_k).code: exact for power-of-two scales (the DQP's values).
                qa = (q.to(tl.float32) * tl.load(ks_ptr + h * D + d)[None, :]).to(q.dtype)
            a_row = abt_ptr + tl.maximum(set_b, 0).to(tl.int64) * max_ablocks
            if MODE_GAMMA:
                m_a = tl.full([BLOCK_M], NEG, tl.float32)
                l_a = tl.zeros([BLOCK_M], tl.float32)
                acc_a = tl.zeros([BLOCK_M, D], tl.float32)
                m_a, l_a, acc_a = _attend_range(qa, m_a, l_a, acc_a, 0, alen, a_row, ak_ptr, av_ptr, ve_ptr,
                                                 h, H_KV, scale_log2, pos, D, BLOCK_N, BSA, False, INT8, TMA_A)
            else:
                # concat: the anchors open the one softmax state the context then continues.
                m_i, l_i, acc = _attend_range(qa, m_i, l_i, acc, 0, alen, a_row, ak_ptr, av_ptr, ve_ptr,
                                               h, H_KV, scale_log2, pos, D, BLOCK_N, BSA, False, INT8, TMA_A)
        m_i, l_i, acc = _attend_range(q, m_i, l_i, acc, 0, diag_lo, t_row, k_ptr, v_ptr, v_ptr, h, H_KV,
                                       scale_log2, pos, D, BLOCK_N, BS, False, False, TMA_KV)
        m_i, l_i, acc = _attend_range(q, m_i, l_i, acc, diag_lo, hi, t_row, k_ptr, v_ptr, v_ptr, h, H_KV,
                                       scale_log2, pos, D, BLOCK_N, BS, True, False, TMA_KV)
        out = acc / l_i[:, None]
        if HAS_ANCHORS:
            if MODE_GAMMA:
                if GAMMA_PER_HEAD:
                    gam = tl.zeros([BLOCK_M], tl.float32) + tl.load(gamma_ptr + hq)
                else:
                    gam = tl.zeros([BLOCK_M], tl.float32) + gamma_val
                # Without anchor tokens the anchor term is absent (g -> 0): plain attention.
                gam = tl.where(alen > 0, gam, 0.0)
                l_a = tl.where(l_a > 0, l_a, 1.0)
                out = (1.0 - gam)[:, None] * out + gam[:, None] * (acc_a / l_a[:, None])
        tl.store(out_ptr + q_rows[:, None] * so_t + hq * so_h + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mmask[:, None])
