#!/usr/bin/env bash
# The GPU checks of a kernel or engine change, in one go (about 5 minutes on one H200): the engine
# check (our forward vs HF, CUDA graphs, kernels vs the torch path with bf16 and int8 anchors), the
# engine bench on Llama-3.2-1B (anchor compile/verify, decode) and the end-to-end bench without HF
# and the protocol section. With TESTS=1 first the kernel tests on the GPU (fp16/bf16/fp32 against
# the fp64 oracle, int8 anchors, plans): Triton compiles every case's kernels afresh, 30 cases took
# 200 s on the H200, so the whole file wants a call of its own (TEST_TIMEOUT, default 500 s).
# Usage: [TESTS=1] OUT=<dir> bash benchmarks/gpu/run_checks.sh      (wheels for missing packages in .whl/)
set -u -o pipefail
. benchmarks/gpu/env.sh
rc=0
if [ "${TESTS:-0}" = 1 ]; then
  timeout -k 10 "${TEST_TIMEOUT:-500}" python3 -m pytest -q -p no:cacheprovider tests/kernels 2>&1 | tail -n 25 | tee "$OUT/gpu_tests.log" || rc=1
fi
OUT_DIR="$OUT" timeout -k 10 "${CHECK_TIMEOUT:-120}" python3 benchmarks/gpu/check_engine.py 2>&1 | tail -n 30 | tee "$OUT/check_engine.log" || rc=1
timeout -k 10 "${ENGINE_TIMEOUT:-120}" python3 benchmarks/engine_bench.py --models llama-3.2-1b --out "$OUT/engine_bench.json" 2>&1 | tail -n 30 | tee "$OUT/engine_bench.log" || rc=1
timeout -k 10 "${E2E_TIMEOUT:-150}" python3 benchmarks/e2e_bench.py --skip hf,protocol --out "$OUT/e2e_bench.json" 2>&1 | tail -n 30 | tee "$OUT/e2e_bench.log" || rc=1
exit $rc
