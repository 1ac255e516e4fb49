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


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Destroy, while the interpreter is whole, the native state tests leave in this process.

    A passing CI run once exited 139 after pytest's summary (592 passed; 1 run in 4), with no
    trace. It was not reproduced on a loaded 2-core box under `python -X faulthandler`: 0
    crashes in 20 exits after a local Ray (2.60.0), 8 after Ray + an in-process vLLM CPU
    engine (0.32.0) + weight-sync and DeepSpeed (0.19.8) gloo groups, 40 after gloo groups
    left half open (torch 2.13.0), and 6 pytest runs of the vLLM, weight-sync, HF engine and
    Ray pipeline modules without the os._exit this replaces. So finalisation is kept, with
    nothing native left for it: Ray's driver, if a test left it up (its atexit hook would run
    later), and objects only the cycle collector frees (gloo groups and their threads,
    engines, Ray handles), which finalisation would otherwise destroy while it tears modules
    down. An in-process vLLM engine core freezes the heap while it lives (`freeze_gc_heap`,
    vllm/v1/engine/core.py), hence the unfreeze. DeepSpeed only runs in Ray actors here.
    What Python cannot stop are Ray's C++ threads (its GCS client's io thread, gRPC's), which
    outlive ray.shutdown() until exit(): the first suspect if exit 139 comes back."""
    import gc
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    gc.unfreeze()
    gc.collect()
