"""vLLM worker extension: join the weight-sync group inside each vLLM worker and load what arrives.

vLLM mixes `WeightSyncExtension` into its `Worker` class (`LLM(worker_extension_cls=...)`,
vllm/v1/worker/worker_base.py `init_worker`) and the engine reaches it with
`LLM.collective_rpc("cpe_...", args=...)`, once per worker (one per tensor-parallel rank).
vLLM refuses an extension attribute the Worker already has (`update_weights`, `sleep`, ...),
so every name here starts with `cpe_` / `_cpe_`. Arguments cross vLLM's msgpack channel, so
they are plain dicts, lists, str and bytes. From the Worker we use `self.rank` (the worker's
rank inside this vLLM instance, which is its TP rank because we run neither pipeline nor data
parallelism inside one LLM), `self.device` (its CUDA device) and
`self.model_runner.get_model()`. vLLM is not imported at module level, so this module imports,
and is tested, on a CPU.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterable
from typing import Any

import torch

from cpe_ray.weight_sync import (
    GroupSpec,
    Manifest,
    SyncGroup,
    WeightSyncError,
    dtype_from_name,
    dtype_name,
    open_cuda,
    receive_buckets,
    unpack,
)

MISSING_NAMES_SHOWN = 8  # enough to recognise a naming mismatch without flooding a log line


def gpu_uuid(device_index: int) -> str:
    """The GPU's UUID: the same in every process, unlike ordinals under CUDA_VISIBLE_DEVICES."""
    return str(torch.cuda.get_device_properties(device_index).uuid)


def encode_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> list[dict[str, Any]]:
    """Tensors as msgpack-safe dicts of raw bytes (vLLM's RPC channel does not rebuild tensors)."""
    entries = []
    for name, tensor in named:
        flat = tensor.detach().contiguous().cpu().reshape(-1)
        entries.append(
            {
                "name": name,
                "dtype": dtype_name(tensor.dtype),
                "shape": list(tensor.shape),
                # through uint8 because numpy has no bfloat16
                "data": flat.view(torch.uint8).numpy().tobytes(),
            }
        )
    return entries


def decode_tensor(entry: dict[str, Any], device: torch.device | str) -> tuple[str, torch.Tensor]:
    dtype = dtype_from_name(entry["dtype"])
    shape = tuple(entry["shape"])
    data = entry["data"]
    if not data:  # torch.frombuffer rejects an empty buffer
        return entry["name"], torch.empty(shape, dtype=dtype, device=device)
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # bytearray: writable copy
    return entry["name"], raw.view(dtype).reshape(shape).to(device)


