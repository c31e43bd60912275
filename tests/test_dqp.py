import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fieldprint.canon import parse_digest
from fieldprint.dqp import (
    ROW_LAYOUT,
    AuditThresholds,
    DQPProfile,
    QuantizedState,
    audit,
    block_digests,
    dequantize,
    differing_blocks,
    exponent_for_bound,
    quantize,
    quantize_codes,
    quantize_rows,
    row_exponents,
    stack_digest,
    state_header,
)
from fieldprint.dqp_profile import EXP_MAX, EXP_MIN
from fieldprint.errors import DQPError
from fieldprint.ledger.entry import StateEntry

L, H, D = 3, 2, 8


def _profile(granularity: str = "channel", block_size: int = 4, headroom_pct: int = 125, revision: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sample = {(l, k): torch.randn(32, H, D, generator=g) * (l + 1) for l in range(L) for k in "KV"}
    return DQPProfile.calibrate([sample], name="llama-test", num_layers=L, num_kv_heads=H, head_dim=D,
                                k_granularity=granularity, block_size=block_size, headroom_pct=headroom_pct, revision=revision)


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=1e-17, max_value=1e21, allow_nan=False))
def test_exponent_is_the_smallest_power_of_two_that_fits(bound):
    e = int(exponent_for_bound(bound))
    assert 127.0 * 2.0**e >= bound
    assert 127.0 * 2.0 ** (e - 1) < bound or e == EXP_MIN


def test_exponent_edges():
    assert int(exponent_for_bound(127.0)) == 0 and int(exponent_for_bound(127.0000001)) == 1
    assert int(exponent_for_bound(0.0)) == EXP_MIN
    assert int(exponent_for_bound(1e300)) == EXP_MAX
    with pytest.raises(DQPError):
        exponent_for_bound(float("nan"))
    with pytest.raises(DQPError):
        exponent_for_bound(-1.0)


def test_round_half_to_even_and_saturation():
    e = np.zeros((1, 4), np.int32)
    x = torch.tensor([[[0.5, 1.5, 2.5, -2.5]], [[-0.5, 126.5, 300.0, -1e30]]], dtype=torch.float32)
    codes = quantize_codes(x, e)
    assert codes.tolist() == [[[0, 2, 2, -2]], [[0, 126, 127, -127]]]
    # a scale of 2**-3: x / scale = x * 8, so 0.3125 * 8 = 2.5 rounds to 2
    x2 = torch.tensor([[[0.3125, 0.4375, -0.0625, 15.875]]])
    assert quantize_codes(x2, np.full((1, 4), -3)).tolist() == [[[2, 4, 0, 127]]]


