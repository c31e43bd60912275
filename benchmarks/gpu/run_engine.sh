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
. benchmarks/gpu/env.sh gpu_state_engine.txt
rc=0
timeout -k 20 "${ENGINE_TIMEOUT:-300}" python3 benchmarks/engine_bench.py ${BENCH_ARGS:-} --out "$OUT/engine_bench.json" 2>&1 | tee "$OUT/engine_bench.log" || rc=1
timeout -k 20 "${E2E_TIMEOUT:-270}" python3 benchmarks/e2e_bench.py ${BENCH_ARGS:-} --out "$OUT/e2e_bench.json" 2>&1 | tee "$OUT/e2e_bench.log" || rc=1
python3 benchmarks/gpu/summarize.py engine "$OUT/engine_bench.json" "$OUT/e2e_bench.json" || rc=1
exit $rc
