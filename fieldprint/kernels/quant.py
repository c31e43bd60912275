"""DQP on the GPU: one Triton pass from bf16/fp16/fp32 K/V to int8 codes, in place or through a block table.

Same arithmetic as the CPU reference (fieldprint/dqp.py): x * 2**-e (exact), clamp to
[-127, 127], round half to even, int8. Rounding uses the float32 magic-number trick
(y + 1.5 * 2**23) - 1.5 * 2**23, which rounds to nearest-even in IEEE float32 addition on the
GPU and in Triton's interpreter alike, so no device math library is involved. Exponents are
either fixed per (head, channel) (the profile's) or each row's own (the DQP row layout:
`row_exponents`, taken from the float32 bits of the row's exact max, then stored after the row's
codes). The kernel never synchronizes: a NaN/Inf count is accumulated into a device counter that
the caller checks when it next touches the host (the committer does so on its background thread).

`quantize_paged` reads a sequence's K/V straight from the paged cache's blocks through its block
table, so committing a sequence needs no gathered copy of its K/V.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from fieldprint.dqp import DTYPE_NAMES, SOURCE_DTYPES, QuantizedState, inverse_scales
from fieldprint.dqp_profile import EXP_MAX, EXP_MIN, DQPProfile
from fieldprint.errors import DQPError

_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: adding it leaves the rounded integer in the low mantissa bits
_F32_MAX = tl.constexpr(3.4028234663852886e38)
_MANT_127_128 = tl.constexpr(8257536)  # float32 mantissa bits of 127/64: frexp's m <= 127/128 exactly below it
_EXP_MIN, _EXP_MAX = tl.constexpr(EXP_MIN), tl.constexpr(EXP_MAX)


@triton.jit
def _dqp_quant_kernel(
    x_ptr, table_ptr, inv_ptr, out_ptr, bad_ptr,
    T, H, D, page, stride_n, stride_p, stride_t, stride_h, stride_d,
    PAGED: tl.constexpr, ROWS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    n = tl.program_id(2).to(tl.int64)  # which state of a stack (e.g. which layer)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    rmask = rows < T
    mask = rmask[:, None] & (d < D)[None, :]
    if PAGED:  # token t lives in slot t % page of block table[t // page]
        block = tl.load(table_ptr + rows // page, mask=rmask, other=0).to(tl.int64)
        src_t = block * stride_p + (rows % page).to(tl.int64) * stride_t
    else:
        src_t = rows.to(tl.int64) * stride_t
    src = n * stride_n + h * stride_h + src_t[:, None] + d.to(tl.int64)[None, :] * stride_d
    x = tl.load(x_ptr + src, mask=mask, other=0.0).to(tl.float32)
    # Ordered comparison: false for NaN, and |Inf| exceeds the largest finite float32.
    finite = tl.abs(x) <= _F32_MAX
    nbad = tl.sum(tl.where(mask & (finite == 0), 1, 0), axis=1)
    tl.atomic_add(bad_ptr + n, tl.sum(nbad, axis=0))
    if ROWS:
        # row_exponents: max |row| = m * 2**E, m in [0.5, 1); e = E - 7 when m <= 127/128, else E - 6.
        # For a normal float32 E is its biased exponent - 126 and m <= 127/128 reads off the mantissa;
        # subnormal maxima land below EXP_MIN either way, and a zero row takes EXP_MIN.
        amax = tl.max(tl.abs(x), axis=1)
        bits = amax.to(tl.int32, bitcast=True)
        big = ((bits >> 23) & 0xFF) - 126
        e = tl.where((bits & 0x7FFFFF) <= _MANT_127_128, big - 7, big - 6)
        e = tl.minimum(tl.maximum(tl.where(amax > 0, e, _EXP_MIN), _EXP_MIN), _EXP_MAX)
        inv = ((127 - e) << 23).to(tl.float32, bitcast=True)  # 2**-e, exact
        y = x * inv[:, None]
    else:
        inv = tl.load(inv_ptr + (n * H + h) * D + d, mask=d < D, other=1.0)
        y = x * inv[None, :]
    y = tl.minimum(tl.maximum(y, -127.0), 127.0)
    y = (y + _ROUND_MAGIC) - _ROUND_MAGIC
    width = D + ROWS  # the row layout keeps each row's exponent after its codes
    dst = ((n * T + rows.to(tl.int64)) * H + h) * width
    tl.store(out_ptr + dst[:, None] + d[None, :], y.to(tl.int8), mask=mask)
    if ROWS:
        tl.store(out_ptr + dst + D, e.to(tl.int8), mask=rmask)


def _launch(pool: torch.Tensor, table: torch.Tensor | None, n: int, t: int, h: int, d: int, page: int,
            inv_scales: torch.Tensor | None, out: torch.Tensor | None, bad: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the buffers and launch over pool [N, P, page, H, D] (P = 1 and page = T when not paged)."""
    rows = inv_scales is None
    shape = (n, t, h, d + rows)
    dev = pool.device
    if not rows:
        inv = inv_scales if inv_scales.dim() == 3 else inv_scales.unsqueeze(0)
        if inv.shape != (n, h, d) or inv.dtype != torch.float32 or inv.device != dev:
            raise DQPError(f"inverse scales must be float32 [{n}, {h}, {d}] on {dev}, "
                           f"got {inv_scales.dtype} {tuple(inv_scales.shape)} on {inv_scales.device}")
        inv_scales = inv.contiguous()
    if out is None:
        out = torch.empty(shape, dtype=torch.int8, device=dev)
    if out.shape != shape or out.dtype != torch.int8 or not out.is_contiguous() or out.device != dev:
        raise DQPError(f"out must be a contiguous int8 tensor {list(shape)} on {dev}, "
                       f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    if bad is None:
        bad = torch.zeros(n, dtype=torch.int32, device=dev)
    if bad.shape != (n,) or bad.dtype != torch.int32 or bad.device != dev:
        raise DQPError(f"bad must be an int32 [{n}] counter on {dev}, got {bad.dtype} {tuple(bad.shape)} on {bad.device}")
    if n and t and h and d:
        # Tiles of 4,096 elements over 4 warps for fixed scales; the row layout's stores (D + 1 bytes a
        # row, unaligned) go faster in tiles of 2,048 on one warp (benchmarks/quant_bench.py, H200,
        # Llama-3-8B shapes, 2,048 tokens: per-row V 122 -> 97 us paged, 154 -> 91 us contiguous).
        block_d = triton.next_power_of_2(d)
        block_t = max(1, min(triton.next_power_of_2(t), (2048 if rows else 4096) // block_d))
        _dqp_quant_kernel[(triton.cdiv(t, block_t), h, n)](
            pool, pool if table is None else table, pool if rows else inv_scales, out, bad,
            t, h, d, page, pool.stride(0), pool.stride(1), pool.stride(2), pool.stride(3), pool.stride(4),
            PAGED=table is not None, ROWS=rows, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=1 if rows else 4,
        )
    return out, bad


def quantize_async(
    x: torch.Tensor,
    inv_scales: torch.Tensor | None,
    out: torch.Tensor | None = None,
    bad: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the quantizer on the current stream: (codes int8, NaN/Inf counters int32 [N]).

    `x` is one state [T, H, D] or a stack [N, T, H, D] (e.g. every layer's K of a sequence), any
    strided view; `inv_scales` is float32 [H, D] or [N, H, D] (2**-e) on x's device, or None for
    the row layout (codes [..., T, H, D + 1], each row's exponent last). One launch, nothing
    waits: read `bad` once the stream has run.
    """
    if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4) or x.dtype not in SOURCE_DTYPES:
        raise DQPError(f"quantize wants a bfloat16/float16/float32 [T, H, D] or [N, T, H, D] tensor, "
                       f"got {getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    stacked = x.dim() == 4
    xs = x if stacked else x.unsqueeze(0)
    n, t, h, d = xs.shape
    if out is not None and not stacked:
        out = out.unsqueeze(0)
    codes, bad = _launch(xs.unsqueeze(1), None, n, t, h, d, max(t, 1), inv_scales, out, bad)
    return (codes if stacked else codes[0]), bad


def quantize_paged(
    pool: torch.Tensor,
    table: torch.Tensor,
    length: int,
    inv_scales: torch.Tensor | None,
    out: torch.Tensor | None = None,
    bad: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_async for the first `length` tokens of a paged sequence, read in place.

    `pool` is the cache's [N, P, page, H, D] (N layers of P blocks; any strided view), `table` an
    int32/int64 tensor of the sequence's block ids on the pool's device, each below P (not checked
    here: that would read the table back; Committer.submit_paged checks the ids on the host). Codes
    [N, length, H, D] (or D + 1: the row layout). The named blocks must stay unwritten until the
    stream has run.
    """
    if not isinstance(pool, torch.Tensor) or pool.dim() != 5 or pool.dtype not in SOURCE_DTYPES:
        raise DQPError(f"quantize_paged wants a bfloat16/float16/float32 [N, blocks, page, H, D] pool, "
                       f"got {getattr(pool, 'dtype', type(pool).__name__)} {tuple(getattr(pool, 'shape', ()))}")
    n, _, page, h, d = pool.shape
    if (not isinstance(table, torch.Tensor) or table.dim() != 1 or table.dtype not in (torch.int32, torch.int64)
            or table.device != pool.device):
        raise DQPError(f"the block table must be a 1-D int32/int64 tensor on {pool.device}")
    if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= table.numel() * page:
        raise DQPError(f"length must be an int of tokens in 0..{table.numel() * page} (the table's {table.numel()} "
                       f"blocks of {page}), got {length!r}")
    return _launch(pool, table, n, length, h, d, page, inv_scales, out, bad)


def device_inverse_scales(profile: DQPProfile, layer: int, kind: str, device: torch.device | str) -> torch.Tensor:
    """float32 [H, D] tensor of 2**-e for one layer's K or V, on `device`."""
    return torch.from_numpy(inverse_scales(profile.exponents(layer, kind))).to(device)


def stack_inverse_scales(profile: DQPProfile, layers: list[int], kind: str, device: torch.device | str) -> torch.Tensor:
    """float32 [N, H, D] tensor of 2**-e for several layers' K or V (a stacked launch)."""
    e = np.stack([profile.exponents(layer, kind) for layer in layers])
    return torch.from_numpy(inverse_scales(e)).to(device)


def quantize_with_kernel(x: torch.Tensor, profile: DQPProfile, layer: int, kind: str) -> QuantizedState:
    """Quantize on x's device and wait: codes on the host, DQPError on NaN/Inf (tests, tools).

    Fixed exponents and per-row V (profile format 3) alike go through the kernel.
    """
    exponents = profile.fixed(layer, kind)
    inv = None if exponents is None else device_inverse_scales(profile, layer, kind, x.device)
    codes, bad = quantize_async(x, inv)
    nbad = int(bad.item())
    if nbad:
        raise DQPError(f"K/V state of layer {layer} {kind} holds {nbad} NaN/Inf value(s); nothing was quantized")
    host = codes.cpu().contiguous()
    return QuantizedState(host, exponents, DTYPE_NAMES[x.dtype], layer, kind, profile.block_size)


__all__ = ["quantize_with_kernel", "quantize_async", "quantize_paged", "device_inverse_scales", "stack_inverse_scales"]