def test_dequantization_is_exact_for_representable_values():
    e = np.array([[-2, 0, 3]], np.int32)
    codes = torch.randint(-127, 128, (50, 1, 3), dtype=torch.int8)
    values = dequantize(codes, e)
    assert torch.equal(quantize_codes(values, e), codes)
    assert torch.equal(values, codes.float() * torch.tensor([0.25, 1.0, 8.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_matches_a_float64_model(dtype):
    p = _profile()
    x = (torch.randn(37, H, D, dtype=torch.float64) * 3).to(dtype)
    qs = quantize(x, p, 2, "K")
    scaled = x.double() / torch.from_numpy(np.ldexp(1.0, p.exponents(2, "K")))
    expected = torch.from_numpy(np.clip(np.round(scaled.numpy()), -127, 127).astype(np.int8))  # numpy rounds half to even
    assert torch.equal(qs.codes, expected)
    assert qs.source_dtype == str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_raises_and_names_the_element(bad):
    p = _profile()
    x = torch.randn(5, H, D)
    x[3, 1, 6] = bad
    with pytest.raises(DQPError, match=r"index \(3, 1, 6\)"):
        quantize(x, p, 0, "V")


def test_bad_inputs_raise_dqp_errors():
    p = _profile()
    with pytest.raises(DQPError, match="T, H_kv, D"):
        quantize(torch.randn(4, H * D), p, 0, "K")
    with pytest.raises(DQPError, match="bfloat16"):
        quantize(torch.randn(4, H, D).double(), p, 0, "K")
    with pytest.raises(DQPError, match="do not fit"):
        quantize(torch.randn(4, H, D + 1), p, 0, "K")
    with pytest.raises(DQPError, match="outside"):
        quantize(torch.randn(4, H, D), p, L, "K")
    with pytest.raises(DQPError, match="kind"):
        quantize(torch.randn(4, H, D), p, 0, "Q")


def test_profile_calibration_granularity_and_headroom():
    g = torch.Generator().manual_seed(1)
    sample = {(l, k): torch.randn(16, H, D, generator=g) for l in range(L) for k in "KV"}
    sample[(1, "K")][:, 0, 5] = 100.0  # an outlier channel, as real K has
    ch = DQPProfile.calibrate([sample], name="m", num_layers=L, num_kv_heads=H, head_dim=D)
    hd = DQPProfile.calibrate([sample], name="m", num_layers=L, num_kv_heads=H, head_dim=D, k_granularity="head")
    assert ch.exponents(1, "K")[0, 5] == exponent_for_bound(125.0)  # 100 * 1.25
    assert ch.exponents(1, "K")[0, 4] < ch.exponents(1, "K")[0, 5]  # other channels keep finer scales
    assert (hd.exponents(1, "K")[0] == hd.exponents(1, "K")[0, 5]).all()  # per head: repeated along D
    v = ch.exponents(2, "V")
    assert (v == v[:, :1]).all()  # V is per head
    assert ch.samples == 16
    for l in range(L):
        for k in "KV":
            bound = sample[(l, k)].abs().amax(dim=0).numpy()
            assert (bound * 1.25 <= 127.0 * np.ldexp(1.0, ch.exponents(l, k))).all()  # calibration data never saturates


def test_profile_encoding_is_canonical_and_hashed():
    p = _profile()
    data = p.encode()
    back = DQPProfile.decode(data)
    assert back.encode() == data and back.digest == p.digest
    parse_digest(p.digest)
    assert _profile(revision=2).digest != p.digest
    assert _profile(headroom_pct=200).digest != p.digest
    with pytest.raises(DQPError, match="canonical"):
        DQPProfile.decode(data.replace(b'{"block_size"', b'{ "block_size"'))
    with pytest.raises(DQPError, match="fields"):
        DQPProfile.decode(data.replace(b'"samples"', b'"sample"'))
    with pytest.raises(DQPError, match="exponents"):
        DQPProfile.decode(data.replace(b'"v_exp":[[', b'"v_exp":[[99,'))


def test_profile_rejects_bad_construction():
    with pytest.raises(DQPError, match="saw no samples"):
        DQPProfile.calibrate([{(0, "K"): torch.randn(4, H, D)}], name="m", num_layers=1, num_kv_heads=H, head_dim=D)
    with pytest.raises(DQPError, match="NaN"):
        DQPProfile.calibrate([{(0, "K"): torch.full((4, H, D), float("nan")), (0, "V"): torch.randn(4, H, D)}],
                             name="m", num_layers=1, num_kv_heads=H, head_dim=D)
    with pytest.raises(DQPError, match="headroom_pct"):
        DQPProfile("m", 1, 1, H, D, "channel", 16, 90, 0, np.zeros((1, H, D), int), np.zeros((1, H), int))
    with pytest.raises(DQPError, match="k_exp"):
        DQPProfile("m", 1, 1, H, D, "channel", 16, 125, 0, np.zeros((1, H), int), np.zeros((1, H), int))


def test_digest_is_deterministic_and_localises_a_changed_block():
    p = _profile(block_size=4)
    x = torch.randn(10, H, D) * 2  # 3 blocks, the last one partial (2 tokens)
    a, b = quantize(x, p, 1, "K"), quantize(x.clone(), p, 1, "K")
    assert a.digest() == b.digest() and len(a.blocks) == 3
    b.codes[9, 1, 3] += 1
    assert b.digest() != a.digest()
    assert differing_blocks(a.blocks, b.blocks) == [2]
    assert differing_blocks(a.blocks, b.blocks[:1]) == [1, 2]


def test_header_binds_dtype_layer_kind_and_block_size():
    p = _profile()
    x = torch.randn(8, H, D)
    base = quantize(x, p, 0, "K")
    d0 = base.digest()
    variants = [
        QuantizedState(base.codes, base.exponents, "bfloat16", 0, "K", base.block_size),
        QuantizedState(base.codes, base.exponents, "float32", 1, "K", base.block_size),
        QuantizedState(base.codes, base.exponents, "float32", 0, "V", base.block_size),
        QuantizedState(base.codes, base.exponents, "float32", 0, "K", base.block_size * 2),
        QuantizedState(base.codes, base.exponents + 1, "float32", 0, "K", base.block_size),
    ]
    assert len({v.digest() for v in variants} | {d0}) == len(variants) + 1
    hdr = state_header("float32", 0, "K", 4, (8, H, D), base.exponents)
    assert hdr[:5] == b"FPDQP" and len(hdr) == 5 + 3 + 20 + H * D


def test_block_digests_are_blake3_of_raw_code_runs():
    import blake3

    codes = torch.randint(-127, 128, (7, H, D), dtype=torch.int8)
    blocks = block_digests(codes, 3)
    raw = codes.numpy().tobytes()
    step = 3 * H * D
    assert blocks == [blake3.blake3(raw[i : i + step]).digest() for i in range(0, len(raw), step)]


def test_stack_digest_is_order_independent_and_rejects_duplicates():
    p = _profile()
    parts = [(l, k, quantize(torch.randn(4, H, D), p, l, k).digest()) for l in range(L) for k in "KV"]
    assert stack_digest(parts) == stack_digest(list(reversed(parts)))
    assert stack_digest(parts) != stack_digest(parts[:-1])
    with pytest.raises(DQPError, match="twice"):
        stack_digest(parts + parts[:1])
    with pytest.raises(DQPError):
        stack_digest([])


def test_audit_identical_recomputation_passes():
    p = _profile()
    x = torch.randn(12, H, D)
    report = audit(x.clone(), quantize(x, p, 0, "K"), p)
    assert report.passed and report.differing == 0 and report.max_distance == 0 and report.blocks_over == []


def test_audit_tolerates_rounding_noise_and_flags_a_tampered_block():
    p = _profile(block_size=4)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, H, D, generator=g) * 2
    committed = quantize(x, p, 1, "V")
    # recomputation on other hardware: a relative error of a bf16 ulp or so on every element
    noisy = x * (1 + torch.randn(x.shape, generator=g) * 2e-4)
    ok = audit(noisy, committed, p)
    assert ok.passed and 0 < ok.differing and ok.max_distance <= 1, ok.summary()
    tampered = noisy.clone()
    tampered[20:24] = -tampered[20:24]  # block 5 recomputed from a different state
    bad = audit(tampered, committed, p)
    assert not bad.passed and bad.blocks_over == [5] and bad.max_distance > 2
    strict = audit(noisy, committed, p, AuditThresholds(max_code_distance=0, max_block_fraction=0.0, max_fraction=0.0))
    assert not strict.passed and set(strict.blocks_over) == {i for i, f in enumerate(strict.block_fractions) if f > 0}


def test_audit_refuses_codes_from_another_profile():
    p, q = _profile(), _profile(seed=5, headroom_pct=400)
    x = torch.randn(4, H, D)
    with pytest.raises(DQPError, match="profile"):
        audit(x, quantize(x, q, 0, "K"), p)
    with pytest.raises(DQPError, match="shape"):
        audit(x[:3], quantize(x, p, 0, "K"), p)


def test_state_entry_carries_the_profile_digest():
    p = _profile()
    qs = quantize(torch.randn(4, H, D, dtype=torch.bfloat16), p, 0, "K")
    d = stack_digest([(0, "K", qs.digest())])
    entry = StateEntry(state_id=d, state_type="observation", digest=d, profile=p.digest, parents=(), taint=(),
                       session="s-1", time_ns=1).encode()
    assert StateEntry.decode(entry).profile == p.digest


def test_malformed_header_and_stack_inputs_raise_dqp_errors():
    e = np.zeros((H, D), dtype=np.int32)
    for layer in (-1, 2**32, True, 1.0):
        with pytest.raises(DQPError, match=r"layer must be an integer in \[0, 2\*\*32\)"):
            state_header("bfloat16", layer, "K", 4, (5, H, D), e)
    with pytest.raises(DQPError, match="block size"):
        state_header("bfloat16", 0, "K", -4, (5, H, D), e)
    with pytest.raises(DQPError, match="kind"):
        state_header("bfloat16", 0, "Q", 4, (5, H, D), e)
    with pytest.raises(DQPError, match="do not fit"):
        state_header("bfloat16", 0, "K", 4, (5, H, D + 1), e)
    d = quantize(torch.ones(5, H, D), _profile(), 0, "K").digest()
    assert stack_digest([(np.int64(1), "V", d), (0, "K", d)]) == stack_digest([(0, "K", d), (1, "V", d)])
    bad = [
        ([(-1, "K", d)], "layer"),
        ([(0, "Q", d)], "kind must be one of"),
        ([(0, "K", d), (0, "k", d)], "kind must be one of"),
        ([(0, "K", "sha256:" + "00" * 32)], "sha256; DQP state digests are blake3"),
        ([(0, "K", "blake3:zz")], "not of the form"),
        ([(0, "K", "blake3:00")], "32 bytes"),
        ([(0, "K", None)], "not of the form"),
        ([(0, "K")], r"\(layer, kind, state digest\) tuples"),
    ]
    for parts, match in bad:
        with pytest.raises(DQPError, match=match):
            stack_digest(parts)


# -- the row layout: V scaled per (token, head) row (profile format 3) -------------------------------


def _token_profile(block_size: int = 4):
    g = torch.Generator().manual_seed(5)
    sample = {(l, k): torch.randn(32, H, D, generator=g) for l in range(L) for k in "KV"}
    return DQPProfile.calibrate([sample], name="rows", num_layers=L, num_kv_heads=H, head_dim=D,
                                v_granularity="token", block_size=block_size)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(min_value=-2.0**70, max_value=2.0**70, allow_nan=False, width=32), min_size=D, max_size=D))
