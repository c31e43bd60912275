"""Triton decode kernel: split-KV over the paged cache, shared anchors per group, one launch.

One grid holds two kinds of work item. An anchor item (tile of sequences sharing an anchor set, KV head,
anchor split) multiplies the queries of up to TILE_SEQ sequences that share an anchor set by one
slice of that set's anchor K/V, so the anchor bytes are read once per tile instead of once per sequence. A
context item (sequence, KV head, context split) reads one slice of that sequence's own pages. Both
write an unnormalized partial (m, l, acc) into a workspace and bump a per-(sequence, KV head)
counter; the program that brings the counter to its target merges the partials (log-sum-exp for
concat, fixed weights for gamma), writes the output and resets the counter to zero for the next
launch. No program ever waits for another, so the single launch cannot deadlock.
"""

from __future__ import annotations

import triton
import triton.language as tl

NEG = tl.constexpr(-1.0e30)  # finite "minus infinity": empty splits then merge without inf - inf = NaN
EXP_MIN = tl.constexpr(-64)  # the DQP's smallest scale exponent (fieldprint/dqp_profile.py)


@triton.jit
def _pow2(e):
    """Exact float32 2**e for int32 e in [-126, 127], from its bits (no approximate exp2)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _scale_rows(p, ve):
    """(P with column j times 2**(e_j - top), 2**top) for int8 V rows with exponents e, top = max e.

    value(V row j) = code_j * 2**e_j, so P @ V == 2**top * ((P * 2**(e - top)) @ codes). Taking the
    tile's largest exponent out keeps every scaled probability <= 1, inside fp16's range, and
    both factors are powers of two: no rounding beyond the product's own. Only fp16 needs this
    (see _int8_operands).
    """
    e = ve.to(tl.int32)
    top = tl.max(e, 0)
    rel = _pow2(tl.maximum(e - top, -126))
    return p * rel[None, :], _pow2(top)


@triton.jit
def _int8_operands(k, v, ve, dtype):
    """DQP codes of a K and a V tile as `dtype` operands; V's rows carry their 2**e where exact.

    Codes (|c| <= 127) are exact in every 16-bit float. code * 2**e with e in the DQP's [-64, 63] is
    exact in bf16 and fp32 (8-bit exponents), so V is dequantized here, in the layout it was loaded
    in: one exponent per loaded row. fp16 cannot hold 2**-64, so for fp16 V stays codes and P's
    columns are scaled instead (_scale_rows), which needs each exponent in P's layout: a gather per
    column that cost more issue slots than the matrix work (docs/attention-notes.md, v13).
    """
    k = k.to(dtype)
    if dtype == tl.float16:
        v = v.to(dtype)
    else:
        # A product by a power of two in range: exact in `dtype` itself (no fp32 round trip).
        v = v.to(dtype) * _pow2(ve.to(tl.int32)).to(dtype)[:, None]
    return k, v


@triton.jit
def _pv(acc, alpha, p, v, ve, INT8: tl.constexpr):
    """acc * alpha + P @ V, V as _int8_operands left it (fp16 int8 codes: P's columns scaled)."""
    if INT8 and v.dtype == tl.float16:
        pv, top = _scale_rows(p, ve)
        acc = acc * alpha[:, None] + dot(pv.to(v.dtype), v) * top
    else:
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v)
    return acc


