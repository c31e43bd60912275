"""Triton prefill / chunked-prefill kernel over the paged cache with anchors, concat or gamma.

One program per (sequence, tile of BLOCK_M new tokens, query head). The new tokens sit at the end
of their sequence (positions context_len - q_len ... context_len - 1) and attend to every anchor
token, every earlier token, and causally among themselves. concat keeps one online-softmax state
across anchors and context (it is one softmax); gamma keeps two and mixes them with fixed weights.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fieldprint.kernels.decode import NEG, _attend_range


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, cu_ptr,
    ak_ptr, av_ptr, abt_ptr, alen_ptr, seqset_ptr, ks_ptr, vs_ptr,
    gamma_ptr, gamma_val, out_ptr,
    H_KV, max_blocks, max_ablocks, scale_log2, sq_t, sq_h, so_t, so_h,
    D: tl.constexpr, GQA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BS: tl.constexpr, BSA: tl.constexpr, HAS_ANCHORS: tl.constexpr, INT8: tl.constexpr,
    MODE_GAMMA: tl.constexpr, GAMMA_PER_HEAD: tl.constexpr,
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
        m_i, l_i, acc = _attend_range(q, m_i, l_i, acc, 0, diag, t_row, k_ptr, v_ptr, h, H_KV,
                                      scale_log2, pos, D, BLOCK_N, BS, False, False)
        hi = tl.minimum(diag + BLOCK_M, ctx)
        m_i, l_i, acc = _attend_range(q, m_i, l_i, acc, diag, hi, t_row, k_ptr, v_ptr, h, H_KV,
                                      scale_log2, pos, D, BLOCK_N, BS, True, False)
        if HAS_ANCHORS:
            # The anchors keep their own state (so INT8 scales fold exactly); concat then merges
            # the two by log-sum-exp, gamma mixes them with fixed weights.
            set_b = tl.load(seqset_ptr + b)
            alen = tl.load(alen_ptr + tl.maximum(set_b, 0))
            alen = tl.where(set_b >= 0, alen, 0)
            qa = q
            if INT8:
                qa = (q.to(tl.float32) * tl.load(ks_ptr + h * D + d)[None, :]).to(q.dtype)
            a_row = abt_ptr + tl.maximum(set_b, 0).to(tl.int64) * max_ablocks
            m_a = tl.full([BLOCK_M], NEG, tl.float32)
            l_a = tl.zeros([BLOCK_M], tl.float32)
            acc_a = tl.zeros([BLOCK_M, D], tl.float32)
            m_a, l_a, acc_a = _attend_range(qa, m_a, l_a, acc_a, 0, alen, a_row, ak_ptr, av_ptr, h,
                                            H_KV, scale_log2, pos, D, BLOCK_N, BSA, False, INT8)
            if INT8:
                acc_a = acc_a * tl.load(vs_ptr + h * D + d)[None, :]
            if MODE_GAMMA:
                if GAMMA_PER_HEAD:
                    gam = tl.zeros([BLOCK_M], tl.float32) + tl.load(gamma_ptr + hq)
                else:
                    gam = tl.zeros([BLOCK_M], tl.float32) + gamma_val
                # Without anchor tokens the anchor term is absent (g -> 0): plain attention.
                gam = tl.where(alen > 0, gam, 0.0)
                l_a = tl.where(l_a > 0, l_a, 1.0)
                out = (1.0 - gam)[:, None] * (acc / l_i[:, None]) + gam[:, None] * (acc_a / l_a[:, None])
            else:
                m_t = tl.maximum(m_i, m_a)
                wc = tl.exp2(m_i - m_t)
                wa = tl.exp2(m_a - m_t)
                out = (acc * wc[:, None] + acc_a * wa[:, None]) / (l_i * wc + l_a * wa)[:, None]
        else:
            out = acc / l_i[:, None]
        tl.store(out_ptr + q_rows[:, None] * so_t + hq * so_h + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mmask[:, None])
