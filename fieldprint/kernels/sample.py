"""The sampler's passes over the vocabulary as kernels: the limits, each row's kept mass, the draw.

A sampled row keeps the tokens whose logit is at least a threshold (its top-k and top-p limits) and
draws by inverse CDF in token-id order from p_j = 2^((x_j - M) * log2(e) / T), M the row's largest
logit (fieldprint/engine/sampling.py has the semantics and the torch operations the CPU runs). Done
with torch operations, that is a dozen full passes over the [rows, vocabulary] float32 logits (shift,
scale, mask, exp, logsumexp, cumsum, searchsorted, count) and some thirty launches, each with its
host cost: 1.2 ms at 128 rows of Llama-3's 128k vocabulary on the H200 for the temperature alone
(benchmarks/sampling_bench.py). Here, given the rows' limits as one float64 tensor [4, R] (log2(e) / T,
top-k, top-p or inf, the draw u) and, where a row has a limit, the sorted logits `vals` [R, K]:

1. `_mass_kernel`, a program per (row, chunk of CHUNK tokens): the chunk's largest kept logit and its
   kept mass relative to it (an online softmax's running pair). Its first run also sets each row's
   threshold from its top-k (vals[k - 1], or -inf).
2. `_top_p_kernel`, a program per row, only where a row has a top-p: the chunk pairs rescaled to the
   row's largest logit give the kept total; a running cumsum over vals counts the most-likely-first
   prefix whose mass before each token is within top_p of it, and the threshold rises to the last of
   them. Then `_mass_kernel` again, for the masses under the new thresholds.
3. `_pick_kernel`, a program per row: the chunk in which the cumulative mass first passes u times the
   total, scanned with a running cumsum for the first token that passes it; where rounding leaves the
   target past that chunk's own mass, its last token with mass.

Each row's result depends on its own logits, limits and u alone (fixed chunks, a fixed order for every
sum), never on the other rows: a seeded request draws the same token in any batch. On CUDA each
launch is prepared once per shape (kernels/launch.py): Triton's own call path cost more host time
than the sampler's whole device time at small batches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fieldprint.kernels.launch import launch_prepared

CHUNK = 4096  # tokens per program of the mass pass: 32 programs per row of a 128k vocabulary
_BLOCK = 1024


@triton.jit
def _chunk_totals(m_ptr, s_ptr, scale, row, n_chunks, CHUNKS: tl.constexpr):
    """A row's chunk masses rescaled to its largest kept logit: (that logit, the masses, the chunk ids)."""
    ci = tl.arange(0, CHUNKS)
    cm = tl.load(m_ptr + row * n_chunks + ci, mask=ci < n_chunks, other=float("-inf"))
    cs = tl.load(s_ptr + row * n_chunks + ci, mask=ci < n_chunks, other=0.0)
    top = tl.max(cm, 0)  # finite: a row keeps at least its largest logit
    return top, tl.where(cs > 0, cs * tl.exp2((cm - top) * scale), 0.0), ci


@triton.jit
def _mass_kernel(x_ptr, lim_ptr, vals_ptr, thr_ptr, m_ptr, s_ptr, V, stride_x, R, stride_v, n_chunks,
                 CHUNK: tl.constexpr, BLOCK: tl.constexpr, FROM_TOP_K: tl.constexpr):
    row = tl.program_id(0)
    c = tl.program_id(1)
    scale = tl.load(lim_ptr + row).to(tl.float32)  # log2(e) / temperature
    if FROM_TOP_K:  # the row's k-th largest logit (vals sorted, most likely first), or -inf
        k = tl.load(lim_ptr + R + row).to(tl.int64)
        thr = tl.load(vals_ptr + row.to(tl.int64) * stride_v + tl.maximum(k, 1) - 1, mask=k > 0, other=float("-inf"))
        if c == 0:
            tl.store(thr_ptr + row, thr)
    else:
        thr = tl.load(thr_ptr + row)
    base = x_ptr + row.to(tl.int64) * stride_x
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    for off in range(0, CHUNK, BLOCK):
        idx = c * CHUNK + off + tl.arange(0, BLOCK)
        x = tl.load(base + idx, mask=idx < V, other=float("-inf"))
        x = tl.where(x >= thr, x, float("-inf"))
        new = tl.maximum(m, tl.max(x, 0))
        ref = tl.where(new == float("-inf"), 0.0, new)  # nothing kept yet: no inf - inf
        s = s * tl.exp2((m - ref) * scale) + tl.sum(tl.exp2((x - ref) * scale), 0)
        m = new
    tl.store(m_ptr + row * n_chunks + c, m)
    tl.store(s_ptr + row * n_chunks + c, s)


@triton.jit
def _top_p_kernel(lim_ptr, vals_ptr, thr_ptr, m_ptr, s_ptr, R, K, stride_v, n_chunks,
                  BLOCK: tl.constexpr, CHUNKS: tl.constexpr):
    row = tl.program_id(0)
    scale = tl.load(lim_ptr + row).to(tl.float32)
    limit_p = tl.load(lim_ptr + 2 * R + row).to(tl.float32)  # inf: no top-p (everything counts)
    thr = tl.load(thr_ptr + row)
    top, w, _ = _chunk_totals(m_ptr, s_ptr, scale, row, n_chunks, CHUNKS)
    limit = limit_p * tl.sum(w, 0)
    base = vals_ptr + row.to(tl.int64) * stride_v
    acc = tl.zeros([], tl.float32)
    kept = tl.zeros([], tl.int64)
    for off in range(0, K, BLOCK):
        j = off + tl.arange(0, BLOCK)
        v = tl.load(base + j, mask=j < K, other=float("-inf"))
        p = tl.where(v >= thr, tl.exp2((v - top) * scale), 0.0)
        run = acc + tl.cumsum(p, 0)
        kept += tl.sum(((run - p <= limit) & (j < K)).to(tl.int64), 0)  # >= 1: nothing comes before the first
        acc = tl.max(run, 0)  # the running total (a cumsum of non-negative terms: its largest)
    # kept >= 1 but where NaN logits made the total NaN: then the first value, never the one before the row.
    tl.store(thr_ptr + row, tl.maximum(thr, tl.load(base + tl.maximum(kept, 1) - 1)))


