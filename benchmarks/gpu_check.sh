#!/usr/bin/env bash
# The GPU check in one command (sections and what each proves: benchmarks/gpu_check.py). From the repository root:
#   bash benchmarks/gpu_check.sh            # on a GPU: writes $OUT/gpu_check.json and gpu_check.log ($OUT or .)
#   bash benchmarks/gpu_check.sh --dry-run  # on CPU under the Triton interpreter with tiny shapes (a CI test runs it)
# Needs torch, triton, numpy, safetensors and pytest; the serve_api section also the server's packages, which the
# GPU machine lacks: they travel as wheels. $PYTHON picks the interpreter (default python3).
#
# On the lent GPU machine, in one call of at most 8 minutes (the run stops starting sections after --budget-s,
# default 420 s). First, here: `bash benchmarks/gpu_wheels.sh` (fills the git-ignored .whl/, ~27 MB). Then run,
# with carry [".whl"] and timeout_s 480 (kind nvidia-h200 to run Mixtral 8x7B at its full 32 layers):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && PYTHONPATH=/tmp/site bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
mkdir -p "$out"
PYTHONUNBUFFERED=1 "${PYTHON:-python3}" benchmarks/gpu_check.py --out "$out/gpu_check.json" "$@" 2>&1 \
  | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
