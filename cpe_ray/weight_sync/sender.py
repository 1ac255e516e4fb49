"""The learner's side of weight sync on one data-parallel rank: plan the manifest, join the
sync group, and send the policy's weights, by broadcast from rank 0 or, where learner and
engine share GPUs, by CUDA IPC handles. Under ZeRO-3 every rank takes part in each bucket's
gather, though only rank 0 sends. The learner core owns one `WeightSender`; the Ray actor
calls it through the core.

A LoRA policy (a peft model) sends only its adapter: the manifest lists the adapter's tensors
under the names `peft.get_peft_model_state_dict` gives them and carries the peft config, and
the engines keep their base weights.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist

from cpe_ray.weight_sync.codec import Bucket, Manifest, pack, plan_manifest
from cpe_ray.weight_sync.cuda import gpu_uuid, share_cuda
from cpe_ray.weight_sync.group import GroupSpec, SyncGroup, SyncStats, adopt_buckets, send_buckets


def gathered(params: list[torch.nn.Parameter], zero3: bool) -> Any:
    """A context in which `params` are whole: ZeRO-3 gathers them (every rank must enter);
    otherwise they already are."""
    if not zero3:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _plain(value: Any) -> Any:
    """JSON for what peft's config holds beyond JSON (target module sets)."""
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"cannot send {type(value).__name__} in an adapter config")


def adapter_config(module: torch.nn.Module) -> dict[str, Any] | None:
    """The active adapter's peft config as plain data (msgpack- and JSON-safe), or None when
    `module` is no peft model."""
    configs = getattr(module, "peft_config", None)
    if not configs:
        return None
    config = configs[module.active_adapter].to_dict()
    return json.loads(json.dumps(config, default=_plain))