@triton.jit
def _pick_kernel(x_ptr, lim_ptr, thr_ptr, m_ptr, s_ptr, out_ptr, V, stride_x, R, n_chunks,
                 CHUNK: tl.constexpr, BLOCK: tl.constexpr, CHUNKS: tl.constexpr):
    row = tl.program_id(0)
    scale = tl.load(lim_ptr + row).to(tl.float32)
    thr = tl.load(thr_ptr + row)
    top, w, ci = _chunk_totals(m_ptr, s_ptr, scale, row, n_chunks, CHUNKS)
    cum = tl.cumsum(w, 0)
    target = tl.load(lim_ptr + 3 * R + row).to(tl.float32) * tl.max(cum, 0)
    # The first chunk whose cumulative mass passes the target (the last with mass if none does).
    c = tl.minimum(tl.sum((cum <= target).to(tl.int32), 0), tl.max(tl.where(w > 0, ci, -1), 0))
    rest = target - tl.sum(tl.where(ci == c - 1, cum, 0.0), 0)  # the mass to pass inside chunk c
    base = x_ptr + row.to(tl.int64) * stride_x
    acc = tl.zeros([], tl.float32)
    found = tl.full([], -1, tl.int64)
    last = tl.full([], -1, tl.int64)
    for off in range(0, CHUNK, BLOCK):
        idx = (c * CHUNK + off + tl.arange(0, BLOCK)).to(tl.int64)
        x = tl.load(base + idx, mask=idx < V, other=float("-inf"))
        p = tl.where(x >= thr, tl.exp2((x - top) * scale), 0.0)
        run = acc + tl.cumsum(p, 0)
        first = tl.min(tl.where((run > rest) & (p > 0), idx, V), 0)
        found = tl.where((found < 0) & (first < V), first, found)
        last = tl.maximum(last, tl.max(tl.where(p > 0, idx, -1), 0))
        acc = tl.max(run, 0)
    # Where rounding leaves the target past the chunk's own mass: its last token with mass. A row of NaN
    # logits has none: token 0, as the torch path draws, never an index outside the vocabulary.
    tl.store(out_ptr + row, tl.where(found >= 0, found, tl.maximum(last, 0)))


def draw(x: torch.Tensor, limits: torch.Tensor, vals: torch.Tensor | None, top_p: bool) -> torch.Tensor:
    """One token per row of float32 logits x [R, V] (int64 [R]).

    limits: float64 [4, R] on x's device: log2(e) / temperature, top-k (0: none), top-p (inf: none) and
    the draw u in [0, 1), per row. vals: each row's largest logits, most likely first [R, K], at least
    max(top-k) of them, and the whole row sorted where a row has a top-p but no top-k; None when no row
    has a limit. top_p: whether any row has one."""
    if x.dim() != 2 or x.dtype != torch.float32:
        raise ValueError(f"the sampler's kernels take float32 logits [rows, vocabulary], got {x.dtype} {tuple(x.shape)}")
    if limits.dtype != torch.float64 or tuple(limits.shape) != (4, x.shape[0]) or not limits.is_contiguous():
        raise ValueError(f"the sampler's limits are a contiguous float64 [4, {x.shape[0]}], got {limits.dtype} "
                         f"{tuple(limits.shape)}")
    x = x if x.stride(1) == 1 else x.contiguous()
    r, v = x.shape
    n = triton.cdiv(v, CHUNK)
    chunks = max(16, triton.next_power_of_2(n))
    out = torch.empty(r, dtype=torch.int64, device=x.device)
    if r == 0:
        return out
    thr = torch.empty(r, dtype=torch.float32, device=x.device)
    m = torch.empty((r, n), dtype=torch.float32, device=x.device)  # two allocations: each 16-byte aligned
    s = torch.empty((r, n), dtype=torch.float32, device=x.device)
    sv = vals if vals is not None else x  # no top-k anywhere: every row's k is 0 and nothing is read from it
    launch_prepared(_mass_kernel, (r, n), [x, limits, sv, thr, m, s, v, x.stride(0), r, sv.stride(0), n],
            CHUNK=CHUNK, BLOCK=_BLOCK, FROM_TOP_K=True)
    if top_p:
        launch_prepared(_top_p_kernel, (r,), [limits, vals, thr, m, s, r, vals.shape[1], vals.stride(0), n],
                BLOCK=_BLOCK, CHUNKS=chunks)
        launch_prepared(_mass_kernel, (r, n), [x, limits, sv, thr, m, s, v, x.stride(0), r, sv.stride(0), n],
                CHUNK=CHUNK, BLOCK=_BLOCK, FROM_TOP_K=False)
    launch_prepared(_pick_kernel, (r,), [x, limits, thr, m, s, out, v, x.stride(0), r, n],
            CHUNK=CHUNK, BLOCK=_BLOCK, CHUNKS=chunks)
    return out
