"""Are anchor K/V hashes reproducible across batch sizes and hardware, before and after DQP?

The same anchor sequences are prefilled through the first layers of a Llama-3.2-1B-shaped model
(random weights, bf16) alone (batch 1), beside 7 and 63 other sequences (batch 8, 64) on the
GPU, and alone on the CPU. For each anchor, layer and K|V we compare against GPU batch 1:
whole-tensor hash match of the raw bf16 bytes, of the DQP codes, the tolerance audit's verdict,
and per-element flip rates. Prints a table, writes benchmarks/results/repro_bench.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fieldprint.dqp import AuditThresholds, DQPProfile, audit, quantize  # noqa: E402

DISTANCE_GRID = (1, 2, 3, 4, 8)  # audit pass rates at these max_code_distance values, other thresholds default
LLAMA32_1B = dict(hidden=2048, heads=32, kv_heads=8, head_dim=64, ffn=8192, layers=16)


def make_weights(cfg: dict, layers: int, seed: int = 0) -> list[dict]:
    """Random fp32 weights drawn on the CPU (so every device starts from identical bf16 values)."""
    g = torch.Generator().manual_seed(seed)
    h, d, nh, hk, f = cfg["hidden"], cfg["head_dim"], cfg["heads"], cfg["kv_heads"], cfg["ffn"]

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * shape[0] ** -0.5).to(torch.bfloat16)

    return [dict(wq=w(h, nh * d), wk=w(h, hk * d), wv=w(h, hk * d), wo=w(nh * d, h), wg=w(h, f), wu=w(h, f), wd=w(f, h))
            for _ in range(layers)]


def forward_kv(cfg: dict, weights: list[dict], x: torch.Tensor, mode: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run x [B, T, hidden] through the layers; returns per layer (K, V) as [B, T, H_kv, D] (K after RoPE).

    mode "prefill": one causal pass over all T tokens (matmuls with M = B*T rows);
    mode "decode": token by token against a KV cache (M = B rows: the regime where kernels
    pick split reductions by batch size).
    """
    b, t, _ = x.shape
    nh, hk, d = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = torch.outer(torch.arange(t, device=x.device, dtype=torch.float32), inv)
    cos_all, sin_all = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    cache = [(torch.empty(b, t, hk, d, device=x.device, dtype=x.dtype), torch.empty(b, t, hk, d, device=x.device, dtype=x.dtype))
             for _ in weights]

    def step(h: torch.Tensor, lo: int, hi: int) -> None:
        cos, sin = cos_all[lo:hi][None, :, None], sin_all[lo:hi][None, :, None]

        def rope(z: torch.Tensor) -> torch.Tensor:
            z1, z2 = z[..., 0::2], z[..., 1::2]
            return torch.stack((z1 * cos - z2 * sin, z1 * sin + z2 * cos), dim=-1).flatten(-2)

        s = hi - lo
        for w, (kc, vc) in zip(weights, cache):
            hn = F.rms_norm(h, (h.shape[-1],))
            q = rope((hn @ w["wq"]).view(b, s, nh, d))
            kc[:, lo:hi] = rope((hn @ w["wk"]).view(b, s, hk, d))
            vc[:, lo:hi] = (hn @ w["wv"]).view(b, s, hk, d)
            att = F.scaled_dot_product_attention(q.transpose(1, 2), kc[:, :hi].transpose(1, 2), vc[:, :hi].transpose(1, 2),
                                                 is_causal=s > 1, enable_gqa=True)
            h = h + att.transpose(1, 2).reshape(b, s, nh * d) @ w["wo"]
            hn = F.rms_norm(h, (h.shape[-1],))
            h = h + (F.silu(hn @ w["wg"]) * (hn @ w["wu"])) @ w["wd"]

    if mode == "prefill":
        step(x, 0, t)
    else:
        for i in range(t):
            step(x[:, i : i + 1], i, i + 1)
    return cache


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--anchors", type=int, default=4)
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "repro_bench.json"))
    a = ap.parse_args()
    cfg = dict(hidden=256, heads=4, kv_heads=2, head_dim=64, ffn=512, layers=2) if a.small else LLAMA32_1B
    cuda = torch.cuda.is_available()
    gpu = "cuda" if cuda else "cpu"  # without a GPU the "gpu" rows run on the CPU (smoke test only)
    batches = [int(b) for b in a.batches.split(",")]
    weights_cpu = make_weights(cfg, a.layers)
    weights_gpu = [{k: v.to(gpu) for k, v in w.items()} for w in weights_cpu]
    g = torch.Generator().manual_seed(1)
    anchors = torch.randn(a.anchors, a.tokens, cfg["hidden"], generator=g).to(torch.bfloat16)
    fillers = torch.randn(max(batches), a.tokens, cfg["hidden"], generator=g).to(torch.bfloat16)

    # Calibrate the profile on the fillers (not the anchors): the deployment situation.
    ncal = min(8, len(fillers))
    with torch.no_grad():
        calib = forward_kv(cfg, weights_gpu, fillers[:ncal].to(gpu), "prefill")
    profile = DQPProfile.calibrate(
        [{(l, kind): kv[i][j].float().cpu() for l, kv in enumerate(calib) for i, kind in enumerate("KV")} for j in range(ncal)],
        name="llama-3.2-1b-repro", num_layers=a.layers, num_kv_heads=cfg["kv_heads"], head_dim=cfg["head_dim"], block_size=16,
    )

    def anchor_states(device: str, batch: int, weights: list[dict], mode: str, source: torch.Tensor = anchors) -> list[dict]:
        """K/V of every anchor computed in a batch of `batch` (anchor first, fillers after)."""
        states = []
        for i in range(a.anchors):
            x = torch.cat((source[i : i + 1], fillers[: batch - 1])).to(device)
            with torch.no_grad():
                kv = forward_kv(cfg, weights, x, mode)
            states.append({(l, kind): kv[l][j][0].cpu() for l in range(a.layers) for j, kind in enumerate("KV")})
        return states

    # Control: the same anchors with one token (the middle one) replaced: a different state,
    # which the audit must reject and localise.
    tampered = anchors.clone()
    tampered[:, a.tokens // 2] = torch.randn(a.anchors, cfg["hidden"], generator=g).to(torch.bfloat16)
    t0 = time.perf_counter()
    runs = {}
    for mode in ("prefill", "decode"):
        for b in batches:
            runs[f"{mode}_gpu_b{b}"] = anchor_states(gpu, b, weights_gpu, mode)
        runs[f"{mode}_cpu_b1"] = anchor_states("cpu", 1, weights_cpu, mode)
    runs["decode_gpu_b1_vs_prefill"] = runs["decode_gpu_b1"]  # same anchor, other code path
    runs["prefill_gpu_b1_one_token_changed"] = anchor_states(gpu, 1, weights_gpu, "prefill", tampered)
    elapsed = time.perf_counter() - t0
    rows = {}
    for name, states in runs.items():
        ref_name = "decode_gpu_b1" if name.startswith("decode") else "prefill_gpu_b1"
        if name == ref_name:
            continue
        if name == "decode_gpu_b1_vs_prefill":
            ref_name = "prefill_gpu_b1"
        ref = runs[ref_name]
        hist = [0] * 6  # |code distance| 0, 1, 2, 3, 4, >=5
        by_distance = dict.fromkeys(DISTANCE_GRID, 0)
        flagged_blocks: set[int] = set()
        raw_match = code_match = audit_pass = n = 0
        raw_flip, code_flip, max_dist, worst_block = [], [], 0, 0.0
        per_layer: dict[str, list[float]] = {}
        for mine, theirs in zip(states, ref):
            for key, x in mine.items():
                y = theirs[key]
                n += 1
                raw_hashes = [hashlib.sha256(t.view(torch.int16).numpy().tobytes()).digest() for t in (x, y)]
                raw_match += raw_hashes[0] == raw_hashes[1]
                raw_flip.append(float((x.view(torch.int16) != y.view(torch.int16)).float().mean()))
                committed = quantize(y, profile, key[0], key[1])
                recomputed = quantize(x, profile, key[0], key[1])
                code_match += recomputed.digest() == committed.digest()
                rep = audit(x, committed, profile)
                for md in DISTANCE_GRID:
                    by_distance[md] += audit(x, committed, profile, AuditThresholds(max_code_distance=md)).passed
                dist = (quantize(x, profile, key[0], key[1]).codes.to(torch.int16) - committed.codes.to(torch.int16)).abs()
                for j in range(5):
                    hist[j] += int((dist == j).sum())
                hist[5] += int((dist >= 5).sum())
                flagged_blocks.update(rep.blocks_over)
                audit_pass += rep.passed
                code_flip.append(rep.fraction)
                max_dist = max(max_dist, rep.max_distance)
                worst_block = max(worst_block, max(rep.block_fractions))
                per_layer.setdefault(f"L{key[0]}{key[1]}", []).append(rep.fraction)
        rows[name] = dict(
            tensors=n, raw_hash_match_rate=raw_match / n, dqp_hash_match_rate=code_match / n, audit_pass_rate=audit_pass / n,
            raw_flip_rate_mean=statistics.mean(raw_flip), code_flip_rate_mean=statistics.mean(code_flip),
            code_flip_rate_max=max(code_flip), max_code_distance=max_dist, worst_block_fraction=worst_block,
            code_flip_rate_by_layer={k: statistics.mean(v) for k, v in per_layer.items()},
            code_distance_histogram=hist, audit_pass_rate_by_max_distance={md: c / n for md, c in by_distance.items()},
            reference=ref_name, blocks_flagged=sorted(flagged_blocks),
        )
    out = dict(
        bench="repro_bench", device=torch.cuda.get_device_name() if cuda else "cpu-only smoke run",
        cpu=platform.processor() or platform.machine(), torch=torch.__version__, python=platform.python_version(),
        date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), config=cfg, layers=a.layers, tokens=a.tokens,
        anchors=a.anchors, batches=batches, references="prefill_gpu_b1 / decode_gpu_b1", profile=profile.digest,
        thresholds=dataclasses.asdict(AuditThresholds()), seconds=elapsed, results=rows,
    )
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"repro_bench on {out['device']}: {a.anchors} anchors x {a.layers} layers x K|V, T={a.tokens}, vs GPU batch 1")
    print(f"{'run':34s} {'raw match':>9s} {'DQP match':>9s} {'audit ok':>8s} {'raw flips':>9s} {'code flips':>10s} {'max dist':>8s}")
    for name, r in rows.items():
        print(f"{name:34s} {r['raw_hash_match_rate']:9.3f} {r['dqp_hash_match_rate']:9.3f} {r['audit_pass_rate']:8.3f} "
              f"{r['raw_flip_rate_mean']:9.4f} {r['code_flip_rate_mean']:10.5f} {r['max_code_distance']:8d}")


if __name__ == "__main__":
    main()
