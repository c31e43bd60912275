"""Store a layer's new K and V into its paged pools: one launch for both (two index_copy_ on the CPU).

Token t's K and V rows [H_kv, D] go to flat slot slot_mapping[t] (block * block_size + offset) of
the pools. K and V may be strided views: v is a column slice of the qkv GEMM's output, read in
place instead of copied first. The kernel reads nothing back to the host and allocates nothing, so
a CUDA graph can capture it. A slot outside the pool is skipped rather than written out of bounds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fieldprint.errors import KernelInputError


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_pool_ptr, v_pool_ptr, slot_ptr, pool_numel,
    stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd, stride_ps, stride_ph, stride_pd,
    H: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    dst = slot * stride_ps + h * stride_ph + d * stride_pd
    mask = (h < H) & (d < D) & (dst >= 0) & (dst < pool_numel)
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d * stride_kd, mask=mask)
    tl.store(k_pool_ptr + dst, k, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d * stride_vd, mask=mask)
    tl.store(v_pool_ptr + dst, v, mask=mask)


def paged_store_kv(k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Write K and V [T, H_kv, D] (any strides) to slots `slot_mapping` (int64 [T]) of contiguous
    pools [num_blocks, block_size, H_kv, D] of the same dtype, in one launch."""
    t, h, d = k.shape
    tensors = (k, v, k_pool, v_pool)
    if (v.shape != k.shape or k_pool.shape != v_pool.shape or k_pool.dim() != 4 or tuple(k_pool.shape[2:]) != (h, d)
            or not (k_pool.is_contiguous() and v_pool.is_contiguous()) or len({x.dtype for x in tensors}) != 1
            or slot_mapping.dtype != torch.int64 or tuple(slot_mapping.shape) != (t,)
            or len({x.device for x in (*tensors, slot_mapping)}) != 1):
        raise KernelInputError(
            f"paged_store_kv needs k, v [T, H_kv, D] and contiguous pools [num_blocks, block_size, H_kv, D] of one dtype, "
            f"slot_mapping int64 [T], all on one device; got k {k.dtype} {tuple(k.shape)}, v {v.dtype} {tuple(v.shape)}, "
            f"pools {k_pool.dtype} {tuple(k_pool.shape)} and {v_pool.dtype} {tuple(v_pool.shape)}, "
            f"slot_mapping {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    kp, vp = k_pool.view(-1, h, d), v_pool.view(-1, h, d)
    _store_kv_kernel[(t,)](k, v, kp, vp, slot_mapping, kp.numel(), *k.stride(), *v.stride(), *kp.stride(),
                           H=h, D=d, BLOCK_H=triton.next_power_of_2(h), BLOCK_D=triton.next_power_of_2(d))
