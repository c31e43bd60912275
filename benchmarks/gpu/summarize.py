"""The short tables the GPU scripts print last, read back from their JSON results.

    python benchmarks/gpu/summarize.py engine ENGINE_JSON E2E_JSON     (benchmarks/gpu/run_engine.sh)
    python benchmarks/gpu/summarize.py attention ATTENTION_JSON        (benchmarks/gpu/run_attention.sh)
"""

from __future__ import annotations

import json
import sys


def load(path: str) -> dict:
    """A results file, or {} (and a line saying why) when it is missing or cut short."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        print(f"{path}: no results ({e})")
        return {}


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def engine(engine_json: str, e2e_json: str) -> None:
    """The headline ratios of engine_bench.py and e2e_bench.py."""

    def f(x, spec=".2f"):
        return fmt(x, spec)

    eng, e2e = load(engine_json), load(e2e_json)
    print("\n=== engine summary (x = ours / HF; anchors = with / without, 1.0 = no cost) ===")
    for name, r in eng.get("models", {}).items():
        p = r.get("parity", {})
        print(f"{name}: parity max|dlogit| {f(p.get('max_abs_dlogit'), '.3g')} (logit std {f(p.get('logit_std'), '.3g')}), "
              f"top-1 {f(p.get('top1_agree'), '.0%')}")
        for n, row in r.get("prefill", {}).items():
            print(f"  prefill {n:>5}: {row['ours_tok_s']:>9.0f} tok/s  x{row['speedup_vs_hf']:.2f} vs HF  "
                  f"anchors {f(row['anchors_vs_none'])}")
        for b, row in r.get("decode", {}).items():
            print(f"  decode B={b:>3}: {row['ours_ms']:>7.2f} ms  x{row['speedup_vs_hf']:.2f} vs HF  anchors {row['anchors_vs_none']:.2f}"
                  f"  (anchors x{row['anchors_speedup_vs_hf_prefix']:.2f} vs HF with them as a prefix)")
        a = r.get("anchors")
        if a:
            print(f"  anchor set {a['tokens']} tokens: compile {a['compile_s']:.2f} s, verify {a['verify_ms']:.1f} ms")
    g = e2e.get("goals", {})
    for b, row in e2e.get("anchors", {}).items():
        ok = row["anchors_vs_none"] >= g.get("anchors_vs_none", 0)
        print(f"e2e B={b:>3}: {row['none']['tok_s']:>8.0f} tok/s, anchors/none {row['anchors_vs_none']:.3f} "
              f"(goal >= {g.get('anchors_vs_none')}: {'met' if ok else 'NOT met'})")
    for b, row in e2e.get("overlap", {}).items():
        print(f"e2e B={b:>3}: overlapped steps / in order {row['overlap_vs_in_order']:.3f} "
              f"(decode step p50 {row['in_order']['decode_step_ms_p50']:.3f} -> {row['overlap']['decode_step_ms_p50']:.3f} ms)")
    for b, row in e2e.get("hf", {}).items():
        ok = row["ours_vs_hf"] >= g.get("vs_hf", 0)
        print(f"e2e B={b:>3}: x{row['ours_vs_hf']:.2f} vs HF generate ({row['hf_tok_s']:.0f} tok/s) "
              f"(goal >= {g.get('vs_hf')}: {'met' if ok else 'NOT met'})")
    for label in ("none", "anchors"):
        fl = e2e.get("floor", {}).get(label)
        if fl:
            ok = fl["step_vs_floor"] <= g.get("step_vs_floor", 0)
            print(f"e2e B=1 decode ({label}): {fl['step_ms']:.3f} ms = x{fl['step_vs_floor']:.2f} the floor "
                  f"(x{fl['step_vs_floor_copy']:.2f} at the measured copy bandwidth) "
                  f"(goal <= {g.get('step_vs_floor')}: {'met' if ok else 'NOT met'})")
    pr = e2e.get("protocol")
    if pr:
        print(f"e2e {pr['model']} protocol ({pr['requests']} requests): {pr['tok_s']:.0f} output tok/s; TTFT p50/p99 "
              f"{pr['ttft_ms_p50']:.0f}/{pr['ttft_ms_p99']:.0f} ms; ITL p50/p99 {f(pr['itl_ms_p50'])}/{f(pr['itl_ms_p99'])} ms")


def attention(attention_json: str) -> None:
    """Ours vs FlashInfer, per shape, from attention_bench.py --only flashinfer."""

    def f(x, spec=".1f"):
        return fmt(x, spec)

    res = load(attention_json)
    chk = res.get("check", {})
    print(f"\n=== ours vs FlashInfer {res.get('flashinfer', {}).get('version', '(not loaded)')} on {res.get('meta', {}).get('device')}"
          f" (ratio = ours time / FlashInfer time, lower is better) ===")
    print(f"correctness check: all ok {chk.get('all_ok')}, worst relerr {f(chk.get('worst'), '.1e')}; "
          f"section errors: {res.get('errors', {})}")
    fi = res.get("flashinfer", {})
    b = fi.get("build")
    if isinstance(b, dict):
        print("FlashInfer build:", {k: (v.get("ok"), v.get("s"), (v.get("error") or "")[:160]) for k, v in b.get("steps", {}).items()})
    print(f"{'B':>4}{'ctx':>8}{'page':>5}{'anchors':>10}  {'ours us':>9}{'FI us':>9}{'ratio':>7}  {'ours ev':>9}{'FI ev':>9}{'ratio':>7}"
          f"  {'max|d| vs FI':>12}")
    for r in fi.get("decode", []):
        if "error" in r:
            print(f"{r['B']:>4}{r['ctx']:>8}{r['page']:>5}  error {r['error'][:120]}")
            continue
        for name in ("none", "bf16", "int8"):
            x = r.get(name, {})
            fb = r.get("bf16", {}) if name == "int8" else x
            label = "0" if name == "none" else f"{r['anchors']} {name}"
            print(f"{r['B']:>4}{r['ctx']:>8}{r['page']:>5}{label:>10}  {f(x.get('ours_us')):>9}{f(fb.get('fi_us')):>9}"
                  f"{f(x.get('ratio', x.get('ratio_vs_fi_bf16')), '.2f'):>7}  {f(x.get('ours_ev_us')):>9}{f(fb.get('fi_ev_us')):>9}"
                  f"{f(x.get('ratio_ev', x.get('ratio_ev_vs_fi_bf16')), '.2f'):>7}"
                  f"  {f(x.get('maxdiff_vs_fi', x.get('maxdiff_vs_fi_dequant')), '.1e'):>12}"
                  + ("" if r.get("fi") == "ok" or name != "none" else f"  FI {r.get('fi')}"[:90]))
    for r in fi.get("prefill", []):
        if "error" in r:
            print(f"prefill N={r['N']} page={r['page']}: error {r['error'][:120]}")
            continue
        print(f"prefill N={r['N']:>6} page={r['page']:>3} +{r['anchors']} anchors: ours {f(r.get('ours_TFLOPs'), '.0f')} TFLOP/s;"
              f" FI fa2 {f(r.get('fa2_TFLOPs'), '.0f')} (ratio {f(r.get('ratio_fa2'), '.2f')});"
              f" FI fa3 {f(r.get('fa3_TFLOPs'), '.0f')} (ratio {f(r.get('ratio_fa3'), '.2f')})")
    h = fi.get("host_cost")
    if h:
        print(f"host cost per decode call, no graph (B={h['B']}, ctx={h['ctx']}, {h['calls']} calls): ours {f(h.get('ours_us'))} us"
              f" (2k anchors {f(h.get('ours_anchors_us'))}), FI {f(h.get('fi_us'))} us (anchors {f(h.get('fi_anchors_us'))});"
              f" ratio {f(h.get('ratio'), '.2f')}; planned (plan once, run per call) ours {f(h.get('ours_plan_us'))} us"
              f" (anchors {f(h.get('ours_plan_anchors_us'))}), ratio {f(h.get('ratio_plan'), '.2f')};"
              f" GPU time ours {f(h.get('ours_gpu_us'))} FI {f(h.get('fi_gpu_us'))} us")
    if fi.get("skipped"):
        print("skipped:", ", ".join(f"{s['kind']} " + " ".join(f"{k}={v}" for k, v in s.items() if k != "kind") for s in fi["skipped"]))
    print(f"section seconds: {res.get('section_seconds')}")


if __name__ == "__main__":
    {"engine": engine, "attention": attention}[sys.argv[1]](*sys.argv[2:])
