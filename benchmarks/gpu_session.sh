#!/usr/bin/env bash
# One call on a lent GPU machine (see ../shared/GPU.md): build, test on CUDA, benchmark.
#   run: bash benchmarks/gpu_session.sh       (writes everything under $OUT)
# Then copy $OUT/results/* into benchmarks/results/ and commit.
set -uo pipefail
OUT="${OUT:-/tmp/fastntxent-gpu}"
mkdir -p "$OUT/results"
export PYTHONUNBUFFERED=1 CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" FASTNTXENT_CUDA_ARCHS="${FASTNTXENT_CUDA_ARCHS:-90}" MAX_JOBS=16
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "== build"; time python setup.py build_ext --inplace 2>&1 | tail -n 3
  python -c "import fastntxent._extension as e; print('cpu kernels', e.has_cpu_kernels(), 'cuda kernels', e.has_cuda_kernels())"
  echo "== tests"; timeout 240 python -m pytest -x -q tests/ 2>&1 | tail -n 25
  echo "== benchmark"
  timeout 300 python benchmarks/run.py --device cuda --sizes 8192 32768 131072 --dims 128 256 --dtypes bf16 \
    --out "$OUT/results/$(python -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "_"))').csv"
  cat "$OUT"/results/*.md
} 2>&1 | tee "$OUT/log"
