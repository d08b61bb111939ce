#!/usr/bin/env bash
# The GPU check in one command (sections and what each proves: benchmarks/gpu_check.py). From the repository root:
#   bash benchmarks/gpu_check.sh            # on a GPU: writes $OUT/gpu_check.json and gpu_check.log ($OUT or .)
#   bash benchmarks/gpu_check.sh --dry-run  # on CPU under the Triton interpreter with tiny shapes (a CI test runs it)
# Needs torch, triton, numpy, safetensors and pytest; $PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
mkdir -p "$out"
PYTHONUNBUFFERED=1 "${PYTHON:-python3}" benchmarks/gpu_check.py --out "$out/gpu_check.json" "$@" 2>&1 \
  | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