def test_row_exponents_are_the_profile_rule_applied_to_each_row(row):
    x = torch.tensor(row, dtype=torch.float32).reshape(1, 1, D)
    want = int(exponent_for_bound(float(x.abs().max())))
    assert int(row_exponents(x)[0, 0]) == want


def test_row_exponent_edges():
    x = torch.zeros(1, 4, D)
    x[0, 1, 3] = 127.0  # exactly 127 * 2**0: fits at e = 0
    x[0, 2, 0] = -127.0 * 2.0**-20 * (1 + 2.0**-23)  # one ulp over 127 * 2**-20: the next exponent
    x[0, 3, 5] = 3e38  # past 127 * 2**EXP_MAX: clamps, and the codes saturate
    assert row_exponents(x)[0].tolist() == [EXP_MIN, 0, -19, EXP_MAX]
    packed = quantize_rows(x)
    assert packed.shape == (1, 4, D + 1) and packed.dtype == torch.int8
    assert packed[0, 1, 3] == 127 and packed[0, 2, 0] == -64 and packed[0, 3, 5] == 127


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_rows_is_quantize_codes_with_each_rows_own_exponent(dtype):
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(9, H, D, generator=g) * torch.logspace(-3, 2, 9)[:, None, None]).to(dtype)
    packed = quantize_rows(x)
    e = packed[..., D].to(torch.int64)
    for t in range(9):
        for h in range(H):
            ref = quantize_codes(x[t : t + 1, h : h + 1], np.full((1, D), int(e[t, h])))
            assert torch.equal(packed[t, h, :D], ref[0, 0])
    values = dequantize(packed, None)
    assert (values.abs().amax(-1) > 63.5 * 2.0 ** e.double()).all()  # every row uses the top half of its range
    assert torch.equal(quantize_rows(values), packed)  # dequantized values quantize back to themselves


