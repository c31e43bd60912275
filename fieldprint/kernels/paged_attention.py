"""PagedFieldprintAttention: fused decode and prefill over a paged KV cache with anchor blocks.

Layout (one layer): K and V pools `[num_blocks, block_size, H_kv, D]`, int32 block tables
`[B, max_blocks]`, int32 context lengths `[B]`. Anchors live in their own pool per layer
(`AnchorPool`: bf16/fp16, or the DQP's INT8 codes: K with a power-of-two scale per channel, V with
one per token and head, the row layout of fieldprint/dqp.py); which anchor set each
sequence reads is one `AnchorRouting` per step, shared by every layer (it also keeps the decode
plan, computed once per step on the device).

Modes, per query q of a sequence with anchors (K_a, V_a) and own keys (K, V), s = sm_scale:
  concat: softmax(q [K_a; K]^T s) [V_a; V]                     (SDPA on the concatenated KV)
  gamma:  (1-g) softmax(q K^T s) V + g softmax(q K_a^T s) V_a   (the v2.5 equation)
A sequence without anchors (seq_anchor_set = -1, or a set of length 0) gets plain attention in
both modes: in gamma the anchor term is absent, i.e. g is treated as 0 for it. (Keeping g with an
empty anchor distribution would scale the output by (1-g), which no caller wants.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import triton

from fieldprint.dqp_profile import EXP_MAX, EXP_MIN
from fieldprint.errors import KernelInputError
from fieldprint.kernels.decode import _decode_kernel, _merge_kernel
from fieldprint.kernels.launch import PreparedLaunch
from fieldprint.kernels.prefill import _prefill_kernel

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634


@dataclass(frozen=True, slots=True)
class AnchorPool:
    """One layer's anchor blocks, fixed for an engine's life.

    k, v: [num_anchor_blocks, block_size, H_kv, D], the cache dtype or int8 DQP codes in [-127, 127].
    k_scale: [H_kv, D] float32 powers of two (int8 only): K value = code * k_scale[head, channel].
    v_exp: [num_anchor_blocks, block_size, H_kv] int8 exponents (int8 only): V value = code * 2**v_exp
        of its (token, head) row, a DQP row-layout state split into codes and exponents.
    layout: each tensor's (shape, dtype), None for one that is not a dense tensor; taken once here
        (the pool is frozen), so a decode plan compares every layer's pool with its own in one step.
    """

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_exp: torch.Tensor | None = None
    layout: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        int8 = isinstance(self.k, torch.Tensor) and self.k.dtype == torch.int8
        ts = (self.k, self.v, self.k_scale, self.v_exp) if int8 else (self.k, self.v)
        object.__setattr__(self, "layout", tuple(
            (t.shape, t.dtype) if isinstance(t, torch.Tensor) and t.is_contiguous() else None for t in ts))


@dataclass(slots=True)
class AnchorRouting:
    """Which anchor blocks form which set, and which set each sequence reads: one per step, all layers.

    block_table: [num_sets, max_anchor_blocks] int32; lens: [num_sets] int32 tokens per set.
    seq_anchor_set: [B] int32, the set each sequence attends to, -1 for none.
    Treat it as immutable for the step: the decode plan (sequences sorted by set, sharing-tile
    starts) is computed on the device on first use per tile size and kept in `plan`, so the
    layers after the first reuse it.
    """

    block_table: torch.Tensor
    lens: torch.Tensor
    seq_anchor_set: torch.Tensor
    plan: dict = field(default_factory=dict)


def _bad(msg: str) -> KernelInputError:
    return KernelInputError(msg)


def _pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def _check_int32(name: str, t: torch.Tensor, ndim: int, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != ndim:
        raise _bad(f"{name} must be an int32 tensor with {ndim} dimension(s); got "
                   f"{getattr(t, 'dtype', type(t))} with shape {tuple(getattr(t, 'shape', ()))}")
    if t.device != device:
        raise _bad(f"{name} is on {t.device} but q is on {device}: put every input on one device")


def _check_shapes(q, k_cache, v_cache, block_tables, context_lens, anchors, routing, mode, gamma, bsz):
    """Shape, dtype and device checks that need no device-to-host sync."""
    if mode not in ("concat", "gamma"):
        raise _bad(f"mode must be 'concat' or 'gamma', got {mode!r}")
    if q.dtype not in _FLOAT_DTYPES:
        raise _bad(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    if q.dim() != 3:
        raise _bad(f"q must be 3-D [tokens, H_q, D], got shape {tuple(q.shape)}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != 4 or c.dtype != q.dtype or c.device != q.device or not c.is_contiguous():
            raise _bad(f"{name} must be a contiguous [num_blocks, block_size, H_kv, D] tensor of "
                       f"q's dtype {q.dtype} on {q.device}; got {c.dtype} {tuple(c.shape)} on {c.device}")
    if k_cache.shape != v_cache.shape:
        raise _bad(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape")
    _, bs, hkv, d = k_cache.shape
    if q.shape[2] != d or not _pow2(d) or d < 16:
        raise _bad(f"head dim must match (q {q.shape[2]}, cache {d}) and be a power of two >= 16")
    if q.shape[1] % hkv:
        raise _bad(f"H_q={q.shape[1]} must be a multiple of H_kv={hkv} (grouped-query attention)")
    if not _pow2(bs):
        raise _bad(f"block_size must be a power of two, got {bs}")
    _check_int32("block_tables", block_tables, 2, q.device)
    _check_int32("context_lens", context_lens, 1, q.device)
    if block_tables.shape[0] != bsz or context_lens.shape[0] != bsz:
        raise _bad(f"block_tables {tuple(block_tables.shape)} and context_lens "
                   f"{tuple(context_lens.shape)} must both have B={bsz} rows")
    if isinstance(gamma, torch.Tensor):
        if gamma.dim() != 1 or gamma.shape[0] != q.shape[1] or gamma.device != q.device:
            raise _bad(f"a per-head gamma must be a [H_q={q.shape[1]}] tensor on {q.device}, "
                       f"got {tuple(gamma.shape)} on {gamma.device}")
    elif not 0.0 <= float(gamma) <= 1.0:
        raise _bad(f"gamma must lie in [0, 1], got {gamma}")
    if (anchors is None) != (routing is None):
        raise _bad("anchors (the layer's AnchorPool) and routing (the step's AnchorRouting) come together or not at all")
    if anchors is None:
        return
    a, r = anchors, routing
    if a.k.dim() != 4 or a.k.shape != a.v.shape or a.k.shape[2:] != k_cache.shape[2:]:
        raise _bad(f"anchor k/v must both be [num_anchor_blocks, block_size, H_kv={hkv}, D={d}]; "
                   f"got {tuple(a.k.shape)} and {tuple(a.v.shape)}")
    if a.k.dtype != a.v.dtype or a.k.dtype not in (q.dtype, torch.int8):
        raise _bad(f"anchor k/v must both be int8 codes or q's dtype {q.dtype}; got {a.k.dtype}, {a.v.dtype}")
    if a.k.device != q.device or a.v.device != q.device or not (a.k.is_contiguous() and a.v.is_contiguous()):
        raise _bad(f"anchor k/v must be contiguous tensors on {q.device}")
    if not _pow2(a.k.shape[1]):
        raise _bad(f"anchor block_size must be a power of two, got {a.k.shape[1]}")
    _check_int32("routing.block_table", r.block_table, 2, q.device)
    _check_int32("routing.lens", r.lens, 1, q.device)
    _check_int32("routing.seq_anchor_set", r.seq_anchor_set, 1, q.device)
    if r.lens.shape[0] != r.block_table.shape[0]:
        raise _bad(f"routing.lens has {r.lens.shape[0]} sets but block_table {r.block_table.shape[0]}")
    if r.seq_anchor_set.shape[0] != bsz:
        raise _bad(f"routing.seq_anchor_set must have B={bsz} entries, got {r.seq_anchor_set.shape[0]}")
    if a.k.dtype == torch.int8:
        s = a.k_scale
        if not isinstance(s, torch.Tensor) or s.dtype != torch.float32 or tuple(s.shape) != (hkv, d) or s.device != q.device:
            raise _bad(f"int8 anchors need anchors.k_scale as float32 [H_kv={hkv}, D={d}] on "
                       f"{q.device} (per-channel; repeat a per-head scale along D)")
        e = a.v_exp
        if (not isinstance(e, torch.Tensor) or e.dtype != torch.int8 or tuple(e.shape) != tuple(a.v.shape[:3])
                or e.device != q.device or not e.is_contiguous()):
            raise _bad(f"int8 anchors need anchors.v_exp as a contiguous int8 [num_anchor_blocks, block_size, "
                       f"H_kv] = {tuple(a.v.shape[:3])} tensor of per-row exponents on {q.device}; got "
                       f"{getattr(e, 'dtype', type(e))} {tuple(getattr(e, 'shape', ()))}")


def _check_values(checks: list[tuple[torch.Tensor, str]]) -> None:
    """Evaluate data-dependent checks with a single device-to-host copy."""
    flags = torch.stack([c.reshape(()) for c, _ in checks]).tolist()
    for ok, (_, msg) in zip(flags, checks):
        if not ok:
            raise _bad(msg)


def _value_checks(k_cache, block_tables, context_lens, anchors, routing, gamma, min_len):
    """Checks on lengths, block ids, anchor sets and scales (they cost one host sync)."""
    nb, bs = k_cache.shape[0], k_cache.shape[1]
    mb = block_tables.shape[1]
    used = torch.arange(mb, device=block_tables.device)[None, :] < ((context_lens + bs - 1) // bs)[:, None]
    out = [
        ((context_lens >= min_len).all() & (context_lens <= mb * bs).all(),
         f"context_lens must lie in [{min_len}, max_blocks*block_size={mb * bs}]"),
        ((~used | ((block_tables >= 0) & (block_tables < nb))).all(),
         f"block_tables name a block outside [0, num_blocks={nb}) within a sequence's length"),
    ]
    if isinstance(gamma, torch.Tensor):
        out.append((((gamma >= 0) & (gamma <= 1)).all(), "every per-head gamma must lie in [0, 1]"))
    if anchors is not None:
        a, r = anchors, routing
        nab, abs_ = a.k.shape[0], a.k.shape[1]
        mab = r.block_table.shape[1]
        aused = torch.arange(mab, device=r.lens.device)[None, :] < ((r.lens + abs_ - 1) // abs_)[:, None]
        out += [
            (((r.lens >= 0) & (r.lens <= mab * abs_)).all(),
             f"routing.lens must lie in [0, max_anchor_blocks*block_size={mab * abs_}]"),
            ((~aused | ((r.block_table >= 0) & (r.block_table < nab))).all(),
             f"routing.block_table names a block outside [0, num_anchor_blocks={nab})"),
            (((r.seq_anchor_set >= -1) & (r.seq_anchor_set < r.lens.shape[0])).all(),
             f"routing.seq_anchor_set entries must be -1 or a set index < {r.lens.shape[0]}"),
        ]
        if a.k.dtype == torch.int8:
            mant, _ = torch.frexp(a.k_scale)
            out.append(((mant == 0.5).all(), "anchors.k_scale must hold positive powers of two (DQP)"))
            out.append((((a.v_exp >= EXP_MIN) & (a.v_exp <= EXP_MAX)).all(),
                        f"anchors.v_exp must lie in the DQP's exponent range [{EXP_MIN}, {EXP_MAX}]"))
    _check_values(out)


class DecodeWorkspace:
    """Scratch memory of paged_attention_decode, owned by its caller (an engine's runner) and reused.

    Per launch: the split partials (m, l, acc) and one arrival counter per (sequence, KV head). The
    kernel leaves every counter at zero when it ends, so zeroing once at allocation serves all
    later launches. It grows when a launch needs more; outgrown buffers are kept, never freed, since
    a CUDA graph captured with them still writes there on every replay. A runner that warms each
    graph's shapes up before capturing (as capture needs anyway) never grows it inside a capture.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._m = self._l = self._acc = self._cnt = None
        self._retired: list[torch.Tensor] = []

    def take(self, slots: int, d: int, pairs: int) -> tuple[torch.Tensor, ...]:
        """(m [slots], l [slots], acc [slots * d] float32, counters [pairs] int32, all zero)."""
        if self._m is None or self._m.numel() < slots or self._acc.numel() < slots * d:
            if self._m is not None:
                self._retired += [self._m, self._l, self._acc]
            n = max(slots, 2 * (0 if self._m is None else self._m.numel()))
            self._m = torch.empty(n, dtype=torch.float32, device=self.device)
            self._l = torch.empty_like(self._m)
            self._acc = torch.empty(n * d, dtype=torch.float32, device=self.device)
        if self._cnt is None or self._cnt.numel() < pairs:
            if self._cnt is not None:
                self._retired.append(self._cnt)
            self._cnt = torch.zeros(max(pairs, 4096), dtype=torch.int32, device=self.device)
        return self._m[:slots], self._l[:slots], self._acc[: slots * d], self._cnt[:pairs]


_workspaces: dict[tuple, DecodeWorkspace] = {}


def _default_workspace(device: torch.device) -> DecodeWorkspace:
    """One workspace per (GPU, stream) for callers that bring none; the CPU gets a fresh one per call."""
    if device.type != "cuda":
        return DecodeWorkspace(device)
    key = (device.index, torch.cuda.current_stream(device).cuda_stream)
    ws = _workspaces.get(key)
    if ws is None:
        ws = _workspaces[key] = DecodeWorkspace(device)
    return ws


_sm_counts: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: small, but enough to exercise several splits in tests
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _sm_counts:
        _sm_counts[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _sm_counts[idx]


def _splits(tokens: int, items: int, sms: int, block_n: int, min_chunk: int,
            want: int | None, fill_wave: bool = False) -> tuple[int, int]:
    """(number of splits, tokens per split) for `items` independent (sequence, head) pairs.

    About 2 programs per multiprocessor; with fewer pairs than multiprocessors at least 20 splits,
    so that the uneven tail and the anchor items running beside average out (docs/attention-notes.md,
    v4 and v5). fill_wave (no anchor items beside): with very few pairs (B=1 or 2 at 8 KV heads) one
    full wave instead: the decode kernel runs three programs per multiprocessor, and a grid just past
    a wave waits on its stragglers (H200, B=1, 32k: 256 programs 44.9 us, 384 41.9; at 128k 400
    programs 193 us vs 152 with 264; v10). With anchors their items would push it past the wave.
    """
    if want is None:
        want = triton.cdiv(2 * sms, max(items, 1))
        if items < sms:
            want = max(want, 20, (3 * sms) // max(items, 1) if fill_wave else 0)
    s = min(max(want, 1), max(1, triton.cdiv(tokens, min_chunk)))
    chunk = triton.cdiv(triton.cdiv(tokens, s), block_n) * block_n
    return triton.cdiv(tokens, chunk), chunk


def _short_chunk(tokens: int, items: int, sms: int, block_n: int) -> int:
    """Fewest tokens per context split: 4 key blocks, but smaller where even that many splits fill no
    more than one wave of three programs per multiprocessor (short contexts at small batches, no
    anchors: their items fill the wave instead). H200, Llama-3.2-1B shapes, 640 tokens of context:
    B=1 8.1 -> 5.7 us, B=8 9.6 -> 8.1; with int8 anchors at B=8 the same splits took 21.8 us against
    14.6 with the 4-block ones. Long contexts and large batches are unchanged (docs/attention-notes.md,
    v11)."""
    for c in (block_n, 2 * block_n):
        if items * triton.cdiv(tokens, c) <= 3 * sms:
            return c
    return 4 * block_n


def _anchor_splits(anchor_tokens: int, pairs: int, rows: int, sms: int, block_n: int) -> tuple[int, int]:
    """(splits, tokens per split) of an anchor set: about four programs per multiprocessor over the
    (sharing tile, KV head) pairs, half as many for tiles of 64 query rows, each of at least two key
    blocks. H200, 2k int8 anchors, graph-timed (the rule before, the context split's size halved below
    8 splits, in brackets): D=64 with 640 tokens of context, B=8 14.6 us (21.8), B=32 32.9 (38.5),
    B=128 84.2 (85.4); D=128 B=64 8k, bf16 anchors, 562 (588); docs/attention-notes.md, v11."""
    want = (4 * sms) // (max(pairs, 1) * max(1, rows // 32))
    s = max(1, min(triton.cdiv(anchor_tokens, 2 * block_n), want))
    chunk = triton.cdiv(triton.cdiv(anchor_tokens, s), block_n) * block_n
    return triton.cdiv(anchor_tokens, chunk), chunk


def _out_buffer(out: torch.Tensor | None, q: torch.Tensor, strides: tuple | None = None) -> torch.Tensor:
    """out, checked, or a new buffer like q; strides: the ones out must have (a decode plan's, q's)."""
    if out is None:
        return torch.empty_strided(q.shape, strides, dtype=q.dtype, device=q.device) if strides else \
            torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise _bad(f"out must be a {q.dtype} tensor of shape {tuple(q.shape)} on {q.device} with a "
                   f"contiguous last dimension; got {out.dtype} {tuple(out.shape)} on {out.device}")
    if strides is not None and out.stride() != strides:
        raise _bad(f"out must have the planned strides {strides} (q's), got {out.stride()}")
    return out


def _gamma_args(gamma, q):
    if isinstance(gamma, torch.Tensor):
        return gamma.to(torch.float32).contiguous(), 0.0, True
    return None, float(gamma), False


def _decode_reg_cap(int8: bool, tile: int, num_warps: int, d: int) -> int | None:
    """Per-thread register cap for the decode launch (None: the compiler's choice).

    The int8 code -> 16-bit conversion raises the whole kernel's registers (context items included:
    one compiled kernel), cutting programs per multiprocessor. At D=128 a cap of 168 in sharing tiles
    of <= 8 sequences gives three with no spills; tiles of 16 measured slower capped, so they keep the
    compiler's choice (docs/attention-notes.md, v6). At D=64 a cap of 128 wins at every tile
    (H200, Llama-3.2-1B shapes, 2k int8 anchors, 1k context: B=32 50.2 -> 40.2 us, B=128 151.7 ->
    110.1 us; attention_bench --only splits, v10).
    """
    if not int8 or num_warps != 4:
        return None
    if d <= 64:
        return 128
    return 168 if tile <= 8 else None


def _anchor_plan(r: AnchorRouting, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences sorted by anchor set, and which sorted positions start a sharing tile.

    A run of sequences with one set is cut into tiles of `tile`; computed with device ops only, so
    the grid (one potential tile per position) needs no host sync.
    """
    got = r.plan.get(tile)
    if got is None:
        s = r.seq_anchor_set
        order = torch.sort(s, stable=True).indices
        ss = s[order]
        idx = torch.arange(s.shape[0], device=s.device)
        new_run = torch.ones_like(ss, dtype=torch.bool)
        new_run[1:] = ss[1:] != ss[:-1]
        run_start = torch.cummax(torch.where(new_run, idx, 0), 0).values
        start = (((idx - run_start) % tile) == 0) & (ss >= 0)
        got = (order.to(torch.int32), start.to(torch.int32))
        r.plan[tile] = got
    return got


# Positions in the decode kernel's argument list of what changes from layer to layer: q, k, v, the
# anchor pool's k, v, k_scale, v_exp (unused ones get a placeholder tensor) and out.
_PER_LAYER = (0, 1, 2, 5, 6, 12, 13, 20)


class DecodePlan:
    """One decode launch (and with merge="apart" the merge's) prepared once: checks, split sizes, the
    anchor plan and the argument lists.

    plan_decode() does all that depends on the step (the batch's block tables and lengths, the
    anchor routing, the pools' shapes); run() swaps in the tensors that change per layer (q, the
    layer's pools, out) and launches, so an engine plans once per step for all its layers. After
    the first run the compiled kernel's launcher is called directly (fieldprint/kernels/launch.py),
    so a call costs a few shape comparisons and the launch itself, not Triton's argument binding.
    """

    def __init__(self, launch: PreparedLaunch, q: torch.Tensor, pool_shape, anchor_layout,
                 merge: PreparedLaunch | None = None) -> None:
        self.launch, self.merge = launch, merge  # merge: the merge's own launch (merge="apart")
        self.shape, self.dtype, self.device, self.q_stride = tuple(q.shape), q.dtype, q.device, q.stride()
        self.pool_shape, self.anchor_layout = pool_shape, anchor_layout

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, anchors: AnchorPool | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
        """Launch over this layer's q [B, H_q, D] and pools (shaped as planned); returns out."""
        if not (isinstance(q, torch.Tensor) and isinstance(k_cache, torch.Tensor) and isinstance(v_cache, torch.Tensor)
                and (anchors is None or isinstance(anchors, AnchorPool)) and (out is None or isinstance(out, torch.Tensor))):
            raise _bad(f"q, k_cache, v_cache (and out) must be tensors and anchors an AnchorPool or None; got "
                       f"{', '.join(type(x).__name__ for x in (q, k_cache, v_cache, anchors, out))}")
        if q.shape != self.shape or q.dtype != self.dtype or q.stride() != self.q_stride:
            raise _bad(f"q must be {self.dtype} of shape {self.shape} with strides {self.q_stride}, as planned; got "
                       f"{q.dtype} {tuple(q.shape)} strides {q.stride()}")
        if k_cache.shape != self.pool_shape or v_cache.shape != self.pool_shape or k_cache.dtype != self.dtype \
                or v_cache.dtype != self.dtype or not k_cache.is_contiguous() or not v_cache.is_contiguous():
            raise _bad(f"k_cache and v_cache must be contiguous {self.dtype} of the planned shape {tuple(self.pool_shape)}")
        if (anchors is None) != (self.anchor_layout is None) or (
                anchors is not None and anchors.layout != self.anchor_layout):
            if self.anchor_layout is None:
                raise _bad("the anchor pool must be absent, as planned")
            got = "absent" if anchors is None else anchors.layout
            raise _bad(f"the anchor pool must be laid out as planned (k, v[, k_scale, v_exp] as (shape, dtype), "
                       f"dense): {self.anchor_layout}; got {got}")
        # out shares q's strides (the kernel's output strides are planned from q's)
        out = _out_buffer(out, q, self.q_stride)
        if anchors is None:
            self.launch.launch(q, k_cache, v_cache, k_cache, v_cache, q, q, out)
        elif anchors.k.dtype == torch.int8:
            self.launch.launch(q, k_cache, v_cache, anchors.k, anchors.v, anchors.k_scale, anchors.v_exp, out)
        else:
            self.launch.launch(q, k_cache, v_cache, anchors.k, anchors.v, q, q, out)
        if self.merge is not None:
            self.merge.launch(out)
        return out


def plan_decode(
    q: torch.Tensor,
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
    check: bool = True,
    num_splits: int | None = None,
    anchor_splits: int | None = None,
    seq_tile: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    max_registers: int | None = -1,
    min_chunk: int | None = None,
    merge: str | None = None,
    workspace: DecodeWorkspace | None = None,
) -> DecodePlan:
    """Check and prepare a decode launch for q's shape over these tables, lengths and anchors.

    q, k_cache, v_cache and anchors stand for every layer's (same shapes and dtypes); the plan
    keeps the tables, lengths, routing, gamma and workspace, which must stay unchanged while it
    is used. Arguments as paged_attention_decode.
    """
    bsz = q.shape[0] if q.dim() == 3 else -1
    _check_shapes(q, k_cache, v_cache, block_tables, context_lens, anchors, routing, mode, gamma, bsz)
    if check:
        _value_checks(k_cache, block_tables, context_lens, anchors, routing, gamma, 1)
    if q.stride(-1) != 1:
        raise _bad(f"q's last dimension must be contiguous, got strides {q.stride()}")
    _, bs, hkv, d = k_cache.shape
    hq = q.shape[1]
    gqa = hq // hkv
    gqa_pad = triton.next_power_of_2(gqa)
    on_gpu = q.is_cuda
    block_n = 64 if on_gpu else 16
    sms = _num_sms(q.device)
    max_ctx = block_tables.shape[1] * bs
    if merge not in (None, "fused", "apart"):
        raise _bad(f"merge must be 'fused', 'apart' or None (the heuristic), got {merge!r}")
    if min_chunk is None:
        min_chunk = block_n if not on_gpu else 4 * block_n if anchors is not None else _short_chunk(
            max_ctx, bsz * hkv, sms, block_n)
    elif not (isinstance(min_chunk, int) and min_chunk >= block_n and min_chunk % block_n == 0):
        raise _bad(f"min_chunk must be a multiple of {block_n} tokens, got {min_chunk!r}")
    s_ctx, chunk = _splits(max_ctx, bsz * hkv, sms, block_n, min_chunk, num_splits, fill_wave=anchors is None)
    s_anc, achunk, n_anchor_items, tile = 0, 0, 0, 1
    a, r = anchors, routing
    if a is not None:
        # Up to 64 query rows per sharing tile, and at B <= 32 at most 4 sequences: a tile's last anchor
        # item merges its sequences one after another, so a wide tile at a small batch ends the launch
        # alone (H200, B=8, 2k shared anchors, 1k context: 28 us with tiles of 8, 20 us with tiles of 4,
        # 10 us without anchors; docs/attention-notes.md, v9).
        widest = max(1, 64 // gqa_pad)
        tile = seq_tile if seq_tile is not None else widest if bsz > 32 else min(4, widest)
        tile = min(triton.next_power_of_2(tile), triton.next_power_of_2(bsz))
        n_tiles = bsz  # one potential tile start per sorted position
        max_alen = r.block_table.shape[1] * a.k.shape[1]
        if anchor_splits is None:
            # The common case, one set shared by the batch: its sequences fill cdiv(B, tile) tiles
            s_anc, achunk = _anchor_splits(max_alen, triton.cdiv(bsz, tile) * hkv, tile * gqa_pad, sms, block_n)
        else:
            s_anc, achunk = _splits(max_alen, n_tiles * hkv, sms, block_n, block_n, anchor_splits)
        n_anchor_items = n_tiles * hkv * s_anc
    s_tot = s_ctx + s_anc
    if merge is None:
        # Fused, a sharing tile's last anchor item merges its sequences one after another; at B=32 and
        # 128 that chain cost more than a second launch (H200: B=128 2k int8 anchors 79.4 -> 76.6 us, bf16
        # 87.9 -> 81.8), at B=8 it did not (8k context: 85.2 fused, 88.5 apart; docs/attention-notes.md
        # v16). B=9-31 were not measured.
        merge = "apart" if tile > 1 and bsz > 8 else "fused"
    dev = q.device
    if workspace is not None and workspace.device != dev:
        raise _bad(f"the workspace is on {workspace.device} but q is on {dev}")
    pm, pl, pacc, cnt = (workspace or _default_workspace(dev)).take(bsz * hq * s_tot, d, bsz * hkv)
    gptr, gval, g_per_head = _gamma_args(gamma, q)
    gamma_arg = gptr if gptr is not None else pm
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    int8 = a is not None and a.k.dtype == torch.int8
    if a is not None:
        abt, alen, aset = r.block_table.contiguous(), r.lens, r.seq_anchor_set
        order, start = _anchor_plan(r, tile)
        bsa = a.k.shape[1]
    else:
        abt, alen, aset, order, start, bsa = (block_tables, context_lens, context_lens, context_lens,
                                              context_lens, bs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if max_registers == -1:
        max_registers = _decode_reg_cap(int8, tile, num_warps, d)
    if max_registers is not None and on_gpu:
        # The anchor and context items share one compiled kernel, so the int8 conversion's
        # registers would otherwise cut the occupancy of the context items too.
        options["maxnreg"] = max_registers
    args = [
        None, None, None, block_tables.contiguous(), context_lens,  # q, k_cache, v_cache: per layer
        None, None, abt, alen, aset, order, start, None, None,  # anchor k, v, k_scale, v_exp: per layer
        gamma_arg, gval, pm, pl, pacc, cnt, None,  # out: per layer
        bsz, hkv, block_tables.shape[1], abt.shape[1], chunk, achunk, n_anchor_items,
        scale * _LOG2E, q.stride(0), q.stride(1), q.stride(0), q.stride(1),  # out's strides are q's
    ]
    constexprs = dict(
        D=d, GQA=gqa, GQA_PAD=gqa_pad, TILE_SEQ=tile, M_CTX=max(16, gqa_pad),
        M_ANC=max(16, tile * gqa_pad), BLOCK_N=block_n, BS=bs, BSA=bsa, S_CTX=s_ctx, S_ANC=s_anc,
        INT8=int8, MODE_GAMMA=mode == "gamma", GAMMA_PER_HEAD=g_per_head,
        S_PAD=triton.next_power_of_2(max(s_ctx, s_anc)),
        MERGE_APART=merge == "apart",
    )
    grid = (n_anchor_items + bsz * hkv * s_ctx,)
    launch = PreparedLaunch(_decode_kernel, grid, args, constexprs, options, _PER_LAYER, dev)
    merge_launch = None
    if merge == "apart":
        names = ("S_CTX", "S_ANC", "GQA", "GQA_PAD", "D", "MODE_GAMMA", "GAMMA_PER_HEAD", "S_PAD")
        merge_launch = PreparedLaunch(_merge_kernel, (bsz * hkv,), [aset, alen, pm, pl, pacc, gamma_arg, gval, None, hkv,
                                                                    q.stride(0), q.stride(1)],
                                      {n: constexprs[n] for n in names}, {"num_warps": 4}, (7,), dev)
    return DecodePlan(launch, q, k_cache.shape, None if a is None else a.layout, merge_launch)


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    anchors: AnchorPool | None = None,
    routing: AnchorRouting | None = None,
    *,
    out: torch.Tensor | None = None,
    **options,
) -> torch.Tensor:
    """One query per sequence (q [B, H_q, D]) over anchors + paged context, in one kernel launch.

    Options (keywords, see plan_decode): mode, gamma, sm_scale; check=False skips the
    data-dependent checks (one host sync); out, if given, receives the result (same shape and
    dtype as q, last dim contiguous); workspace: the caller's scratch memory (default: one per GPU
    stream); num_splits, anchor_splits and seq_tile override the split-KV and anchor-sharing
    heuristics (seq_tile=1: no sharing); num_warps/num_stages/max_registers (per-thread register
    cap, None = none, -1 = heuristic) override the launch configuration; merge ("fused": the last
    item to finish merges, "apart": a second launch merges; None: apart where sequences share tiles
    at B > 8) says where the partials are merged. A caller that runs the
    same step over many layers plans once (plan_decode) and calls DecodePlan.run per layer.
    """
    q = q if q.dim() != 3 or q.stride(-1) == 1 else q.contiguous()
    plan = plan_decode(q, k_cache, v_cache, block_tables, context_lens, anchors, routing, **options)
    if out is not None and out.stride() != q.stride():
        # The launch writes with q's strides (planned); an out laid out otherwise receives a copy.
        return _out_buffer(out, q).copy_(plan.run(q, k_cache, v_cache, anchors))
    return plan.run(q, k_cache, v_cache, anchors, out)


def _tma_ok(k: torch.Tensor, v: torch.Tensor, block_n: int) -> bool:
    """Whether a K/V pool can be read page-by-page through tensor descriptors."""
    nb, bs, hkv, d = k.shape
    return (bs >= block_n and nb * bs < 2**31 and k.data_ptr() % 16 == 0 and v.data_ptr() % 16 == 0
            and (hkv * d * k.element_size()) % 16 == 0)


def _descriptors(k: torch.Tensor, v: torch.Tensor, block_n: int):
    """Descriptors over [blocks * block_size, H_kv * D] views; one tile = block_n rows x D."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    nb, bs, hkv, d = k.shape
    return (TensorDescriptor.from_tensor(k.view(nb * bs, hkv * d), [block_n, d]),
            TensorDescriptor.from_tensor(v.view(nb * bs, hkv * d), [block_n, d]))


def paged_attention_prefill(
    q: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
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
    check: bool = True,
    out: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Varlen-packed new tokens (q [T, H_q, D], cu_seqlens_q [B+1]) already written to the cache.

    Each new token attends to its sequence's anchors, all earlier tokens, and causally among the
    new ones; context_lens include the new tokens. Without max_seqlen_q (the longest q length) one
    host sync reads it. out, if given, receives the result; block_m/block_n/num_warps/num_stages override the tiling.
    """
    if not isinstance(cu_seqlens_q, torch.Tensor) or cu_seqlens_q.dim() != 1 or cu_seqlens_q.numel() < 2:
        raise _bad("cu_seqlens_q must be an int32 tensor [B+1] of cumulative new-token counts")
    bsz = cu_seqlens_q.shape[0] - 1
    _check_shapes(q, k_cache, v_cache, block_tables, context_lens, anchors, routing, mode, gamma, bsz)
    _check_int32("cu_seqlens_q", cu_seqlens_q, 1, q.device)
    q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    if check:
        _value_checks(k_cache, block_tables, context_lens, anchors, routing, gamma, 0)
        _check_values([
            (cu_seqlens_q[0] == 0, "cu_seqlens_q must start at 0"),
            (cu_seqlens_q[-1] == q.shape[0], f"cu_seqlens_q must end at the number of tokens {q.shape[0]}"),
            ((q_lens >= 0).all(), "cu_seqlens_q must be non-decreasing"),
            ((q_lens <= context_lens).all(), "each sequence's new tokens must be counted in context_lens"),
        ])
    max_q = max_seqlen_q if max_seqlen_q is not None else (int(q_lens.max()) if bsz else 0)
    q = q if q.stride(-1) == 1 else q.contiguous()
    _, bs, hkv, d = k_cache.shape
    hq = q.shape[1]
    on_gpu = q.is_cuda
    big = 128 if q.dtype != torch.float32 else 64  # fp32 K/V tiles of 128x128 overflow shared memory
    bm = block_m or (big if on_gpu else 16)
    bn = block_n or (big if on_gpu else 16)
    out = _out_buffer(out, q)
    if max_q == 0:
        return out
    gptr, gval, g_per_head = _gamma_args(gamma, q)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    a, r = anchors, routing
    if a is not None:
        int8 = a.k.dtype == torch.int8
        ak, av, abt, alen, aset = a.k, a.v, r.block_table.contiguous(), r.lens, r.seq_anchor_set
        ks, ve, bsa = (a.k_scale, a.v_exp, a.k.shape[1]) if int8 else (q, q, a.k.shape[1])
    else:
        int8, ak, av, abt, alen, aset, ks, ve, bsa = (
            False, k_cache, v_cache, block_tables, context_lens, context_lens, q, q, bs)
    # Pages of at least block_n tokens: each K/V tile is one page, copied by descriptor (TMA on
    # the GPU) instead of per-thread gathers.
    tma_kv = _tma_ok(k_cache, v_cache, bn)
    tma_a = a is not None and not int8 and _tma_ok(ak, av, bn)
    if tma_kv:
        k_arg, v_arg = _descriptors(k_cache, v_cache, bn)
    else:
        k_arg, v_arg = k_cache, v_cache
    if tma_a:
        ak, av = _descriptors(ak, av, bn)
    grid = (bsz, triton.cdiv(max_q, bm), hq)
    _prefill_kernel[grid](
        q, k_arg, v_arg, block_tables.contiguous(), context_lens, cu_seqlens_q,
        ak, av, abt, alen, aset, ks, ve, gptr if gptr is not None else q, gval, out,
        hkv, block_tables.shape[1], abt.shape[1], scale * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        D=d, GQA=hq // hkv, BLOCK_M=bm, BLOCK_N=bn, BS=bs, BSA=bsa, HAS_ANCHORS=a is not None,
        INT8=int8, MODE_GAMMA=mode == "gamma", GAMMA_PER_HEAD=g_per_head, TMA_KV=tma_kv, TMA_A=tma_a,
        num_warps=num_warps or (8 if on_gpu else 4), num_stages=num_stages or (3 if on_gpu else 1),
    )
    return out
