"""Picking each sequence's next token: greedy argmax, or a seeded draw under temperature, top-k and top-p.

A sampled token is one inverse-CDF draw: u in [0, 1) picks the first token, in token-id order, whose
cumulative kept probability exceeds u times the kept mass. u is splitmix64's output number n for the
request's seed, n the index of the token in its output: a pure function of (seed, n), computed for the
whole batch at once. So, given the same logits (a batch may round them otherwise than a lone
sequence), a seeded request draws the same tokens alone or in any batch, after a preemption too, and
the batch needs no per-row generator: the whole draw is a few batched operations (on CUDA, three small
kernels: fieldprint/kernels/sample.py). (The sampler before drew each row from its own
torch.Generator, one multinomial call per sampled sequence and step; with a full-vocabulary sort for
top-p, Llama-3.2-1B's sampled decode ran at 0.22-0.57 of greedy's tokens per second on the H200,
results/e2e_bench_tiles.json; the batched torch operations reached 0.76-0.85, the kernels 0.94-0.96.)
"""

from __future__ import annotations

import secrets

import numpy as np
import torch

from fieldprint.kernels.sample import draw

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
# The smallest temperature used: a smaller one (down to 5e-324 passes validation) would be 0 in float32.
_TINY = float(np.finfo(np.float32).tiny)
_LOG2E = 1.4426950408889634  # the weights are powers of two: 2^((x - max) * log2(e) / temperature)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1) of a [B, V] tensor. CUDA reduces each row with one block: Llama-3's 128k vocabulary
    at B=1 took 28 us on the H200, so there a large vocabulary is reduced in chunks first."""
    return chunked_argmax(x) if x.is_cuda and x.shape[1] >= 4 * 4096 else x.argmax(-1)


def chunked_argmax(x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """x.argmax(-1) in two passes: each chunk's maximum, then the first chunk holding the largest (the
    first maximum's index, as argmax gives)."""
    b, v = x.shape
    n = v // chunk
    vals, idx = x[:, : n * chunk].reshape(b, n, chunk).max(-1)  # max(dim) also returns the first maximum
    if n * chunk < v:
        tv, ti = x[:, n * chunk :].max(-1, keepdim=True)
        vals, idx = torch.cat([vals, tv], 1), torch.cat([idx, ti], 1)
    best = vals.argmax(-1, keepdim=True)
    return (best * chunk + idx.gather(1, best)).squeeze(1)


