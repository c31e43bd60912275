#!/usr/bin/env bash
# Everything this area measures on the GPU, in one go: quant (identity + throughput), repro, commit.
# Usage: OUT=<dir for json/logs> bash benchmarks/gpu/run_all.sh [--quant-only]   (wheels for missing packages in .whl/)
#   --quant-only: quant_bench alone (identity, kernel, quantize + digest end to end), about 2 minutes.
set -u -o pipefail
quant_only=0
[ "${1:-}" = "--quant-only" ] && quant_only=1
. benchmarks/gpu/env.sh gpu_state.txt
python3 -c "import blake3, cryptography; print('blake3', blake3.__version__)"
rc=0
python3 benchmarks/quant_bench.py --out "$OUT/quant_bench.json" 2>&1 | tee "$OUT/quant_bench.log" || rc=1
if [ $quant_only = 1 ]; then
  echo "=== summary ==="; tail -n 12 "$OUT/quant_bench.log"
  exit $rc
fi
python3 benchmarks/repro_bench.py --out "$OUT/repro_bench.json" 2>&1 | tee "$OUT/repro_bench.log" || rc=1
python3 benchmarks/commit_bench.py --out "$OUT/commit_bench.json" 2>&1 | tee "$OUT/commit_bench.log" || rc=1
python3 benchmarks/commit_bench.py --graphs --repeats 5 --out "$OUT/commit_bench_graphs.json" 2>&1 | tee "$OUT/commit_bench_graphs.log" || rc=1
echo "=== summary ==="
tail -n 12 "$OUT/quant_bench.log"; tail -n 10 "$OUT/repro_bench.log"; tail -n 12 "$OUT/commit_bench.log"; tail -n 8 "$OUT/commit_bench_graphs.log"
exit $rc
