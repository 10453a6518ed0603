#!/usr/bin/env bash
# Compiles every standalone CUDA kernel source for sm_80 and sm_90 with -Xptxas -v, prints
# registers / shared memory / spills per kernel, and fails on a compile error or on any spill.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
if [ ! -x "$NVCC" ]; then
  echo "nvcc not found at $NVCC: CUDA kernels not compiled" >&2
  exit 1
fi
archs="${FASTNTXENT_CUDA_ARCHS:-80;90}"
gencode=()
for a in ${archs//;/ }; do gencode+=("-gencode=arch=compute_${a},code=sm_${a}"); done
status=0
out=$(mktemp -d)
for src in csrc/cuda/*.cu; do
  log="$out/$(basename "$src").log"
  if ! "$NVCC" -std=c++17 -O3 --use_fast_math -c "$src" -o "$out/$(basename "$src").o" "${gencode[@]}" \
      -Xptxas -v > "$log" 2>&1; then
    cat "$log"; echo "FAILED: $src" >&2; status=1; continue
  fi
  echo "== $src"
  # One line per kernel and architecture: name, registers, spills, shared memory.
  awk '/Compiling entry function/ { match($0, /_Z[^'"'"']*/); name = substr($0, RSTART, RLENGTH); split($0, p, "for "); arch = p[2] }
       /spill stores/ { spills = $5 + $9 }
       /Used [0-9]+ registers/ { smem = "?"; for (k = 2; k <= NF; k++) if ($k ~ /^smem/) smem = $(k - 2)
                                 printf "  %-9s regs %-4s smem %-6s spill-bytes %-4s %s\n", arch, $5, smem, spills, name; if (spills > 0) bad = 1 }
       END { exit bad }' "$log" | c++filt || status=1
  grep -q "spill stores" "$log" || { echo "no ptxas report for $src" >&2; status=1; }
done
exit $status
