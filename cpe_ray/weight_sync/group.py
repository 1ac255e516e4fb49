"""The sync group: byte buckets broadcast from the learner's rank 0 to the engines' workers.

The learner's rank 0 is rank 0 of a process group of its own (gloo over a `TCPStore` on CPU,
NCCL on GPU), independent of DeepSpeed's default group, whose other ranks are the engines'
workers. Each bucket of the manifest (codec.py) is one flat uint8 broadcast. Sender and
receiver keep two buckets in flight so that packing or loading one overlaps the transfer of
the next. Where parameters already live in bucket-shaped buffers (`adopt_buckets`: the HF
engine always, the CPU learner at ZeRO-0 in float32), those buffers are broadcast as they
are, with no copy. Every failure becomes a `WeightSyncError` naming the group, rank and bucket.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from cpe_ray.weight_sync.codec import (
    Bucket,
    Manifest,
    WeightSyncError,
    bucket_view,
    dtype_name,
    pack,
    unpack,
)

SYNC_BACKENDS = ("gloo", "nccl")


@dataclass(frozen=True)
class GroupSpec:
    """Everything a peer needs to join the sync group (crosses Ray and collective_rpc)."""

    backend: str
    host: str
    port: int
    world_size: int
    timeout_s: float
    name: str = "cpe-weight-sync"

    def __post_init__(self) -> None:
        if self.backend not in SYNC_BACKENDS:
            raise ValueError(f"sync backend must be one of {SYNC_BACKENDS}, got {self.backend!r}")
        if self.world_size < 2:
            raise ValueError("a sync group needs the learner and at least one engine rank")

    @property
    def endpoint(self) -> str:
        return f"{self.name}@{self.host}:{self.port}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SyncStats:
    buckets: int
    bytes: int
    seconds: float


def free_port(host: str = "") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class SyncGroup:
    """One member of the sync group. All members must construct it at the same time."""

    def __init__(self, spec: GroupSpec, rank: int, device: torch.device | str = "cpu") -> None:
        self.spec, self.rank, self.device = spec, rank, torch.device(device)
        timeout = timedelta(seconds=spec.timeout_s)
        try:
            store = dist.TCPStore(
                spec.host, spec.port, spec.world_size, is_master=rank == 0, timeout=timeout
            )
            prefixed = dist.PrefixStore(spec.name, store)
            if spec.backend == "gloo":
                self.pg = dist.ProcessGroupGloo(prefixed, rank, spec.world_size, timeout)
            else:
                opts = dist.ProcessGroupNCCL.Options()
                opts._timeout = timeout
                self.pg = dist.ProcessGroupNCCL(prefixed, rank, spec.world_size, opts)
        except Exception as exc:  # DistStoreError, RuntimeError from the backend
            raise self._error("could not join", exc) from exc
        self._store = store  # the group reads through it; keep it alive
        self.staging: list[torch.Tensor] = []  # reused by send_buckets / receive_buckets

    def _error(self, what: str, exc: BaseException) -> WeightSyncError:
        detail = " ".join(str(exc).split())[:300]
        return WeightSyncError(
            f"weight sync {self.spec.endpoint}: rank {self.rank} of {self.spec.world_size} {what} "
            f"({type(exc).__name__}: {detail}); if a peer died or did not join within "
            f"{self.spec.timeout_s:g} s, the group must be rebuilt on a new port"
        )

    def broadcast_async(self, tensor: torch.Tensor, what: str):
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        try:
            return self.pg.broadcast([tensor], opts)
        except Exception as exc:
            raise self._error(f"failed to start {what}", exc) from exc

    def wait(self, work, what: str) -> None:
        try:
            work.wait()
        except Exception as exc:
            raise self._error(f"failed in {what}", exc) from exc

    def close(self) -> None:
        shutdown = getattr(self.pg, "shutdown", None)
        if callable(shutdown):  # frees NCCL communicators now instead of at garbage collection
            with contextlib.suppress(Exception):  # the peer may already be gone; we are leaving
                shutdown()


def _buffers(group: SyncGroup, manifest: Manifest) -> list[torch.Tensor]:
    """The group's two staging buffers, kept across syncs: fresh pages cost a first touch
    (0.2-0.3 s per GB on a CPU), which would otherwise be paid at every sync."""
    size = manifest.max_bucket_bytes
    if not group.staging or group.staging[0].numel() < size:
        group.staging = [torch.empty(size, dtype=torch.uint8, device=group.device)
                         for _ in range(2)]
    return group.staging


def send_buckets(
    group: SyncGroup,
    manifest: Manifest,
    fetch: Callable[[Bucket], AbstractContextManager[Mapping[str, torch.Tensor]]],
    persistent: bool = False,
) -> SyncStats:
    """Rank 0: pack and broadcast every bucket.

    `fetch(bucket)` is a context manager giving the bucket's tensors by name, valid inside it:
    ZeRO-3 gathers the partitioned parameters on entry and frees them on exit. `persistent`
    says the tensors outlive `fetch` (nothing was gathered): a bucket that needs no packing
    (see `bucket_view`) is then sent straight from them without waiting, so a sender whose
    parameters were adopted into bucket buffers sends every bucket at once, copying nothing.
    """
    start = time.perf_counter()
    buffers: list[torch.Tensor] = []  # staging, allocated only if some bucket needs packing
    pending = [None, None]  # packed buckets in flight, by staging buffer
    direct: list[Any] = []  # unpacked persistent buckets in flight
    for bucket in manifest.buckets:
        slot = bucket.index % 2
        with fetch(bucket) as tensors:
            view = bucket_view(bucket, tensors)
            if view is not None:
                if view.is_cuda:
                    torch.cuda.current_stream().synchronize()
                work = group.broadcast_async(view, f"bucket {bucket.index}")
                if persistent:
                    direct.append((work, bucket.index))
                else:  # a gathered tensor is freed when fetch exits: finish sending it first
                    group.wait(work, f"bucket {bucket.index}")
                continue
            if pending[slot] is not None:  # its buffer is still being sent
                group.wait(pending[slot][0], f"bucket {pending[slot][1]}")
            buffers = buffers or _buffers(group, manifest)
            flat = pack(bucket, tensors, buffers[slot])
        if flat.is_cuda:
            torch.cuda.current_stream().synchronize()  # NCCL's stream must see the packed bytes
        pending[slot] = (group.broadcast_async(flat, f"bucket {bucket.index}"), bucket.index)
    for work, index in direct + [p for p in pending if p is not None]:
        group.wait(work, f"bucket {index}")
    return SyncStats(len(manifest.buckets), manifest.total_bytes, time.perf_counter() - start)


def receive_buckets(
    group: SyncGroup,
    manifest: Manifest,
    load: Callable[[list[tuple[str, torch.Tensor]]], None],
) -> SyncStats:
    """Engine ranks: receive every bucket and `load` its tensors (views valid during the call)."""
    start = time.perf_counter()
    buckets = manifest.buckets
    buffers = _buffers(group, manifest)
    works: dict[int, Any] = {}
    if buckets:
        works[0] = group.broadcast_async(buffers[0][: buckets[0].nbytes], "bucket 0")
    for bucket in buckets:
        i = bucket.index
        group.wait(works.pop(i), f"bucket {i}")
        if i + 1 < len(buckets):  # the other buffer was loaded from in step i - 1: free now
            nxt = buckets[i + 1]
            buf = buffers[(i + 1) % 2][: nxt.nbytes]
            works[i + 1] = group.broadcast_async(buf, f"bucket {i + 1}")
        load(unpack(bucket, buffers[i % 2][: bucket.nbytes]))
    return SyncStats(len(buckets), manifest.total_bytes, time.perf_counter() - start)


def adopt_buckets(
    params: Mapping[str, torch.Tensor], manifest: Manifest, device: torch.device | str = "cpu"
) -> list[torch.Tensor] | None:
    """Move `params` into one flat buffer per bucket, laid out as the manifest says.

    Afterwards each parameter's `.data` is a view into its bucket, so a bucket broadcast
    received into that buffer *is* the load: no unpacking, no second copy. Returns the
    buffers, or None (nothing changed) unless every manifest tensor names a parameter of the
    same shape and dtype, as with an HF model receiving from a learner of the same model.
    """
    for bucket in manifest.buckets:
        for spec in bucket.tensors:
            p = params.get(spec.name)
            if p is None or tuple(p.shape) != spec.shape or dtype_name(p.dtype) != spec.dtype:
                return None
    buffers = []
    with torch.no_grad():
        for bucket in manifest.buckets:
            flat = torch.empty(bucket.nbytes, dtype=torch.uint8, device=device)
            for name, view in unpack(bucket, flat):
                view.copy_(params[name].data)
                params[name].data = view
            buffers.append(flat)
    return buffers


def receive_into(group: SyncGroup, manifest: Manifest, buffers: Sequence[torch.Tensor]
                 ) -> SyncStats:
    """Engine ranks whose parameters live in `adopt_buckets` buffers: receive in place."""
    start = time.perf_counter()
    works = [group.broadcast_async(buf, f"bucket {i}") for i, buf in enumerate(buffers)]
    for i, work in enumerate(works):
        group.wait(work, f"bucket {i}")
    return SyncStats(len(manifest.buckets), manifest.total_bytes, time.perf_counter() - start)
