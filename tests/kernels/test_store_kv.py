"""The K/V store kernel (on the GPU, or Triton's interpreter on CPU) writes exactly what the CPU path's
index_copy_ writes, from contiguous and strided K/V, and nothing else in the pools."""

from __future__ import annotations

import pytest
import torch

from fieldprint.engine.attention import AttentionContext, KVCache, store_kv
from fieldprint.errors import KernelInputError
from fieldprint.kernels.paged_attention import AnchorRouting
from fieldprint.kernels.store_kv import paged_store_kv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAYERS, NUM_BLOCKS, LAYER = 2, 6, 1


def _cpu_store(k_pools: torch.Tensor, v_pools: torch.Tensor, k, v, slots: torch.Tensor) -> None:
    """The engine's CPU path (attention.store_kv) into layer LAYER of [L, num_blocks, block_size, H_kv, D] pools."""
    none = torch.zeros(0, dtype=torch.int32)
    ctx = AttentionContext(KVCache(k_pools, v_pools, k_pools[:, :1], v_pools[:, :1]), False, slots,
                           none[None], none, none, 0, AnchorRouting(none[None], none, none))
    store_kv(ctx, LAYER, k, v)


def _kv(layout: str, t: int, h: int, d: int, dtype: torch.dtype, g: torch.Generator):
    """New K and V [T, H, D] in one of the layouts the store must accept."""
    if layout == "qkv":  # column slices of a [T, (H_q + 2 H_kv) D] GEMM output, as Attention.forward passes them
        qkv = torch.randn(t, (2 * h + 2 * h) * d, generator=g).to(dtype)
        _, k, v = qkv.split([2 * h * d, h * d, h * d], dim=-1)
        return k.view(t, h, d), v.view(t, h, d)
    if layout == "gapped":  # every other element of the head dim, tokens in reverse order
        k, v = torch.randn(2, t, h, 2 * d, generator=g).to(dtype)
        return k.flip(0)[..., ::2], v.flip(0)[..., ::2]
    return tuple(torch.randn(2, t, h, d, generator=g).to(dtype))


@pytest.mark.parametrize("layout", ["contiguous", "qkv", "gapped"])
@pytest.mark.parametrize("h,d", [(3, 64), (8, 128), (1, 128), (2, 64)])
@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_kernel_writes_exactly_what_index_copy_writes(dtype, block_size, h, d, layout):
    g = torch.Generator().manual_seed(h * 1000 + d + block_size)
    for t in (1, 37):
        k, v = _kv(layout, t, h, d, dtype, g)
        if layout != "contiguous" and t > 1:
            assert not (k.is_contiguous() or v.is_contiguous())
        # distinct slots scattered over every block (block 0 too, as a captured batch's padding rows write there)
        slots = torch.randperm(NUM_BLOCKS * block_size, generator=g)[:t]
        k_pools, v_pools = torch.randn(2, LAYERS, NUM_BLOCKS, block_size, h, d, generator=g).to(dtype)
        want_k, want_v = k_pools.clone(), v_pools.clone()
        _cpu_store(want_k, want_v, k, v, slots)
        got_k, got_v = k_pools.to(DEVICE), v_pools.to(DEVICE)
        paged_store_kv(k.to(DEVICE), v.to(DEVICE), got_k[LAYER], got_v[LAYER], slots.to(DEVICE))
        assert torch.equal(got_k.cpu(), want_k) and torch.equal(got_v.cpu(), want_v), (dtype, block_size, h, d, layout, t)


def test_slots_outside_the_pool_are_skipped():
    g = torch.Generator().manual_seed(0)
    h, d, bs = 3, 64, 16
    k, v = torch.randn(2, 4, h, d, generator=g)
    slots = torch.tensor([5, -1, NUM_BLOCKS * bs, 17])
    k_pools, v_pools = torch.randn(2, LAYERS, NUM_BLOCKS, bs, h, d, generator=g)
    want_k, want_v = k_pools.clone(), v_pools.clone()
    inside = torch.tensor([0, 3])
    _cpu_store(want_k, want_v, k[inside], v[inside], slots[inside])
    got_k, got_v = k_pools.to(DEVICE), v_pools.to(DEVICE)
    paged_store_kv(k.to(DEVICE), v.to(DEVICE), got_k[LAYER], got_v[LAYER], slots.to(DEVICE))
    assert torch.equal(got_k.cpu(), want_k) and torch.equal(got_v.cpu(), want_v)


def test_inconsistent_inputs_are_refused():
    k = torch.zeros(2, 3, 64, device=DEVICE)
    pool = torch.zeros(4, 16, 3, 64, device=DEVICE)
    slots = torch.tensor([1, 2], device=DEVICE)
    with pytest.raises(KernelInputError, match="of one dtype"):
        paged_store_kv(k, k.half(), pool, pool, slots)
    with pytest.raises(KernelInputError, match="slot_mapping int64"):
        paged_store_kv(k, k, pool, pool, slots.int())
    with pytest.raises(KernelInputError, match=r"pools torch.float32 \(4, 16, 2, 96\)"):
        paged_store_kv(k, k, pool.view(4, 16, 2, 96), pool.view(4, 16, 2, 96), slots)
    with pytest.raises(KernelInputError, match="contiguous pools"):
        paged_store_kv(k, k, pool.transpose(0, 1), pool.transpose(0, 1), slots)