def adapter_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The active adapter's parameters, keyed as `get_peft_model_state_dict` names them (which
    drops the adapter's name), so the engines load what peft would save. The keys come from
    peft itself; the parameters from the module, where ZeRO-3 can gather them."""
    from peft import get_peft_model_state_dict

    active = module.active_adapter
    wanted = set(get_peft_model_state_dict(module, adapter_name=active))
    params = {}
    for name, p in module.named_parameters():
        key = name.replace(f".{active}", "")
        if key in wanted:
            params[key] = p
    if set(params) != wanted:
        missing = sorted(wanted - set(params))[:3]
        raise ValueError(f"adapter tensors without a parameter (buffers?): {missing}")
    return params


class WeightSender:
    """Sends `module`'s parameters (the policy inside its DeepSpeed engine) to the engines;
    only its adapter's when `module` is a peft model.

    `adopt`: lay the parameters out as the buckets when rank 0 joins, so that a sync sends
    them without packing; only safe where the optimiser updates the parameters where they
    are (the caller knows when).
    """

    def __init__(self, module: torch.nn.Module, *, rank: int, world: int, device: torch.device,
                 zero3: bool, bucket_bytes: int, adopt: bool) -> None:
        self.module, self.rank, self.world, self.device = module, rank, world, device
        self.zero3, self.bucket_bytes, self.adopt = zero3, bucket_bytes, adopt
        self._group: SyncGroup | None = None
        self.adapter = adapter_config(module)

    def _params(self) -> dict[str, torch.nn.Parameter]:
        """What a sync sends, by manifest name: every parameter, or the adapter's."""
        if self.adapter is None:
            return dict(self.module.named_parameters())
        return adapter_parameters(self.module)

    def manifest(self) -> Manifest:
        entries = []
        for name, p in self._params().items():
            shape = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
            entries.append((name, shape, p.dtype))
        planned = plan_manifest(entries, self.bucket_bytes)
        return Manifest(planned.buckets, adapter=self.adapter)

    def join(self, spec: GroupSpec, manifest: Manifest) -> bool:
        """Rank 0 joins; True if the parameters now live in the bucket buffers."""
        if self.rank != 0:
            return False
        self._group = SyncGroup(spec, 0, self.device)
        if self.adopt:  # adopt_buckets changes nothing if any shape or dtype disagrees
            return adopt_buckets(self._params(), manifest, self.device) is not None
        return False

    @contextmanager
    def _whole(self, params: Mapping[str, torch.nn.Parameter], bucket: Bucket
               ) -> Iterator[dict[str, torch.Tensor]]:
        """The bucket's tensors by name, whole inside the context (gathered under ZeRO-3)."""
        chosen = [params[t.name] for t in bucket.tensors]
        with gathered(chosen, self.zero3):
            yield {t.name: params[t.name].data for t in bucket.tensors}

    def broadcast(self, manifest: Manifest) -> SyncStats | None:
        params = self._params()

        def fetch(bucket: Bucket):
            return self._whole(params, bucket)

        if self.rank == 0:
            if self._group is None:
                raise RuntimeError("broadcast_weights before join_weight_group")
            return send_buckets(self._group, manifest, fetch, persistent=not self.zero3)
        for bucket in manifest.buckets:  # ZeRO-3: every rank must enter each gather
            with fetch(bucket):
                pass
        return None

    def push_adapter(
        self,
        manifest: Manifest,
        load: Callable[[int, dict[str, Any], list[tuple[str, torch.Tensor]]], None] | None,
    ) -> SyncStats:
        """Colocated GPUs, LoRA policy: the adapter (tens of MB) goes by value, a host copy of
        its tensors handed to `load(version, peft_config, named_tensors)` (the engine's
        `load_adapter`), rather than by IPC handles into the base's buckets. Every rank
        gathers (ZeRO-3); ranks given no `load` copy nothing."""
        start = time.perf_counter()
        params = self._params()
        tensors: list[tuple[str, torch.Tensor]] = []
        for bucket in manifest.buckets:
            with self._whole(params, bucket) as whole:
                if load is not None:
                    tensors += [(n, t.detach().to("cpu", copy=True)) for n, t in whole.items()]
        if load is not None:
            load(manifest.version, manifest.adapter or {}, tensors)
        return SyncStats(len(manifest.buckets), manifest.total_bytes, time.perf_counter() - start)

    def push_ipc(
        self,
        manifest: Manifest,
        load: Callable[[dict[str, Any], Bucket], None] | None,
        tp: int = 1,
    ) -> SyncStats:
        """Colocated GPUs: pack each bucket here and let the engine workers on these GPUs map it.

        Learner ranks [e*tp, (e+1)*tp) share GPUs with engine e's tp workers. Every rank packs
        the bucket on its GPU; with tp > 1 the handles are gathered so that the engine's first
        rank (the one given `load`) hands the engine one handle per GPU. `load(handles,
        bucket)` returns once the engine has copied the bucket (a blocking Ray call), and a
        barrier keeps the other ranks' buffers alive until then, so one buffer serves every
        bucket. Every rank gathers (ZeRO-3).
        """
        start = time.perf_counter()
        params = self._params()
        buffer = torch.empty(manifest.max_bucket_bytes, dtype=torch.uint8, device=self.device)
        uuid = gpu_uuid(self.device.index or 0)
        for bucket in manifest.buckets:
            with self._whole(params, bucket) as tensors:
                flat = pack(bucket, tensors, buffer)
                torch.cuda.synchronize(self.device)
                handles = {uuid: share_cuda(flat)}
                if tp > 1:
                    everyone: list[Any] = [None] * self.world
                    dist.all_gather_object(everyone, handles)
                    first = self.rank - self.rank % tp
                    handles = {k: v for h in everyone[first : first + tp] for k, v in h.items()}
                if load is not None:
                    load(handles, bucket)
                if tp > 1:
                    dist.barrier()
        return SyncStats(len(manifest.buckets), manifest.total_bytes, time.perf_counter() - start)
