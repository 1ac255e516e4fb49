"""Shared test setup: offline everything, and `gpu` tests skipped where CUDA is absent."""

from __future__ import annotations

import os

import pytest

# No test may reach a hub or a tracking server.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA (gpu marker); no GPU visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


LOCAL_RAY_CPUS = 4  # logical: two learner ranks, a rollout and a GRM actor on a 2-core box


@pytest.fixture(scope="module")
def local_ray():
    """A fresh single-node Ray for one test module (never an already running cluster)."""
    import ray

    ray.init(address="local", num_cpus=LOCAL_RAY_CPUS, include_dashboard=False,
             log_to_driver=False)
    yield ray
    ray.shutdown()


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Exit with pytest's status without the interpreter's finalisation. After every result
    was reported, finalising the C extensions left loaded (vLLM's in-process engine core,
    torch, DeepSpeed, Ray's core worker) once crashed a passing run with a segmentation fault
    (CI exit 139, 592 passed); what the tests found is pytest's status, so that is the exit."""
    if not _EXIT_STATUS:
        return
    import sys

    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT_STATUS[0])
