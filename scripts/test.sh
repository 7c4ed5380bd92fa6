#!/usr/bin/env bash
# The test job (CI runs exactly this): set up, run the test suite, smoke-run the main job, then prove the
# stable-ABI claim: the same wheel, built against torch 2.14.1, installed beside torch 2.13.0+cpu in a
# second venv, passes the CPU test suite there too.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
WHEEL=$(ls dist/lowrank-*.whl)

echo "== tests (torch 2.14.1)"
LOWRANK_REQUIRE_GALORE_TORCH=1 .venv/bin/python -m pytest tests -q -p no:cacheprovider

echo "== main job smoke run (python -m lowrank.bench --quick)"
.venv/bin/python -m lowrank.bench --quick --device cpu --out build/bench-smoke

echo "== ABI check: the same wheel under torch 2.13.0+cpu"
if [ ! -x .venv-abi/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv-abi
fi
.venv-abi/bin/python -m pip install -q torch==2.13.0 numpy pytest \
  safetensors==0.8.0 transformers==5.25.0 accelerate==1.15.0 hypothesis==6.170.27 gguf==0.19.0 2>&1 | grep -v "^WARNING: Location" || true
.venv-abi/bin/python -m pip install -q --no-deps --force-reinstall "$WHEEL"
.venv-abi/bin/python -c "import torch, lowrank; print('torch', torch.__version__, '-> lowrank', lowrank.__version__, 'loaded')"
.venv-abi/bin/python -m pytest tests -q -p no:cacheprovider
