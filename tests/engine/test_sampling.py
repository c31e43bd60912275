"""Sampling a batch: draws come from splitmix64 per (seed, token index), every row of a batch samples
what it samples alone, the limits hold, and the draws follow the kept distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fieldprint.engine.sampling import next_tokens, sample_rows, splitmix64, uniforms
from fieldprint.engine.sequence import SamplingParams, Sequence

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
