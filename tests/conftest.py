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
