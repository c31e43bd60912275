"""Sampling a batch: temperature, top-k and top-p applied to all rows at once give each row the token
the row-at-a-time sampler gave with the same generator; the limits hold; greedy rows stay argmax."""

from __future__ import annotations

import torch

from fieldprint.engine.runner import sample_rows
from fieldprint.engine.sequence import SamplingParams


def _one_row(row: torch.Tensor, p: SamplingParams, g: torch.Generator) -> int:
    """The sampler as it ran one sequence at a time (the reference)."""
    row = row / p.temperature
    if p.top_k:
        kth = torch.topk(row, min(p.top_k, row.shape[-1])).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, -1)
    if p.top_p < 1:
        sp, si = torch.sort(probs, descending=True)
        cut = torch.cumsum(sp, -1) - sp > p.top_p
        probs = torch.zeros_like(probs).scatter_(0, si, sp.masked_fill(cut, 0))
    return int(torch.multinomial(probs, 1, generator=g)[0])


PARAMS = [SamplingParams(temperature=0.8), SamplingParams(temperature=1.3, top_k=5),
          SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(temperature=1.0, top_k=40, top_p=0.5),
          SamplingParams(temperature=2.0, top_k=1), SamplingParams(temperature=0.5, top_p=1e-4),
          SamplingParams(temperature=1.1, top_k=100000)]


def test_a_batch_samples_what_each_row_samples_alone():
    g = torch.Generator().manual_seed(0)
    for step in range(40):
        logits = torch.randn(len(PARAMS), 3000, generator=g) * 3
        seeds = [1000 * step + i for i in range(len(PARAMS))]
        got = sample_rows(logits, PARAMS, [torch.Generator().manual_seed(s) for s in seeds])
        want = [_one_row(logits[i], p, torch.Generator().manual_seed(s)) for i, (p, s) in enumerate(zip(PARAMS, seeds))]
        assert got.tolist() == want


def test_the_limits_hold():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 500, generator=g).repeat(len(PARAMS), 1)
    order = logits[0].argsort(descending=True)
    gens = [torch.Generator().manual_seed(i) for i in range(len(PARAMS))]
    seen = [set() for _ in PARAMS]
    for _ in range(300):
        for i, tok in enumerate(sample_rows(logits, PARAMS, gens).tolist()):
            seen[i].add(tok)
    top = lambda k: set(order[:k].tolist())  # noqa: E731
    assert seen[1] <= top(5) and len(seen[1]) == 5  # top_k=5: only, and all, of the five
    assert seen[4] == top(1) and seen[5] == top(1)  # top_k=1 and a tiny top_p are greedy
    probs = torch.softmax(logits[0] / 0.7, -1)[order]
    nucleus = int((torch.cumsum(probs, 0) - probs <= 0.9).sum())
    assert seen[2] <= top(nucleus) and len(seen[2]) > 5
    assert len(seen[0]) > 50 and len(seen[6]) > 50  # no limit (top_k past the vocabulary: none)
