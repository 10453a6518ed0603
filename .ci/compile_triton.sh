#!/usr/bin/env bash
# Ahead-of-time compile gate of every Triton kernel (no GPU): .ci/compile_triton.py compiles
# them (self, cross, self local-rows, SigLIP) for sm_80 / sm_90 / sm_75 and prints registers, spills, shared memory per variant;
# it fails on a compile error, on shared memory over the limit in the fallback config, and on
# new fallback-config spills (bf16 / fp16 / tf32). Twice:
#   1. under the CI venv's pinned triton (requirements.txt; installed here if the venv has
#      none yet, as .ci/run calls this before the test install): the "ci" matrix;
#   2. under triton 3.6.0 (what many GPU users have) in .venv-triton36 (triton + numpy only:
#      the kernel modules import no torch): the representative "subset" matrix.
# Results: build/triton_compile/triton-<version>.{json,md}. Both runs always go; exit 1 if either fails.
# Size (2026-12-03): ci 612 compiles (243 of them the local-rows / SigLIP kernels: 604 s wall on one
# process here, ~5 min with 2), subset 284 (80 of them new); the timeouts leave room for a loaded runner.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
out=build/triton_compile
mkdir -p "$out"
jobs="${FASTNTXENT_COMPILE_JOBS:-2}"
status=0

pin=$(grep -E '^triton==' requirements.txt | head -n 1)
[ -n "$pin" ] || { echo "requirements.txt pins no triton" >&2; exit 1; }
if ! python -c "import triton, sys; sys.exit(triton.__version__ != '${pin#triton==}')" 2>/dev/null; then
  echo "+ pip install $pin"
  python -m pip install -q "$pin"
fi
v=$(python -c "import triton; print(triton.__version__)")
echo "== Triton AOT compile gate, triton $v (CI venv)"
t0=$SECONDS
timeout 1800 python .ci/compile_triton.py --matrix ci --jobs "$jobs" --fail-on-config-spills \
  --json "$out/triton-$v.json" --markdown "$out/triton-$v.md" || status=1
echo "== triton $v gate: $((SECONDS - t0)) s"

t0=$SECONDS
venv36=.venv-triton36
if ! "$venv36/bin/python" -c "import triton, sys; sys.exit(triton.__version__ != '3.6.0')" 2>/dev/null; then
  echo "+ python3 -m venv $venv36 && pip install triton==3.6.0 'numpy<2.4'"
  rm -rf "$venv36"
  python3 -m venv "$venv36"
  "$venv36/bin/python" -m pip install -q triton==3.6.0 'numpy<2.4'
fi
echo "== Triton AOT compile gate, triton 3.6.0 ($venv36, ready in $((SECONDS - t0)) s)"
timeout 1200 "$venv36/bin/python" .ci/compile_triton.py --subset --jobs "$jobs" --fail-on-config-spills \
  --json "$out/triton-3.6.0.json" --markdown "$out/triton-3.6.0.md" || status=1
echo "== triton 3.6.0 gate (with the venv): $((SECONDS - t0)) s"
exit $status
