"""The Triton quantizer (on the GPU, or Triton's interpreter on CPU) gives exactly the CPU reference's codes.

Inputs are drawn on the CPU (the same values on every machine) and moved to DEVICE, where the
kernel runs; its codes come back to the CPU to be compared with the reference bit for bit.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fieldprint.dqp import DQPProfile, inverse_scales, quantize_codes
from fieldprint.dqp import quantize as quantize_ref
from fieldprint.errors import DQPError
from fieldprint.kernels.quant import device_inverse_scales, quantize_async, quantize_with_kernel

H, D = 4, 32
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _profile(layers: int = 2) -> DQPProfile:
    g = torch.Generator().manual_seed(0)
    sample = {(l, k): torch.randn(64, H, D, generator=g) * 4 for l in range(layers) for k in "KV"}
    return DQPProfile.calibrate([sample], name="kern", num_layers=layers, num_kv_heads=H, head_dim=D, block_size=8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 7, 64, 200])
def test_kernel_matches_reference(dtype, t):
    p = _profile()
    x = (torch.randn(t, H, D) * 6).to(dtype)
    for kind in "KV":
        ref = quantize_ref(x, p, 1, kind)
        got = quantize_with_kernel(x.to(DEVICE), p, 1, kind)  # codes come back on the host
        assert torch.equal(got.codes, ref.codes)
        assert got.digest() == ref.digest()


def test_exact_ties_round_half_to_even_like_the_reference():
    e = np.random.default_rng(1).integers(-6, 3, size=(H, D)).astype(np.int32)
    halves = torch.arange(-130, 130, dtype=torch.float32) + 0.5  # every x.5 in range, and beyond it
    x = (halves[:, None, None] * torch.from_numpy(np.ldexp(np.float32(1), e))).contiguous()
    codes, bad = quantize_async(x.to(DEVICE), torch.from_numpy(inverse_scales(e)).to(DEVICE))
    ref = quantize_codes(x, e)
    assert int(bad) == 0 and torch.equal(codes.cpu(), ref)
    assert ref[:, 0, 0].tolist()[128:133] == [-2, 0, 0, 2, 2]  # -1.5, -0.5, 0.5, 1.5, 2.5
    assert ref.abs().max() == 127


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 40), st.integers(-8, 8), st.integers(0, 2**31 - 1))
def test_random_states_and_exponents(t, shift, seed):
    g = torch.Generator().manual_seed(seed)
    e = (torch.randint(-5, 3, (H, D), generator=g) + shift).numpy().astype(np.int32)
    x = (torch.randn(t, H, D, generator=g) * 2.0 ** float(shift + 4)).to(torch.bfloat16)
    codes, _ = quantize_async(x.to(DEVICE), torch.from_numpy(inverse_scales(e)).to(DEVICE))
    assert torch.equal(codes.cpu(), quantize_codes(x, e))


def test_strided_views_of_a_cache_quantize_like_contiguous_copies():
    p = _profile()
    cache = torch.randn(3, H, 50, D).to(torch.float16).to(DEVICE)  # [B, H, T, D]: a transposed view per sequence
    view = cache[1, :, 5:45].permute(1, 0, 2)  # [T, H, D] with non-unit strides
    got, _ = quantize_async(view, device_inverse_scales(p, 0, "K", DEVICE))
    assert torch.equal(got.cpu(), quantize_codes(view.contiguous(), p.exponents(0, "K")))


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_values_are_counted_and_raise(bad_value):
    p = _profile()
    x = torch.randn(33, H, D)
    x[0, 0, 0] = bad_value
    x[32, 3, 31] = bad_value
    x = x.to(DEVICE)
    _, bad = quantize_async(x, device_inverse_scales(p, 0, "V", DEVICE))
    assert int(bad) == 2
    with pytest.raises(DQPError, match="2 NaN/Inf"):
        quantize_with_kernel(x, p, 0, "V")


def test_bad_kernel_inputs():
    p = _profile()
    inv = device_inverse_scales(p, 0, "K", DEVICE)
    with pytest.raises(DQPError, match="quantize wants"):
        quantize_async(torch.randn(4, H * D, device=DEVICE), inv)
    with pytest.raises(DQPError, match="quantize wants"):
        quantize_async(torch.randn(4, H, D, device=DEVICE).double(), inv)
    with pytest.raises(DQPError, match="inverse scales"):
        quantize_async(torch.randn(4, H, D, device=DEVICE), inv.double())
    codes, bad = quantize_async(torch.randn(0, H, D, device=DEVICE), inv)
    assert codes.shape == (0, H, D) and int(bad) == 0


def test_stacked_launch_uses_each_layers_scales_and_counts_per_layer():
    from fieldprint.kernels.quant import stack_inverse_scales

    p = _profile(layers=3)
    cache = (torch.randn(3, H, 20, D) * 5).to(torch.bfloat16).to(DEVICE)  # [L, H, T, D]
    stack = cache.transpose(1, 2)  # [L, T, H, D], strided
    stack[2, 4, 1, 0] = float("nan")
    codes, bad = quantize_async(stack, stack_inverse_scales(p, [0, 1, 2], "K", DEVICE))
    assert bad.tolist() == [0, 0, 1]
    for l in range(2):
        assert torch.equal(codes[l].cpu(), quantize_codes(stack[l], p.exponents(l, "K")))
    with pytest.raises(DQPError, match="inverse scales"):
        quantize_async(stack, stack_inverse_scales(p, [0, 1], "K", DEVICE))


def test_bad_out_and_counter_buffers_raise_dqp_errors():
    """Caller-given buffers are checked with errors, not asserts (python -O strips those)."""
    x = torch.randn(5, H, D, device=DEVICE)
    inv = torch.ones(H, D, device=DEVICE)
    for out, match in [(torch.empty(5, H, D, dtype=torch.int16, device=DEVICE), "out must be"),
                       (torch.empty(4, H, D, dtype=torch.int8, device=DEVICE), "out must be"),
                       (torch.empty(5, D, H, dtype=torch.int8, device=DEVICE).transpose(1, 2), "out must be")]:
        with pytest.raises(DQPError, match=match):
            quantize_async(x, inv, out=out)
    for bad in [torch.zeros(2, dtype=torch.int32, device=DEVICE), torch.zeros(1, dtype=torch.int64, device=DEVICE)]:
        with pytest.raises(DQPError, match="bad must be"):
            quantize_async(x, inv, bad=bad)


def _row_edge_values(t: int, g: torch.Generator) -> torch.Tensor:
    """[t, H, D] rows whose maxima sit on every exponent boundary: 127/128 and 1 times powers of two, zeros, tiny and huge."""
    x = torch.randn(t, H, D, generator=g)
    x = x / x.abs().amax(-1, keepdim=True)  # each row's max is exactly 1
    e = torch.randint(-70, 70, (t, H, 1), generator=g).float()
    m = torch.tensor([127 / 128, 1.0, 0.75, 0.5, 0.9999, 127.5 / 128])[torch.randint(0, 6, (t, H, 1), generator=g)]
    x = x * m * torch.exp2(e)
    x[0, 0] = 0.0  # a zero row takes EXP_MIN
    if t > 1:
        x[1, 1] = 1e-40  # subnormal maximum
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_row_layout_kernel_matches_quantize_rows(dtype):
    from fieldprint.dqp import quantize_rows

    g = torch.Generator().manual_seed(5)
    x = _row_edge_values(40, g).to(dtype)
    x = torch.where(torch.isfinite(x), x, torch.zeros(()).to(dtype))  # fp16 overflows the largest rows
    codes, bad = quantize_async(x.to(DEVICE), None)
    assert int(bad) == 0 and codes.shape == (40, H, D + 1)
    assert torch.equal(codes.cpu(), quantize_rows(x))


@pytest.mark.parametrize("page", [4, 16])
@pytest.mark.parametrize("rows", [False, True])
def test_paged_quantizer_reads_blocks_through_the_table_like_a_gathered_copy(page, rows):
    from fieldprint.dqp import quantize_rows
    from fieldprint.kernels.quant import quantize_paged, stack_inverse_scales

    p = _profile(layers=3)
    g = torch.Generator().manual_seed(page + rows)
    pool = (torch.randn(3, 9, page, H, D, generator=g) * 5).to(torch.bfloat16)  # [L, blocks, page, H, D]
    table = [7, 2, 5, 0]
    length = 3 * page + 1  # the last block only partly used
    gathered = pool[:, table].flatten(1, 2)[:, :length]
    inv = None if rows else stack_inverse_scales(p, [0, 1, 2], "K", DEVICE)
    codes, bad = quantize_paged(pool.to(DEVICE), torch.tensor(table, dtype=torch.int32, device=DEVICE), length, inv)
    assert bad.tolist() == [0, 0, 0]
    for l in range(3):
        want = quantize_rows(gathered[l]) if rows else quantize_codes(gathered[l], p.exponents(l, "K"))
        assert torch.equal(codes[l].cpu(), want)


def test_paged_quantizer_counts_non_finite_values_in_the_blocks_it_reads_only():
    from fieldprint.kernels.quant import quantize_paged

    pool = torch.randn(2, 4, 8, H, D)
    pool[0, 3, 0, 0, 0] = float("nan")  # a block the table does not name
    pool[1, 1, 2, 3, 5] = float("inf")
    _, bad = quantize_paged(pool.to(DEVICE), torch.tensor([1, 2], device=DEVICE), 16, None)
    assert bad.tolist() == [0, 1]


def test_bad_paged_quantizer_inputs():
    from fieldprint.kernels.quant import quantize_paged

    pool = torch.randn(2, 4, 8, H, D, device=DEVICE)
    table = torch.tensor([1, 2], device=DEVICE)
    with pytest.raises(DQPError, match="pool"):
        quantize_paged(pool[0], table, 8, None)
    with pytest.raises(DQPError, match="block table"):
        quantize_paged(pool, table.float(), 8, None)
    with pytest.raises(DQPError, match="block table"):
        quantize_paged(pool, [1, 2], 8, None)
    with pytest.raises(DQPError, match="length must be"):
        quantize_paged(pool, table, 17, None)  # two blocks of 8 hold 16 tokens
    with pytest.raises(DQPError, match="length must be"):
        quantize_paged(pool, table, True, None)
    codes, bad = quantize_paged(pool, table, 0, None)
    assert codes.shape == (2, 0, H, D + 1) and bad.tolist() == [0, 0]