def test_row_layout_header_and_digest_bind_the_exponents():
    p = _token_profile()
    x = torch.randn(10, H, D)
    qs = quantize(x, p, 1, "V")
    assert qs.exponents is None and qs.codes.shape == (10, H, D + 1)
    hdr = qs.header()
    assert hdr[5] == ROW_LAYOUT and len(hdr) == 5 + 3 + 5 * 4  # no exponent bytes after the fixed fields
    assert hdr == state_header("float32", 1, "V", 4, (10, H, D), None)
    assert len(qs.digest() and qs.blocks) == 3
    moved = qs.codes.clone()
    moved[6, 0, D] += 1  # one row's exponent (the same codes then mean twice the values)
    other = QuantizedState(moved, None, "float32", 1, "V", 4)
    assert other.digest() != qs.digest() and differing_blocks(qs.blocks, other.blocks) == [1]
    k = quantize(x, p, 1, "K")
    assert k.exponents is not None and k.codes.shape == (10, H, D)


def test_row_layout_inputs_are_checked():
    packed = quantize_rows(torch.randn(3, H, D))
    bad = packed.clone()
    bad[1, 0, D] = 100  # an exponent past EXP_MAX: no DQP value
    with pytest.raises(DQPError, match="row exponents must lie in"):
        dequantize(bad, None)
    with pytest.raises(DQPError, match="int8"):
        dequantize(packed.float(), None)
    with pytest.raises(DQPError, match="quantize_rows wants"):
        quantize_rows(torch.randint(0, 5, (3, H, D)))
    with pytest.raises(DQPError, match="NaN/Inf"):
        quantize(torch.full((2, H, D), float("nan")), _token_profile(), 0, "V")


def test_audit_of_the_row_layout_measures_steps_of_the_committed_scale():
    p = _token_profile()
    x = torch.randn(12, H, D)
    committed = quantize(x, p, 0, "V")
    assert audit(x, committed, p).passed and audit(x, committed, p).differing == 0
    tampered = committed.codes.clone()
    tampered[9, 1, :4] += 9
    report = audit(x, QuantizedState(tampered, None, "float32", 0, "V", 4), p)
    assert not report.passed and report.max_distance == 9 and report.blocks_over == [2]
    with pytest.raises(DQPError, match="not made with this profile"):
        audit(x, committed, _profile(), AuditThresholds())
