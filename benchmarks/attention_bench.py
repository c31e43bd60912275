"""PagedFieldprintAttention on the GPU: correctness first (bf16 vs fp32 oracle), then timings.

Sections (by default): check, decode, shared, modes, prefill, naive64k; sweeps on request:
prefill_tune (tilings x page sizes), int8 (register caps, anchor item sizes, B=1 split counts),
flashinfer (ours vs FlashInfer 0.5.3 on one shared set of inputs per shape, issue 11; run it with
benchmarks/gpu/run_attention.sh, which builds FlashInfer's JIT kernels beside it: --fi-build/--fi-status).
    python benchmarks/attention_bench.py [--only check,prefill_tune] [--quick] [--out FILE] [--budget S]
Prints a compact table per section and writes JSON (device, versions, shapes, medians, ratios);
the flashinfer section rewrites it after every shape, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from fieldprint.kernels.paged_attention import (  # noqa: E402
    AnchorPool,
    AnchorRouting,
    _splits,
    paged_attention_decode,
    paged_attention_prefill,
    plan_decode,
)
from fieldprint.kernels.reference import (  # noqa: E402
    naive_decode_batched,
    reference_paged,
    sdpa_decode_contiguous,
)

DEV = "cuda"
try:
    from torch.nn.attention.flex_attention import flex_attention as _flex

    FLEX = torch.compile(_flex, dynamic=False)
except Exception:  # FlexAttention missing: reported as NaN
    FLEX = None
BF = torch.bfloat16
RESULTS: dict = {}
BATCHES: list[int] = []


def med(fn, rep=200) -> float:
    """Median time in microseconds (events; L2 flushed between repeats by do_bench)."""
    return do_bench(fn, warmup=30, rep=rep, return_mode="median") * 1e3


def med_graph(calls, inner: int, reps: int = 15) -> float:
    """Median microseconds per call: a CUDA graph replays `inner` calls cycling over `calls`.

    Graphs take the host launch cost out (as an engine's decode step would); rotating over input
    sets larger than L2 together keeps repeated calls from timing the cache.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls:
            c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=side):
        for i in range(inner):
            calls[i % len(calls)]()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        st.record()
        g.replay()
        en.record()
        en.synchronize()
        times.append(st.elapsed_time(en) * 1e3 / inner)
    del g
    return float(torch.tensor(times).median())


