#!/usr/bin/env bash
# Our PagedFieldprintAttention vs FlashInfer 0.5.3 on the GPU (issue 11), in one go: about 6 minutes
# on one H200 (--quick: about 4). FlashInfer compiles its kernels with nvcc on first use (its wheel
# ships sources, no prebuilt kernels), so that build runs in the background (attention_bench.py
# --fi-build) while our correctness check runs; the bench uses FlashInfer only once the build reports
# it done, re-measures the shapes it met before, and marks FlashInfer unavailable if the build fails
# or runs out of time. Then a short table read back from the JSON.
# Usage: OUT=<dir for json/logs> bash benchmarks/gpu/run_attention.sh [--quick]   (wheels in .whl/)
#   ATTN_BUDGET (s, default 320; --quick 190): the bench's own budget, shapes past it are skipped and
#   recorded; ATTN_TIMEOUT (default budget + 50) kills it; FI_BUILD_TIMEOUT (default = the budget)
#   bounds FlashInfer's build. ATTN_SECTIONS (default check,flashinfer); BENCH_ARGS is passed to the
#   bench (BENCH_ARGS=--smoke ATTN_SECTIONS=flashinfer: tiny shapes, runs on the CPU with
#   TRITON_INTERPRET=1, to check the script and this summary anywhere).
set -u -o pipefail
export PYTHONUNBUFFERED=1
T0=$(date +%s)
QUICK=""
if [ "${1:-}" = "--quick" ]; then QUICK="--quick"; fi
BUDGET=${ATTN_BUDGET:-$([ -n "$QUICK" ] && echo 190 || echo 320)}
# --quick compiles FlashInfer's fa2 module only (decode and prefill share it); the full run adds fa3.
VARIANTS=${FI_VARIANTS:-$([ -n "$QUICK" ] && echo fa2 || echo fa2,fa3)}
TIMEOUT=${ATTN_TIMEOUT:-$((BUDGET + 50))}
BUILD_TIMEOUT=${FI_BUILD_TIMEOUT:-$BUDGET}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
fi
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
# FlashInfer's JIT: its cache in /tmp, ninja from the Python environment, some cores left to the bench;
# the build starts first, the GPU state and versions print while it runs.
export FLASHINFER_WORKSPACE_BASE=${FLASHINFER_WORKSPACE_BASE:-/tmp/fi_ws}
export MAX_JOBS=${MAX_JOBS:-12}
PATH="$(python3 -c 'import os, sys; print(os.path.dirname(sys.executable))'):$PATH"
export PATH
STATUS="$OUT/fi_build_status.json"
PIDF="/tmp/fi_build.$$.pid"
rm -f "$STATUS" "$PIDF"
(
  timeout -k 10 "$BUILD_TIMEOUT" python3 benchmarks/attention_bench.py --fi-build "$STATUS" --fi-variants "$VARIANTS" ${BENCH_ARGS:-} >"$OUT/fi_build.log" 2>&1 &
  echo $! >"$PIDF"
  wait $!
  brc=$?
  # A build that timed out or crashed: mark it done, so that the bench stops waiting for it.
  python3 - "$STATUS" "$brc" "$VARIANTS" <<'PY'
import json, os, sys
path, rc = sys.argv[1], int(sys.argv[2])
try:
    with open(path) as f:
        st = json.load(f)
except (OSError, ValueError):
    st = {"steps": {}}
if not st.get("done"):
    for v in sys.argv[3].split(","):
        st.setdefault("steps", {}).setdefault(v, {"ok": False, "error": f"build ended with exit status {rc} (124: timed out)"})
    st["done"] = True
    st["exit_status"] = rc
    with open(path + ".tmp", "w") as f:
        json.dump(st, f, indent=1)
    os.replace(path + ".tmp", path)
PY
  echo "FlashInfer build finished (exit status $brc) after $(( $(date +%s) - T0 )) s"
) &
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,memory.used --format=csv 2>&1 | tee "$OUT/gpu_state_attention.txt"
echo "nvcc: $(command -v nvcc || echo missing)  ninja: $(command -v ninja || echo missing)  nproc: $(nproc)"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
rc=0
timeout -k 20 "$TIMEOUT" python3 benchmarks/attention_bench.py --only "${ATTN_SECTIONS:-check,flashinfer}" $QUICK --keep-going \
  --budget "$BUDGET" --fi-status "$STATUS" --out "$OUT/attention_flashinfer.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/attention_flashinfer.log" || rc=1
if [ -f "$PIDF" ]; then kill "$(cat "$PIDF")" 2>/dev/null; fi
wait
rm -f "$PIDF"
tail -n 30 "$OUT/fi_build.log" 2>/dev/null | grep -v '^\s*$' | tail -n 8
python3 - "$OUT/attention_flashinfer.json" <<'EOF' || rc=1
import json, sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        print(f"{path}: no results ({e})")
        return {}


def f(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


res = load(sys.argv[1])
chk = res.get("check", {})
print(f"\n=== ours vs FlashInfer {res.get('flashinfer', {}).get('version', '(not loaded)')} on {res.get('meta', {}).get('device')}"
      f" (ratio = ours time / FlashInfer time, lower is better) ===")
print(f"correctness check: all ok {chk.get('all_ok')}, worst relerr {f(chk.get('worst'), '.1e')}; section errors: {res.get('errors', {})}")
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
EOF
echo "total $(( $(date +%s) - T0 )) s"
exit $rc