@triton.jit
def dot(a, b):
    """a @ b with fp32 accumulation; fp32 operands multiply in IEEE fp32, never TF32.

    On NVIDIA GPUs tl.dot's default for fp32 operands is TF32 (a 10-bit mantissa), which Triton's
    interpreter does not emulate: fp32 results would differ by device. bf16/fp16 keep the default.
    """
    if a.dtype == tl.float32:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def _attend_tile(
    q, m_i, l_i, acc, start, hi, table_row_ptr, k_ptr, v_ptr, ve_ptr, h, H_KV, scale_log2, pos,
    D: tl.constexpr, BLOCK_N: tl.constexpr, BS: tl.constexpr, MASKED: tl.constexpr,
    CAUSAL: tl.constexpr, INT8: tl.constexpr, TMA: tl.constexpr,
):
    """One BLOCK_N tile of paged tokens from `start`: scores, online softmax (base 2), P @ V.

    TMA: k_ptr / v_ptr are tensor descriptors over the pool as [blocks * BS, H_kv * D]; a tile
    is one page's rows, copied by the tensor memory accelerator (no per-thread addresses).
    INT8 (never with TMA): K's per-channel scale is already folded into q; ve_ptr holds one int8
    exponent per (token, head) V row, which scales V's rows, or P's columns for fp16
    (_int8_operands).
    """
    d = tl.arange(0, D)
    n = start + tl.arange(0, BLOCK_N)
    nmask = n < hi
    ve = 0
    if TMA:
        row = tl.load(table_row_ptr + start // BS) * BS + start % BS
        k = k_ptr.load([row, h * D])
        v = v_ptr.load([row, h * D])
        if MASKED:
            # Rows past hi are another token's (or unwritten) data: scores are masked below,
            # and V rows are zeroed so that 0 * (inf or NaN) cannot reach the output.
            v = tl.where(nmask[:, None], v, 0)
    else:
        # Unsigned, so that // and % by the power-of-two page size are a shift and a mask (signed
        # division adds a sign fix-up per row).
        nu = n.to(tl.uint32)
        if BS >= BLOCK_N:
            # The whole tile lies in one page (start is a multiple of BLOCK_N, BLOCK_N divides BS).
            page = tl.load(table_row_ptr + start // BS).to(tl.int64)
        elif MASKED:
            page = tl.load(table_row_ptr + nu // BS, mask=nmask, other=0).to(tl.int64)
        else:
            page = tl.load(table_row_ptr + nu // BS).to(tl.int64)
        row = (page * BS + (nu % BS).to(tl.int64)) * H_KV + h
        off = row * D
        if MASKED:
            k = tl.load(k_ptr + off[:, None] + d[None, :], mask=nmask[:, None], other=0)
            v = tl.load(v_ptr + off[:, None] + d[None, :], mask=nmask[:, None], other=0)
            if INT8:
                ve = tl.load(ve_ptr + row, mask=nmask, other=EXP_MIN)
        else:
            k = tl.load(k_ptr + off[:, None] + d[None, :])
            v = tl.load(v_ptr + off[:, None] + d[None, :])
            if INT8:
                ve = tl.load(ve_ptr + row)
    if INT8:
        k, v = _int8_operands(k, v, ve, q.dtype)
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
    acc = _pv(acc, alpha, p, v, ve, INT8)
    return m_new, l_i, acc


@triton.jit
def _attend_range(
    q, m_i, l_i, acc, lo, hi, table_row_ptr, k_ptr, v_ptr, ve_ptr, h, H_KV, scale_log2, pos,
    D: tl.constexpr, BLOCK_N: tl.constexpr, BS: tl.constexpr, CAUSAL: tl.constexpr,
    INT8: tl.constexpr, TMA: tl.constexpr,
):
    """Online softmax of q over tokens [lo, hi) of one paged sequence (pages named by table_row;
    lo a multiple of BLOCK_N). Whole tiles run without masks; only the last partial tile (and
    causal tiles) pay for them. Decode and prefill (fieldprint/kernels/prefill.py) both run it.
    """
    hi = tl.maximum(hi, lo)
    if CAUSAL:
        for start in range(lo, hi, BLOCK_N):
            m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, start, hi, table_row_ptr, k_ptr, v_ptr, ve_ptr, h,
                                         H_KV, scale_log2, pos, D, BLOCK_N, BS, True, True, INT8, TMA)
    else:
        full = lo + (hi - lo) // BLOCK_N * BLOCK_N
        for start in range(lo, full, BLOCK_N):
            m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, start, hi, table_row_ptr, k_ptr, v_ptr, ve_ptr, h,
                                         H_KV, scale_log2, pos, D, BLOCK_N, BS, False, False, INT8, TMA)
        if full < hi:
            m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, full, hi, table_row_ptr, k_ptr, v_ptr, ve_ptr, h,
                                         H_KV, scale_log2, pos, D, BLOCK_N, BS, True, False, INT8, TMA)
    return m_i, l_i, acc


@triton.jit
def _merge_slots(pm_ptr, pl_ptr, pacc_ptr, base, rmask, s_lo, s_hi, D: tl.constexpr,
                 ROWS: tl.constexpr, S_PAD: tl.constexpr, SB: tl.constexpr):
    """Log-sum-exp merge of partial slots [s_lo, s_hi) for ROWS heads; returns (m, l, acc).

    The row max comes from one load of all slots; then SB slots are loaded at a time so that many
    loads are in flight. .cg reads from L2, never from a stale L1 line of this multiprocessor.
    """
    d = tl.arange(0, D)
    sp = tl.arange(0, S_PAD)
    smask = rmask[:, None] & (sp[None, :] < s_hi - s_lo)
    m_all = tl.load(pm_ptr + base[:, None] + s_lo + sp[None, :], mask=smask, other=NEG,
                    cache_modifier=".cg")
    m_t = tl.max(m_all, 1)
    l_t = tl.zeros([ROWS], tl.float32)
    o_t = tl.zeros([ROWS, D], tl.float32)
    sb = tl.arange(0, SB)
    for s0 in range(s_lo, s_hi, SB):
        cmask = rmask[:, None] & (s0 + sb[None, :] < s_hi)
        idx = base[:, None] + s0 + sb[None, :]
        m = tl.load(pm_ptr + idx, mask=cmask, other=NEG, cache_modifier=".cg")
        l = tl.load(pl_ptr + idx, mask=cmask, other=0.0, cache_modifier=".cg")
        a = tl.load(pacc_ptr + idx[:, :, None] * D + d[None, None, :], mask=cmask[:, :, None],
                    other=0.0, cache_modifier=".cg")
        w = tl.exp2(m - m_t[:, None])
        l_t += tl.sum(l * w, 1)
        o_t += tl.sum(a * w[:, :, None], 1)
    return m_t, l_t, o_t


@triton.jit
def _merge_and_store(
    b, h, H_KV, seqset_ptr, alen_ptr, pm_ptr, pl_ptr, pacc_ptr, out_ptr, so_b, so_h, gamma_ptr,
    gamma_val, S_CTX: tl.constexpr, S_ANC: tl.constexpr, GQA: tl.constexpr, GQA_PAD: tl.constexpr,
    D: tl.constexpr, MODE_GAMMA: tl.constexpr, GAMMA_PER_HEAD: tl.constexpr, S_PAD: tl.constexpr,
):
    """Combine every partial of (sequence b, KV head h) and write its GQA output rows."""
    g = tl.arange(0, GQA_PAD)
    rmask = g < GQA
    hq = h * GQA + g
    base = (b * H_KV * GQA + hq) * (S_CTX + S_ANC)
    m_c, l_c, o_c = _merge_slots(pm_ptr, pl_ptr, pacc_ptr, base, rmask, 0, S_CTX, D, GQA_PAD, S_PAD, 8)
    out = o_c / l_c[:, None]
    if S_ANC > 0:
        set_b = tl.load(seqset_ptr + b)
        if set_b >= 0:
            if MODE_GAMMA:
                m_a, l_a, o_a = _merge_slots(pm_ptr, pl_ptr, pacc_ptr, base, rmask, S_CTX,
                                             S_CTX + S_ANC, D, GQA_PAD, S_PAD, 8)
                if GAMMA_PER_HEAD:
                    gam = tl.load(gamma_ptr + hq, mask=rmask, other=0.0)
                else:
                    gam = tl.zeros([GQA_PAD], tl.float32) + gamma_val
                # An empty anchor set counts as no anchors: the anchor term is absent (g -> 0).
                has_tokens = tl.load(alen_ptr + set_b) > 0
                gam = tl.where(has_tokens, gam, 0.0)
                l_a = tl.where(l_a > 0, l_a, 1.0)
                out = (1.0 - gam)[:, None] * out + gam[:, None] * (o_a / l_a[:, None])
            else:
                # concat is one softmax over [anchors; context]: keep merging into the same state.
                m_a, l_a, o_a = _merge_slots(pm_ptr, pl_ptr, pacc_ptr, base, rmask, S_CTX,
                                             S_CTX + S_ANC, D, GQA_PAD, S_PAD, 8)
                m_t = tl.maximum(m_c, m_a)
                wc = tl.exp2(m_c - m_t)
                wa = tl.exp2(m_a - m_t)
                out = (o_c * wc[:, None] + o_a * wa[:, None]) / (l_c * wc + l_a * wa)[:, None]
    d = tl.arange(0, D)
    tl.store(out_ptr + b * so_b + hq[:, None] * so_h + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None])


