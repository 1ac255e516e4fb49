"""Learner-to-engine weight transfer: byte-aligned buckets, each packed and broadcast once.

The learner's rank 0 is rank 0 of a process group of its own (gloo over a `TCPStore` on CPU,
NCCL on GPU), independent of DeepSpeed's default group, whose other ranks are the engines'
workers. The manifest (which tensor lives at which byte offset of which bucket) is built
once from names, shapes and dtypes and handed to every receiver; afterwards each bucket is
one flat uint8 broadcast, unpacked into views and loaded. Sender and receiver keep two
buckets in flight so that packing or loading one overlaps the transfer of the next. Where
parameters already live in bucket-shaped buffers (`adopt_buckets`: the HF engine always, the
CPU learner at ZeRO-0 in float32), those buffers are broadcast as they are, with no copy. Where a
learner and an engine share a GPU, `share_cuda`/`open_cuda` pass a packed bucket by CUDA IPC
handle instead. Every failure becomes a `WeightSyncError` naming the group, rank and bucket.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from cpe_ray.errors import CpeError

ALIGN_BYTES = 64  # every tensor starts at a multiple of this, so views of any dtype are aligned
SYNC_BACKENDS = ("gloo", "nccl")


class WeightSyncError(CpeError):
    """A weight-sync peer did not join, died, or timed out; the message names which."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype name {name!r}")
    return dtype


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int  # bytes from the start of its bucket
    nbytes: int


@dataclass(frozen=True)
class Bucket:
    index: int
    nbytes: int
    tensors: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class Manifest:
    """Where each tensor lives in the bucket stream; sent once, reused by every sync."""

    buckets: tuple[Bucket, ...]

    @property
    def total_bytes(self) -> int:
        return sum(b.nbytes for b in self.buckets)

    @property
    def num_tensors(self) -> int:
        return sum(len(b.tensors) for b in self.buckets)

    @property
    def max_bucket_bytes(self) -> int:
        return max((b.nbytes for b in self.buckets), default=0)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and dicts: what msgspec (vLLM's collective_rpc) and JSON can carry."""
        return {"buckets": [asdict(b) for b in self.buckets]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        buckets = []
        for b in data["buckets"]:
            specs = tuple(
                TensorSpec(t["name"], tuple(t["shape"]), t["dtype"], t["offset"], t["nbytes"])
                for t in b["tensors"]
            )
            buckets.append(Bucket(b["index"], b["nbytes"], specs))
        return cls(tuple(buckets))


def _aligned(n: int) -> int:
    return -(-n // ALIGN_BYTES) * ALIGN_BYTES


def plan_manifest(
    entries: Iterable[tuple[str, Sequence[int], torch.dtype | str]], bucket_bytes: int
) -> Manifest:
    """Greedy in order: a bucket closes when the next tensor would pass `bucket_bytes`.

    A tensor bigger than `bucket_bytes` gets a bucket of its own rather than being split,
    so that every received tensor is one contiguous view.
    """
    if bucket_bytes <= 0:
        raise ValueError("bucket_bytes must be positive")
    buckets: list[Bucket] = []
    current: list[TensorSpec] = []
    used = 0

    def close() -> None:
        nonlocal current, used
        if current:
            buckets.append(Bucket(len(buckets), used, tuple(current)))
        current, used = [], 0

    for name, shape, dtype in entries:
        dt = dtype_from_name(dtype) if isinstance(dtype, str) else dtype
        shape = tuple(int(s) for s in shape)
        nbytes = torch.Size(shape).numel() * dt.itemsize
        start = _aligned(used)
        if current and start + nbytes > bucket_bytes:
            close()
            start = 0
        current.append(TensorSpec(name, shape, dtype_name(dt), start, nbytes))
        used = start + nbytes
    close()
    return Manifest(tuple(buckets))


def manifest_for(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Manifest:
    return plan_manifest(((n, t.shape, t.dtype) for n, t in named), bucket_bytes)


def pack(bucket: Bucket, tensors: Mapping[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """Copy the bucket's tensors into `out` (uint8, at least bucket.nbytes) at their offsets."""
    flat = out[: bucket.nbytes]
    for spec in bucket.tensors:
        t = tensors[spec.name]
        if tuple(t.shape) != spec.shape or dtype_name(t.dtype) != spec.dtype:
            raise WeightSyncError(
                f"tensor {spec.name} is {tuple(t.shape)} {t.dtype}, manifest says {spec.shape} "
                f"{spec.dtype}; rebuild the manifest after changing the model"
            )
        view = flat[spec.offset : spec.offset + spec.nbytes]
        view.copy_(t.detach().contiguous().reshape(-1).view(torch.uint8), non_blocking=True)
    return flat


def unpack(bucket: Bucket, flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Views into `flat`, named and shaped as the manifest says (no copies)."""
    out = []
    for spec in bucket.tensors:
        raw = flat[spec.offset : spec.offset + spec.nbytes]
        out.append((spec.name, raw.view(dtype_from_name(spec.dtype)).view(spec.shape)))
    return out


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


def _buffers(group: SyncGroup, manifest: Manifest) -> list[torch.Tensor]:
    """The group's two staging buffers, kept across syncs: fresh pages cost a first touch
    (0.2-0.3 s per GB on a CPU), which would otherwise be paid at every sync."""
    size = manifest.max_bucket_bytes
    if not group.staging or group.staging[0].numel() < size:
        group.staging = [torch.empty(size, dtype=torch.uint8, device=group.device)
                         for _ in range(2)]
    return group.staging


def bucket_view(bucket: Bucket, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """The bucket's bytes without packing, when its tensors already lie in one storage at
    the manifest's offsets (parameters adopted by `adopt_buckets`, or a bucket of one
    contiguous tensor); else None."""
    if not bucket.tensors or bucket.nbytes == 0:
        return None
    first = tensors[bucket.tensors[0].name]
    storage = first.untyped_storage()
    base = first.data_ptr() - bucket.tensors[0].offset
    for spec in bucket.tensors:
        t = tensors[spec.name]
        if (not t.is_contiguous() or tuple(t.shape) != spec.shape
                or dtype_name(t.dtype) != spec.dtype or t.device != first.device
                or t.untyped_storage().data_ptr() != storage.data_ptr()
                or t.data_ptr() != base + spec.offset):
            return None
    start = base - storage.data_ptr()
    if start < 0 or start + bucket.nbytes > storage.nbytes():
        return None
    flat = torch.empty(0, dtype=torch.uint8, device=first.device)
    return flat.set_(storage, start, (bucket.nbytes,))


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
