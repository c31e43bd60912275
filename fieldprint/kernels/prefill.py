"""Triton prefill / chunked-prefill kernel over the paged cache with anchors, concat or gamma.

One program per (sequence, tile of BLOCK_M new tokens, query head). The new tokens sit at the end
of their sequence (positions context_len - q_len ... context_len - 1) and attend to every anchor
token, every earlier token, and causally among themselves.

concat is one softmax over [anchors; context], so it keeps ONE online-softmax state: the anchors
are attended first (INT8: with the K scale folded into q and each V row's power-of-two scale
applied to P's columns, both exact), then the context continues the same state: one [BLOCK_M, D]
fp32 accumulator instead of two, which keeps the 128x128 kernel's registers out of the loops'
spills (docs/attention-notes.md, v6). gamma needs two states.

The matrix-product loop differs from the decode one: the softmax scale is applied inside the
exponent's fused multiply-add (qk * s - m) rather than as a separate multiply on every score, and
when a page holds at least BLOCK_N tokens a K/V tile is one page of one head, copied through a
tensor descriptor (TMA on the H100: v7) instead of gathered row by row through the block table.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fieldprint.kernels.decode import EXP_MIN, NEG, _scale_rows, dot


@triton.jit
def _prefill_tile(
    q, m_i, l_i, acc, start, hi, table_row_ptr, k_ptr, v_ptr, ve_ptr, h, H_KV, scale_log2, pos,
    D: tl.constexpr, BLOCK_N: tl.constexpr, BS: tl.constexpr, MASKED: tl.constexpr,
    CAUSAL: tl.constexpr, INT8: tl.constexpr, TMA: tl.constexpr,
):
    """One BLOCK_N tile of paged tokens from `start`: scores, online softmax (base 2), P @ V.

    TMA: k_ptr / v_ptr are tensor descriptors over the pool as [blocks * BS, H_kv * D]; a tile
    is one page's rows, copied by the tensor memory accelerator (no per-thread addresses).
    INT8 (never with TMA): ve_ptr holds one int8 exponent per (token, head) V row.
    """
    d = tl.arange(0, D)
    n = start + tl.arange(0, BLOCK_N)
    if TMA:
        row = tl.load(table_row_ptr + start // BS) * BS + start % BS
        k = k_ptr.load([row, h * D])
        v = v_ptr.load([row, h * D])
        if MASKED:
            nmask = n < hi
            # Rows past hi are another token's (or unwritten) data: scores are masked below,
            # and V rows are zeroed so that 0 * (inf or NaN) cannot reach the output.
            v = tl.where(nmask[:, None], v, 0)
    elif BS >= BLOCK_N:
        # The whole tile lies in one page (start is a multiple of BLOCK_N, BLOCK_N divides BS).
        page = tl.load(table_row_ptr + start // BS).to(tl.int64)
        off = ((page * BS + n % BS) * H_KV + h) * D
    else:
        if MASKED:
            page = tl.load(table_row_ptr + n // BS, mask=n < hi, other=0).to(tl.int64)
        else:
            page = tl.load(table_row_ptr + n // BS).to(tl.int64)
        off = ((page * BS + n % BS) * H_KV + h) * D
    if not TMA:
        if MASKED:
            nmask = n < hi
            k = tl.load(k_ptr + off[:, None] + d[None, :], mask=nmask[:, None], other=0)
            v = tl.load(v_ptr + off[:, None] + d[None, :], mask=nmask[:, None], other=0)
            if INT8:
                ve = tl.load(ve_ptr + off // D, mask=nmask, other=EXP_MIN)
        else:
            k = tl.load(k_ptr + off[:, None] + d[None, :])
            v = tl.load(v_ptr + off[:, None] + d[None, :])
            if INT8:
                ve = tl.load(ve_ptr + off // D)
    if INT8:
        # Codes are exact in bf16/fp16; K's scale is folded into q, V's rows scale P (_scale_rows).
        k = k.to(q.dtype)
        v = v.to(q.dtype)
    qk = dot(q, tl.trans(k))
    if MASKED:
        valid = nmask[None, :]
        if CAUSAL:
            valid = valid & (n[None, :] <= pos[:, None])
        qk = tl.where(valid, qk, float("-inf"))
    # max(qk) * s == max(qk * s) for s > 0; the scale then rides in one FMA per score.
    m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
    p = tl.exp2(qk * scale_log2 - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if INT8:
        pv, top = _scale_rows(p, ve)
        acc = acc * alpha[:, None] + dot(pv.to(q.dtype), v) * top
    else:
        acc = acc * alpha[:, None] + dot(p.to(q.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _prefill_range(
    q, m_i, l_i, acc, lo, hi, table_row_ptr, k_ptr, v_ptr, ve_ptr, h, H_KV, scale_log2, pos,
    D: tl.constexpr, BLOCK_N: tl.constexpr, BS: tl.constexpr, CAUSAL: tl.constexpr,
    INT8: tl.constexpr, TMA: tl.constexpr,
):
    """Tokens [lo, hi) (lo a multiple of BLOCK_N): whole tiles unmasked, the rest masked."""
    hi = tl.maximum(hi, lo)
    if CAUSAL:
        for start in range(lo, hi, BLOCK_N):
            m_i, l_i, acc = _prefill_tile(q, m_i, l_i, acc, start, hi, table_row_ptr, k_ptr, v_ptr,
                                          ve_ptr, h, H_KV, scale_log2, pos, D, BLOCK_N, BS, True, True, INT8, TMA)
    else:
        full = lo + (hi - lo) // BLOCK_N * BLOCK_N
        for start in range(lo, full, BLOCK_N):
            m_i, l_i, acc = _prefill_tile(q, m_i, l_i, acc, start, hi, table_row_ptr, k_ptr, v_ptr,
                                          ve_ptr, h, H_KV, scale_log2, pos, D, BLOCK_N, BS, False, False, INT8, TMA)
        if full < hi:
            m_i, l_i, acc = _prefill_tile(q, m_i, l_i, acc, full, hi, table_row_ptr, k_ptr, v_ptr,
                                          ve_ptr, h, H_KV, scale_log2, pos, D, BLOCK_N, BS, True, False, INT8, TMA)
    return m_i, l_i, acc


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
                m_a, l_a, acc_a = _prefill_range(qa, m_a, l_a, acc_a, 0, alen, a_row, ak_ptr, av_ptr, ve_ptr,
                                                 h, H_KV, scale_log2, pos, D, BLOCK_N, BSA, False, INT8, TMA_A)
            else:
                # concat: the anchors open the one softmax state the context then continues.
                m_i, l_i, acc = _prefill_range(qa, m_i, l_i, acc, 0, alen, a_row, ak_ptr, av_ptr, ve_ptr,
                                               h, H_KV, scale_log2, pos, D, BLOCK_N, BSA, False, INT8, TMA_A)
        m_i, l_i, acc = _prefill_range(q, m_i, l_i, acc, 0, diag_lo, t_row, k_ptr, v_ptr, v_ptr, h, H_KV,
                                       scale_log2, pos, D, BLOCK_N, BS, False, False, TMA_KV)
        m_i, l_i, acc = _prefill_range(q, m_i, l_i, acc, diag_lo, hi, t_row, k_ptr, v_ptr, v_ptr, h, H_KV,
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
