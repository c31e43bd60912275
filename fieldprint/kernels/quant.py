"""DQP v1 on the GPU: one Triton pass from a [T, H, D] bf16/fp16/fp32 state to int8 codes.

Same arithmetic as the CPU reference (fieldprint/dqp.py): x * 2**-e (exact), clamp to
[-127, 127], round half to even, int8. Rounding uses the float32 magic-number trick
(y + 1.5 * 2**23) - 1.5 * 2**23, which rounds to nearest-even in IEEE float32 addition on the
GPU and in Triton's interpreter alike, so no device math library is involved. The kernel never
synchronizes: a NaN/Inf count is accumulated into a device counter that the caller checks when
it next touches the host (the committer does so on its background thread).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from fieldprint.dqp import DTYPE_NAMES, SOURCE_DTYPES, QuantizedState, inverse_scales, quantize_rows
from fieldprint.dqp_profile import DQPProfile
from fieldprint.errors import DQPError

_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: adding it leaves the rounded integer in the low mantissa bits
_F32_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _dqp_quant_kernel(
    x_ptr, inv_ptr, out_ptr, bad_ptr,
    T, C, D, stride_n, stride_t, stride_h, stride_d,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)  # which state of a stack (e.g. which layer)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < T
    cmask = cols < C
    mask = rmask[:, None] & cmask[None, :]
    h = cols // D
    d = cols % D
    src = n * stride_n + rows.to(tl.int64)[:, None] * stride_t + (h.to(tl.int64) * stride_h + d.to(tl.int64) * stride_d)[None, :]
    x = tl.load(x_ptr + src, mask=mask, other=0.0).to(tl.float32)
    inv = tl.load(inv_ptr + n * C + cols, mask=cmask, other=1.0)
    # Ordered comparison: false for NaN, and |Inf| exceeds the largest finite float32.
    finite = tl.abs(x) <= _F32_MAX
    nbad = tl.sum(tl.where(mask & (finite == 0), 1, 0), axis=1)
    tl.atomic_add(bad_ptr + n, tl.sum(nbad, axis=0))
    y = x * inv[None, :]
    y = tl.minimum(tl.maximum(y, -127.0), 127.0)
    y = (y + _ROUND_MAGIC) - _ROUND_MAGIC
    dst = n * T * C + rows.to(tl.int64)[:, None] * C + cols[None, :]
    tl.store(out_ptr + dst, y.to(tl.int8), mask=mask)


def quantize_async(
    x: torch.Tensor,
    inv_scales: torch.Tensor,
    out: torch.Tensor | None = None,
    bad: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the quantizer on the current stream: (codes int8 like x, NaN/Inf counters int32 [N]).

    `x` is one state [T, H, D] or a stack [N, T, H, D] (e.g. every layer's K of a sequence), any
    strided view (a slice of a paged cache); `inv_scales` is float32 [H, D] or [N, H, D] (2**-e)
    on x's device. One launch, nothing waits: read `bad` once the stream has run.
    """
    stacked = x.dim() == 4
    if x.dim() not in (3, 4) or x.dtype not in SOURCE_DTYPES:
        raise DQPError(f"quantize wants a bfloat16/float16/float32 [T, H, D] or [N, T, H, D] tensor, got {x.dtype} {tuple(x.shape)}")
    xs = x if stacked else x.unsqueeze(0)
    n, t, h, d = xs.shape
    inv = inv_scales if inv_scales.dim() == 3 else inv_scales.unsqueeze(0)
    if inv.shape != (n, h, d) or inv.dtype != torch.float32 or inv.device != x.device:
        raise DQPError(f"inverse scales must be float32 [{n}, {h}, {d}] on {x.device}, "
                       f"got {inv_scales.dtype} {tuple(inv_scales.shape)} on {inv_scales.device}")
    if out is None:
        out = torch.empty(xs.shape, dtype=torch.int8, device=x.device)
    out = out if out.dim() == 4 else out.unsqueeze(0)
    if out.shape != xs.shape or out.dtype != torch.int8 or not out.is_contiguous() or out.device != x.device:
        raise DQPError(f"out must be a contiguous int8 tensor shaped like x {tuple(x.shape)} on {x.device}, "
                       f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    if bad is None:
        bad = torch.zeros(n, dtype=torch.int32, device=x.device)
    if bad.shape != (n,) or bad.dtype != torch.int32 or bad.device != x.device:
        raise DQPError(f"bad must be an int32 [{n}] counter on {x.device}, got {bad.dtype} {tuple(bad.shape)} on {bad.device}")
    c = h * d
    if n and t and c:
        block_c = min(triton.next_power_of_2(c), 1024)
        block_t = max(1, min(triton.next_power_of_2(t), 4096 // block_c))
        grid = (triton.cdiv(t, block_t), triton.cdiv(c, block_c), n)
        _dqp_quant_kernel[grid](
            xs, inv.contiguous(), out, bad, t, c, d, xs.stride(0), xs.stride(1), xs.stride(2), xs.stride(3),
            BLOCK_T=block_t, BLOCK_C=block_c, num_warps=4,
        )
    return (out if stacked else out[0]), bad


def device_inverse_scales(profile: DQPProfile, layer: int, kind: str, device: torch.device | str) -> torch.Tensor:
    """float32 [H, D] tensor of 2**-e for one layer's K or V, on `device`."""
    return torch.from_numpy(inverse_scales(profile.exponents(layer, kind))).to(device)


def stack_inverse_scales(profile: DQPProfile, layers: list[int], kind: str, device: torch.device | str) -> torch.Tensor:
    """float32 [N, H, D] tensor of 2**-e for several layers' K or V (a stacked launch)."""
    e = np.stack([profile.exponents(layer, kind) for layer in layers])
    return torch.from_numpy(inverse_scales(e)).to(device)


def quantize_with_kernel(x: torch.Tensor, profile: DQPProfile, layer: int, kind: str) -> QuantizedState:
    """Quantize on x's device and wait: codes on the host, DQPError on NaN/Inf (tests, tools).

    Fixed exponents go through the kernel; a per-row V (profile format 3) through quantize_rows,
    the same torch arithmetic on every device.
    """
    exponents = profile.fixed(layer, kind)
    if exponents is None:
        codes, nbad = quantize_rows(x), int((~torch.isfinite(x)).sum())
    else:
        codes, bad = quantize_async(x, device_inverse_scales(profile, layer, kind, x.device))
        nbad = int(bad.item())
    if nbad:
        raise DQPError(f"K/V state of layer {layer} {kind} holds {nbad} NaN/Inf value(s); nothing was quantized")
    host = codes.cpu().contiguous()
    return QuantizedState(host, exponents, DTYPE_NAMES[x.dtype], layer, kind, profile.block_size)


__all__ = ["quantize_with_kernel", "quantize_async", "device_inverse_scales", "stack_inverse_scales"]
