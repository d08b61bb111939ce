#!/usr/bin/env bash
# The wheels the GPU machine lacks for `moe-cluster serve --no-ray` (the GPU check's serve_api section), downloaded
# into .whl/ for CPython 3.12 on manylinux x86_64: one version each (the project environment's), no dependency
# resolution (--no-deps), so the list below is the whole set. That machine has torch, triton, numpy, safetensors,
# httpx (with anyio, h11, idna, certifi), sentencepiece, prometheus-client and nvidia-ml-py, and no network. Left
# out: Ray (--no-ray) and llguidance (the server starts without it and refuses structured output). From the
# repository root:
#   bash benchmarks/gpu_wheels.sh      # then carry .whl with the GPU check (benchmarks/gpu_check.sh's header)
# PYTHON_VERSION=3.11 WHEEL_DIR=DIR: another interpreter's wheels, to try the set on a machine without 3.12.
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${WHEEL_DIR:-.whl}"
WHEELS=(
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0  # pydantic needs a newer one than torch may have brought
  starlette==1.10.0 uvicorn==0.55.0 click==8.5.1 httptools==0.9.0
  mistral-common==1.13.1
  # what mistral-common's modules import as the tokenizers load (its image and JSON-schema support, its requests)
  pydantic-extra-types==2.11.1 pycountry==26.2.16 pillow==13.0.0 tiktoken==0.14.0
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 attrs==26.1.0
  requests==2.34.2 urllib3==2.8.0 charset-normalizer==3.5.3
)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
mkdir -p "$dest"
for wheel in "${WHEELS[@]}"; do
  "${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
    --implementation cp "${platforms[@]}" -d "$dest" "$wheel"
done
du -ch "$dest"/*.whl | tail -1
