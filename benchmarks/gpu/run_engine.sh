#!/usr/bin/env bash
# The inference engine on the GPU, in one go (about 5-8 minutes on one H200): engine_bench.py (our
# forward vs HF transformers, anchors, compile/verify; Llama-3.2-1B and Llama-3-8B) then e2e_bench.py
# (generation with and without anchors, HF generate, the bandwidth floor, nano-vllm's protocol), then
# a short table of the headline ratios read back from both JSON files.
# Usage: OUT=<dir for json/logs> bash benchmarks/gpu/run_engine.sh   (wheels for missing packages in .whl/)
#   ENGINE_TIMEOUT / E2E_TIMEOUT (seconds, default 300 / 270) bound each script; both write their
#   JSON as they go, so a script cut short still leaves what it measured. BENCH_ARGS is passed to both
#   (BENCH_ARGS=--smoke: tiny configs on the CPU, to check the scripts and this summary anywhere).
set -u -o pipefail
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
fi
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,memory.used --format=csv | tee "$OUT/gpu_state_engine.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
rc=0
timeout -k 20 "${ENGINE_TIMEOUT:-300}" python3 benchmarks/engine_bench.py ${BENCH_ARGS:-} --out "$OUT/engine_bench.json" 2>&1 | tee "$OUT/engine_bench.log" || rc=1
timeout -k 20 "${E2E_TIMEOUT:-270}" python3 benchmarks/e2e_bench.py ${BENCH_ARGS:-} --out "$OUT/e2e_bench.json" 2>&1 | tee "$OUT/e2e_bench.log" || rc=1
python3 - "$OUT/engine_bench.json" "$OUT/e2e_bench.json" <<'EOF' || rc=1
import json, sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        print(f"{path}: no results ({e})")
        return {}


def f(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


eng, e2e = load(sys.argv[1]), load(sys.argv[2])
print("\n=== engine summary (x = ours / HF; anchors = with / without, 1.0 = no cost) ===")
for name, r in eng.get("models", {}).items():
    p = r.get("parity", {})
    print(f"{name}: parity max|dlogit| {f(p.get('max_abs_dlogit'), '.3g')} (logit std {f(p.get('logit_std'), '.3g')}), "
          f"top-1 {f(p.get('top1_agree'), '.0%')}")
    for n, row in r.get("prefill", {}).items():
        print(f"  prefill {n:>5}: {row['ours_tok_s']:>9.0f} tok/s  x{row['speedup_vs_hf']:.2f} vs HF  anchors {f(row['anchors_vs_none'])}")
    for b, row in r.get("decode", {}).items():
        print(f"  decode B={b:>3}: {row['ours_ms']:>7.2f} ms  x{row['speedup_vs_hf']:.2f} vs HF  anchors {row['anchors_vs_none']:.2f}"
              f"  (anchors x{row['anchors_speedup_vs_hf_prefix']:.2f} vs HF with them as a prefix)")
    a = r.get("anchors")
    if a:
        print(f"  anchor set {a['tokens']} tokens: compile {a['compile_s']:.2f} s, verify {a['verify_ms']:.1f} ms")
g = e2e.get("goals", {})
for b, row in e2e.get("anchors", {}).items():
    ok = row["anchors_vs_none"] >= g.get("anchors_vs_none", 0)
    print(f"e2e B={b:>3}: {row['none']['tok_s']:>8.0f} tok/s, anchors/none {row['anchors_vs_none']:.3f} (goal >= {g.get('anchors_vs_none')}: {'met' if ok else 'NOT met'})")
for b, row in e2e.get("hf", {}).items():
    ok = row["ours_vs_hf"] >= g.get("vs_hf", 0)
    print(f"e2e B={b:>3}: x{row['ours_vs_hf']:.2f} vs HF generate ({row['hf_tok_s']:.0f} tok/s) (goal >= {g.get('vs_hf')}: {'met' if ok else 'NOT met'})")
for label in ("none", "anchors"):
    fl = e2e.get("floor", {}).get(label)
    if fl:
        ok = fl["step_vs_floor"] <= g.get("step_vs_floor", 0)
        print(f"e2e B=1 decode ({label}): {fl['step_ms']:.3f} ms = x{fl['step_vs_floor']:.2f} the floor "
              f"(x{fl['step_vs_floor_copy']:.2f} at the measured copy bandwidth) (goal <= {g.get('step_vs_floor')}: {'met' if ok else 'NOT met'})")
pr = e2e.get("protocol")
if pr:
    print(f"e2e {pr['model']} protocol ({pr['requests']} requests): {pr['tok_s']:.0f} output tok/s; TTFT p50/p99 "
          f"{pr['ttft_ms_p50']:.0f}/{pr['ttft_ms_p99']:.0f} ms; ITL p50/p99 {f(pr['itl_ms_p50'])}/{f(pr['itl_ms_p99'])} ms")
EOF
exit $rc