@triton.jit
def _store_partial(pm_ptr, pl_ptr, pacc_ptr, idx, rmask, m_i, l_i, acc, D: tl.constexpr):
    """Write one unnormalized partial (m, l, acc) per row to workspace slot index idx."""
    d = tl.arange(0, D)
    tl.store(pm_ptr + idx, m_i, mask=rmask)
    tl.store(pl_ptr + idx, l_i, mask=rmask)
    tl.store(pacc_ptr + idx[:, None] * D + d[None, :], acc, mask=rmask[:, None])


@triton.jit
def _anchor_item(
    pid, q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr,
    ak_ptr, av_ptr, abt_ptr, alen_ptr, seqset_ptr, order_ptr, start_ptr, ks_ptr, ve_ptr,
    gamma_ptr, gamma_val, pm_ptr, pl_ptr, pacc_ptr, cnt_ptr, out_ptr,
    B, H_KV, max_blocks, max_ablocks, chunk, achunk, n_anchor_items, scale_log2,
    sq_b, sq_h, so_b, so_h,
    D: tl.constexpr, GQA: tl.constexpr, GQA_PAD: tl.constexpr, TILE_SEQ: tl.constexpr,
    M_CTX: tl.constexpr, M_ANC: tl.constexpr, BLOCK_N: tl.constexpr, BS: tl.constexpr,
    BSA: tl.constexpr, S_CTX: tl.constexpr, S_ANC: tl.constexpr, INT8: tl.constexpr,
    MODE_GAMMA: tl.constexpr, GAMMA_PER_HEAD: tl.constexpr, S_PAD: tl.constexpr,
    MERGE_APART: tl.constexpr,
):
    """Anchor work item: (run of up to TILE_SEQ sequences sharing one anchor set, KV head, split).

    Items exist for every sorted position; only those the plan marks as a run's tile start work,
    the rest return at once (the grid is sized without reading the sets back to the host).
    """
    d = tl.arange(0, D)
    split = pid % S_ANC
    t = pid // S_ANC
    h = t % H_KV
    p0 = t // H_KV
    if tl.load(start_ptr + p0) != 0:
        cur = tl.load(seqset_ptr + tl.load(order_ptr + p0))
        r = tl.arange(0, M_ANC)
        j = r // GQA_PAD
        gi = r % GQA_PAD
        pos_r = p0 + j
        rvalid = (j < TILE_SEQ) & (gi < GQA) & (pos_r < B)
        seq_r = tl.load(order_ptr + pos_r, mask=rvalid, other=0)
        set_r = tl.load(seqset_ptr + seq_r, mask=rvalid, other=-1)
        rvalid = rvalid & (set_r == cur)
        q = tl.load(q_ptr + seq_r[:, None] * sq_b + (h * GQA + gi)[:, None] * sq_h + d[None, :],
                    mask=rvalid[:, None], other=0)
        jv = tl.arange(0, TILE_SEQ)
        pos_j = p0 + jv
        jvalid = pos_j < B
        seq_j = tl.load(order_ptr + pos_j, mask=jvalid, other=0)
        set_j = tl.load(seqset_ptr + seq_j, mask=jvalid, other=-1)
        jvalid = jvalid & (set_j == cur)
        if INT8:
            # q.(code*s_k) == (q*s_k).code: with power-of-two scales the fold is exact (DQP values).
            q = (q.to(tl.float32) * tl.load(ks_ptr + h * D + d)[None, :]).to(q.dtype)
        alen = tl.load(alen_ptr + cur)
        lo = split * achunk
        hi = tl.minimum(lo + achunk, alen)
        m_i = tl.full([M_ANC], NEG, tl.float32)
        l_i = tl.zeros([M_ANC], tl.float32)
        acc = tl.zeros([M_ANC, D], tl.float32)
        m_i, l_i, acc = _attend_range(
            q, m_i, l_i, acc, lo, hi, abt_ptr + cur.to(tl.int64) * max_ablocks, ak_ptr, av_ptr, ve_ptr,
            h, H_KV, scale_log2, r, D, BLOCK_N, BSA, False, INT8, False)
        idx = (seq_r * (H_KV * GQA) + h * GQA + gi) * (S_CTX + S_ANC) + S_CTX + split
        _store_partial(pm_ptr, pl_ptr, pacc_ptr, idx, rvalid, m_i, l_i, acc, D)
        if not MERGE_APART:
            # Every thread's partial stores must be ordered before the counter bump (release).
            tl.debug_barrier()
            old = tl.atomic_add(cnt_ptr + seq_j * H_KV + h, 1, mask=jvalid, sem="acq_rel", scope="gpu")
            need = jvalid & (old == S_CTX + S_ANC - 1)
            for jj in range(TILE_SEQ):
                pick = jv == jj
                if tl.sum(tl.where(pick & need, 1, 0), 0) > 0:
                    bj = tl.sum(tl.where(pick, seq_j, 0), 0)
                    _merge_and_store(bj, h, H_KV, seqset_ptr, alen_ptr, pm_ptr, pl_ptr, pacc_ptr, out_ptr,
                                     so_b, so_h, gamma_ptr, gamma_val, S_CTX, S_ANC, GQA, GQA_PAD, D,
                                     MODE_GAMMA, GAMMA_PER_HEAD, S_PAD)
                    tl.atomic_xchg(cnt_ptr + bj * H_KV + h, 0)