class WeightSyncExtension:
    """Methods that vLLM adds to each worker; state lives in `_cpe_*` attributes set lazily,
    because vLLM never calls an extension's `__init__`."""

    # Provided by vLLM's Worker (or by a test's stand-in).
    rank: int
    device: torch.device
    model_runner: Any

    def cpe_join_weight_group(self, spec: dict[str, Any], first_rank: int) -> int:
        """Join the sync group as rank `first_rank + self.rank`; every peer must join now."""
        self.cpe_close_weight_group()
        group_spec = GroupSpec(**spec)
        # gloo moves CPU tensors: receive into host buffers, load_weights copies them to the GPU.
        device = self.device if group_spec.backend == "nccl" else torch.device("cpu")
        self._cpe_group = SyncGroup(group_spec, first_rank + self.rank, device=device)
        return self._cpe_group.rank

    def cpe_receive_weights(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Receive and load every bucket of `manifest` from rank 0; returns SyncStats as a dict."""
        group = getattr(self, "_cpe_group", None)
        if group is None:
            raise WeightSyncError(
                f"vLLM worker rank {self.rank} has no weight-sync group; join_weight_group first"
            )
        stats = receive_buckets(group, Manifest.from_dict(manifest), self._cpe_load)
        self._cpe_synchronize()
        return {"buckets": stats.buckets, "bytes": stats.bytes, "seconds": stats.seconds}

    def cpe_load_ipc(self, handles: dict[str, bytes], manifest_bucket: dict[str, Any]) -> int:
        """Load one packed bucket shared by CUDA IPC from a process on the same GPU.

        `handles` maps a GPU UUID to the pickled `share_cuda` handle of the bucket on that GPU
        (pickled by the engine because msgpack cannot carry torch types); each worker opens
        the one for its own GPU. Returns the number of tensors loaded.
        """
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        uuid = gpu_uuid(index)
        if uuid not in handles:
            raise WeightSyncError(
                f"vLLM worker rank {self.rank}: no IPC handle for its GPU {uuid} "
                f"(handles for {sorted(handles)}); the sender must share the bucket on every GPU"
            )
        bucket = Manifest.from_dict({"buckets": [manifest_bucket]}).buckets[0]
        flat = open_cuda(pickle.loads(handles[uuid]), index)
        self._cpe_load(unpack(bucket, flat[: bucket.nbytes]))
        # The copies must finish before the sender reuses or frees the shared memory.
        self._cpe_synchronize()
        del flat
        return len(bucket.tensors)

    def cpe_load_tensors(self, entries: list[dict[str, Any]]) -> int:
        """Load tensors sent inline as `encode_tensors` dicts (small models, the direct path)."""
        self._cpe_load([decode_tensor(entry, self.device) for entry in entries])
        self._cpe_synchronize()
        return len(entries)

    def cpe_begin_update(self) -> None:
        """Start recording which parameters get loaded (checked by `cpe_finish_update`)."""
        self._cpe_loaded: set[str] | None = set()
        self._cpe_tracked = True

    def cpe_finish_update(self) -> dict[str, Any]:
        """Report parameters not loaded since `cpe_begin_update`.

        After a level-2 sleep every parameter not loaded holds garbage, so the engine refuses
        to wake the KV cache then. Like vLLM's own loader (default_loader.py,
        track_weights_loading) this relies on `load_weights` returning the loaded names; a
        model that returns None is reported as untracked.
        """
        loaded = getattr(self, "_cpe_loaded", None) or set()
        tracked = getattr(self, "_cpe_tracked", False)
        names = {name for name, _ in self.model_runner.get_model().named_parameters()}
        missing = sorted(names - loaded) if tracked else []
        self._cpe_loaded, self._cpe_tracked = None, False
        return {
            "tracked": tracked,
            "total": len(names),
            "num_missing": len(missing),
            "missing": missing[:MISSING_NAMES_SHOWN],
        }

    def cpe_close_weight_group(self) -> None:
        group = getattr(self, "_cpe_group", None)
        self._cpe_group = None
        shutdown = getattr(getattr(group, "pg", None), "shutdown", None)
        if callable(shutdown):  # frees NCCL communicators now instead of at garbage collection
            with contextlib.suppress(Exception):  # the peer may already be gone; we are leaving
                shutdown()

    def destroy_worker_extension(self) -> None:
        """vLLM's shutdown hook for extensions (vllm/config/parallel.py, worker_extension_cls)."""
        self.cpe_close_weight_group()

    def cpe_named_shapes(self) -> dict[str, list[Any]]:
        """{name: [shape, dtype]} of the model's parameters, to debug manifest name mismatches."""
        model = self.model_runner.get_model()
        return {n: [list(p.shape), dtype_name(p.dtype)] for n, p in model.named_parameters()}

    def _cpe_load(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        model = self.model_runner.get_model()
        with self._cpe_config_context():
            loaded = model.load_weights(weights=weights)
        if getattr(self, "_cpe_loaded", None) is not None:
            if loaded is None:
                self._cpe_tracked = False
            else:
                self._cpe_loaded.update(loaded)

    def _cpe_config_context(self) -> contextlib.AbstractContextManager[Any]:
        # vLLM's own weight-transfer paths load under the current vLLM config (some layers
        # read it while loading); a stand-in worker without one needs no context.
        config = getattr(self, "vllm_config", None)
        if config is None:
            return contextlib.nullcontext()
        from vllm.config import set_current_vllm_config

        return set_current_vllm_config(config)

    def _cpe_synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
