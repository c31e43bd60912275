"""Sampling a batch: draws come from splitmix64 per (seed, token index), every row of a batch samples
what it samples alone, the limits hold, and the draws follow the kept distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fieldprint.engine.sampling import next_tokens, sample_rows, splitmix64, uniforms
from fieldprint.engine.sequence import SamplingParams, Sequence
from fieldprint.kernels.sample import CHUNK, draw

PARAMS = [SamplingParams(temperature=0.8), SamplingParams(temperature=1.3, top_k=5),
          SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(temperature=1.0, top_k=40, top_p=0.5),
          SamplingParams(temperature=2.0, top_k=1), SamplingParams(temperature=0.5, top_p=1e-4),
          SamplingParams(temperature=1.1, top_k=100000)]


def test_draws_are_splitmix64_outputs():
    # The first three outputs of splitmix64 seeded 0, as the reference C code (splitmix64.c) prints them.
    assert splitmix64([0, 0, 0], [0, 1, 2]).tolist() == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    u = uniforms([0, 2**63 - 1, 12345], [0, 7, 10**9])
    assert u.dtype == np.float64 and ((u >= 0) & (u < 1)).all()
    assert u[0] == (0xE220A8397B1DCDAF >> 11) * 2.0**-53


def _expected(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution a row's limits keep, renormalized (the oracle, one row in float64)."""
    x = logits.double() / p.temperature
    order = torch.argsort(x, descending=True)
    probs = torch.softmax(x[order], -1)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if p.top_k:
        keep[p.top_k:] = False
    probs = probs.masked_fill(~keep, 0) / probs.masked_fill(~keep, 0).sum()
    if p.top_p < 1:
        probs = probs.masked_fill(torch.cumsum(probs, 0) - probs > p.top_p, 0)
        probs /= probs.sum()
    return torch.zeros_like(probs).scatter_(0, order, probs)


def test_a_batch_samples_what_each_row_samples_alone():
    g = torch.Generator().manual_seed(0)
    for step in range(40):
        logits = torch.randn(len(PARAMS), 3000, generator=g) * 3
        u = uniforms([1000 * step + i for i in range(len(PARAMS))], [step] * len(PARAMS))
        got = sample_rows(logits, PARAMS, u).tolist()
        assert got == [int(sample_rows(logits[i : i + 1], [p], u[i : i + 1])[0]) for i, p in enumerate(PARAMS)]
        # a row drawn with its logits, limits and u: the same in any company (here, only unlimited rows)
        free = [i for i, p in enumerate(PARAMS) if not p.top_k and p.top_p == 1]
        assert sample_rows(logits[free], [PARAMS[i] for i in free], u[free]).tolist() == [got[i] for i in free]


def test_the_limits_hold():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 500, generator=g).repeat(len(PARAMS), 1)
    order = logits[0].argsort(descending=True)
    seen = [set() for _ in PARAMS]
    for n in range(300):
        for i, tok in enumerate(sample_rows(logits, PARAMS, uniforms(list(range(len(PARAMS))), [n] * len(PARAMS))).tolist()):
            seen[i].add(tok)
    top = lambda k: set(order[:k].tolist())  # noqa: E731
    assert seen[1] <= top(5) and len(seen[1]) == 5  # top_k=5: only, and all, of the five
    assert seen[4] == top(1) and seen[5] == top(1)  # top_k=1 and a tiny top_p are greedy
    probs = torch.softmax(logits[0] / 0.7, -1)[order]
    nucleus = int((torch.cumsum(probs, 0) - probs <= 0.9).sum())
    assert seen[2] <= top(nucleus) and len(seen[2]) > 5
    assert len(seen[0]) > 50 and len(seen[6]) > 50  # no limit (top_k past the vocabulary: none)


