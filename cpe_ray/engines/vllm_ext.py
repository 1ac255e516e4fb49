"""vLLM worker extension: join the weight-sync group inside each vLLM worker and load what arrives.

vLLM mixes `WeightSyncExtension` into its `Worker` class (`LLM(worker_extension_cls=...)`,
vllm/v1/worker/worker_base.py `init_worker`) and the engine reaches it with
`LLM.collective_rpc("cpe_...", args=...)`, once per worker (one per tensor-parallel rank).
vLLM refuses an extension attribute the Worker already has (`update_weights`, `sleep`, ...),
so every name here starts with `cpe_` / `_cpe_`. Arguments cross vLLM's msgpack channel, so
they are plain dicts, lists, str and bytes. From the Worker we use `self.rank` (the worker's
rank inside this vLLM instance, which is its TP rank because we run neither pipeline nor data
parallelism inside one LLM), `self.device` (its CUDA device), `self.model_runner` and
`self.vllm_config`. Each method is one RPC: the transport is weight_sync/ (the sync group,
the codec, CUDA IPC), the load is vLLM's layerwise reload (vllm_reload.py).
"""

from __future__ import annotations

import pickle
from typing import Any

import torch

from cpe_ray.engines.adapters import write_adapter
from cpe_ray.engines.vllm_reload import LayerwiseLoader
from cpe_ray.weight_sync.codec import (
    Manifest,
    WeightSyncError,
    decode_tensor,
    dtype_name,
    unpack,
)
from cpe_ray.weight_sync.cuda import cuda_index, gpu_uuid, open_cuda, synchronize
from cpe_ray.weight_sync.group import GroupSpec, SyncGroup, receive_buckets


class WeightSyncExtension:
    """Methods that vLLM adds to each worker; state lives in `_cpe_*` attributes set lazily,
    because vLLM never calls an extension's `__init__`."""

    # Provided by vLLM's Worker.
    rank: int
    device: torch.device
    model_runner: Any
    vllm_config: Any

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
        loader = self._cpe_loader()
        stats = receive_buckets(self._cpe_sync_group(), Manifest.from_dict(manifest),
                                loader.load_borrowed)
        synchronize(self.device)
        return {"buckets": stats.buckets, "bytes": stats.bytes, "seconds": stats.seconds}

    def cpe_receive_adapter(self, manifest: dict[str, Any], path: str) -> dict[str, Any]:
        """Receive a LoRA adapter's buckets; rank 0 writes the adapter to folder `path` (on
        tmpfs, on this node), from which the engine then loads it. The base is not touched."""
        received: list[tuple[str, torch.Tensor]] = []
        plan = Manifest.from_dict(manifest)
        stats = receive_buckets(self._cpe_sync_group(), plan, lambda named: received.extend(
            (n, t.clone()) for n, t in named))  # views into the staging buffers
        if self.rank == 0:
            write_adapter(path, manifest["adapter"], received)
        return {"buckets": stats.buckets, "bytes": stats.bytes, "seconds": stats.seconds}

    def cpe_load_ipc(self, handles: dict[str, bytes], manifest_bucket: dict[str, Any]) -> int:
        """Load one packed bucket shared by CUDA IPC from a process on the same GPU.

        `handles` maps a GPU UUID to the pickled `share_cuda` handle of the bucket on that GPU
        (pickled by the engine because msgpack cannot carry torch types); each worker opens
        the one for its own GPU. Returns the number of tensors loaded.
        """
        index = cuda_index(self.device)
        uuid = gpu_uuid(index)
        if uuid not in handles:
            raise WeightSyncError(
                f"vLLM worker rank {self.rank}: no IPC handle for its GPU {uuid} "
                f"(handles for {sorted(handles)}); the sender must share the bucket on every GPU"
            )
        bucket = Manifest.from_dict({"buckets": [manifest_bucket]}).buckets[0]
        flat = open_cuda(pickle.loads(handles[uuid]), index)
        self._cpe_loader().load_borrowed(unpack(bucket, flat[: bucket.nbytes]))
        # The copies must finish before the sender reuses or frees the shared memory.
        synchronize(self.device)
        del flat
        return len(bucket.tensors)

    def cpe_load_tensors(self, entries: list[dict[str, Any]]) -> int:
        """Load tensors sent inline as `encode_tensors` dicts (small models, the direct path)."""
        self._cpe_loader().load([decode_tensor(entry, self.device) for entry in entries])
        synchronize(self.device)
        return len(entries)

    def cpe_begin_update(self) -> None:
        """Open vLLM's layerwise reload and start recording which parameters get loaded."""
        self._cpe_loader().begin()

    def cpe_finish_update(self) -> dict[str, Any]:
        """Close the reload; report the parameters not loaded since `cpe_begin_update`."""
        return self._cpe_loader().finish()

    def cpe_close_weight_group(self) -> None:
        group = getattr(self, "_cpe_group", None)
        self._cpe_group = None
        if group is not None:
            group.close()

    def destroy_worker_extension(self) -> None:
        """vLLM's shutdown hook for extensions (vllm/config/parallel.py, worker_extension_cls)."""
        self.cpe_close_weight_group()

    def cpe_named_shapes(self) -> dict[str, list[Any]]:
        """{name: [shape, dtype]} of the model's parameters, to debug manifest name mismatches."""
        model = self.model_runner.get_model()
        return {n: [list(p.shape), dtype_name(p.dtype)] for n, p in model.named_parameters()}

    def _cpe_sync_group(self) -> SyncGroup:
        group = getattr(self, "_cpe_group", None)
        if group is None:
            raise WeightSyncError(
                f"vLLM worker rank {self.rank} has no weight-sync group; join_weight_group first"
            )
        return group

    def _cpe_loader(self) -> LayerwiseLoader:
        loader = getattr(self, "_cpe_layerwise", None)
        if loader is None:
            loader = self._cpe_layerwise = LayerwiseLoader(
                self.rank, self.model_runner, self.vllm_config)
        return loader
