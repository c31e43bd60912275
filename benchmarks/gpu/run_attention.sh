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
T0=$(date +%s)
QUICK=""
if [ "${1:-}" = "--quick" ]; then QUICK="--quick"; fi
BUDGET=${ATTN_BUDGET:-$([ -n "$QUICK" ] && echo 190 || echo 320)}
# --quick compiles FlashInfer's fa2 module only (decode and prefill share it); the full run adds fa3.
VARIANTS=${FI_VARIANTS:-$([ -n "$QUICK" ] && echo fa2 || echo fa2,fa3)}
TIMEOUT=${ATTN_TIMEOUT:-$((BUDGET + 50))}
BUILD_TIMEOUT=${FI_BUILD_TIMEOUT:-$BUDGET}
. benchmarks/gpu/env.sh gpu_state_attention.txt
# FlashInfer's JIT: its cache in /tmp, ninja from the Python environment, some cores left to the bench.
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
echo "nvcc: $(command -v nvcc || echo missing)  ninja: $(command -v ninja || echo missing)"
rc=0
timeout -k 20 "$TIMEOUT" python3 benchmarks/attention_bench.py --only "${ATTN_SECTIONS:-check,flashinfer}" $QUICK --keep-going \
  --budget "$BUDGET" --fi-status "$STATUS" --out "$OUT/attention_flashinfer.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/attention_flashinfer.log" || rc=1
if [ -f "$PIDF" ]; then kill "$(cat "$PIDF")" 2>/dev/null; fi
wait
rm -f "$PIDF"
tail -n 30 "$OUT/fi_build.log" 2>/dev/null | grep -v '^\s*$' | tail -n 8
python3 benchmarks/gpu/summarize.py attention "$OUT/attention_flashinfer.json" || rc=1
echo "total $(( $(date +%s) - T0 )) s"
exit $rc