def splitmix64(seeds: list[int], counters: list[int]) -> np.ndarray:
    """Output number counter + 1 of splitmix64 started at each seed (uint64): mix(seed + (counter + 1) * golden)."""
    z = np.asarray(seeds, dtype=np.uint64) + (np.asarray(counters, dtype=np.uint64) + np.uint64(1)) * _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def uniforms(seeds: list[int], counters: list[int]) -> np.ndarray:
    """The draw in [0, 1) of token `counter` of a request seeded `seed`: splitmix64's top 53 bits."""
    return (splitmix64(seeds, counters) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def sample_rows(logits: torch.Tensor, params: list, u: np.ndarray, fused: bool | None = None) -> torch.Tensor:
    """One token per row of logits [R, V] (temperature > 0), each row with its own temperature, top-k,
    top-p and draw u[row] in [0, 1).

    A row keeps the tokens at least as likely as its k-th most likely, then those at least as likely as
    the last of the smallest (most likely first) prefix whose mass reaches top_p; ties at either edge
    are all kept: both limits are a threshold on the logit. It draws from what it kept, renormalized, by
    an inverse CDF in token-id order (in float32: a draw resolves about 6e-8 of the kept mass). Both
    the kept set and that order depend on the row's values alone, never on how the batch's other rows
    are limited, so a row draws the same token in any batch. Only sorted values are needed: of the
    largest max(k) logits when every row has a top-k, else (a top-p on a row without one) of the whole
    vocabulary; with no limit on any row, nothing is sorted. fused (default: on CUDA): the passes over
    the vocabulary as kernels (fieldprint/kernels/sample.py), else the torch operations below.
    """
    dev, v = logits.device, logits.shape[1]
    ks = [min(p.top_k, v) for p in params]
    limit_p = any(p.top_p < 1 for p in params)
    # One copy to the device: log2(e) / temperature, top-k (0: none), top-p (inf: none, since a
    # cumulative sum may pass 1.0 by a rounding) and the draw, per row. Not blocking: a blocking copy
    # waits for the stream, i.e. for the step's forward pass, before the host may queue the draw's
    # kernels behind it (reading the tokens is the step's one sync).
    host = np.array([[_LOG2E / max(p.temperature, _TINY) for p in params], ks,
                     [p.top_p if p.top_p < 1 else np.inf for p in params], u], dtype=np.float64)
    limits = torch.from_numpy(host).to(dev, non_blocking=True)
    x = logits.float()
    vals = None
    if any(ks) or limit_p:
        vals = torch.topk(x, max(ks), dim=-1).values if all(ks) else torch.sort(x, dim=-1, descending=True).values
    if logits.is_cuda if fused is None else fused:
        return draw(x, limits, vals, limit_p)
    scale, k, top_p, draws = limits.to(torch.float32)
    top = x.amax(-1, keepdim=True)  # the row's largest logit, always kept
    thr = torch.full((x.shape[0],), float("-inf"), device=dev)
    if any(ks):
        thr = torch.where(k > 0, vals.gather(1, (k.clamp(min=1) - 1).long()[:, None]).squeeze(1), thr)
    if limit_p:
        # The kept probabilities, most likely first, unnormalized: 2^((x - top) * scale).
        total = _weights(x, x >= thr[:, None], scale, top).sum(-1, keepdim=True)
        ps = _weights(vals, vals >= thr[:, None], scale, top)
        kept = ((torch.cumsum(ps, -1) - ps) <= top_p[:, None] * total).sum(-1, keepdim=True)  # >= 1 (but NaN)
        thr = torch.maximum(thr, vals.gather(1, kept.clamp(min=1) - 1).squeeze(1))
    cdf = torch.cumsum(_weights(x, x >= thr[:, None], scale, top), -1)  # non-decreasing, as searchsorted needs
    total = cdf[:, -1:]
    j = torch.searchsorted(cdf, draws[:, None] * total, right=True)
    # u * total can round up to the total itself: then the last token with any mass.
    return torch.minimum(j, (cdf < total).sum(-1, keepdim=True)).squeeze(1)


def _weights(x: torch.Tensor, kept: torch.Tensor, scale: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Each kept token's unnormalized probability 2^((x - top) * scale), 0 for the others."""
    return torch.exp2((x - top) * scale[:, None]).masked_fill(~kept, 0)


def next_tokens(seqs: list, logits: torch.Tensor) -> list[int]:
    """Next token of each sequence (one logits row each), read back to the host."""
    return next_token_ids(seqs, logits).tolist()


def next_token_ids(seqs: list, logits: torch.Tensor) -> torch.Tensor:
    """Next token of each sequence (one logits row each) on logits' device, int64: greedy rows by
    argmax, the others drawn. Nothing waits for the device.

    An unseeded request draws its seed once, at its first sampled token (torch.seed() would reseed the
    caller's global generator)."""
    rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if not rows:
        return argmax_rows(logits)
    for i in rows:
        s = seqs[i]
        if s.sample_seed is None:
            s.sample_seed = s.params.seed if s.params.seed is not None else secrets.randbits(63)
    u = uniforms([seqs[i].sample_seed for i in rows], [len(seqs[i].output_ids) for i in rows])
    if len(rows) == len(seqs):
        return sample_rows(logits, [s.params for s in seqs], u)
    out = argmax_rows(logits)
    out[torch.tensor(rows).to(out.device, non_blocking=True)] = sample_rows(logits[rows], [seqs[i].params for i in rows], u)
    return out