@triton.jit
def _context_item(
    cid, q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr,
    ak_ptr, av_ptr, abt_ptr, alen_ptr, seqset_ptr, order_ptr, start_ptr, ks_ptr, ve_ptr,
    gamma_ptr, gamma_val, pm_ptr, pl_ptr, pacc_ptr, cnt_ptr, out_ptr,
    B, H_KV, max_blocks, max_ablocks, chunk, achunk, n_anchor_items, scale_log2,
    sq_b, sq_h, so_b, so_h,
    D: tl.constexpr, GQA: tl.constexpr, GQA_PAD: tl.constexpr, TILE_SEQ: tl.constexpr,
    M_CTX: tl.constexpr, M_ANC: tl.constexpr, BLOCK_N: tl.constexpr, BS: tl.constexpr,
    BSA: tl.constexpr, S_CTX: tl.constexpr, S_ANC: tl.constexpr, INT8: tl.constexpr,
    MODE_GAMMA: tl.constexpr, GAMMA_PER_HEAD: tl.constexpr, S_PAD: tl.constexpr,
    MERGE_APART: tl.constexpr,
):
    """Context work item: (sequence, KV head, context split) over the sequence's own pages."""
    d = tl.arange(0, D)
    split = cid % S_CTX
    t = cid // S_CTX
    h = t % H_KV
    b = t // H_KV
    ctx = tl.load(ctx_ptr + b)
    r = tl.arange(0, M_CTX)
    rmask = r < GQA
    q = tl.load(q_ptr + b * sq_b + (h * GQA + r)[:, None] * sq_h + d[None, :],
                mask=rmask[:, None], other=0)
    m_i = tl.full([M_CTX], NEG, tl.float32)
    l_i = tl.zeros([M_CTX], tl.float32)
    acc = tl.zeros([M_CTX, D], tl.float32)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, ctx)
    m_i, l_i, acc = _attend_range(
        q, m_i, l_i, acc, lo, hi, bt_ptr + b.to(tl.int64) * max_blocks, k_ptr, v_ptr, v_ptr, h, H_KV,
        scale_log2, r, D, BLOCK_N, BS, False, False, False)
    idx = (b * (H_KV * GQA) + h * GQA + r) * (S_CTX + S_ANC) + split
    _store_partial(pm_ptr, pl_ptr, pacc_ptr, idx, rmask, m_i, l_i, acc, D)
    if not MERGE_APART:
        target = S_CTX
        if S_ANC > 0:
            target = tl.where(tl.load(seqset_ptr + b) >= 0, S_CTX + S_ANC, S_CTX)
        tl.debug_barrier()
        old = tl.atomic_add(cnt_ptr + b * H_KV + h, 1, sem="acq_rel", scope="gpu")
        if old == target - 1:
            _merge_and_store(b, h, H_KV, seqset_ptr, alen_ptr, pm_ptr, pl_ptr, pacc_ptr, out_ptr, so_b, so_h,
                             gamma_ptr, gamma_val, S_CTX, S_ANC, GQA, GQA_PAD, D, MODE_GAMMA,
                             GAMMA_PER_HEAD, S_PAD)
            tl.atomic_xchg(cnt_ptr + b * H_KV + h, 0)


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr,
    ak_ptr, av_ptr, abt_ptr, alen_ptr, seqset_ptr, order_ptr, start_ptr, ks_ptr, ve_ptr,
    gamma_ptr, gamma_val, pm_ptr, pl_ptr, pacc_ptr, cnt_ptr, out_ptr,
    B, H_KV, max_blocks, max_ablocks, chunk, achunk, n_anchor_items, scale_log2,
    sq_b, sq_h, so_b, so_h,
    D: tl.constexpr, GQA: tl.constexpr, GQA_PAD: tl.constexpr, TILE_SEQ: tl.constexpr,
    M_CTX: tl.constexpr, M_ANC: tl.constexpr, BLOCK_N: tl.constexpr, BS: tl.constexpr,
    BSA: tl.constexpr, S_CTX: tl.constexpr, S_ANC: tl.constexpr, INT8: tl.constexpr,
    MODE_GAMMA: tl.constexpr, GAMMA_PER_HEAD: tl.constexpr, S_PAD: tl.constexpr,
    MERGE_APART: tl.constexpr,
):
    pid = tl.program_id(0)
    if S_ANC > 0:
        if pid < n_anchor_items:
            _anchor_item(pid, q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, ak_ptr, av_ptr, abt_ptr, alen_ptr,
                         seqset_ptr, order_ptr, start_ptr, ks_ptr, ve_ptr, gamma_ptr, gamma_val, pm_ptr, pl_ptr,
                         pacc_ptr, cnt_ptr, out_ptr, B, H_KV, max_blocks, max_ablocks, chunk, achunk,
                         n_anchor_items, scale_log2, sq_b, sq_h, so_b, so_h, D, GQA, GQA_PAD, TILE_SEQ,
                         M_CTX, M_ANC, BLOCK_N, BS, BSA, S_CTX, S_ANC, INT8, MODE_GAMMA, GAMMA_PER_HEAD,
                         S_PAD, MERGE_APART)
        else:
            _context_item(pid - n_anchor_items, q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, ak_ptr, av_ptr, abt_ptr, alen_ptr,
                         seqset_ptr, order_ptr, start_ptr, ks_ptr, ve_ptr, gamma_ptr, gamma_val, pm_ptr, pl_ptr,
                         pacc_ptr, cnt_ptr, out_ptr, B, H_KV, max_blocks, max_ablocks, chunk, achunk,
                         n_anchor_items, scale_log2, sq_b, sq_h, so_b, so_h, D, GQA, GQA_PAD, TILE_SEQ,
                         M_CTX, M_ANC, BLOCK_N, BS, BSA, S_CTX, S_ANC, INT8, MODE_GAMMA, GAMMA_PER_HEAD,
                         S_PAD, MERGE_APART)
    else:
        _context_item(pid, q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, ak_ptr, av_ptr, abt_ptr, alen_ptr,
                         seqset_ptr, order_ptr, start_ptr, ks_ptr, ve_ptr, gamma_ptr, gamma_val, pm_ptr, pl_ptr,
                         pacc_ptr, cnt_ptr, out_ptr, B, H_KV, max_blocks, max_ablocks, chunk, achunk,
                         n_anchor_items, scale_log2, sq_b, sq_h, so_b, so_h, D, GQA, GQA_PAD, TILE_SEQ,
                         M_CTX, M_ANC, BLOCK_N, BS, BSA, S_CTX, S_ANC, INT8, MODE_GAMMA, GAMMA_PER_HEAD,
                         S_PAD, MERGE_APART)


