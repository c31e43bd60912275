# Sourced by the run_*.sh scripts: packages the GPU machine lacks from the wheels in .whl/ (if any),
# the output folder $OUT (default benchmarks/results), and the GPU's state and the versions, printed
# (and kept in $OUT/$1 when a file name is given).
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
fi
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,memory.used --format=csv
  df -h /dev/shm; nproc
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$([ -n "${1:-}" ] && echo "$OUT/$1" || echo /dev/null)"
