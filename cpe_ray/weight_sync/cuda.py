"""Device helpers of weight sync: CUDA IPC handles for a learner and an engine sharing a GPU,
GPU identities that hold across processes, and waiting for a device's copies to finish."""

from __future__ import annotations

from typing import Any

import torch


def share_cuda(tensor: torch.Tensor) -> tuple[Any, ...]:
    """A picklable CUDA IPC handle for `tensor` (the owner must keep it alive until used)."""
    from torch.multiprocessing.reductions import reduce_tensor

    return reduce_tensor(tensor)


def open_cuda(handle: tuple[Any, ...], device_index: int) -> torch.Tensor:
    """Rebuild a tensor from `share_cuda`'s handle in another process on the same GPU."""
    rebuild, args = handle
    args = list(args)
    args[6] = device_index  # the sender's device ordinal can differ under CUDA_VISIBLE_DEVICES
    return rebuild(*args)


def gpu_uuid(device_index: int) -> str:
    """The GPU's UUID: the same in every process, unlike ordinals under CUDA_VISIBLE_DEVICES."""
    return str(torch.cuda.get_device_properties(device_index).uuid)


def cuda_index(device: torch.device) -> int:
    """The ordinal of a CUDA `device`; a bare "cuda" means the current one."""
    return device.index if device.index is not None else torch.cuda.current_device()


def synchronize(device: torch.device) -> None:
    """Wait for `device`'s queued copies (a no-op off CUDA): a sender may reuse the memory
    they read from once this returns."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
