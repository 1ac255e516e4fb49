"""The weight codec: a bucket manifest, and tensors packed into byte buffers and back.

The manifest (which tensor lives at which byte offset of which bucket) is built once from
names, shapes and dtypes and handed to every receiver; afterwards each bucket is one flat
uint8 buffer, packed by the sender and unpacked into views by the receiver. Small sets of
tensors can also travel inline, as msgpack-safe dicts of raw bytes (`encode_tensors`). The
sync group that moves the buckets is `group.py`; CUDA IPC handles are `cuda.py`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from cpe_ray.errors import CpeError

ALIGN_BYTES = 64  # every tensor starts at a multiple of this, so views of any dtype are aligned


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
    """Where each tensor lives in the bucket stream; planned once, reused by every sync.

    `adapter`: None for the whole model; for a LoRA policy the adapter's peft config as a
    plain dict (`LoraConfig.to_dict()`), the tensors being only the adapter's, named as
    `peft.get_peft_model_state_dict` names them. `version`: which sync this is (1, 2, ...;
    0 before the first), stamped by the driver on each sync so that engines can keep several
    adapter versions apart.
    """

    buckets: tuple[Bucket, ...]
    adapter: dict[str, Any] | None = None
    version: int = 0

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
        return {"buckets": [asdict(b) for b in self.buckets], "adapter": self.adapter,
                "version": self.version}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        buckets = []
        for b in data["buckets"]:
            specs = tuple(
                TensorSpec(t["name"], tuple(t["shape"]), t["dtype"], t["offset"], t["nbytes"])
                for t in b["tensors"]
            )
            buckets.append(Bucket(b["index"], b["nbytes"], specs))
        return cls(tuple(buckets), data.get("adapter"), int(data.get("version", 0)))


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