@pytest.mark.parametrize("p", PARAMS[:4], ids=["plain", "top_k", "top_p", "top_k+top_p"])
def test_draws_follow_the_kept_distribution(p):
    """20,000 draws of one request (token indexes 0..19,999) over 12 tokens: every token's frequency
    within 5 standard deviations of its probability, and nothing outside the kept set."""
    logits = torch.tensor([2.0, 1.5, 1.2, 1.0, 0.7, 0.5, 0.1, 0.0, -0.3, -1.0, -2.0, -4.0])
    n = 20000
    u = uniforms([42] * n, list(range(n)))
    toks = sample_rows(logits.repeat(n, 1), [p] * n, u)
    freq = torch.bincount(toks, minlength=12).double() / n
    want = _expected(logits, p)
    assert (freq[want == 0] == 0).all()
    sd = (want * (1 - want) / n).sqrt()
    assert ((freq - want).abs() <= 5 * sd + 1e-12).all(), (freq.tolist(), want.tolist())


def test_a_draw_at_the_edges_of_the_unit_interval_picks_a_kept_token():
    """u = 0 takes the first candidate with mass, u just below 1 the last one, past every rounding."""
    logits = torch.tensor([[0.0, -200.0, 5.0, -200.0]]).repeat(2, 1)  # tokens 1 and 3 underflow to mass 0
    for p in (SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_k=3)):
        got = sample_rows(logits, [p, p], np.array([0.0, 1 - 2.0**-53])).tolist()
        assert got[0] in (0, 2) and got[1] in (0, 2)


def test_next_tokens_mixes_greedy_and_seeded_rows_and_seeds_each_request_once():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 50, generator=g)
    seqs = [Sequence([1], SamplingParams()), Sequence([1], SamplingParams(temperature=0.9, seed=5)),
            Sequence([1], SamplingParams(temperature=0.9))]
    got = next_tokens(seqs, logits)
    assert got[0] == int(logits[0].argmax())
    assert got[1] == int(sample_rows(logits[1:2], [seqs[1].params], uniforms([5], [0]))[0])
    assert seqs[1].sample_seed == 5 and isinstance(seqs[2].sample_seed, int)
    drawn = seqs[2].sample_seed
    seqs[2].output_ids.append(got[2])
    next_tokens(seqs, logits)
    assert seqs[2].sample_seed == drawn  # drawn once per request, then kept


