"""vLLM worker extension: join the weight-sync group inside each vLLM worker and load what arrives.

vLLM mixes `WeightSyncExtension` into its `Worker` class (`LLM(worker_extension_cls=...)`,
vllm/v1/worker/worker_base.py `init_worker`) and the engine reaches it with
`LLM.collective_rpc("cpe_...", args=...)`, once per worker (one per tensor-parallel rank).
vLLM refuses an extension attribute the Worker already has (`update_weights`, `sleep`, ...),
so every name here starts with `cpe_` / `_cpe_`. Arguments cross vLLM's msgpack channel, so
they are plain dicts, lists, str and bytes. From the Worker we use `self.rank` (the worker's
rank inside this vLLM instance, which is its TP rank because we run neither pipeline nor data
parallelism inside one LLM), `self.device` (its CUDA device) and
`self.model_runner.get_model()`.

Loading goes through vLLM's own in-place reload (vllm/model_executor/model_loader/reload/):
`cpe_begin_update` opens it (`initialize_layerwise_reload`: each layer gets back its
checkpoint-format parameters and defers its post-load processing), every transport's
tensors then go to `model.load_weights` in checkpoint names (a layer is processed, e.g.
repacked for the CPU kernels or quantized, as soon as all its tensors have arrived), and
`cpe_finish_update` closes it (`finalize_layerwise_reload`) and resets what vLLM's
`reload_weights` resets. A raw `load_weights` without it writes into parameters that a layer
repacked and freed after the first load ("parameter torch.Size([0])"). vLLM's one-shot
`model_runner.reload_weights(weights_iterator=...)` is the same three calls in one; ours spans
several RPCs (one per bucket or chunk), so the update is opened and closed around them.
vLLM is imported only inside the methods, so this module imports on any machine.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterable
from typing import Any

import torch

from cpe_ray.weight_sync.codec import (
    GroupSpec,
    Manifest,
    SyncGroup,
    WeightSyncError,
    dtype_from_name,
    dtype_name,
    gpu_uuid,
    open_cuda,
    receive_buckets,
    unpack,
)

MISSING_NAMES_SHOWN = 8  # enough to recognise a naming mismatch without flooding a log line


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
        group = getattr(self, "_cpe_group", None)
        if group is None:
            raise WeightSyncError(
                f"vLLM worker rank {self.rank} has no weight-sync group; join_weight_group first"
            )
        stats = receive_buckets(group, Manifest.from_dict(manifest), self._cpe_load_borrowed)
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
        self._cpe_load_borrowed(unpack(bucket, flat[: bucket.nbytes]))
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
        """Open vLLM's layerwise reload and start recording which parameters get loaded."""
        self._cpe_open_reload()
        self._cpe_reloading = True
        self._cpe_loaded: set[str] | None = set()
        self._cpe_tracked = True

    def cpe_finish_update(self) -> dict[str, Any]:
        """Report parameters not loaded since `cpe_begin_update`.

        After a level-2 sleep every parameter not loaded holds garbage, so the engine refuses
        to wake the KV cache then. Like vLLM's own loader (default_loader.py,
        track_weights_loading) this relies on `load_weights` returning the loaded names; a
        model that returns None is reported as untracked.
        """
        model = self.model_runner.get_model()
        if getattr(self, "_cpe_reloading", False):
            self._cpe_close_reload()
            self._cpe_reloading = False
        loaded = getattr(self, "_cpe_loaded", None) or set()
        tracked = getattr(self, "_cpe_tracked", False)
        names = {name for name, _ in model.named_parameters()}
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

    def _cpe_load_borrowed(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        """Load views into memory the caller reuses (a receive buffer, a peer's IPC bucket).

        vLLM's layerwise reload keeps each tensor until its layer is whole, and a layer can
        span two buckets: without the copies the next bucket overwrote the pending half of
        a layer (0.03 nats off on the tiny model). A copy lives until its layer is done."""
        self._cpe_load([(name, tensor.clone()) for name, tensor in weights])

    def _cpe_load(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        if not getattr(self, "_cpe_reloading", False):
            raise WeightSyncError(
                f"vLLM worker rank {self.rank}: weights arrived outside an update; the engine "
                "brackets every load with cpe_begin_update / cpe_finish_update")
        model = self.model_runner.get_model()
        with self._cpe_config_context():
            loaded = model.load_weights(weights=weights)
        if getattr(self, "_cpe_loaded", None) is not None:
            if loaded is None:
                self._cpe_tracked = False
            else:
                self._cpe_loaded.update(loaded)

    def _cpe_open_reload(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        # An update left open by a failed one stays open: layers not yet whole keep waiting
        # for their tensors (initialize skips layers already reloading).
        with self._cpe_config_context():
            initialize_layerwise_reload(self.model_runner.get_model())

    def _cpe_close_reload(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        with self._cpe_config_context():
            finalize_layerwise_reload(self.model_runner.get_model(),
                                      self.vllm_config.model_config)
        self._cpe_reprocess_tied()
        # what vLLM's reload_weights resets after loading (gpu_model_runner.py)
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            fn = getattr(self.model_runner, reset, None)
            if callable(fn):
                fn()

    def _cpe_reprocess_tied(self) -> None:
        """Redo the post-load processing of layers that share a weight (tied embeddings).

        vLLM's reload processes each layer that received tensors; a tied `lm_head` receives
        none (the checkpoint has no `lm_head.weight`), so a kernel copy it made at start-up
        (the CPU backend packs one for its GEMM) keeps the old weights: with vLLM 0.32 the
        CPU engine's log-probs after an update were off by 0.66 nats until this ran."""
        by_storage: dict[int, list[torch.nn.Module]] = {}
        for module in self.model_runner.get_model().modules():
            weight = getattr(module, "weight", None)
            method = getattr(module, "quant_method", None)
            if isinstance(weight, torch.Tensor) and weight.numel() and hasattr(
                    method, "process_weights_after_loading"):
                by_storage.setdefault(weight.data_ptr(), []).append(module)
        with self._cpe_config_context():
            for modules in by_storage.values():
                if len(modules) > 1:
                    for module in modules:
                        module.quant_method.process_weights_after_loading(module)

    def _cpe_config_context(self) -> contextlib.AbstractContextManager[Any]:
        # vLLM's own weight-transfer paths load under the current vLLM config (some layers
        # read it while loading and processing).
        from vllm.config import set_current_vllm_config

        return set_current_vllm_config(self.vllm_config)

    def _cpe_synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