def n_sets(bytes_per_set: int) -> int:
    """Input copies to rotate over so that together they exceed L2 (50 MB) three times."""
    return max(1, min(8, -(-150_000_000 // max(bytes_per_set, 1))))


def paged(bsz, ctx, hkv, d, bs, dtype=BF, lens=None):
    """Random paged K/V with scattered (non-contiguous) block tables; each sequence ctx tokens."""
    per = triton.cdiv(ctx, bs)
    nb = bsz * per
    k = torch.randn(nb, bs, hkv, d, dtype=dtype, device=DEV)
    v = torch.randn(nb, bs, hkv, d, dtype=dtype, device=DEV)
    bt = torch.randperm(nb, device=DEV).reshape(bsz, per).to(torch.int32)
    if lens is None:
        lens = torch.full((bsz,), ctx, dtype=torch.int32, device=DEV)
    return k, v, bt, lens


def anchor_set(nsets, alen, hkv, d, bs, seq_set, int8=False, dtype=BF, alens=None):
    """(pool, routing) of random anchor sets (bf16, or int8 codes with power-of-two scales), scattered blocks."""
    per = max(1, triton.cdiv(alen, bs))
    nb = nsets * per
    if int8:
        pool = int8_pool(nb, bs, hkv, d)
    else:
        pool = AnchorPool(torch.randn(nb, bs, hkv, d, dtype=dtype, device=DEV),
                          torch.randn(nb, bs, hkv, d, dtype=dtype, device=DEV))
    bt = torch.randperm(nb, device=DEV).reshape(nsets, per).to(torch.int32)
    if alens is None:
        alens = torch.full((nsets,), alen, dtype=torch.int32, device=DEV)
    return pool, AnchorRouting(bt, alens, seq_set.to(torch.int32))


def int8_pool(nb, bs, hkv, d):
    """Random int8 anchor codes [nb, bs, H_kv, D] as the DQP writes them: K times a power of two per
    channel (float32 [H_kv, D]), V times 2**v_exp of its row (int8 [nb, bs, H_kv], per token and head)."""
    k = torch.randint(-127, 128, (nb, bs, hkv, d), dtype=torch.int8, device=DEV)
    v = torch.randint(-127, 128, (nb, bs, hkv, d), dtype=torch.int8, device=DEV)
    ks = 2.0 ** torch.randint(-9, -5, (hkv, d), device=DEV).float()
    return AnchorPool(k, v, ks, torch.randint(-8, -5, (nb, bs, hkv), dtype=torch.int8, device=DEV))


def dequant_pool(pool, dtype=BF):
    """(K, V) of an int8 AnchorPool as `dtype` values (exact in bf16: 8-bit codes times powers of two)."""
    k = pool.k.float() * pool.k_scale
    v = pool.v.float() * torch.exp2(pool.v_exp.float()).unsqueeze(-1)
    return k.to(dtype), v.to(dtype)


def relerr(out, ref):
    """||out - ref|| / ||ref|| in fp64."""
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


# ----------------------------------------------------------------------------------------------
def section_check(quick: bool) -> None:
    """bf16 on the GPU vs the fp32 naive oracle; poisoned outputs; determinism; counters reset."""
    torch.manual_seed(1)
    rows, worst = [], 0.0
    cases = [
        # B, hq, hkv, d, bs, anchors(None|"bf16"|"int8"), alen, mode, gamma, seq_tile
        (6, 32, 8, 128, 16, None, 0, "concat", 0.0, None),
        (6, 32, 8, 128, 16, "bf16", 700, "concat", 0.0, None),
        (6, 32, 8, 128, 64, "int8", 1500, "concat", 0.0, None),
        (6, 32, 8, 128, 32, "bf16", 700, "gamma", 0.3, None),
        (6, 32, 8, 128, 16, "int8", 700, "gamma", "head", 1),
        (5, 8, 8, 64, 16, "bf16", 300, "gamma", 1.0, None),
        (36, 32, 8, 64, 16, "int8", 2000, "concat", 0.0, None),  # Llama-3.2-1B shapes: int8 at D=64 (register cap 128)
        (7, 64, 8, 128, 16, "bf16", 900, "concat", 0.0, 2),
        (40, 32, 8, 128, 16, "bf16", 2000, "concat", 0.0, None),
        (40, 32, 8, 128, 16, "int8", 2000, "gamma", 0.3, None),
    ]
    for bsz, hq, hkv, d, bs, akind, alen, mode, g, tile in cases:
        lens = torch.randint(1, 5000, (bsz,), device=DEV).to(torch.int32)
        lens[0] = 1
        k, v, bt, lens = paged(bsz, 5000, hkv, d, bs, lens=lens)
        seq_set = torch.randint(-1, 2, (bsz,), device=DEV)
        a = (None, None)
        if akind:
            alens = torch.tensor([alen, max(1, alen // 3)], dtype=torch.int32, device=DEV)
            a = anchor_set(2, alen, hkv, d, bs, seq_set, int8=akind == "int8", alens=alens)
        gam = torch.rand(hq, device=DEV) if g == "head" else g
        q = torch.randn(bsz, hq, d, dtype=BF, device=DEV)
        out = torch.full_like(q, float("nan"))
        paged_attention_decode(q, k, v, bt, lens, *a, mode=mode, gamma=gam, out=out, seq_tile=tile)
        out2 = torch.full_like(q, float("nan"))
        paged_attention_decode(q, k, v, bt, lens, *a, mode=mode, gamma=gam, out=out2, seq_tile=tile)
        ref = reference_paged(q, None, k, v, bt, lens, *a, mode=mode, gamma=gam, dtype=torch.float32)
        e = relerr(out, ref)
        ok = e < 1e-2 and not out.isnan().any().item() and torch.equal(out, out2)
        worst = max(worst, e)
        rows.append(("decode", bsz, hq, hkv, d, bs, akind, mode, str(g), e, ok))
    for bsz, hq, hkv, d, bs, akind, mode, g in [
        (3, 32, 8, 128, 16, "bf16", "concat", 0.0), (3, 32, 8, 128, 64, "int8", "gamma", 0.3),
        (2, 16, 4, 64, 32, None, "gamma", 0.3), (3, 32, 8, 128, 16, "bf16", "gamma", "head"),
        (3, 32, 8, 128, 128, "bf16", "concat", 0.0), (3, 32, 8, 128, 128, "int8", "gamma", 0.3),
    ]:
        qlens = torch.tensor([700, 1, 1300][:bsz], dtype=torch.int32, device=DEV)
        lens = qlens + torch.tensor([0, 900, 2000][:bsz], dtype=torch.int32, device=DEV)
        k, v, bt, lens = paged(bsz, int(lens.max()), hkv, d, bs, lens=lens)
        cu = torch.zeros(bsz + 1, dtype=torch.int32, device=DEV)
        cu[1:] = qlens.cumsum(0)
        seq_set = torch.tensor([0, -1, 1][:bsz], device=DEV)
        a = anchor_set(2, 1000, hkv, d, bs, seq_set, int8=akind == "int8") if akind else (None, None)
        gam = torch.rand(hq, device=DEV) if g == "head" else g
        q = torch.randn(int(cu[-1]), hq, d, dtype=BF, device=DEV)
        out = torch.full_like(q, float("nan"))
        paged_attention_prefill(q, cu, k, v, bt, lens, *a, mode=mode, gamma=gam, out=out)
        ref = reference_paged(q, cu, k, v, bt, lens, *a, mode=mode, gamma=gam, dtype=torch.float32)
        e = relerr(out, ref)
        ok = e < 1e-2 and not out.isnan().any().item()
        worst = max(worst, e)
        rows.append(("prefill", bsz, hq, hkv, d, bs, akind, mode, str(g), e, ok))
    # The single launch under a CUDA graph: replays equal the eager result (counters self-reset).
    bsz, hq, hkv, d = 16, 32, 8, 128
    k, v, bt, lens = paged(bsz, 3000, hkv, d, 16, lens=torch.randint(1, 3000, (bsz,), device=DEV).int())
    a = anchor_set(2, 1000, hkv, d, 16, torch.randint(-1, 2, (bsz,), device=DEV), int8=True)
    q = torch.randn(bsz, hq, d, dtype=BF, device=DEV)
    eager = paged_attention_decode(q, k, v, bt, lens, *a, mode="gamma", gamma=0.3)
    gout = torch.full_like(q, float("nan"))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        paged_attention_decode(q, k, v, bt, lens, *a, mode="gamma", gamma=0.3, out=gout, check=False)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=side):
        paged_attention_decode(q, k, v, bt, lens, *a, mode="gamma", gamma=0.3, out=gout, check=False)
    graph_ok = True
    for _ in range(3):
        gout.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        graph_ok &= torch.equal(gout, eager)
    rows.append(("graph", bsz, hq, hkv, d, 16, "int8", "gamma", "0.3", 0.0, graph_ok))
    # A plan's later runs call the compiled kernel's launcher directly (kernels/launch.py): the same bits.
    plan = plan_decode(q, k, v, bt, lens, *a, mode="gamma", gamma=0.3)
    runs = [plan.run(q, k, v, a[0]) for _ in range(3)]
    rows.append(("direct", bsz, hq, hkv, d, 16, "int8", "gamma", "0.3", 0.0,
                 plan.launch.direct and all(torch.equal(r, eager) for r in runs)))
    from fieldprint.kernels import paged_attention as pa
    # Every launch above used the default workspaces (one per GPU stream): each must end with its counters at zero.
    counters_zero = bool(pa._workspaces) and all(int(w._cnt.abs().sum()) == 0 for w in pa._workspaces.values())
    print("\n== correctness (bf16 on GPU vs fp32 naive oracle; NaN-poisoned outputs) ==")
    print(f"{'kind':8}{'B':>4}{'Hq':>4}{'Hkv':>4}{'D':>5}{'bs':>4} {'anchors':8}{'mode':8}{'g':>6}{'relerr':>10}  ok")
    for r in rows:
        print(f"{r[0]:8}{r[1]:>4}{r[2]:>4}{r[3]:>4}{r[4]:>5}{r[5]:>4} {str(r[6]):8}{r[7]:8}{r[8]:>6}{r[9]:>10.2e}  {r[10]}")
    all_ok = all(r[-1] for r in rows) and counters_zero
    print(f"counters reset: {counters_zero}; all ok: {all_ok}; worst relerr {worst:.2e}")
    RESULTS["check"] = {"rows": [list(map(str, r)) for r in rows], "all_ok": all_ok, "worst": worst}
    if not all_ok:
        raise SystemExit("correctness check failed: no timings")


# ----------------------------------------------------------------------------------------------
def section_decode(quick: bool) -> None:
    """Decode vs SDPA on contiguous KV of the same total length, FlexAttention, naive reference."""
    hq, hkv, d, bs = 32, 8, 128, 16
    bsizes = BATCHES or ([1, 8] if quick else [1, 8, 64])
    ctxs = [8192, 32768] if quick else [8192, 32768, 131072]
    anchors_tok = [0, 2048, 8192]
    rows = []
    for bsz in bsizes:
        for ctx in ctxs:
            torch.cuda.empty_cache()
            amax = max(anchors_tok)
            per_set = 2 * bsz * hkv * d * 2 * (ctx + amax)
            ns = n_sets(per_set)
            if bsz * (ctx + amax) * hkv * d * 2 * 2 * 2 > 76e9:
                print(f"  B={bsz} ctx={ctx}: paged + contiguous copies do not fit in 80 GB; skipped")
                continue
            sets = []
            for _ in range(ns):
                k, v, bt, lens = paged(bsz, ctx, hkv, d, bs)
                kc = torch.randn(bsz, hkv, ctx + amax, d, dtype=BF, device=DEV)
                vc = torch.randn(bsz, hkv, ctx + amax, d, dtype=BF, device=DEV)
                q = torch.randn(bsz, hq, d, dtype=BF, device=DEV)
                sets.append((q, k, v, bt, lens, kc, vc, torch.empty_like(q)))
            inner = max(ns, 10 if bsz * ctx >= 64 * 32768 else 40)
            for atok in anchors_tok:
                anc = []
                for (q, k, v, bt, lens, _kc, _vc, out) in sets:
                    a = anchor_set(1, atok, hkv, d, bs, torch.zeros(bsz, device=DEV)) if atok else (None, None)
                    anc.append(a)
                    out.fill_(float("nan"))
                    paged_attention_decode(q, k, v, bt, lens, *a, out=out)  # checked call
                    assert not out.isnan().any()
                total = ctx + atok

                def ours(i):
                    q, k, v, bt, lens, kc, vc, out = sets[i]
                    return lambda: paged_attention_decode(q, k, v, bt, lens, anc[i], check=False, out=out)

                def sdpa(i):
                    q, k, v, bt, lens, kc, vc, out = sets[i]
                    kk, vv = kc[:, :, :total], vc[:, :, :total]
                    return lambda: sdpa_decode_contiguous(q, kk, vv)

                def naive(i):
                    q, k, v, bt, lens, kc, vc, out = sets[i]
                    ka = kc[:, :, :atok] if atok else None
                    va = vc[:, :, :atok] if atok else None
                    kn, vn = kc[:, :, atok:total], vc[:, :, atok:total]
                    return lambda: naive_decode_batched(q, kn, vn, ka, va)

                t_ours = med_graph([ours(i) for i in range(ns)], inner)
                t_sdpa = med_graph([sdpa(i) for i in range(ns)], inner)
                t_naive = float("nan")  # not run where its scores no longer fit beside two KV copies
                if bsz * ctx < 64 * 131072:
                    t_naive = med_graph([naive(i) for i in range(ns)], max(ns, 4), reps=5)
                t_flex = float("nan")
                if bsz == 8 and atok == 2048 and FLEX is not None:
                    q, k, v, bt, lens, kc, vc, out = sets[0]
                    kk, vv = kc[:, :, :total], vc[:, :, :total]
                    try:
                        fq = q.unsqueeze(2)
                        FLEX(fq, kk, vv, enable_gqa=True)
                        t_flex = med(lambda: FLEX(fq, kk, vv, enable_gqa=True))
                        t_sdpa_ev = med(lambda: sdpa_decode_contiguous(q, kk, vv))
                        t_flex = t_flex * t_sdpa / t_sdpa_ev  # same timing method as the others
                    except Exception as e:  # report, don't hide
                        print("  flex failed:", type(e).__name__, str(e)[:200])
                kv_bytes = 2 * bsz * hkv * d * 2 * (ctx + atok)  # what SDPA on the concatenated KV reads
                uniq = 2 * hkv * d * 2 * (bsz * ctx + atok)  # anchors once: the least any kernel must read
                rows.append(dict(B=bsz, ctx=ctx, anchors=atok, ours_us=t_ours, sdpa_us=t_sdpa,
                                 flex_us=t_flex, naive_us=t_naive, ratio_sdpa=t_ours / t_sdpa,
                                 ours_TBps_unique=uniq / t_ours / 1e6, sdpa_TBps=kv_bytes / t_sdpa / 1e6,
                                 sets=ns))
                print(f"  B={bsz:3} ctx={ctx:6} anc={atok:5}: ours {t_ours:9.1f} us  sdpa {t_sdpa:9.1f}"
                      f"  flex {t_flex:9.1f}  naive {t_naive:9.1f}  ours/sdpa {t_ours / t_sdpa:5.2f}", flush=True)
            sets = anc = None  # frees the GPU memory; a `del` would leave the closures above unbound names
    print("\n== decode (Hq=32, Hkv=8, D=128, bf16, block 16, concat, CUDA-graph medians) ==")
    print(f"{'B':>3}{'ctx':>8}{'anch':>6}{'ours us':>10}{'sdpa us':>10}{'flex us':>10}{'naive us':>10}"
          f"{'ours/sdpa':>10}{'ours TB/s':>10}{'sdpa TB/s':>10}")
    for r in rows:
        print(f"{r['B']:>3}{r['ctx']:>8}{r['anchors']:>6}{r['ours_us']:>10.1f}{r['sdpa_us']:>10.1f}"
              f"{r['flex_us']:>10.1f}{r['naive_us']:>10.1f}{r['ratio_sdpa']:>10.2f}"
              f"{r['ours_TBps_unique']:>10.2f}{r['sdpa_TBps']:>10.2f}")
    RESULTS["decode"] = rows


def section_shared(quick: bool) -> None:
    """B=64 sequences sharing 8k anchor tokens, 1k own tokens each: cascade vs per-sequence."""
    hq, hkv, d, bs, bsz = 32, 8, 128, 16, 64
    k, v, bt, lens = paged(bsz, 1024, hkv, d, bs)
    q = torch.randn(bsz, hq, d, dtype=BF, device=DEV)
    rows = []
    for int8 in (False, True):
        a = anchor_set(1, 8192, hkv, d, bs, torch.zeros(bsz, device=DEV), int8=int8)
        out = torch.full_like(q, float("nan"))
        r = {"int8": int8}
        for name, tile in (("cascade", None), ("per_seq", 1)):
            o = torch.full_like(q, float("nan"))
            paged_attention_decode(q, k, v, bt, lens, *a, out=o, seq_tile=tile)
            assert not o.isnan().any()
            r[name + "_us"] = med_graph([lambda: paged_attention_decode(
                q, k, v, bt, lens, *a, check=False, out=out, seq_tile=tile)], 20)
        r["speedup"] = r["per_seq_us"] / r["cascade_us"]
        rows.append(r)
    print("\n== shared anchors (B=64, 8k shared anchor tokens, 1k own; one launch each) ==")
    for r in rows:
        print(f"  int8={r['int8']!s:5}: cascade {r['cascade_us']:8.1f} us  per-sequence {r['per_seq_us']:8.1f} us"
              f"  speedup {r['speedup']:.2f}x")
    RESULTS["shared"] = rows


def section_modes(quick: bool) -> None:
    """gamma vs concat, and INT8 vs bf16 anchors, on decode."""
    hq, hkv, d, bs = 32, 8, 128, 16
    rows = []
    for bsz, ctx, atok in ((8, 32768, 8192), (8, 8192, 8192), (64, 8192, 2048), (1, 131072, 8192)):
        k, v, bt, lens = paged(bsz, ctx, hkv, d, bs)
        q = torch.randn(bsz, hq, d, dtype=BF, device=DEV)
        seq = torch.arange(bsz, device=DEV)  # one set per sequence: no sharing, anchors read per sequence
        ab = anchor_set(bsz, atok, hkv, d, bs, seq)
        ai = anchor_set(bsz, atok, hkv, d, bs, seq, int8=True)
        out = torch.empty_like(q)
        t = {}
        for name, a, mode in (("concat", ab, "concat"), ("gamma", ab, "gamma"), ("int8", ai, "concat")):
            paged_attention_decode(q, k, v, bt, lens, *a, mode=mode, gamma=0.3, out=out)
            t[name] = med_graph([lambda: paged_attention_decode(
                q, k, v, bt, lens, *a, mode=mode, gamma=0.3, check=False, out=out)], 20)
        rows.append(dict(B=bsz, ctx=ctx, anchors=atok, concat_us=t["concat"], gamma_us=t["gamma"],
                         int8_us=t["int8"], gamma_over_concat=t["gamma"] / t["concat"],
                         int8_over_bf16=t["int8"] / t["concat"],
                         anchor_bytes_bf16=ab[0].k.numel() * 2 * 2, anchor_bytes_int8=ai[0].k.numel() * 2))
        k = v = None
    print("\n== modes (decode, anchors per sequence) ==")
    for r in rows:
        print(f"  B={r['B']:3} ctx={r['ctx']:6} anc={r['anchors']:5}: concat {r['concat_us']:8.1f}  gamma "
              f"{r['gamma_us']:8.1f} ({r['gamma_over_concat']:.3f}x)  int8 {r['int8_us']:8.1f} "
              f"({r['int8_over_bf16']:.3f}x, anchor bytes {r['anchor_bytes_int8'] / r['anchor_bytes_bf16']:.2f}x)")
    RESULTS["modes"] = rows


def section_prefill(quick: bool) -> None:
    """Prefill of N new tokens with 2k anchors: TFLOP/s vs SDPA causal on N tokens.

    Block size 16 (per-row gathers) and 128 (one page per tile: the descriptor / TMA path).
    """
    hq, hkv, d, atok = 32, 8, 128, 2048
    rows = []
    for n, bs in ((4096, 16), (16384, 16), (4096, 128), (16384, 128)):
        k, v, bt, lens = paged(1, n, hkv, d, bs)
        cu = torch.tensor([0, n], dtype=torch.int32, device=DEV)
        q = torch.randn(n, hq, d, dtype=BF, device=DEV)
        a = anchor_set(1, atok, hkv, d, bs, torch.zeros(1, device=DEV))
        qs = torch.randn(1, hq, n, d, dtype=BF, device=DEV)
        ks = torch.randn(1, hkv, n, d, dtype=BF, device=DEV)
        vs = torch.randn(1, hkv, n, d, dtype=BF, device=DEV)
        t_sdpa = med(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True))
        f_causal = 4 * d * hq * n * n / 2
        f_anch = 4 * d * hq * n * atok
        out = torch.empty_like(q)
        r = dict(N=n, block_size=bs, anchors=atok, sdpa_us=t_sdpa, sdpa_TFLOPs=f_causal / t_sdpa / 1e6)
        for name, aa, mode in (("noanchor", (None, None), "concat"), ("concat", a, "concat"), ("gamma", a, "gamma")):
            paged_attention_prefill(q, cu, k, v, bt, lens, *aa, mode=mode, gamma=0.3, out=out)
            t = med(lambda: paged_attention_prefill(q, cu, k, v, bt, lens, *aa, mode=mode, gamma=0.3,
                                                    check=False, out=out, max_seqlen_q=n))
            fl = f_causal + (f_anch if aa[0] is not None else 0)
            r[name + "_us"] = t
            r[name + "_TFLOPs"] = fl / t / 1e6
        r["ratio_vs_sdpa"] = r["concat_TFLOPs"] / r["sdpa_TFLOPs"]
        rows.append(r)
        k = v = None
    print("\n== prefill (Hq=32, Hkv=8, D=128, bf16, 2k anchors; TFLOP/s counted causal) ==")
    for r in rows:
        print(f"  N={r['N']:6} bs={r['block_size']:3}: sdpa causal {r['sdpa_TFLOPs']:6.0f}  ours no-anchor {r['noanchor_TFLOPs']:6.0f}"
              f"  concat {r['concat_TFLOPs']:6.0f} ({r['ratio_vs_sdpa']:.2f} of sdpa)  gamma {r['gamma_TFLOPs']:6.0f}")
    RESULTS["prefill"] = rows


PREFILL_TILINGS = [  # block size, block_m, block_n, num_warps, num_stages
    (16, 128, 128, 8, 3), (16, 128, 64, 8, 3), (16, 64, 64, 4, 2),
    (128, 128, 128, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 2),
]


def section_prefill_tune(quick: bool) -> None:
    """Prefill tilings and page sizes (concat, 2k anchors) vs SDPA causal in the same run.

    Pages of >= block_n tokens take the descriptor (TMA) path, smaller ones the per-row gather.
    Every (page size, tiling) is first checked against the fp32 oracle at N=4k (NaN-poisoned
    output); the best tiling of each page size is then also timed without anchors and in gamma.
    """
    hq, hkv, d, atok = 32, 8, 128, 2048
    rows, checks = [], []
    data = {}
    for n in (4096, 16384):
        qs = torch.randn(1, hq, n, d, dtype=BF, device=DEV)
        ks = torch.randn(1, hkv, n, d, dtype=BF, device=DEV)
        vs = torch.randn(1, hkv, n, d, dtype=BF, device=DEV)
        t_sdpa = med(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True))
        qs = ks = vs = None
        cu = torch.tensor([0, n], dtype=torch.int32, device=DEV)
        q = torch.randn(n, hq, d, dtype=BF, device=DEV)
        for bs in sorted({c[0] for c in PREFILL_TILINGS}):
            k, v, bt, lens = paged(1, n, hkv, d, bs)
            a = anchor_set(1, atok, hkv, d, bs, torch.zeros(1, device=DEV))
            data[n, bs] = (k, v, bt, lens, cu, q, a, t_sdpa)
    for bs in sorted({c[0] for c in PREFILL_TILINGS}):
        k, v, bt, lens, cu, q, a, _ = data[4096, bs]
        ref = reference_paged(q, cu, k, v, bt, lens, *a, mode="concat", dtype=torch.float32)
        for cfg in [c for c in PREFILL_TILINGS if c[0] == bs]:
            out = torch.full_like(q, float("nan"))
            paged_attention_prefill(q, cu, k, v, bt, lens, *a, out=out, block_m=cfg[1], block_n=cfg[2],
                                    num_warps=cfg[3], num_stages=cfg[4])
            e = relerr(out, ref)
            checks.append((cfg, e, e < 1e-2 and not out.isnan().any().item()))
        del ref
    print("prefill tiling checks (4k, concat, 2k anchors, vs fp32 oracle):",
          [(c[0], f"{c[1]:.1e}", c[2]) for c in checks], flush=True)
    if not all(c[2] for c in checks):
        RESULTS["prefill_tune"] = {"checks": [list(map(str, c)) for c in checks]}
        raise SystemExit("prefill tiling check failed: no timings")

    def flops(n, anchors):
        return 4 * d * hq * n * n / 2 + (4 * d * hq * n * atok if anchors else 0)

    def time_cfg(n, cfg, mode, with_anchors=True):
        k, v, bt, lens, cu, q, a, t_sdpa = data[n, cfg[0]]
        aa = a if with_anchors else (None, None)
        out = torch.empty_like(q)
        kw = dict(mode=mode, gamma=0.3, out=out, block_m=cfg[1], block_n=cfg[2], num_warps=cfg[3],
                  num_stages=cfg[4])
        paged_attention_prefill(q, cu, k, v, bt, lens, *aa, **kw)
        t = med(lambda: paged_attention_prefill(q, cu, k, v, bt, lens, *aa, check=False, max_seqlen_q=n, **kw))
        return t, flops(n, with_anchors) / t / 1e6

    def add(n, cfg, variant, t, tf):
        sd = flops(n, False) / data[n, cfg[0]][7] / 1e6
        rows.append(dict(N=n, block_size=cfg[0], tiling=list(cfg[1:]), variant=variant, us=t, TFLOPs=tf,
                         sdpa_TFLOPs=sd, ratio_vs_sdpa=tf / sd))
        print(f"  N={n:6} bs={cfg[0]:3} {cfg[1:]}: {variant:8} {tf:6.0f} TFLOP/s  sdpa {sd:6.0f}  "
              f"ratio {tf / sd:.2f}", flush=True)

    for cfg in PREFILL_TILINGS:
        for n in (4096, 16384):
            add(n, cfg, "concat", *time_cfg(n, cfg, "concat"))
    best = {}
    for bs in sorted({c[0] for c in PREFILL_TILINGS}):
        mine = [c for c in PREFILL_TILINGS if c[0] == bs]
        best[bs] = min(mine, key=lambda c: sum(r["us"] for r in rows if r["block_size"] == bs
                                               and r["tiling"] == list(c[1:])))
        for n in (4096, 16384):
            add(n, best[bs], "noanchor", *time_cfg(n, best[bs], "concat", with_anchors=False))
            add(n, best[bs], "gamma", *time_cfg(n, best[bs], "gamma"))
    print("\n== prefill page sizes and tilings (Hq=32, Hkv=8, D=128, bf16, 2k anchors) ==")
    for r in rows:
        print(f"  N={r['N']:6} bs={r['block_size']:3} {str(r['tiling']):14} {r['variant']:9} {r['TFLOPs']:6.0f} TFLOP/s "
              f"(sdpa causal {r['sdpa_TFLOPs']:4.0f}, ratio {r['ratio_vs_sdpa']:.2f})")
    RESULTS["prefill_tune"] = {"checks": [list(map(str, c)) for c in checks],
                               "best": {str(k): list(v) for k, v in best.items()}, "rows": rows}


def section_int8(quick: bool) -> None:
    """INT8 vs bf16 anchors (one set per sequence) with register caps and anchor chunk sizes;
    and B=1, 8k context + 8k shared anchors vs SDPA with several split counts."""
    hq, hkv, d, bs = 32, 8, 128, 16
    rows = []
    for bsz, ctx, atok in ((8, 8192, 8192), (1, 131072, 8192), (8, 32768, 8192), (64, 8192, 2048)):
        k, v, bt, lens = paged(bsz, ctx, hkv, d, bs)
        q = torch.randn(bsz, hq, d, dtype=BF, device=DEV)
        seq = torch.arange(bsz, device=DEV)
        ab = anchor_set(bsz, atok, hkv, d, bs, seq)
        ai = anchor_set(bsz, atok, hkv, d, bs, seq, int8=True)
        ref = torch.full_like(q, float("nan"))
        paged_attention_decode(q, k, v, bt, lens, *ai, out=ref, max_registers=None)
        out = torch.empty_like(q)
        # The default anchor split count, to build the "half-size anchor items" (v5) variant.
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        want = max(triton.cdiv(2 * sms, bsz * hkv), 20 if bsz * hkv < sms else 1)
        chunk = triton.cdiv(triton.cdiv(ctx, min(want, triton.cdiv(ctx, 256))), 64) * 64
        s_half = triton.cdiv(atok, max(64, chunk // 2 // 64 * 64))
        r = dict(B=bsz, ctx=ctx, anchors=atok)
        for name, a, regs, asp in (("bf16", ab, None, None), ("int8", ai, None, None),
                                   ("int8_r168", ai, 168, None), ("int8_r128", ai, 128, None),
                                   ("int8_half", ai, None, s_half), ("int8_half_r168", ai, 168, s_half)):
            o = torch.full_like(q, float("nan"))
            paged_attention_decode(q, k, v, bt, lens, *a, out=o, max_registers=regs, anchor_splits=asp)
            if a is ai:
                e = relerr(o, ref)
                assert e < 1e-2 and not o.isnan().any(), (name, e)
            r[name + "_us"] = med_graph([lambda: paged_attention_decode(
                q, k, v, bt, lens, *a, check=False, out=out, max_registers=regs, anchor_splits=asp)], 20)
        for key in list(r):
            if key.startswith("int8") and key.endswith("_us"):
                r[key[:-3] + "_over_bf16"] = r[key] / r["bf16_us"]
        rows.append(r)
        print("  " + "  ".join(f"{kk}={vv:.1f}" if isinstance(vv, float) else f"{kk}={vv}" for kk, vv in r.items()
                               if not kk.endswith("_over_bf16")), flush=True)
        del k, v, ab, ai
    # B=1, 8k own tokens + 8k shared anchors (the v5 decode miss): split counts.
    bsz, ctx, atok = 1, 8192, 8192
    ns = n_sets(2 * hkv * d * 2 * (ctx + atok))
    sets = []
    for _ in range(ns):
        k, v, bt, lens = paged(bsz, ctx, hkv, d, bs)
        kc = torch.randn(bsz, hkv, ctx + atok, d, dtype=BF, device=DEV)
        vc = torch.randn(bsz, hkv, ctx + atok, d, dtype=BF, device=DEV)
        q = torch.randn(bsz, hq, d, dtype=BF, device=DEV)
        a = anchor_set(1, atok, hkv, d, bs, torch.zeros(bsz, device=DEV))
        sets.append((q, k, v, bt, lens, *a, kc, vc, torch.empty_like(q)))
    t_sdpa = med_graph([lambda s=s_: sdpa_decode_contiguous(s[0], s[7], s[8]) for s_ in sets], max(ns, 40))
    small = []
    for sp, asp in ((None, None), (16, 8), (32, 8), (8, 8), (20, 4)):
        calls = [lambda s=s_: paged_attention_decode(*s[:7], check=False, out=s[9], num_splits=sp,
                                                     anchor_splits=asp) for s_ in sets]
        t = med_graph(calls, max(ns, 40))
        small.append(dict(num_splits=str(sp), anchor_splits=str(asp), us=t, sdpa_us=t_sdpa, ratio_sdpa=t / t_sdpa))
    print("\n== INT8 vs bf16 anchors (decode, one set per sequence; us, CUDA-graph medians) ==")
    for r in rows:
        print(f"  B={r['B']:3} ctx={r['ctx']:6} anc={r['anchors']:5}: bf16 {r['bf16_us']:7.1f}"
              + "".join(f"  {kk[:-3]} {r[kk]:7.1f} ({r[kk[:-3] + '_over_bf16']:.3f})" for kk in r
                        if kk.startswith("int8") and kk.endswith("_us")))
    print("== B=1, 8k context + 8k shared anchors: split counts vs SDPA-contiguous ==")
    for r in small:
        print(f"  splits={r['num_splits']:>5} anchor_splits={r['anchor_splits']:>5}: {r['us']:6.1f} us  "
              f"sdpa {r['sdpa_us']:6.1f}  ratio {r['ratio_sdpa']:.3f}")
    RESULTS["int8"] = {"modes": rows, "b1_8k_8k": small}


def section_anchor_cost(quick: bool) -> None:
    """What shared anchors cost: decode with none / bf16 / int8 anchors (2k tokens, one set shared by
    the batch) at the engine's shapes (Llama-3.2-1B: H_q 32, H_kv 8, D 64, 640 tokens of context,
    B=1/8/32/128) and issue 11's (Llama-3-8B: D 128, 8k of context, B=1/8/64), graph-timed with the
    default plans; and prefill of 4k new tokens after them (16-token pages). Each anchor row's output
    is checked against the same anchors dequantized to bf16. With --baseline (this section's JSON from
    another build on the same machine) every time is printed beside the baseline's, with the ratio."""
    l1, l8 = (32, 8, 64), (32, 8, 128)
    specs = [(1, 640, l1), (8, 640, l1), (32, 640, l1), (128, 640, l1), (1, 8192, l8), (8, 8192, l8), (64, 8192, l8)]
    if DEV != "cuda":
        specs = [(2, 128, (8, 2, 64))]
    rows = []
    for bsz, ctx, (hq, hkv, d) in specs[:2] if quick else specs:
        k, v, bt, lens = paged(bsz, ctx, hkv, d, 16, dtype=BF)
        q = torch.randn(bsz, hq, d, dtype=BF, device=DEV)
        ai = anchor_set(1, 2048, hkv, d, 16, torch.zeros(bsz, device=DEV), int8=True)
        ab = (AnchorPool(*dequant_pool(ai[0], BF)), ai[1])
        out = torch.empty_like(q)
        r = {"kind": "decode", "B": bsz, "ctx": ctx, "d": d}
        want = paged_attention_decode(q, k, v, bt, lens, *ab)
        for name, a in (("none", (None, None)), ("bf16", ab), ("int8", ai)):
            if a[0] is not None:
                r[name + "_err"] = relerr(paged_attention_decode(q, k, v, bt, lens, *a), want)
                assert r[name + "_err"] < 1e-2, r
            p = plan_decode(q, k, v, bt, lens, *a, check=False)
            r[name + "_us"] = t_graph([lambda p=p, a=a: p.run(q, k, v, a[0], out=out)], 20)
        rows.append(r)
        del k, v, bt, lens, q, ai, ab
    n, hq, hkv, d = (4096, 32, 8, 128) if DEV == "cuda" else (64, 8, 2, 64)
    k, v, bt, lens = paged(1, n, hkv, d, 16, dtype=BF)
    cu = torch.tensor([0, n], dtype=torch.int32, device=DEV)
    q = torch.randn(n, hq, d, dtype=BF, device=DEV)
    ai = anchor_set(1, 2048, hkv, d, 16, torch.zeros(1, device=DEV), int8=True)
    ab = (AnchorPool(*dequant_pool(ai[0], BF)), ai[1])
    out = torch.empty_like(q)
    r = {"kind": "prefill", "B": 1, "ctx": n, "d": d}
    want = paged_attention_prefill(q, cu, k, v, bt, lens, *ab)
    for name, a in (("none", (None, None)), ("bf16", ab), ("int8", ai)):
        if a[0] is not None:
            r[name + "_err"] = relerr(paged_attention_prefill(q, cu, k, v, bt, lens, *a), want)
            assert r[name + "_err"] < 1e-2, r
        r[name + "_us"] = t_events(lambda a=a: paged_attention_prefill(q, cu, k, v, bt, lens, *a, check=False,
                                                                        out=out, max_seqlen_q=n))
    rows.append(r)
    base = {}
    if BASELINE:
        with open(BASELINE[0]) as f:
            base = {(b["kind"], b["B"], b["ctx"], b["d"]): b for b in json.load(f).get("anchor_cost", [])}
    print("\n== anchor cost (2k shared anchors, us; decode graph-timed, prefill events) ==")
    for r in rows:
        b = base.get((r["kind"], r["B"], r["ctx"], r["d"]), {})
        for name in ("none", "bf16", "int8"):
            if name + "_us" in b:
                r[name + "_vs_baseline"] = r[name + "_us"] / b[name + "_us"]
        r["int8_over_bf16"] = r["int8_us"] / r["bf16_us"]
        print(f"  {r['kind']:7} D={r['d']:3} B={r['B']:3} ctx={r['ctx']:5}: " + "  ".join(
            f"{name} {r[name + '_us']:7.1f}" + (f" (base {b[name + '_us']:7.1f}, {r[name + '_vs_baseline']:.3f})"
                                                 if name + "_us" in b else "")
            for name in ("none", "bf16", "int8")) + f"  int8/bf16 {r['int8_over_bf16']:.3f}")
    RESULTS["anchor_cost"] = rows


def section_naive64k(quick: bool) -> None:
    """The original estimate: naive dual attention at 64k materializes ~8 GB of scores per head.

    Measured per layer on a 13B-like shape (40 heads, D=128, MHA): decode of one token at 64k
    context with 2k anchors, naive vs fused; and prefill of 64k tokens for ONE head (what fits),
    naive (materialized 64k x 64k scores) vs fused, then scaled to 40 heads x 40 layers.
    """
    hq = hkv = 40
    d, bs, ctx, atok, layers = 128, 16, 65536, 2048, 40
    k, v, bt, lens = paged(1, ctx, hkv, d, bs)
    q = torch.randn(1, hq, d, dtype=BF, device=DEV)
    a = anchor_set(1, atok, hkv, d, bs, torch.zeros(1, device=DEV))
    kc = torch.randn(1, hkv, ctx, d, dtype=BF, device=DEV)
    vc = torch.randn_like(kc)
    kac = torch.randn(1, hkv, atok, d, dtype=BF, device=DEV)
    vac = torch.randn_like(kac)
    out = torch.empty_like(q)
    paged_attention_decode(q, k, v, bt, lens, *a, mode="gamma", gamma=0.3, out=out)
    t_fused = med(lambda: paged_attention_decode(q, k, v, bt, lens, *a, mode="gamma", gamma=0.3,
                                                 check=False, out=out))
    t_naive = med(lambda: naive_decode_batched(q, kc, vc, kac, vac, mode="gamma", gamma=0.3), rep=50)
    k = v = kc = vc = None
    torch.cuda.empty_cache()
    # Prefill, one head, 64k x 64k scores materialized in bf16 (8.6 GB) and softmaxed.
    n = ctx if not quick else 16384
    qh = torch.randn(n, d, dtype=BF, device=DEV)
    kh = torch.randn(n, d, dtype=BF, device=DEV)
    vh = torch.randn(n, d, dtype=BF, device=DEV)
    kah = torch.randn(atok, d, dtype=BF, device=DEV)
    vah = torch.randn(atok, d, dtype=BF, device=DEV)

    def naive_prefill_head():
        s = qh @ kh.T
        s.mul_(1 / math.sqrt(d))
        s.masked_fill_(torch.ones(n, n, dtype=torch.bool, device=DEV).triu_(1), float("-inf"))
        own = torch.softmax(s, dim=-1) @ vh
        del s
        anc = torch.softmax((qh @ kah.T) / math.sqrt(d), dim=-1) @ vah
        return 0.7 * own + 0.3 * anc

    try:
        t_np = med(naive_prefill_head, rep=20)
        peak = torch.cuda.max_memory_allocated() / 2**30
    except torch.OutOfMemoryError:
        t_np, peak = float("nan"), float("nan")
    torch.cuda.empty_cache()
    kp, vp, btp, lensp = paged(1, n, 1, d, bs)
    cu = torch.tensor([0, n], dtype=torch.int32, device=DEV)
    q1 = qh.reshape(n, 1, d)
    a1 = anchor_set(1, atok, 1, d, bs, torch.zeros(1, device=DEV))
    o1 = torch.empty_like(q1)
    paged_attention_prefill(q1, cu, kp, vp, btp, lensp, *a1, mode="gamma", gamma=0.3, out=o1)
    t_fp = med(lambda: paged_attention_prefill(q1, cu, kp, vp, btp, lensp, *a1, mode="gamma", gamma=0.3,
                                               check=False, out=o1), rep=50)
    r = dict(ctx=ctx, heads=hq, layers=layers, decode_layer_fused_us=t_fused,
             decode_layer_naive_us=t_naive, decode_token_fused_ms=t_fused * layers / 1e3,
             decode_token_naive_ms=t_naive * layers / 1e3, prefill_n=n,
             prefill_head_naive_ms=t_np / 1e3, prefill_head_fused_ms=t_fp / 1e3,
             prefill_model_naive_s=t_np * hq * layers / 1e6, prefill_model_fused_s=t_fp * hq * layers / 1e6,
             scores_bytes_per_head=n * n * 2, naive_peak_GiB=peak)
    print("\n== naive dual attention at 64k (13B-like: 40 heads, D=128, 40 layers, 2k anchors, gamma) ==")
    print(f"  decode per layer: naive {t_naive:8.1f} us  fused {t_fused:8.1f} us  -> per token (x40 layers):"
          f" naive {r['decode_token_naive_ms']:.2f} ms  fused {r['decode_token_fused_ms']:.2f} ms")
    print(f"  prefill N={n}, one head: naive {t_np / 1e3:8.1f} ms (scores {n * n * 2 / 1e9:.1f} GB, peak "
          f"{peak:.1f} GiB)  fused {t_fp / 1e3:8.2f} ms -> x40 heads x40 layers: naive "
          f"{r['prefill_model_naive_s']:.1f} s  fused {r['prefill_model_fused_s']:.2f} s")
    RESULTS["naive64k"] = r


# ----------------------------------------------------------------------------------------------
# FlashInfer side by side (issue 11): one shared set of inputs per shape, both kernels on it.
FI_HQ, FI_HKV, FI_D = 32, 8, 128  # Llama-3-8B attention
FI_WS_BYTES = 512 << 20  # FlashInfer's float workspace (split-KV partials); 128 MB is its usual figure
OUT_PATH: list[str] = []
DEADLINE = [float("inf")]  # wall-clock end of this run's budget (--budget)
BASELINE: list[str] = []  # --baseline: a JSON of this bench from another build, printed beside this run


def flush() -> None:
    """Write RESULTS now (a run cut short keeps what it measured)."""
    if not OUT_PATH:
        return
    path = OUT_PATH[0]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def time_left() -> float:
    return DEADLINE[0] - time.time()


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:600]}"


def t_events(fn, rep=100) -> float:
    """Median microseconds of one call: CUDA events (do_bench), or the wall clock on the CPU (smoke)."""
    if DEV == "cuda":
        return med(fn, rep=rep)
    ts = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e6)
    return sorted(ts)[1]


def t_graph(calls, inner) -> float:
    """Median microseconds per call under a CUDA graph (med_graph); the wall clock on the CPU (smoke)."""
    if DEV == "cuda":
        return med_graph(calls, inner)
    return t_events(calls[0])


def host_cost(fn, n=200, reps=7) -> float:
    """Median host wall time per call over n back-to-back calls (no graph), microseconds."""
    fn()
    if DEV == "cuda":
        torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        if DEV == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        if DEV == "cuda":
            torch.cuda.synchronize()
        ts.append((time.perf_counter() - t) / n * 1e6)
    return sorted(ts)[len(ts) // 2]


class FlashInferState:
    """FlashInfer, when and if usable: it JIT-compiles its kernels with nvcc on first use.

    With a status file (written by `--fi-build` running beside this process), FlashInfer is used only
    once that build reports the variant built, so no timing waits on nvcc and a failed or cut-short
    build leaves FlashInfer's columns marked unavailable instead of stalling the run. Without one,
    FlashInfer is imported here and compiles in-process on first use.
    """

    def __init__(self, status_path: str | None, disabled: bool):
        self.status_path = status_path
        self.fi = None
        self.failed = "disabled (--no-flashinfer)" if disabled else None
        self.status: dict = {}

    def _read(self) -> dict:
        if self.status_path and os.path.exists(self.status_path):
            try:
                with open(self.status_path) as f:
                    self.status = json.load(f)
            except (OSError, ValueError):
                pass
        return self.status

    def built(self, variant: str) -> bool | None:
        """True/False once the status file says so; None while unknown (no file: True)."""
        if not self.status_path:
            return True
        st = self._read().get("steps", {}).get(variant)
        if st is not None:
            return bool(st.get("ok"))
        return False if self.status.get("done") else None

    def ready(self, variant: str = "fa2") -> bool:
        """Whether FlashInfer can run `variant` now (never blocks on a build)."""
        if self.failed:
            return False
        b = self.built(variant)
        if b is None:
            return False
        if not b:
            if variant == "fa2":
                self.failed = "build failed: " + str(self.status.get("steps", {}).get("fa2", self.status))[:600]
            return False
        if self.fi is None:
            try:
                import flashinfer

                self.fi = flashinfer
                RESULTS.setdefault("flashinfer", {})["version"] = getattr(flashinfer, "__version__", "?")
                try:
                    import tvm_ffi

                    RESULTS["flashinfer"]["tvm_ffi"] = getattr(tvm_ffi, "__version__", "?")
                except Exception:  # the fake or a future FlashInfer without it
                    pass
            except Exception as e:  # absent or broken: its columns say so
                self.failed = "import failed: " + _err(e)
                return False
        return True

    def pending(self, variant: str = "fa2") -> bool:
        """True while a build of `variant` is still running (its outcome unknown)."""
        return not self.failed and self.built(variant) is None

    def wait(self, variant: str, until: float) -> bool:
        while self.pending(variant) and time.time() < until:
            time.sleep(2)
        return self.ready(variant)

    def why(self, variant: str = "fa2") -> str:
        if self.failed:
            return self.failed
        b = self.built(variant)
        if b is None:
            return f"{variant} build still running"
        if b is False:
            step = self.status.get("steps", {}).get(variant)
            return f"{variant} build failed: {str(step)[:400]}" if step else f"{variant} not built (not asked for)"
        return "ok"


_FI_WS: list[torch.Tensor] = []


def fi_workspace() -> torch.Tensor:
    if not _FI_WS:
        _FI_WS.append(torch.zeros(FI_WS_BYTES, dtype=torch.uint8, device=DEV))
    return _FI_WS[0]


def fi_page_lists(bt: torch.Tensor, lens: torch.Tensor, bs: int, anchor_pages: torch.Tensor | None):
    """FlashInfer's (indptr, indices, last_page_len) for sequences whose pages are [anchor pages; own pages].

    bt: [B, per] own pages; anchor_pages: [A] page ids of the anchor set (whole pages: the set's
    length is a multiple of the page size), listed first in every sequence's list.
    """
    bsz = bt.shape[0]
    own = ((lens + bs - 1) // bs).tolist()
    rows = []
    for b in range(bsz):
        r = bt[b, : own[b]]
        rows.append(r if anchor_pages is None else torch.cat([anchor_pages, r]))
    indices = torch.cat(rows).to(torch.int32)
    counts = torch.tensor([r.numel() for r in rows], dtype=torch.int32, device=bt.device)
    indptr = torch.zeros(bsz + 1, dtype=torch.int32, device=bt.device)
    indptr[1:] = counts.cumsum(0)
    last = ((lens - 1) % bs + 1).to(torch.int32)
    return indptr, indices, last


def fi_decode_wrapper(fi, indptr, indices, last, bs):
    """BatchDecodeWithPagedKVCacheWrapper (tensor cores, CUDA-graph mode: fixed buffers), planned once."""
    w = fi.BatchDecodeWithPagedKVCacheWrapper(
        fi_workspace(), "NHD", use_cuda_graph=True, use_tensor_cores=True,
        paged_kv_indptr_buffer=torch.empty_like(indptr), paged_kv_indices_buffer=torch.empty_like(indices),
        paged_kv_last_page_len_buffer=torch.empty_like(last))
    w.plan(indptr, indices, last, FI_HQ, FI_HKV, FI_D, bs, q_data_type=BF, kv_data_type=BF)
    return w


def fi_prefill_wrapper(fi, backend, qo_indptr, indptr, indices, last, bs):
    """BatchPrefillWithPagedKVCacheWrapper (causal; the given backend), planned once."""
    w = fi.BatchPrefillWithPagedKVCacheWrapper(fi_workspace(), "NHD", backend=backend)
    w.plan(qo_indptr, indptr, indices, last, FI_HQ, FI_HKV, FI_D, bs, causal=True, q_data_type=BF, kv_data_type=BF)
    return w


def fi_build(status_path: str, variants=("fa2", "fa3")) -> None:
    """Compile (JIT) and load the FlashInfer variants this bench uses, writing progress to status_path.

    Run beside the bench (the GPU script starts it in the background). The module a tiny problem
    compiles is the one every shape uses: it depends on dtypes, head dim and options, not on shapes.
    fa2: the tensor-core decode wrapper and the fa2 prefill wrapper (one module, shared);
    fa3: the Hopper prefill backend, which the wrapper's "auto" picks on an H200.
    """
    st: dict = {"started": time.strftime("%H:%M:%S"), "steps": {}, "done": False}

    def write():
        with open(status_path + ".tmp", "w") as f:
            json.dump(st, f, indent=1)
        os.replace(status_path + ".tmp", status_path)

    t0 = time.time()
    try:
        import flashinfer as fi

        st["version"] = getattr(fi, "__version__", "?")
        st["import_s"] = time.time() - t0
    except Exception as e:
        st["import_error"] = _err(e)
        st["steps"] = {v: {"ok": False, "error": st["import_error"]} for v in variants}
        st["done"] = True
        write()
        return
    write()
    bs, ctx, bsz = 16, 40, 2
    k = torch.randn(16, bs, FI_HKV, FI_D, dtype=BF, device=DEV)
    v = torch.randn_like(k)
    bt = torch.arange(6, dtype=torch.int32, device=DEV).reshape(bsz, 3)
    lens = torch.full((bsz,), ctx, dtype=torch.int32, device=DEV)
    indptr, indices, last = fi_page_lists(bt, lens, bs, torch.tensor([8, 9], dtype=torch.int32, device=DEV))
    lock = threading.Lock()

    def build(name):
        t = time.time()
        try:
            if name == "fa2":
                w = fi_decode_wrapper(fi, indptr, indices, last, bs)
                w.run(torch.randn(bsz, FI_HQ, FI_D, dtype=BF, device=DEV), (k, v))
            n = 24
            qo = torch.tensor([0, n], dtype=torch.int32, device=DEV)
            ip, ix, la = fi_page_lists(bt[:1], lens[:1], bs, None)
            w = fi_prefill_wrapper(fi, name, qo, ip, ix, la, bs)
            w.run(torch.randn(n, FI_HQ, FI_D, dtype=BF, device=DEV), (k, v))
            if DEV == "cuda":
                torch.cuda.synchronize()
            step = {"ok": True, "s": round(time.time() - t, 1)}
        except Exception as e:
            step = {"ok": False, "s": round(time.time() - t, 1), "error": _err(e)}
        with lock:
            st["steps"][name] = step
            print(f"flashinfer build {name}: {step}", flush=True)
            write()

    # The variants compile side by side (each is ~10 nvcc jobs; different modules, different locks).
    fi_workspace()
    threads = [threading.Thread(target=build, args=(name,)) for name in variants]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    st["done"] = True
    st["total_s"] = round(time.time() - t0, 1)
    write()


def _decode_specs(quick: bool, smoke: bool):
    """Decode shapes in priority order: (B, ctx, page size, anchor tokens, tier)."""
    if smoke:
        return [(2, 64, 16, 32, "core"), (1, 48, 16, 32, "core")]
    k = 1024
    core = [(1, c, 16, 2 * k) for c in (k, 8 * k, 32 * k)] + [(8, c, 16, 2 * k) for c in (k, 8 * k, 32 * k)] \
        + [(64, c, 16, 2 * k) for c in (k, 8 * k, 32 * k)]
    if quick:
        core = [(1, k, 16, 2 * k), (1, 32 * k, 16, 2 * k), (64, 8 * k, 16, 2 * k), (64, 32 * k, 16, 2 * k)]
        return [(*s, "core") for s in core] + [(64, 8 * k, 128, 2 * k, "page128")]
    extra = [(8, 8 * k, 128, 2 * k, "page128"), (64, 8 * k, 128, 2 * k, "page128"), (1, 32 * k, 128, 2 * k, "page128"),
             (8, 8 * k, 16, 8 * k, "anchors8k"), (64, 8 * k, 16, 8 * k, "anchors8k"),
             (1, 128 * k, 16, 2 * k, "ctx128k"), (8, 128 * k, 16, 2 * k, "ctx128k"),
             (256, k, 16, 2 * k, "B256"), (256, 8 * k, 16, 2 * k, "B256"), (256, 32 * k, 16, 2 * k, "B256")]
    return [(*s, "core") for s in core] + extra


def _ref_ok(bsz, ctx, atok) -> bool:
    """Whether the fp32 reference (one sequence at a time) is cheap enough at this shape."""
    return bsz * (ctx + atok) <= 300_000 and bsz <= 64


def fi_decode_shape(st: FlashInferState, bsz, ctx, bs, atok, tier, hq, hkv, d) -> dict:
    """One decode shape: ours (bf16 and int8 anchors, and none) vs FlashInfer on one shared K/V pool.

    The pool holds every sequence's own pages and, after them, the anchor set's pages: ours reads
    the anchors through AnchorPool (a view of those pages) + AnchorRouting (one set shared by the
    batch); FlashInfer gets them as the first pages of each sequence's page list. Both thus compute
    softmax(q [K_a; K]^T / sqrt(D)) [V_a; V] (our concat mode).
    """
    row = dict(B=bsz, ctx=ctx, page=bs, anchors=atok, tier=tier)
    use_fi = st.ready("fa2")
    row["fi"] = "ok" if use_fi else "unavailable: " + st.why("fa2")
    per = triton.cdiv(ctx, bs)
    napb = atok // bs
    nctx = bsz * per
    bytes_set = 2 * (nctx + napb) * bs * hkv * d * 2
    ns = n_sets(bytes_set) if DEV == "cuda" else 1
    row["sets"] = ns
    bt = torch.randperm(nctx, device=DEV).reshape(bsz, per).to(torch.int32)
    lens = torch.full((bsz,), ctx, dtype=torch.int32, device=DEV)
    abt = (nctx + torch.randperm(napb, device=DEV)).to(torch.int32)  # anchor pages in FlashInfer's numbering
    routing = AnchorRouting((abt - nctx).reshape(1, napb), torch.tensor([atok], dtype=torch.int32, device=DEV),
                            torch.zeros(bsz, dtype=torch.int32, device=DEV))
    sets = []
    for _ in range(ns):
        kall = torch.randn(nctx + napb, bs, hkv, d, dtype=BF, device=DEV)
        vall = torch.randn_like(kall)
        q = torch.randn(bsz, hq, d, dtype=BF, device=DEV)
        sets.append(dict(kall=kall, vall=vall, k=kall[:nctx], v=vall[:nctx], q=q,
                         pool=AnchorPool(kall[nctx:], vall[nctx:]), out=torch.empty_like(q), fo=torch.empty_like(q)))
    inner = max(ns, 10 if bsz * ctx >= 64 * 32768 else 40)
    w = {}
    if use_fi:
        try:
            for name, ap in (("none", None), ("bf16", abt)):
                w[name] = fi_decode_wrapper(st.fi, *fi_page_lists(bt, lens, bs, ap), bs)
        except Exception as e:
            row["fi"] = "plan failed: " + _err(e)
            use_fi = False
    for name in ("none", "bf16"):  # no anchors; bf16 anchors
        a = (None, None) if name == "none" else None  # anchors: per set

        def ours(s, a=a):
            aa = a if a is not None else (s["pool"], routing)
            return lambda: paged_attention_decode(s["q"], s["k"], s["v"], bt, lens, *aa, check=False, out=s["out"])

        s0 = sets[0]
        aa0 = (None, None) if name == "none" else (s0["pool"], routing)
        s0["out"].fill_(float("nan"))
        paged_attention_decode(s0["q"], s0["k"], s0["v"], bt, lens, *aa0, out=s0["out"])  # checked call
        o_ours = s0["out"].clone()
        r = {"ours_nan": bool(o_ours.isnan().any())}
        if _ref_ok(bsz, ctx, atok if name == "bf16" else 0):
            ref = reference_paged(s0["q"], None, s0["k"], s0["v"], bt, lens, *aa0, dtype=torch.float32)
            r["ours_relerr_ref"] = relerr(o_ours, ref)
        else:
            ref = None
        r["ours_ev_us"] = t_events(ours(s0))
        r["ours_us"] = t_graph([ours(s) for s in sets], inner)
        if use_fi:
            wr = w[name]
            try:
                s0["fo"].fill_(float("nan"))
                wr.run(s0["q"], (s0["kall"], s0["vall"]), out=s0["fo"])
                r["maxdiff_vs_fi"] = (o_ours.float() - s0["fo"].float()).abs().max().item()
                r["relerr_vs_fi"] = relerr(o_ours, s0["fo"])
                if ref is not None:
                    r["fi_relerr_ref"] = relerr(s0["fo"], ref)
                r["fi_ev_us"] = t_events(lambda: wr.run(s0["q"], (s0["kall"], s0["vall"]), out=s0["fo"]))
                r["ratio_ev"] = r["ours_ev_us"] / r["fi_ev_us"]
            except Exception as e:
                r["fi_error"] = _err(e)
            if "fi_ev_us" in r:
                try:
                    r["fi_us"] = t_graph([lambda s=s: wr.run(s["q"], (s["kall"], s["vall"]), out=s["fo"]) for s in sets], inner)
                    r["ratio"] = r["ours_us"] / r["fi_us"]
                except Exception as e:  # no graph for FlashInfer: its event timing above still stands
                    r["fi_graph_error"] = _err(e)
        ref = None
        row[name] = r
    # int8 anchors (ours only; FlashInfer has no int8-anchor path): time against FlashInfer's bf16 run
    # above, and check the output against FlashInfer on the dequantized (bf16-exact) anchors.
    try:
        for s in sets:
            s["pool8"] = int8_pool(napb, bs, hkv, d)
        s0 = sets[0]
        s0["out"].fill_(float("nan"))
        paged_attention_decode(s0["q"], s0["k"], s0["v"], bt, lens, s0["pool8"], routing, out=s0["out"])
        o8 = s0["out"].clone()
        r = {"ours_nan": bool(o8.isnan().any())}
        r["ours_ev_us"] = t_events(lambda: paged_attention_decode(s0["q"], s0["k"], s0["v"], bt, lens, s0["pool8"], routing,
                                                                  check=False, out=s0["out"]))
        r["ours_us"] = t_graph([lambda s=s: paged_attention_decode(s["q"], s["k"], s["v"], bt, lens, s["pool8"], routing,
                                                                   check=False, out=s["out"]) for s in sets], inner)
        kd, vd = dequant_pool(s0["pool8"])
        if _ref_ok(bsz, ctx, atok):
            ref = reference_paged(s0["q"], None, s0["k"], s0["v"], bt, lens, s0["pool8"], routing, dtype=torch.float32)
            r["ours_relerr_ref"] = relerr(o8, ref)
            ref = None
        fa = row["bf16"]
        if use_fi and "fi_us" in fa:
            s0["kall"][nctx:].copy_(kd)
            s0["vall"][nctx:].copy_(vd)
            s0["fo"].fill_(float("nan"))
            w["bf16"].run(s0["q"], (s0["kall"], s0["vall"]), out=s0["fo"])
            r["maxdiff_vs_fi_dequant"] = (o8.float() - s0["fo"].float()).abs().max().item()
            r["relerr_vs_fi_dequant"] = relerr(o8, s0["fo"])
            r["ratio_vs_fi_bf16"] = r["ours_us"] / fa["fi_us"]
            r["ratio_ev_vs_fi_bf16"] = r["ours_ev_us"] / fa["fi_ev_us"]
        r["over_ours_bf16"] = r["ours_us"] / row["bf16"]["ours_us"]
        row["int8"] = r
    except Exception as e:
        row["int8"] = {"error": _err(e)}
    sets = w = None
    return row


def _fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def _print_decode(row):
    for name in ("none", "bf16", "int8"):
        r = row.get(name, {})
        if "error" in r:
            print(f"  B={row['B']:3} ctx={row['ctx']:6} page={row['page']:3} {name:7}: error {r['error']}", flush=True)
            continue
        fi_us = r.get("fi_us") if name != "int8" else row.get("bf16", {}).get("fi_us")
        ratio = r.get("ratio", r.get("ratio_vs_fi_bf16"))
        diff = r.get("maxdiff_vs_fi", r.get("maxdiff_vs_fi_dequant"))
        print(f"  B={row['B']:3} ctx={row['ctx']:6} page={row['page']:3} anc={row['anchors'] if name != 'none' else 0:5} "
              f"{name:7}: ours {_fmt(r.get('ours_us')):>8} us (ev {_fmt(r.get('ours_ev_us')):>8})  FI {_fmt(fi_us):>8}"
              f"  ours/FI {_fmt(ratio, '.3f'):>6}  max|d| vs FI {_fmt(diff, '.2e')}  relerr ref {_fmt(r.get('ours_relerr_ref'), '.1e')}",
              flush=True)


def fi_prefill_shape(st: FlashInferState, n, bs, atok, hq, hkv, d) -> dict:
    """One sequence, `atok` anchor tokens then n new tokens (causal): ours vs FlashInfer fa2 / fa3."""
    row = dict(N=n, page=bs, anchors=atok)
    per = triton.cdiv(n, bs)
    napb = atok // bs
    kall = torch.randn(per + napb, bs, hkv, d, dtype=BF, device=DEV)
    vall = torch.randn_like(kall)
    k, v = kall[:per], vall[:per]
    bt = torch.randperm(per, device=DEV).reshape(1, per).to(torch.int32)
    lens = torch.tensor([n], dtype=torch.int32, device=DEV)
    abt = (per + torch.randperm(napb, device=DEV)).to(torch.int32)
    a = (AnchorPool(kall[per:], vall[per:]),
         AnchorRouting((abt - per).reshape(1, napb), torch.tensor([atok], dtype=torch.int32, device=DEV),
                       torch.zeros(1, dtype=torch.int32, device=DEV)))
    cu = torch.tensor([0, n], dtype=torch.int32, device=DEV)
    q = torch.randn(n, hq, d, dtype=BF, device=DEV)
    out = torch.full_like(q, float("nan"))
    flops = 4 * d * hq * (n * n / 2 + n * atok)
    paged_attention_prefill(q, cu, k, v, bt, lens, *a, out=out)
    o_ours = out.clone()
    row["ours_nan"] = bool(o_ours.isnan().any())
    ref = None
    if n <= 4096:
        ref = reference_paged(q, cu, k, v, bt, lens, *a, dtype=torch.float32)
        row["ours_relerr_ref"] = relerr(o_ours, ref)
    row["ours_us"] = t_events(lambda: paged_attention_prefill(q, cu, k, v, bt, lens, *a, check=False, out=out, max_seqlen_q=n),
                              rep=200)
    row["ours_TFLOPs"] = flops / row["ours_us"] / 1e6
    for backend in ("fa2", "fa3"):
        if not st.ready(backend):
            row[backend] = "unavailable: " + st.why(backend)
            continue
        try:
            w = fi_prefill_wrapper(st.fi, backend, cu, *fi_page_lists(bt, lens, bs, abt), bs)
            fo = torch.full_like(q, float("nan"))
            w.run(q, (kall, vall), out=fo)
            row[backend + "_maxdiff_vs_ours"] = (o_ours.float() - fo.float()).abs().max().item()
            row[backend + "_relerr_vs_ours"] = relerr(o_ours, fo)
            if ref is not None:
                row[backend + "_relerr_ref"] = relerr(fo, ref)
            t = t_events(lambda: w.run(q, (kall, vall), out=fo), rep=200)
            row[backend + "_us"] = t
            row[backend + "_TFLOPs"] = flops / t / 1e6
            row["ratio_" + backend] = row["ours_us"] / t
        except Exception as e:
            row[backend] = "error: " + _err(e)
    return row


def _print_prefill(r):
    parts = [f"  prefill N={r['N']:6} page={r['page']:3} anc={r['anchors']}: ours {r['ours_TFLOPs']:6.0f} TFLOP/s"]
    for b in ("fa2", "fa3"):
        if b + "_TFLOPs" in r:
            parts.append(f"FI-{b} {r[b + '_TFLOPs']:6.0f} (ours/FI time {r['ratio_' + b]:.3f}, max|d| {r[b + '_maxdiff_vs_ours']:.2e})")
        else:
            parts.append(f"FI-{b} {r.get(b, '-')}")
    print("  ".join(parts), flush=True)


def fi_host_cost(st: FlashInferState, hq, hkv, d, bsz=1, ctx=1024, bs=16, atok=2048) -> dict:
    """Host cost of one decode call without a graph: N back-to-back calls on a tiny shape, wall time / N."""
    per = triton.cdiv(ctx, bs)
    napb = atok // bs
    kall = torch.randn(per * bsz + napb, bs, hkv, d, dtype=BF, device=DEV)
    vall = torch.randn_like(kall)
    nctx = per * bsz
    bt = torch.arange(nctx, dtype=torch.int32, device=DEV).reshape(bsz, per)
    lens = torch.full((bsz,), ctx, dtype=torch.int32, device=DEV)
    abt = torch.arange(nctx, nctx + napb, dtype=torch.int32, device=DEV)
    a = (AnchorPool(kall[nctx:], vall[nctx:]),
         AnchorRouting((abt - nctx).reshape(1, napb), torch.tensor([atok], dtype=torch.int32, device=DEV),
                       torch.zeros(bsz, dtype=torch.int32, device=DEV)))
    q = torch.randn(bsz, hq, d, dtype=BF, device=DEV)
    out, fo = torch.empty_like(q), torch.empty_like(q)
    k, v = kall[:nctx], vall[:nctx]
    n = 200 if DEV == "cuda" else 3
    r = dict(B=bsz, ctx=ctx, page=bs, anchors=atok, calls=n, fa3_build_running=st.pending("fa3"))
    r["ours_us"] = host_cost(lambda: paged_attention_decode(q, k, v, bt, lens, check=False, out=out), n=n)
    r["ours_anchors_us"] = host_cost(lambda: paged_attention_decode(q, k, v, bt, lens, *a, check=False, out=out), n=n)
    r["ours_checked_us"] = host_cost(lambda: paged_attention_decode(q, k, v, bt, lens, out=out), n=n)
    # The comparable of FlashInfer's plan()/run(): plan once per step, run per call (what the engine does per layer).
    plan, plan_a = plan_decode(q, k, v, bt, lens, check=False), plan_decode(q, k, v, bt, lens, *a, check=False)
    r["ours_plan_us"] = host_cost(lambda: plan.run(q, k, v, out=out), n=n)
    r["ours_plan_anchors_us"] = host_cost(lambda: plan_a.run(q, k, v, a[0], out=out), n=n)
    r["ours_gpu_us"] = t_graph([lambda: paged_attention_decode(q, k, v, bt, lens, check=False, out=out)], 40)
    if st.ready("fa2"):
        try:
            for name, ap in (("", None), ("_anchors", abt)):
                w = fi_decode_wrapper(st.fi, *fi_page_lists(bt, lens, bs, ap), bs)
                r["fi" + name + "_us"] = host_cost(lambda w=w: w.run(q, (kall, vall), out=fo), n=n)
                if not name:
                    r["fi_gpu_us"] = t_graph([lambda w=w: w.run(q, (kall, vall), out=fo)], 40)
            r["ratio"] = r["ours_us"] / r["fi_us"]
            r["ratio_anchors"] = r["ours_anchors_us"] / r["fi_anchors_us"]
            r["ratio_plan"] = r["ours_plan_us"] / r["fi_us"]
            r["ratio_plan_anchors"] = r["ours_plan_anchors_us"] / r["fi_anchors_us"]
        except Exception as e:
            r["fi_error"] = _err(e)
    else:
        r["fi"] = "unavailable: " + st.why("fa2")
    print(f"  host cost per decode call (B={bsz}, ctx={ctx}, no graph, {n} back-to-back calls): ours {r['ours_us']:.1f} us "
          f"(anchors {r['ours_anchors_us']:.1f}, checked {r['ours_checked_us']:.1f}; planned {r['ours_plan_us']:.1f}, "
          f"planned with anchors {r['ours_plan_anchors_us']:.1f}; GPU {r['ours_gpu_us']:.1f})  FI "
          f"{_fmt(r.get('fi_us'))} (anchors {_fmt(r.get('fi_anchors_us'))}; GPU {_fmt(r.get('fi_gpu_us'))})  "
          f"ours/FI {_fmt(r.get('ratio'), '.2f')}", flush=True)
    return r


FI_ARGS: dict = {}


def section_flashinfer(quick: bool) -> None:
    """Ours vs FlashInfer 0.5.3 on Llama-3-8B attention (Hq=32, Hkv=8, D=128, bf16), issue 11.

    Decode: B x context x page size with 2k anchors shared by the batch (and none; int8 anchors
    ours only), FlashInfer's tensor-core decode wrapper planned once, events and CUDA-graph medians.
    Prefill: one sequence after 2k anchors, causal, vs FlashInfer's prefill wrapper (fa2, and fa3
    where built). Host cost of one decode call. Shapes run in priority order until --budget is
    spent; the rest are recorded as skipped. A shape met before FlashInfer's build is done gets
    ours measured, and is measured again, FlashInfer included, once it is.
    """
    smoke = FI_ARGS.get("smoke", False)
    hq, hkv, d = (8, 2, 64) if smoke else (FI_HQ, FI_HKV, FI_D)
    st = FlashInferState(FI_ARGS.get("status"), FI_ARGS.get("disabled", False))
    res = RESULTS.setdefault("flashinfer", {})
    res.update(dict(shape=dict(Hq=hq, Hkv=hkv, D=d, dtype="bf16"), int8_v_form="v_exp",
                    decode=[], prefill=[], skipped=[], ratio="ours time / FlashInfer time (lower is better)",
                    fi_decode="BatchDecodeWithPagedKVCacheWrapper(NHD, use_tensor_cores=True, use_cuda_graph=True)",
                    fi_prefill="BatchPrefillWithPagedKVCacheWrapper(NHD, causal=True), backends fa2 and fa3"))
    res["dlpack_c_exchange"] = hasattr(torch.Tensor, "__dlpack_c_exchange_api__")
    flush()

    def status():
        res["build"] = st._read() if st.status_path else "in-process"

    specs = _decode_specs(quick, smoke)
    pending: list = []
    est = {"core": 8, "page128": 8, "anchors8k": 8, "ctx128k": 15, "B256": 25}

    def run_decode(spec, i):
        bsz, ctx, bs, atok, tier = spec
        t0 = time.time()
        try:
            row = fi_decode_shape(st, bsz, ctx, bs, atok, tier, hq, hkv, d)
            row["wall_s"] = round(time.time() - t0, 1)
        except Exception as e:
            row = dict(B=bsz, ctx=ctx, page=bs, anchors=atok, tier=tier, error=_err(e))
            print(f"  B={bsz} ctx={ctx} page={bs}: error {row['error']}", flush=True)
        else:
            _print_decode(row)
        if i is None:
            res["decode"].append(row)
        else:
            res["decode"][i] = row
        status()
        flush()
        if DEV == "cuda":
            torch.cuda.empty_cache()
        return row

    def retry_pending():
        while pending and st.ready("fa2") and time_left() > 20:
            i, spec = pending.pop(0)
            run_decode(spec, i)

    prefill_specs = [(4096, 16), (4096, 128), (16384, 16), (16384, 128)]
    if quick:
        prefill_specs = [(4096, 128), (16384, 128)]
    if smoke:
        prefill_specs = [(40, 16)]
    atok_p = 32 if smoke else 2048
    prefill_done = []

    def run_prefill(i=None, specs=None):
        for n, bs in specs or prefill_specs:
            if time_left() < 15:
                res["skipped"].append(dict(kind="prefill", N=n, page=bs, why="budget"))
                continue
            try:
                row = fi_prefill_shape(st, n, bs, atok_p, hq, hkv, d)
                _print_prefill(row)
            except Exception as e:
                row = dict(N=n, page=bs, anchors=atok_p, error=_err(e))
                print(f"  prefill N={n} page={bs}: error {row['error']}", flush=True)
            if i is None:
                res["prefill"].append(row)
                prefill_done.append((n, bs))
            else:
                j = next(j for j, r in enumerate(res["prefill"]) if r.get("N") == n and r.get("page") == bs)
                res["prefill"][j] = row
            status()
            flush()
            if DEV == "cuda":
                torch.cuda.empty_cache()

    core = [s for s in specs if s[4] == "core"]
    rest = [s for s in specs if s[4] != "core"]
    for spec in core:
        retry_pending()
        if time_left() < est[spec[4]] + 60:  # keep time for prefill and the host cost
            res["skipped"].append(dict(kind="decode", B=spec[0], ctx=spec[1], page=spec[2], anchors=spec[3], why="budget"))
            continue
        row = run_decode(spec, None)
        if "still running" in str(row.get("fi")) and (st.pending("fa2") or st.ready("fa2")):
            pending.append((len(res["decode"]) - 1, spec))
    # FlashInfer still compiling: wait for it (bounded), then measure what was met before it.
    if pending and st.pending("fa2"):
        print(f"  waiting for FlashInfer's build (up to {max(0, time_left() - 90):.0f} s)...", flush=True)
        st.wait("fa2", time.time() + max(0, time_left() - 90))
    retry_pending()
    run_prefill()
    res["host_cost"] = fi_host_cost(st, hq, hkv, d, bs=16, atok=32 if smoke else 2048, ctx=64 if smoke else 1024)
    flush()
    for spec in rest:
        if time_left() < est[spec[4]] + 5:
            res["skipped"].append(dict(kind="decode", B=spec[0], ctx=spec[1], page=spec[2], anchors=spec[3], why="budget"))
            continue
        bsz, ctx, bs, atok, _ = spec
        need = 2 * (bsz * ctx + atok) * hkv * d * 2 * 2.5  # pool, rotation sets aside, plus slack
        if DEV == "cuda" and need > torch.cuda.mem_get_info()[0]:
            res["skipped"].append(dict(kind="decode", B=bsz, ctx=ctx, page=bs, anchors=atok, why="memory"))
            continue
        run_decode(spec, None)
    # fa3 built late: prefill again with it, if time is left.
    if st.ready("fa3") and any(isinstance(r.get("fa3"), str) and "still running" in r["fa3"] for r in res["prefill"]):
        run_prefill(i=True, specs=[(r["N"], r["page"]) for r in res["prefill"] if isinstance(r.get("fa3"), str)])
    status()
    for r in res["decode"]:  # rows met while the build ran, never re-measured: say why in the end
        if "still running" in str(r.get("fi", "")) and not st.pending("fa2"):
            r["fi"] = "not re-measured (budget); FlashInfer: " + st.why("fa2")
    res["unmeasured_fi"] = [dict(B=r.get("B"), ctx=r.get("ctx"), page=r.get("page")) for r in res["decode"] if r.get("fi") != "ok"]
    flush()


def section_tile(quick: bool) -> None:
    """Anchor-sharing tile size at small batches (B 1-32, 2k shared anchors): graph-timed decode per seq_tile.

    The tile's last-arriving anchor item merges its sequences' outputs one after another, so a wide tile
    at a small batch can leave one program working alone at the end; this measures where that costs.
    """
    out = []
    shapes = [(32, 8, 64), (32, 8, 128)]  # Llama-3.2-1B and Llama-3-8B attention
    for hq, hkv, d in shapes[:1] if quick else shapes:
        for bsz in (1, 8, 32):
            for ctx in (1024, 8192):
                k, v, bt, lens = paged(bsz, ctx, hkv, d, 16, dtype=BF)
                q = torch.randn(bsz, hq, d, dtype=BF, device=DEV)
                o = torch.empty_like(q)
                row = {"hq": hq, "hkv": hkv, "d": d, "B": bsz, "ctx": ctx,
                       "none_us": t_graph([lambda: paged_attention_decode(q, k, v, bt, lens, check=False, out=o)], 40)}
                for kind in ("bf16", "int8"):
                    a = anchor_set(1, 2048, hkv, d, 16, torch.zeros(bsz, device=DEV), int8=kind == "int8", dtype=BF)
                    default = t_graph([lambda a=a: paged_attention_decode(q, k, v, bt, lens, *a, check=False, out=o)], 40)
                    tiles = {}
                    for tile in (1, 2, 4, 8, 16):
                        if tile > triton.next_power_of_2(bsz):
                            break
                        tiles[tile] = t_graph([lambda a=a, t=tile: paged_attention_decode(
                            q, k, v, bt, lens, *a, check=False, out=o, seq_tile=t)], 40)
                    best = min(tiles, key=tiles.get)
                    row[kind] = {"default_us": default, "tiles_us": tiles, "best_tile": best,
                                 "default_vs_none": default / row["none_us"], "best_vs_none": tiles[best] / row["none_us"]}
                out.append(row)
                print(f"  tile D={d} B={bsz:>3} ctx={ctx:>5}: none {row['none_us']:6.1f} us | " + " | ".join(
                    f"{kind} default {row[kind]['default_us']:6.1f} " + " ".join(
                        f"t{t}={x:.1f}" for t, x in row[kind]["tiles_us"].items()) for kind in ("bf16", "int8")), flush=True)
                RESULTS["tile"] = out
                flush()


def _v10_rule(bsz: int, ctx: int, hkv: int, kind, sms: int) -> dict:
    """The split plan before v11, as explicit arguments: context splits of at least 256 tokens; anchor
    splits of the context split's size, halved for int8 anchors when that gave fewer than 8."""
    s, chunk = _splits(ctx, bsz * hkv, sms, 64, 256, None, fill_wave=kind is None)
    kw = {"min_chunk": 256}
    if kind is not None:
        per = chunk
        if kind == "int8" and -(-2048 // chunk) < 8:
            per = max(64, chunk // 2 // 64 * 64)
        kw["anchor_splits"] = -(-2048 // min(per, 2048))
    return kw


def section_splits(quick: bool) -> None:
    """Split-KV counts against the plan's defaults: the end-to-end bench's decode steps (Llama-3.2-1B's
    D=64, 640 tokens of context, B=1/8/32/128, none and 2k int8 anchors), where anchors cost the engine
    most (D=64 at B=32 and 128, 1k of context), and where we trail FlashInfer (docs/attention.md: long
    contexts at B=1 and 8, anchors at B=8 and 64 with 8k of context). "v10 rule" is the plan before
    v11's short-context and anchor split rules. Graph-timed, us per call; every variant's output is
    compared with the default's (same math, other split points: within bf16 rounding). The earlier
    sweeps of stages, warps, register caps and sharing tiles are in results/attention_splits_*.json."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" else 4
    l8, l1 = (32, 8, 128), (32, 8, 64)  # Llama-3-8B, Llama-3.2-1B attention (H_q, H_kv, D)
    specs = [(1, 640, None, l1), (1, 640, "int8", l1), (8, 640, None, l1), (8, 640, "int8", l1),
             (32, 640, None, l1), (32, 640, "int8", l1), (128, 640, None, l1), (128, 640, "int8", l1),
             (32, 1024, "int8", l1), (128, 1024, "int8", l1),
             (1, 32768, None, l8), (8, 32768, None, l8), (1, 8192, "int8", l8),
             (8, 8192, "int8", l8), (64, 8192, "bf16", l8), (64, 8192, "int8", l8)]
    if DEV != "cuda":
        specs = [(1, 256, None, (8, 2, 64)), (2, 128, "int8", (8, 2, 64))]
    if BATCHES:  # --batches: only these batch sizes
        specs = [x for x in specs if x[0] in BATCHES]
    out = []
    for bsz, ctx, kind, (hq, hkv, d) in specs[:3] if quick else specs:
        if time_left() < 30:
            out.append({"B": bsz, "ctx": ctx, "anchors": kind, "d": d, "skipped": "budget"})
            continue
        k, v, bt, lens = paged(bsz, ctx, hkv, d, 16, dtype=BF)
        q = torch.randn(bsz, hq, d, dtype=BF, device=DEV)
        a = (None, None) if kind is None else anchor_set(1, 2048, hkv, d, 16, torch.zeros(bsz, device=DEV),
                                                          int8=kind == "int8", dtype=BF)
        plan = plan_decode(q, k, v, bt, lens, *a, check=False)
        s_default = plan.launch.constexprs["S_CTX"]
        variants = {"default": {}}
        if DEV == "cuda":
            variants["v10 rule"] = _v10_rule(bsz, ctx, hkv, kind, sms)
        variants.update({f"splits x{f}": {"num_splits": max(1, round(s_default * f))} for f in (0.5, 2)})
        if ctx <= 4096:  # short contexts: splits of fewer tokens
            variants.update({f"min chunk {c}": {"min_chunk": c} for c in (64, 128, 256)})
        if kind is not None:
            s_anc, tile = plan.launch.constexprs["S_ANC"], plan.launch.constexprs["TILE_SEQ"]
            variants.update({f"anchor splits x{f}": {"anchor_splits": max(1, round(s_anc * f))} for f in (0.5, 2)})
            variants.update({f"sharing tile {t}": {"seq_tile": t} for t in (tile // 2, tile * 2) if 1 <= t <= 32})
            if kind == "int8":
                variants["anchor items uncapped"] = {"max_registers": None}
            variants.update({f"merge {m}": {"merge": m} for m in ("fused", "apart")})
        o = torch.empty_like(q)
        want = paged_attention_decode(q, k, v, bt, lens, *a, check=False)
        row = {"B": bsz, "ctx": ctx, "anchors": kind, "hq": hq, "hkv": hkv, "d": d, "sms": sms,
               "default_splits": s_default, "us": {}, "max_diff": {}}
        for name, kw in variants.items():
            if time_left() < 10:
                row["us"][name] = "skipped: budget"
                continue
            try:
                p = plan_decode(q, k, v, bt, lens, *a, check=False, **kw)
                row["max_diff"][name] = float((p.run(q, k, v, a[0]) - want).abs().max())
                row["us"][name] = t_graph([lambda p=p, q=q, k=k, v=v, a=a, o=o: p.run(q, k, v, a[0], out=o)], 20)
            except Exception as e:  # e.g. a configuration over the shared memory: recorded, the sweep goes on
                row["us"][name] = _err(e)
        times = {n: t for n, t in row["us"].items() if isinstance(t, float)}
        row["best"] = min(times, key=times.get)
        row["best_vs_default"] = times[row["best"]] / times["default"]
        out.append(row)
        print(f"  splits D={d} B={bsz:>3} ctx={ctx:>6} anchors={kind} (S={s_default}): " + " | ".join(
            f"{n} {t:.1f}" if isinstance(t, float) else f"{n} failed" for n, t in row["us"].items())
            + f"  -> best {row['best']} ({row['best_vs_default']:.2f}x)", flush=True)
        RESULTS["splits"] = out
        flush()
        del k, v, bt, lens, q, a, plan
        if DEV == "cuda":
            torch.cuda.empty_cache()


def section_host(quick: bool) -> None:
    """Host cost of one decode call without a graph (B=1, 1k context, 2k anchors): one-shot vs planned."""
    hq, hkv, d, bs = 32, 8, 128, 16
    k, v, bt, lens = paged(1, 1024, hkv, d, bs, dtype=BF)
    q = torch.randn(1, hq, d, dtype=BF, device=DEV)
    o = torch.empty_like(q)
    n, reps = (200, 7) if DEV == "cuda" else (2, 1)  # the CPU (--smoke) only checks the section's logic
    r = {}
    for kind in ("none", "bf16", "int8"):
        a = (None, None) if kind == "none" else anchor_set(1, 2048, hkv, d, bs, torch.zeros(1, device=DEV),
                                                           int8=kind == "int8", dtype=BF)
        plan = plan_decode(q, k, v, bt, lens, *a, check=False)
        r[kind] = {"one_shot_us": host_cost(lambda a=a: paged_attention_decode(q, k, v, bt, lens, *a, check=False, out=o),
                                            n, reps),
                   "planned_us": host_cost(lambda a=a, p=plan: p.run(q, k, v, a[0], out=o), n, reps),
                   "gpu_us": t_graph([lambda a=a, p=plan: p.run(q, k, v, a[0], out=o)], 40)}
        want = paged_attention_decode(q, k, v, bt, lens, *a)
        r[kind]["planned_equals_one_shot"] = bool(torch.equal(plan.run(q, k, v, a[0]), want))
        r[kind]["planned_direct"] = plan.launch.direct or plan.launch.why_not_direct
        if plan.launch.direct:
            # The floor under any launch from Python: the compiled kernel's launcher, arguments ready.
            pl, c = plan.launch, plan.launch._compiled
            ready = pl._direct.copy()
            for i, t in zip(pl.slots, (q, k, v, *((k, v, q, q) if a[0] is None else (a[0].k, a[0].v, q, q)), o)):
                ready[i] = t.data_ptr()
            if kind == "int8":
                ready[pl.slots[5]], ready[pl.slots[6]] = a[0].k_scale.data_ptr(), a[0].v_exp.data_ptr()
            stream = torch.cuda.current_stream().cuda_stream
            r[kind]["launcher_only_us"] = host_cost(lambda: c.run(pl.grid[0], 1, 1, stream, c.function, c.packed_metadata,
                                                                  None, None, None, *ready), n, reps)
        print(f"  host cost {kind}: one-shot {r[kind]['one_shot_us']:.1f} us, planned {r[kind]['planned_us']:.1f} us "
              f"GPU {r[kind]['gpu_us']:.1f} us, direct: {r[kind]['planned_direct']} "
              f"(the launcher alone {r[kind].get('launcher_only_us', float('nan')):.1f} us), "
              f"planned == one-shot: {r[kind]['planned_equals_one_shot']}", flush=True)
    RESULTS["host"] = r
    flush()


SECTIONS = {"check": section_check, "tile": section_tile, "host": section_host, "splits": section_splits,
            "decode": section_decode, "shared": section_shared,
            "modes": section_modes, "prefill": section_prefill, "naive64k": section_naive64k,
            "prefill_tune": section_prefill_tune, "int8": section_int8, "flashinfer": section_flashinfer,
            "anchor_cost": section_anchor_cost}


def main() -> None:
    """Run the chosen sections and write the JSON results (after every section; flashinfer: every shape)."""
    global DEV, BF
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="check,decode,shared,modes,prefill,naive64k")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "attention_bench.json"))
    ap.add_argument("--batches", default="", help="decode and splits sections: only these batch sizes, e.g. 1,8 (decode default 1,8,64)")
    ap.add_argument("--budget", type=float, default=0.0,
                    help="seconds for the whole run (flashinfer section: shapes past it are skipped and recorded); 0 = none")
    ap.add_argument("--keep-going", action="store_true", help="a section that fails is recorded and the next one runs")
    ap.add_argument("--fi-status", default=None,
                    help="status file of a FlashInfer build running beside this run (--fi-build); FlashInfer is used once it is built")
    ap.add_argument("--fi-build", default=None, metavar="STATUS",
                    help="only compile FlashInfer's kernels (JIT), writing progress to STATUS, then exit")
    ap.add_argument("--fi-variants", default="fa2,fa3", help="with --fi-build: which FlashInfer variants to compile")
    ap.add_argument("--no-flashinfer", action="store_true", help="flashinfer section: ours only")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes; runs on the CPU too (TRITON_INTERPRET=1), to check the script's own logic")
    ap.add_argument("--baseline", default=None,
                    help="anchor_cost section: this bench's JSON from another build on the same machine, shown beside")
    args = ap.parse_args()
    if args.baseline:
        BASELINE.append(args.baseline)
    t_start = time.time()
    if args.budget > 0:
        DEADLINE[0] = t_start + args.budget
    if not torch.cuda.is_available():
        if not args.smoke:
            raise SystemExit("no GPU: only --smoke runs on the CPU")
        DEV = "cpu"
        BF = torch.float32  # the interpreter has no bf16 arithmetic: the smoke checks logic, not numbers
    if args.fi_build:
        fi_build(args.fi_build, tuple(v for v in args.fi_variants.split(",") if v))
        return
    BATCHES.extend(int(x) for x in args.batches.split(",") if x)
    FI_ARGS.update(smoke=args.smoke, status=args.fi_status, disabled=args.no_flashinfer)
    OUT_PATH.append(args.out)
    if DEV == "cuda":
        props = torch.cuda.get_device_properties(0)
        RESULTS["meta"] = dict(device=props.name, sms=props.multi_processor_count)
    else:
        RESULTS["meta"] = dict(device="cpu (smoke)", sms=0)
    # Paths as file names: where a run wrote its files says nothing about the run.
    recorded = {k: os.path.basename(v) if k in ("out", "baseline", "fi_status") and v else v for k, v in vars(args).items()}
    RESULTS["meta"].update(torch=torch.__version__, triton=triton.__version__, args=recorded,
                           date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    print(RESULTS["meta"], flush=True)
    flush()
    for name in args.only.split(","):
        t0 = time.time()
        try:
            SECTIONS[name](args.quick)
        except (Exception, SystemExit) as e:
            if not args.keep_going or name == "check":  # nothing is timed after a failed or broken check
                RESULTS.setdefault("errors", {})[name] = _err(e)
                flush()
                raise
            RESULTS.setdefault("errors", {})[name] = _err(e)
            print(f"section {name} failed: {_err(e)}", flush=True)
            if DEV == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        RESULTS.setdefault("section_seconds", {})[name] = time.time() - t0
        flush()
    RESULTS["total_seconds"] = time.time() - t_start
    flush()


if __name__ == "__main__":
    main()
