# The GPU image for cpe-ray: vLLM engines, DeepSpeed learners, Ray, wandb.
#
#   docker build -t <registry>/cpe-ray:0.1.0 .
#   docker push <registry>/cpe-ray:0.1.0        # then set docker.image in launch/cluster.yaml
#
# Versions (tests/test_launch.py checks them against pyproject.toml):
# - vLLM 0.33.0 is pyproject's `vllm` extra (cpe_ray/engines/vllm.py is written against it).
# - Its wheel metadata pins torch==2.14.0 and needs Python >=3.11,<3.15; torch 2.14.0's wheel
#   on PyPI is the CUDA 13.0 build (cuda-toolkit 13.0.3, nvidia-nccl-cu13), and vLLM's own
#   kernels are cu13 as well. Hence a CUDA 13.0 base; hosts need an NVIDIA driver >= 580.
#   The devel flavour brings nvcc, which DeepSpeed (fused Adam, ZeRO-offload's CPU Adam) and
#   FlashInfer use to JIT-compile their kernels on first use.
# - Ubuntu 24.04's Python is 3.12, inside both ranges.
# - Ray: match the version on the machine you run `ray up` / `ray job submit` from.
# The base tag is an assumption (NVIDIA publishes <cuda>-devel-ubuntu24.04 tags); any CUDA 13.x
# devel image with Python >= 3.11 works: docker build --build-arg CUDA_IMAGE=... .
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.14.0
ARG VLLM_VERSION=0.33.0
ARG DEEPSPEED_VERSION=0.19.8
ARG RAY_VERSION=2.60.0

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}

# python3-dev and build-essential: DeepSpeed's JIT kernels. openssh-client and rsync: the Ray
# cluster launcher runs its autoscaler inside the head's container and syncs files with rsync
# through `docker exec`.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-dev python3-venv build-essential git curl ca-certificates \
        openssh-client rsync sudo tini \
    && rm -rf /var/lib/apt/lists/*

# A virtual environment (Ubuntu's system Python is externally managed), also on the PATH of
# login shells: the cluster launcher runs `ray start` through `bash --login`.
RUN python3 -m venv "${VIRTUAL_ENV}" \
    && pip install --upgrade pip setuptools wheel packaging ninja \
    && echo 'export PATH=/opt/venv/bin:$PATH' > /etc/profile.d/cpe-ray-venv.sh

# 1. torch first (the version vLLM pins), 2. DeepSpeed built against it: it ships only an sdist
# whose build imports torch, and with build isolation pip would build it against another torch
# downloaded into a throwaway environment (launch/install.sh does the same on a CPU machine).
RUN pip install "torch==${TORCH_VERSION}"
RUN DS_BUILD_OPS=0 pip install --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}"
# 3. vLLM, Ray with its dashboard (the Jobs API), wandb, and boto3 for the autoscaler on AWS.
RUN pip install "vllm==${VLLM_VERSION}" "ray[default]==${RAY_VERSION}" wandb boto3

# 4. The project itself with the `vllm` extra; everything it needs is already there, so this
# layer is cheap to rebuild when the code changes. Jobs ship their own copy of the repository
# (ray job submit --working-dir .), which comes first on sys.path; this one serves `ray start`,
# tests (python -m pytest -q -m gpu) and interactive use.
WORKDIR /workspace/cpe-ray
COPY . /workspace/cpe-ray
RUN pip install -e ".[vllm]" \
    && python -c "import os; from importlib.metadata import version; \
want = {n: os.environ[n.upper() + '_VERSION'] for n in ('torch', 'vllm', 'deepspeed', 'ray')}; \
got = {n: version(n).split('+')[0] for n in want}; \
assert got == want, f'a later install replaced a pinned package: {got} != {want}'; \
print('cpe-ray image:', got)"

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["bash"]
