"""PagedFieldprintAttention against the fp64 naive oracle (CPU: Triton interpreter, fp32/fp16; GPU: bf16 too).

Every case draws random inputs from a seed derived from the case itself (the same in every
process, printed on failure so a failure can be replayed), scatters pages through non-contiguous
block tables, and poisons the output with NaN first so that an unwritten element fails the
comparison.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from fieldprint.errors import KernelInputError
from fieldprint.kernels.paged_attention import (
    AnchorPool,
    AnchorRouting,
    DecodeWorkspace,
    _anchor_splits,
    _short_chunk,
    paged_attention_decode,
    paged_attention_prefill,
    plan_decode,
)
from fieldprint.kernels.reference import reference_paged

# fp32 means IEEE fp32 on every device: on a GPU, TF32 products (tl.dot's default) miss 2e-5.
# bf16 keeps 8 bits of mantissa where fp16 keeps 11 (measured on an H200: ~2e-3 and ~3e-4).
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
# Triton's interpreter runs tl.dot through numpy, which has no bfloat16: its bf16 products are wrong.
GPU_ONLY = pytest.mark.skipif(not ON_GPU, reason="bf16 tl.dot is wrong in Triton's CPU interpreter; bf16 runs on a GPU")


def _seed(case: object) -> int:
    """A seed from the case's repr: hash() of a str differs per process, so it cannot replay a failure."""
    return zlib.crc32(repr(case).encode())


def _on_device(x: object) -> object:
    if isinstance(x, torch.Tensor):
        return x.to(DEVICE)
    if isinstance(x, AnchorPool):
        return AnchorPool(*(_on_device(getattr(x, f)) for f in ("k", "v", "k_scale", "v_exp")))
    if isinstance(x, AnchorRouting):
        return AnchorRouting(*(_on_device(getattr(x, f)) for f in ("block_table", "lens", "seq_anchor_set")))
    return x


def _run(kernel, *args, out=None, **kwargs):
    """Run a kernel on DEVICE over CPU-built inputs (no copy on the CPU); the result comes back into `out`."""
    result = kernel(*map(_on_device, args), out=_on_device(out), **{k: _on_device(v) for k, v in kwargs.items()})
    if out is None:
        return result.cpu()
    out.copy_(result)
    return out


def decode(*args, **kwargs):
    """paged_attention_decode on DEVICE: the GPU when there is one, else Triton's interpreter."""
    return _run(paged_attention_decode, *args, **kwargs)


def prefill(*args, **kwargs):
    """paged_attention_prefill on DEVICE: the GPU when there is one, else Triton's interpreter."""
    return _run(paged_attention_prefill, *args, **kwargs)