@pytest.mark.parametrize("t", [1e-30, 1e-40, 5e-324])
def test_a_vanishing_temperature_samples_the_most_likely_token(t):
    """Temperatures down to the smallest float validation lets through: the argmax, whatever the limits
    (logits / t overflowed to inf, and inf - inf gave NaN probabilities: token 0, or an index error)."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 1000, generator=g) * 5
    for p in (SamplingParams(temperature=t), SamplingParams(temperature=t, top_k=5), SamplingParams(temperature=t, top_p=0.5)):
        assert sample_rows(logits, [p] * 3, uniforms([1, 2, 3], [0, 0, 0])).tolist() == logits.argmax(-1).tolist()
    hot = sample_rows(logits.repeat(200, 1), [SamplingParams(temperature=1e30)] * 600, uniforms(list(range(600)), [0] * 600))
    assert len(set(hot.tolist())) > 300  # and a huge one is uniform: most of 600 draws over 1000 tokens differ


# The kernels (the GPU's path; Triton's interpreter here) against the torch path the tests above hold
# to the semantics. The interpreter takes milliseconds per program: a few hundred rows in all.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _both(logits: torch.Tensor, params: list, u: np.ndarray) -> list[int]:
    logits = logits.to(DEVICE)
    fused = sample_rows(logits, params, u, fused=True).tolist()
    assert fused == sample_rows(logits, params, u, fused=False).tolist()
    return fused


def _oracle(row: torch.Tensor, p: SamplingParams, u: float) -> int:
    """The token sample_rows must draw for one row, the kept set and the inverse CDF in float64."""
    x = row.double()
    scale = 1.4426950408889634 / p.temperature
    w = torch.exp2((x - x.max()) * scale)
    vals = x.sort(descending=True).values
    thr = vals[min(p.top_k, len(x)) - 1] if p.top_k else float("-inf")
    if p.top_p < 1:
        ps = torch.exp2((vals - x.max()) * scale) * (vals >= thr)
        kept = int(((torch.cumsum(ps, 0) - ps) <= p.top_p * float(w[x >= thr].sum())).sum())
        thr = max(thr, float(vals[kept - 1]))
    cdf = torch.cumsum(w * (x >= thr), 0)
    return int((cdf <= u * cdf[-1]).sum())


def test_the_kernels_draw_what_the_torch_path_and_a_float64_oracle_draw():
    """A vocabulary of three and a half kernel chunks, logits rounded through bf16 (ties, as an LM
    head's are), every kind of limit, alone and in a batch: the same tokens from the kernels, the
    torch path and the oracle."""
    g = torch.Generator().manual_seed(5)
    v = 3 * CHUNK + CHUNK // 2
    params = PARAMS + [SamplingParams(temperature=0.9, top_k=50, top_p=0.95), SamplingParams(temperature=0.6, top_k=3)]
    for step in range(6):
        logits = (torch.randn(len(params), v, generator=g) * 4).to(torch.bfloat16).float()
        u = uniforms([7 * step + i for i in range(len(params))], [step] * len(params))
        got = _both(logits, params, u)
        assert got == [_oracle(row, p, float(ui)) for row, p, ui in zip(logits, params, u)]
        if step < 2:
            alone = [sample_rows(logits[i : i + 1].to(DEVICE), [p], u[i : i + 1], fused=True) for i, p in enumerate(params)]
            assert got == [int(t[0]) for t in alone]
        top_k_only = [p for p in params if p.top_k]  # every row limited by top-k: a topk, not a sort
        rows = [i for i, p in enumerate(params) if p.top_k]
        assert _both(logits[rows], top_k_only, u[rows]) == [got[i] for i in rows]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's (x - max) / 1e-30: -inf, as meant
def test_the_kernels_at_the_edges():
    """u at both ends with tokens of no mass; vanishing and huge temperatures; a row of -inf but one."""
    logits = torch.tensor([[0.0, -200.0, 5.0, -200.0]]).repeat(2, 1)
    for p in (SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_k=3)):
        assert set(_both(logits, [p, p], np.array([0.0, 1 - 2.0**-53]))) <= {0, 2}
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 1000, generator=g) * 5
    for t in (1e-30, 5e-324):
        for p in (SamplingParams(temperature=t), SamplingParams(temperature=t, top_k=5), SamplingParams(temperature=t, top_p=0.5)):
            assert _both(logits, [p] * 3, uniforms([1, 2, 3], [0, 0, 0])) == logits.argmax(-1).tolist()
    hot = _both(logits.repeat(10, 1), [SamplingParams(temperature=1e30)] * 30, uniforms(list(range(30)), [0] * 30))
    assert len(set(hot)) > 25
    lone = torch.full((2, 5000), float("-inf"))
    lone[0, 4321], lone[1, 17] = 1.0, -3.0
    assert _both(lone, [SamplingParams(temperature=0.7, top_p=0.9)] * 2, uniforms([1, 2], [0, 0])) == [4321, 17]


def test_the_kernels_refuse_what_they_cannot_read():
    limits = torch.zeros(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="float32 logits"):
        draw(torch.zeros(2, 8, dtype=torch.bfloat16), limits, None, False)
    with pytest.raises(ValueError, match="float32 logits"):
        draw(torch.zeros(8), limits, None, False)
    with pytest.raises(ValueError, match=r"float64 \[4, 2\]"):
        draw(torch.zeros(2, 8), limits.float(), None, False)
    with pytest.raises(ValueError, match=r"float64 \[4, 2\]"):
        draw(torch.zeros(2, 8), limits[:3], None, False)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's NaN arithmetic, which the test feeds it
def test_nan_or_inf_logits_still_draw_a_token_of_the_vocabulary():
    """A model that emits NaN or inf logits is broken, but the draw must not index outside the
    vocabulary (on the GPU the next step's embedding lookup would fault): both paths stay in range."""
    logits = torch.randn(4, 3 * CHUNK)
    logits[0, 5] = float("nan")
    logits[1] = float("nan")
    logits[2, 7] = float("inf")
    logits[3, :] = float("-inf")
    logits[3, 9] = float("nan")
    for p in (SamplingParams(temperature=0.8), SamplingParams(temperature=0.8, top_k=20, top_p=0.9),
              SamplingParams(temperature=0.8, top_p=0.9)):
        u = uniforms([1, 2, 3, 4], [0, 0, 0, 0])
        for fused in (False, True):
            got = sample_rows(logits.to(DEVICE), [p] * 4, u, fused=fused).tolist()
            assert all(0 <= t < logits.shape[1] for t in got), (p, fused, got)
