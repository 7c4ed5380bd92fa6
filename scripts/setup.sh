#!/usr/bin/env bash
# Set up a development environment on a fresh machine: .venv with torch 2.14.1 (CUDA 13.0 build, which
# also runs on CPU-only machines) and the build tools, then build the lowrank wheel (CUDA kernels too
# when nvcc is on the PATH) into dist/ and install it into .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q torch==2.14.1 "scikit-build-core>=0.10" ninja "cmake>=3.26" \
  nvidia-cutlass==4.2.0.0 numpy pytest tqdm matplotlib galore-torch==1.0 \
  safetensors==0.8.0 transformers==5.25.0 accelerate==1.15.0 hypothesis==6.170.27 gguf==0.19.0 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch; print('torch', torch.__version__)"
rm -rf dist
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
  .venv/bin/python -m pip wheel --no-build-isolation --no-deps . -w dist -Cbuild-dir=build/wheel 2>&1 \
  | grep -E "lowrank:|Created wheel|error|Error" || true
WHEEL=$(ls dist/lowrank-*.whl)
.venv/bin/python -m pip install -q --no-deps --force-reinstall "$WHEEL"
.venv/bin/python -c "import lowrank; print('lowrank', lowrank.__version__, 'CUDA kernels built:', lowrank.has_cuda_kernels() or 'no (or no CUDA torch)', '| wheel:', '$WHEEL')"