def _pages(lens, bs, hkv, d, dtype, gen, spare=3):
    """Random K/V pool with each sequence's pages scattered across it (non-contiguous tables)."""
    per = [max(1, -(-int(n) // bs)) for n in lens]
    mb = max(per) + 1  # one unused column: entries past a sequence's length are never read
    nb = sum(per) + spare
    k = torch.randn(nb, bs, hkv, d, generator=gen).to(dtype)
    v = torch.randn(nb, bs, hkv, d, generator=gen).to(dtype)
    perm = torch.randperm(nb, generator=gen)
    bt = torch.full((len(lens), mb), 10**6, dtype=torch.int32)  # garbage past the used blocks
    i = 0
    for b, p in enumerate(per):
        bt[b, :p] = perm[i : i + p].to(torch.int32)
        i += p
    return k, v, bt, torch.tensor(lens, dtype=torch.int32)


def _anchors(alens, seq_set, bs, hkv, d, dtype, gen, int8=False, per_channel=True):
    per = [max(1, -(-n // bs)) for n in alens]
    nb = sum(per) + 2
    if int8:
        k = torch.randint(-127, 128, (nb, bs, hkv, d), generator=gen, dtype=torch.int8)
        v = torch.randint(-127, 128, (nb, bs, hkv, d), generator=gen, dtype=torch.int8)
        e = torch.randint(-9, -4, (hkv, d if per_channel else 1), generator=gen)
        ks = (2.0 ** e.float()).expand(hkv, d).contiguous()
        # Per-row V exponents over a wide span: rows 2**10 apart share every tile.
        vs = torch.randint(-14, -3, (nb, bs, hkv), generator=gen, dtype=torch.int8)
    else:
        k = torch.randn(nb, bs, hkv, d, generator=gen).to(dtype)
        v = torch.randn(nb, bs, hkv, d, generator=gen).to(dtype)
        ks = vs = None
    perm = torch.randperm(nb, generator=gen)
    bt = torch.zeros(len(alens), max(per), dtype=torch.int32)
    i = 0
    for s, p in enumerate(per):
        bt[s, :p] = perm[i : i + p].to(torch.int32)
        i += p
    return (AnchorPool(k, v, ks, vs),
            AnchorRouting(bt, torch.tensor(alens, dtype=torch.int32), torch.tensor(seq_set, dtype=torch.int32)))


def _relerr(out, ref):
    assert not torch.isnan(out).any(), "unwritten (NaN-poisoned) or NaN output elements"
    return ((out.double() - ref).norm() / ref.norm()).item()


# Sampled corners of the matrix: ragged lengths (1, partial last blocks), block sizes 16/32/64,
# GQA 1/4/8, D 64/128, anchors none / 1 block / many blocks / INT8, g in {0, 0.3, 1, per head}.
DECODE_CASES = [
    # lens, bs, hq, hkv, d, dtype, anchors: (alens, seq_set, int8) | None, mode, gamma
    ([1, 37, 80], 16, 4, 1, 64, torch.float32, None, "concat", 0.0),
    ([50, 17, 128], 32, 8, 2, 64, torch.float32, None, "gamma", 0.3),
    ([70, 5], 64, 8, 1, 128, torch.float16, None, "concat", 0.0),
    ([33, 90, 2, 64], 16, 8, 2, 64, torch.float32, ([16], [0, 0, -1, 0], False), "concat", 0.0),
    ([33, 90, 2], 16, 4, 1, 64, torch.float32, ([100, 9], [1, 0, 1], False), "concat", 0.0),
    ([45, 12, 77], 32, 2, 2, 64, torch.float32, ([70, 33], [0, -1, 1], False), "gamma", 0.3),
    ([45, 12, 77], 16, 8, 1, 64, torch.float16, ([40, 64], [1, 1, 0], False), "gamma", 1.0),
    ([60, 3, 31], 16, 4, 2, 128, torch.float32, ([50, 20], [0, 1, 0], True), "concat", 0.0),
    ([60, 3, 31], 64, 8, 2, 64, torch.float16, ([130], [0, 0, -1], True), "gamma", 0.3),
    ([20, 41], 32, 4, 1, 64, torch.float32, ([64, 5], [1, 0], False), "gamma", "head"),
    ([20, 41, 9], 16, 4, 4, 64, torch.float32, ([30], [0, -1, 0], True), "gamma", 0.0),
    pytest.param(([33, 90, 2], 16, 4, 1, 64, torch.bfloat16, ([100, 9], [1, 0, 1], False), "concat", 0.0), marks=GPU_ONLY),
    pytest.param(([60, 3, 31], 32, 8, 2, 128, torch.bfloat16, ([50, 20], [0, 1, 0], True), "gamma", 0.3), marks=GPU_ONLY),
    pytest.param(([70, 5, 128], 64, 8, 8, 64, torch.bfloat16, None, "concat", 0.0), marks=GPU_ONLY),
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=[f"decode{i}" for i in range(len(DECODE_CASES))])
def test_decode_matches_oracle(case):
    lens, bs, hq, hkv, d, dtype, anc, mode, g = case
    seed = _seed(case)
    gen = torch.Generator().manual_seed(seed)
    k, v, bt, cl = _pages(lens, bs, hkv, d, dtype, gen)
    a = _anchors(anc[0], anc[1], bs, hkv, d, dtype, gen, int8=anc[2]) if anc else (None, None)
    gamma = torch.rand(hq, generator=gen) if g == "head" else g
    q = torch.randn(len(lens), hq, d, generator=gen).to(dtype)
    ref = reference_paged(q, None, k, v, bt, cl, *a, mode=mode, gamma=gamma)
    for merge in ("fused", "apart"):
        out = torch.full_like(q, float("nan"))
        decode(q, k, v, bt, cl, *a, mode=mode, gamma=gamma, out=out, merge=merge)
        err = _relerr(out, ref)
        assert err < TOL[dtype], f"{merge}: relative error {err:.3g} >= {TOL[dtype]} for {dtype} (seed {seed}: _seed(case))"


PREFILL_CASES = [
    # q_lens, prefix lens, bs, hq, hkv, d, dtype, anchors, mode, gamma
    ([40, 1, 23], [0, 30, 17], 16, 4, 2, 64, torch.float32, None, "concat", 0.0),
    ([33, 0, 50], [10, 5, 0], 32, 8, 1, 64, torch.float32, ([40, 70], [1, 0, 0], False), "concat", 0.0),
    ([33, 19], [45, 0], 64, 4, 4, 64, torch.float16, ([17], [0, -1], False), "gamma", 0.3),
    ([18, 29], [3, 21], 16, 8, 1, 128, torch.float32, ([50], [0, 0], True), "concat", 0.0),
    ([26, 7, 40], [0, 60, 9], 16, 4, 1, 64, torch.float32, ([20, 33], [0, 1, -1], True), "gamma", 1.0),
    ([30, 12], [0, 25], 32, 2, 2, 64, torch.float32, ([48], [0, 0], False), "gamma", "head"),
    ([21, 40], [9, 0], 16, 8, 2, 64, torch.float16, ([33], [0, 0], True), "concat", 0.0),
    pytest.param(([33, 0, 50], [10, 5, 0], 32, 8, 1, 64, torch.bfloat16, ([40, 70], [1, 0, 0], False), "gamma", 0.3),
                 marks=GPU_ONLY),
    pytest.param(([18, 29], [3, 21], 16, 8, 1, 128, torch.bfloat16, ([50], [0, 0], True), "concat", 0.0), marks=GPU_ONLY),
]


@pytest.mark.parametrize("case", PREFILL_CASES, ids=[f"prefill{i}" for i in range(len(PREFILL_CASES))])
def test_prefill_matches_oracle(case):
    qlens, prefix, bs, hq, hkv, d, dtype, anc, mode, g = case
    seed = _seed(case)
    gen = torch.Generator().manual_seed(seed)
    lens = [p + n for p, n in zip(prefix, qlens)]
    k, v, bt, cl = _pages(lens, bs, hkv, d, dtype, gen)
    a = _anchors(anc[0], anc[1], bs, hkv, d, dtype, gen, int8=anc[2]) if anc else (None, None)
    gamma = torch.rand(hq, generator=gen) if g == "head" else g
    cu = torch.tensor([0] + list(torch.tensor(qlens).cumsum(0)), dtype=torch.int32)
    q = torch.randn(int(cu[-1]), hq, d, generator=gen).to(dtype)
    out = torch.full_like(q, float("nan"))
    prefill(q, cu, k, v, bt, cl, *a, mode=mode, gamma=gamma, out=out)
    ref = reference_paged(q, cu, k, v, bt, cl, *a, mode=mode, gamma=gamma)
    err = _relerr(out, ref)
    assert err < TOL[dtype], f"relative error {err:.3g} >= {TOL[dtype]} for {dtype} (seed {seed}: _seed(case))"


# Tilings that reach both K/V addressing paths: tiles spanning several pages (block_n > block
# size: one block-table entry per row) and tiles inside one page (block size >= block_n), with
# causal diagonals that start off a block_n boundary.
TILINGS = [
    # bs, block_m, block_n, int8 anchors, mode
    (16, 32, 32, True, "concat"),
    (16, 16, 32, False, "gamma"),
    (64, 32, 16, True, "gamma"),
    (32, 16, 16, False, "concat"),
]


@pytest.mark.slow
@pytest.mark.parametrize("tiling", TILINGS, ids=[f"tiling{i}" for i in range(len(TILINGS))])
def test_prefill_tilings_match_oracle(tiling):
    bs, bm, bn, int8, mode = tiling
    gen = torch.Generator().manual_seed(7 + bs + bm + bn)
    qlens, prefix = [50, 29, 1], [45, 3, 70]
    k, v, bt, cl = _pages([p + n for p, n in zip(prefix, qlens)], bs, 2, 64, torch.float32, gen)
    a = _anchors([77, 40], [1, 0, -1], bs, 2, 64, torch.float32, gen, int8=int8)
    cu = torch.tensor([0] + list(torch.tensor(qlens).cumsum(0)), dtype=torch.int32)
    q = torch.randn(int(cu[-1]), 8, 64, generator=gen)
    out = torch.full_like(q, float("nan"))
    prefill(q, cu, k, v, bt, cl, *a, mode=mode, gamma=0.3, out=out, block_m=bm, block_n=bn)
    ref = reference_paged(q, cu, k, v, bt, cl, *a, mode=mode, gamma=0.3)
    assert _relerr(out, ref) < TOL[torch.float32]


@pytest.mark.slow
def test_decode_splits_and_sharing_tiles_agree():
    """Any split count and any sharing tile (several sets per tile too) computes the same function."""
    gen = torch.Generator().manual_seed(7)
    lens = [90, 61, 7, 128, 33]
    k, v, bt, cl = _pages(lens, 16, 2, 64, torch.float32, gen)
    a = _anchors([70, 20, 45], [2, 0, 2, -1, 1], 16, 2, 64, torch.float32, gen)
    q = torch.randn(5, 8, 64, generator=gen)
    ref = reference_paged(q, None, k, v, bt, cl, *a, mode="gamma", gamma=0.3)
    for splits, asplits, tile in [(1, 1, 1), (3, 2, 2), (8, 5, 4), (None, None, 8)]:
        for merge in ("fused", "apart"):  # the last item to finish merges, or a launch of its own
            out = torch.full_like(q, float("nan"))
            decode(q, k, v, bt, cl, *a, mode="gamma", gamma=0.3, out=out,
                   num_splits=splits, anchor_splits=asplits, seq_tile=tile, merge=merge)
            assert _relerr(out, ref) < 2e-5, (splits, asplits, tile, merge)
    # A long run of one set is cut into several sharing tiles (and a last, shorter one).
    a = _anchors([70, 20], [0, 0, 0, 1, 0], 16, 2, 64, torch.float32, gen)
    ref = reference_paged(q, None, k, v, bt, cl, *a)
    for tile in (1, 2, 4):
        for merge in ("fused", "apart"):
            out = torch.full_like(q, float("nan"))
            decode(q, k, v, bt, cl, *a, out=out, seq_tile=tile, anchor_splits=2, merge=merge)
            assert _relerr(out, ref) < 2e-5, (tile, merge)


def test_concat_equals_sdpa_on_concatenated_kv():
    """An independent oracle: torch SDPA over [anchors; context] for a single decode query."""
    gen = torch.Generator().manual_seed(11)
    k, v, bt, cl = _pages([57], 16, 2, 64, torch.float32, gen)
    a = _anchors([40], [0], 16, 2, 64, torch.float32, gen)
    q = torch.randn(1, 4, 64, generator=gen)
    out = decode(q, k, v, bt, cl, *a)
    kk = torch.cat([a[0].k[a[1].block_table[0].long()].reshape(-1, 2, 64)[:40],
                    k[bt[0, :4].long()].reshape(-1, 2, 64)[:57]])
    vv = torch.cat([a[0].v[a[1].block_table[0].long()].reshape(-1, 2, 64)[:40],
                    v[bt[0, :4].long()].reshape(-1, 2, 64)[:57]])
    kk = kk.transpose(0, 1).repeat_interleave(2, 0)[None]
    vv = vv.transpose(0, 1).repeat_interleave(2, 0)[None]
    ref = F.scaled_dot_product_attention(q[:, :, None], kk, vv)[:, :, 0]
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)


def test_gamma_without_anchors_is_plain_attention():
    """No anchor set (-1) or an empty one: gamma's anchor term is absent, whatever g is."""
    gen = torch.Generator().manual_seed(3)
    k, v, bt, cl = _pages([40, 25, 60], 16, 2, 64, torch.float32, gen)
    a = _anchors([30, 0], [-1, 1, 0], 16, 2, 64, torch.float32, gen)
    q = torch.randn(3, 4, 64, generator=gen)
    out = decode(q, k, v, bt, cl, *a, mode="gamma", gamma=0.8)
    plain = decode(q, k, v, bt, cl, None, mode="gamma", gamma=0.8)
    assert torch.allclose(out[:2], plain[:2], atol=1e-6)
    assert not torch.allclose(out[2], plain[2], atol=1e-3)  # sequence 2 does see its anchors
    cu = torch.tensor([0, 5, 9, 12], dtype=torch.int32)
    qp = torch.randn(12, 4, 64, generator=gen)
    outp = prefill(qp, cu, k, v, bt, cl, *a, mode="gamma", gamma=0.8)
    plainp = prefill(qp, cu, k, v, bt, cl, None)
    assert torch.allclose(outp[:9], plainp[:9], atol=1e-6)


def test_int8_anchors_equal_their_dequantized_values():
    """The kernel reads int8 codes; the result equals fp32 anchors holding code * scale (decode and prefill)."""
    gen = torch.Generator().manual_seed(5)
    k, v, bt, cl = _pages([44, 70], 32, 2, 64, torch.float32, gen)
    a8 = _anchors([50], [0, 0], 32, 2, 64, torch.float32, gen, int8=True)
    p8, routing = a8
    vf = p8.v.float() * torch.pow(2.0, p8.v_exp.float())[..., None]
    af = (AnchorPool(p8.k.float() * p8.k_scale, vf), routing)
    q = torch.randn(2, 4, 64, generator=gen)
    qp = torch.randn(30, 4, 64, generator=gen)
    cu = torch.tensor([0, 10, 30], dtype=torch.int32)
    for mode in ("concat", "gamma"):
        o8 = decode(q, k, v, bt, cl, *a8, mode=mode, gamma=0.3)
        of = decode(q, k, v, bt, cl, *af, mode=mode, gamma=0.3)
        assert torch.allclose(o8, of, atol=1e-5, rtol=1e-5)
        o8 = prefill(qp, cu, k, v, bt, cl, *a8, mode=mode, gamma=0.3)
        of = prefill(qp, cu, k, v, bt, cl, *af, mode=mode, gamma=0.3)
        assert torch.allclose(o8, of, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16,
                                   pytest.param(torch.bfloat16, marks=GPU_ONLY)])
def test_int8_v_exponents_at_the_ends_of_the_dqp_range(dtype):
    """V rows of 2**-64 .. 2**-56 in one KV head and 2**55 .. 2**63 in the other (fp16, whose range
    holds neither output: -24 .. -14 and -8 .. 1), mixed within every tile: each head's output
    matches the fp64 oracle on its own scale, in decode and prefill. The context's V is zero, so
    the outputs are the anchors' alone."""
    gen = torch.Generator().manual_seed(23)
    k, v, bt, cl = _pages([70, 9], 16, 2, 64, dtype, gen)
    v.zero_()
    pool, routing = _anchors([90], [0, 0], 16, 2, 64, dtype, gen, int8=True)
    bands = [(-24, -14), (-8, 1)] if dtype == torch.float16 else [(-64, -56), (55, 63)]
    ve = torch.stack([torch.randint(lo, hi + 1, pool.v_exp.shape[:2], generator=gen) for lo, hi in bands], -1)
    a = (AnchorPool(pool.k, pool.v, pool.k_scale, ve.to(torch.int8).contiguous()), routing)
    q = torch.randn(2, 8, 64, generator=gen).to(dtype)
    qp = torch.randn(30, 8, 64, generator=gen).to(dtype)
    cu = torch.tensor([0, 21, 30], dtype=torch.int32)
    for mode in ("concat", "gamma"):
        for out, ref in ((decode(q, k, v, bt, cl, *a, mode=mode, gamma=0.5),
                          reference_paged(q, None, k, v, bt, cl, *a, mode=mode, gamma=0.5)),
                         (prefill(qp, cu, k, v, bt, cl, *a, mode=mode, gamma=0.5),
                          reference_paged(qp, cu, k, v, bt, cl, *a, mode=mode, gamma=0.5))):
            for head in range(2):  # query heads 4h .. 4h+3 read KV head h
                err = _relerr(out[:, 4 * head:4 * head + 4], ref[:, 4 * head:4 * head + 4])
                assert err < TOL[dtype], (mode, head, err)


def test_decode_is_deterministic():
    gen = torch.Generator().manual_seed(9)
    k, v, bt, cl = _pages([77, 120, 5], 16, 2, 64, torch.float32, gen)
    a = _anchors([60], [0, 0, 0], 16, 2, 64, torch.float32, gen)
    q = torch.randn(3, 8, 64, generator=gen)
    o1 = decode(q, k, v, bt, cl, *a, num_splits=4)
    o2 = decode(q, k, v, bt, cl, *a, num_splits=4)
    assert torch.equal(o1, o2)


def _base(gen=None):
    gen = gen or torch.Generator().manual_seed(1)
    k, v, bt, cl = _pages([20, 30], 16, 2, 64, torch.float32, gen)
    q = torch.randn(2, 4, 64, generator=gen)
    return q, k, v, bt, cl


@pytest.mark.parametrize("mutate, needle", [
    (lambda a: a.update(q=a["q"].half()), "must be a contiguous"),
    (lambda a: a.update(q=a["q"][:, :3]), "multiple of H_kv"),
    (lambda a: a.update(block_tables=a["block_tables"].long()), "int32"),
    (lambda a: a.update(context_lens=a["context_lens"][:1]), "B=2 rows"),
    (lambda a: a.update(context_lens=torch.tensor([0, 5], dtype=torch.int32)), "context_lens must lie"),
    (lambda a: a.update(context_lens=torch.tensor([20, 999], dtype=torch.int32)), "context_lens must lie"),
    (lambda a: a["block_tables"].__setitem__((0, 0), 999), "outside [0, num_blocks"),
    (lambda a: a.update(mode="sum"), "mode must be"),
    (lambda a: a.update(gamma=1.5), "gamma must lie"),
    (lambda a: a.update(gamma=torch.full((3,), 0.5)), "per-head gamma"),
    (lambda a: a.update(gamma=torch.full((4,), 2.0)), "per-head gamma must lie"),
    (lambda a: a.update(min_chunk=24), "min_chunk must be a multiple"),
    (lambda a: a.update(min_chunk="64"), "min_chunk must be a multiple"),
    (lambda a: a.update(min_chunk=True), "min_chunk must be a multiple"),
    (lambda a: a.update(merge="late"), "merge must be"),
])
def test_decode_rejects_bad_inputs(mutate, needle):
    q, k, v, bt, cl = _base()
    args = dict(q=q, k_cache=k, v_cache=v, block_tables=bt, context_lens=cl, mode="concat", gamma=0.0)
    mutate(args)
    with pytest.raises(KernelInputError, match=needle.replace("[", r"\[").replace("(", r"\(")):
        decode(**args)


def test_anchor_inputs_are_validated():
    gen = torch.Generator().manual_seed(2)
    q, k, v, bt, cl = _base(gen)
    a, r = _anchors([20], [0, -1], 16, 2, 64, torch.float32, gen, int8=True)
    with pytest.raises(KernelInputError, match="k_scale"):
        decode(q, k, v, bt, cl, AnchorPool(a.k, a.v), r)
    with pytest.raises(KernelInputError, match="come together"):
        decode(q, k, v, bt, cl, a, None)
    with pytest.raises(KernelInputError, match="powers of two"):
        decode(q, k, v, bt, cl, AnchorPool(a.k, a.v, a.k_scale * 3, a.v_exp), r)
    with pytest.raises(KernelInputError, match="v_exp as a contiguous int8"):
        decode(q, k, v, bt, cl, AnchorPool(a.k, a.v, a.k_scale, a.v_exp.float()), r)
    with pytest.raises(KernelInputError, match="v_exp as a contiguous int8"):
        decode(q, k, v, bt, cl, AnchorPool(a.k, a.v, a.k_scale, a.v_exp[:, :, :1].contiguous()), r)
    with pytest.raises(KernelInputError, match="exponent range"):
        decode(q, k, v, bt, cl, AnchorPool(a.k, a.v, a.k_scale, torch.full_like(a.v_exp, 100)), r)
    with pytest.raises(KernelInputError, match="seq_anchor_set"):
        decode(q, k, v, bt, cl, a, AnchorRouting(r.block_table, r.lens, torch.tensor([0, 4], dtype=torch.int32)))
    with pytest.raises(KernelInputError, match="routing.lens"):
        decode(q, k, v, bt, cl, a, AnchorRouting(r.block_table, torch.tensor([999], dtype=torch.int32), r.seq_anchor_set))
    with pytest.raises(KernelInputError, match="int8 codes"):
        decode(q, k, v, bt, cl, AnchorPool(a.k.float(), a.v, a.k_scale, a.v_exp), r)


def test_prefill_rejects_bad_layout():
    q, k, v, bt, cl = _base()
    qp = torch.randn(10, 4, 64)
    with pytest.raises(KernelInputError, match="end at the number of tokens"):
        prefill(qp, torch.tensor([0, 4, 9], dtype=torch.int32), k, v, bt, cl)
    with pytest.raises(KernelInputError, match="counted in context_lens"):
        prefill(qp, torch.tensor([0, 1, 10], dtype=torch.int32), k, v, bt,
                                torch.tensor([20, 8], dtype=torch.int32))
    with pytest.raises(KernelInputError, match="cu_seqlens_q"):
        prefill(qp, torch.tensor([0, 4, 10]), k, v, bt, cl)
    with pytest.raises(KernelInputError, match="out must be"):
        prefill(qp, torch.tensor([0, 4, 10], dtype=torch.int32), k, v, bt, cl,
                                out=torch.empty(10, 4, 32))


def test_scale_argument_is_used():
    q, k, v, bt, cl = _base()
    out = decode(q, k, v, bt, cl, sm_scale=0.05)
    ref = reference_paged(q, None, k, v, bt, cl, sm_scale=0.05)
    assert _relerr(out, ref) < 2e-5
    assert math.isfinite(out.sum().item())


def test_a_one_shot_decode_fills_an_out_laid_out_unlike_q():
    q, k, v, bt, cl = _base()
    want = decode(q, k, v, bt, cl)
    out = torch.full((q.shape[1], q.shape[0], q.shape[2]), float("nan")).transpose(0, 1)  # [B, H, D], other strides
    assert torch.equal(decode(q, k, v, bt, cl, out=out), want) and torch.equal(out, want)


@pytest.mark.skipif(not ON_GPU, reason="the direct launch is of a compiled kernel: needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["none", "bf16", "int8"])
def test_a_plan_launches_the_compiled_kernel_directly_with_the_same_results(kind):
    """After its first run, a plan calls the compiled kernel's launcher itself: the outputs are Triton's
    own launch's bit for bit, eagerly and in a CUDA graph; a misaligned tensor takes Triton's path."""
    gen = torch.Generator().manual_seed(31)
    layers = [_pages([1, 300, 17, 64], 16, 2, 64, torch.bfloat16, torch.Generator().manual_seed(i)) for i in range(3)]
    bt, cl = _on_device(layers[0][2]), _on_device(layers[0][3])
    pools = [None] * 3 if kind == "none" else [
        _anchors([40, 20], [1, -1, 0, 0], 16, 2, 64, torch.bfloat16, torch.Generator().manual_seed(9 + i),
                 int8=kind == "int8") for i in range(3)]
    routing = None if kind == "none" else _on_device(pools[0][1])
    pools = [None if p is None else _on_device(p[0]) for p in pools]
    qs = [torch.randn(4, 8, 64, generator=gen).to(DEVICE, torch.bfloat16) for _ in layers]
    ks = [(_on_device(k), _on_device(v)) for k, v, _, _ in layers]
    # Triton's own launch, a fresh plan per call: what the direct calls must equal.
    want = [paged_attention_decode(q, k, v, bt, cl, p, routing) for q, (k, v), p in zip(qs, ks, pools)]
    plan = plan_decode(qs[0], *ks[0], bt, cl, pools[0], routing)
    assert not plan.launch.direct
    got = [plan.run(q, k, v, p) for q, (k, v), p in zip(qs, ks, pools)]
    assert plan.launch.direct, plan.launch.why_not_direct
    got += [plan.run(q, k, v, p) for q, (k, v), p in zip(qs, ks, pools)]
    assert all(torch.equal(g, w) for g, w in zip(got, want + want))
    outs = [torch.full_like(q, float("nan")) for q in qs]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for q, (k, v), p, o in zip(qs, ks, pools, outs):
            plan.run(q, k, v, p, out=o)
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(o, w) for o, w in zip(outs, want))
    shifted = torch.empty(qs[0].numel() + 1, dtype=qs[0].dtype, device=DEVICE)[1:].view_as(qs[0])  # 2 bytes off
    shifted.copy_(qs[0])
    assert torch.equal(plan.run(shifted, *ks[0], pools[0]), want[0])


def test_a_callers_workspace_is_reused_grown_and_gives_the_same_results():
    gen = torch.Generator().manual_seed(12)
    ws = DecodeWorkspace(DEVICE)
    small = _pages([9, 30], 16, 2, 64, torch.float32, gen)
    large = _pages([70, 130, 5, 44], 16, 2, 64, torch.float32, gen)
    a = _anchors([40], [0, -1, 0, 0], 16, 2, 64, torch.float32, gen, int8=True)
    for k, v, bt, cl in (small, large, small):  # grows for the second call, then serves a smaller one
        b = bt.shape[0]
        q = torch.randn(b, 8, 64, generator=gen)
        anchors = (a[0], AnchorRouting(a[1].block_table, a[1].lens, a[1].seq_anchor_set[:b]))
        want = decode(q, k, v, bt, cl, *anchors)
        assert torch.equal(decode(q, k, v, bt, cl, *anchors, workspace=ws), want)
        assert torch.equal(decode(q, k, v, bt, cl, *anchors, workspace=ws), want)  # counters were left at zero
        # The merge as a launch of its own, between fused ones in the same workspace: it leaves the
        # counters alone, and the fused launch after it finds them at zero.
        assert torch.equal(decode(q, k, v, bt, cl, *anchors, workspace=ws, merge="apart"), want)
        assert torch.equal(decode(q, k, v, bt, cl, *anchors, workspace=ws, merge="fused"), want)
    assert ws._m.numel() >= 4 * 8 * 2 and not ws._cnt.any()
    with pytest.raises(KernelInputError, match="workspace is on"):
        paged_attention_decode(*(t.to(DEVICE) for t in (q, k, v, bt, cl)), workspace=DecodeWorkspace("meta"))


def test_a_plan_serves_every_layer_like_one_shot_calls():
    """plan_decode once per step, run per layer: the same results as separate calls, and layer
    tensors of another shape are refused."""
    gen = torch.Generator().manual_seed(21)
    layers = [_pages([33, 90, 7], 16, 2, 64, torch.float32, torch.Generator().manual_seed(i)) for i in range(3)]
    bt, cl = layers[0][2], layers[0][3]  # one step: the same tables and lengths for every layer
    pools = [_anchors([40, 20], [1, -1, 0], 16, 2, 64, torch.float32, torch.Generator().manual_seed(9 + i), int8=True)
             for i in range(3)]
    routing = _on_device(pools[0][1])
    qs = [torch.randn(3, 8, 64, generator=gen) for _ in layers]
    dev = lambda t: _on_device(t)  # noqa: E731
    plan = plan_decode(dev(qs[0]), dev(layers[0][0]), dev(layers[0][1]), dev(bt), dev(cl), dev(pools[0][0]), routing,
                       mode="gamma", gamma=0.4)
    for _ in range(2):
        for (k, v, _, _), (pool, _), q in zip(layers, pools, qs):
            want = decode(q, k, v, bt, cl, pool, pools[0][1], mode="gamma", gamma=0.4)
            got = plan.run(dev(q), dev(k), dev(v), dev(pool)).cpu()
            assert torch.equal(got, want)
    with pytest.raises(KernelInputError, match="as planned"):
        plan.run(dev(qs[0][:2]), dev(layers[0][0]), dev(layers[0][1]), dev(pools[0][0]))
    with pytest.raises(KernelInputError, match="anchor pool must be"):
        plan.run(dev(qs[0]), dev(layers[0][0]), dev(layers[0][1]), None)
    k, v = dev(layers[0][0]), dev(layers[0][1])
    with pytest.raises(KernelInputError, match="must be contiguous torch.float32 of the planned shape"):
        plan.run(dev(qs[0]), k.half(), v.half(), dev(pools[0][0]))
    with pytest.raises(KernelInputError, match="must be contiguous"):  # the kernel indexes the pools densely
        plan.run(dev(qs[0]), k.transpose(1, 2).contiguous().transpose(1, 2), v, dev(pools[0][0]))
    with pytest.raises(KernelInputError, match="must be tensors"):
        plan.run(dev(qs[0]).cpu().numpy(), k, v, dev(pools[0][0]))
    with pytest.raises(KernelInputError, match="AnchorPool or None"):
        plan.run(dev(qs[0]), k, v, "pool")
    with pytest.raises(KernelInputError, match="per-call tensor 1 must be a tensor on"):
        plan.run(dev(qs[0]), k.to("meta"), v, dev(pools[0][0]))
    with pytest.raises(KernelInputError, match="planned strides"):  # the launch writes out with q's strides
        plan.run(dev(qs[0]), k, v, dev(pools[0][0]), out=torch.empty(8, 3, 64, device=k.device).transpose(0, 1))
    bf = AnchorPool(pools[0][0].k.float(), pools[0][0].v.float())  # a pool of another dtype than planned (int8)
    with pytest.raises(KernelInputError, match="anchor pool must be laid out as planned"):
        plan.run(dev(qs[0]), k, v, dev(bf))
    p0 = dev(pools[0][0])
    for other in (AnchorPool(p0.k, p0.v[:1], p0.k_scale, p0.v_exp), AnchorPool(p0.k, p0.v, p0.k_scale.half(), p0.v_exp),
                  AnchorPool(p0.k, p0.v, p0.k_scale, None), AnchorPool(p0.k, p0.v, p0.k_scale.t().contiguous().t(), p0.v_exp)):
        with pytest.raises(KernelInputError, match="anchor pool must be laid out as planned"):
            plan.run(dev(qs[0]), k, v, other)


@pytest.mark.parametrize("tokens", [64, 640, 2048, 2049, 131072])
@pytest.mark.parametrize("pairs", [1, 8, 64, 1024])
def test_split_plans_cover_every_token_once_in_whole_key_blocks(tokens, pairs):
    """Anchor and short-context split plans: whole 64-token blocks, no empty split, all tokens covered."""
    s, chunk = _anchor_splits(tokens, pairs, 64, 132, 64)
    assert chunk % 64 == 0 and (s - 1) * chunk < tokens <= s * chunk and chunk >= min(128, -(-tokens // 64) * 64)
    c = _short_chunk(tokens, pairs, 132, 64)
    assert c in (64, 128, 256) and (c == 256 or pairs * -(-tokens // c) <= 3 * 132)
