#!/usr/bin/env bash
# Install cpe-ray into the active Python environment on a CPU machine.
#   bash launch/install.sh          # runtime
#   bash launch/install.sh --test   # runtime + test tools
# torch goes first: the CPU build this machine provides. DeepSpeed ships only an sdist whose
# build imports torch, so it is built against that torch (no build isolation); otherwise pip
# would fetch gigabytes of CUDA packages into its build environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
extra=""
[[ "${1:-}" == "--test" ]] && extra="[test]"
"$PY" -m pip install -q --upgrade pip setuptools wheel
"$PY" -m pip install -q "torch==${CPE_RAY_TORCH_VERSION:-2.13.0}"
DS_BUILD_OPS=0 "$PY" -m pip install -q --no-build-isolation "deepspeed>=0.16"
"$PY" -m pip install -q -e ".${extra}"
"$PY" -c "import torch, deepspeed, ray, transformers, cpe_ray; print('cpe-ray installed: torch', torch.__version__, '| ray', ray.__version__, '| deepspeed', deepspeed.__version__)"