@triton.jit
def _merge_kernel(
    seqset_ptr, alen_ptr, pm_ptr, pl_ptr, pacc_ptr, gamma_ptr, gamma_val, out_ptr, H_KV, so_b, so_h,
    S_CTX: tl.constexpr, S_ANC: tl.constexpr, GQA: tl.constexpr, GQA_PAD: tl.constexpr, D: tl.constexpr,
    MODE_GAMMA: tl.constexpr, GAMMA_PER_HEAD: tl.constexpr, S_PAD: tl.constexpr,
):
    """The merge as a launch of its own (MERGE_APART): one program per (sequence, KV head).

    Fused, a sharing tile's last anchor item merges its sequences one after another, and that chain
    of L2 round trips is the longest path of a launch at large batches (docs/attention-notes.md,
    v16); apart, every (sequence, head) merges in parallel after the decode launch has written
    all its partials (the same stream orders the two).
    """
    pid = tl.program_id(0)
    _merge_and_store(pid // H_KV, pid % H_KV, H_KV, seqset_ptr, alen_ptr, pm_ptr, pl_ptr, pacc_ptr, out_ptr,
                     so_b, so_h, gamma_ptr, gamma_val, S_CTX, S_ANC, GQA, GQA_PAD, D, MODE_GAMMA,
                     GAMMA_PER_HEAD, S_PAD)
