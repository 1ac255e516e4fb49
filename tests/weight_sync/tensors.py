"""Tensors for the weight-sync tests: arbitrary bit patterns, compared bit for bit."""

from __future__ import annotations

import torch

from cpe_ray.weight_sync.codec import Manifest

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64,
          torch.int32, torch.int8, torch.uint8]


def random_tensor(shape, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Arbitrary bit patterns (NaNs and infinities included) of `dtype`."""
    numel = torch.Size(shape).numel()
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact: same dtype, same shape, same bytes (so NaN payloads count too)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def layout(m: Manifest) -> dict[str, tuple[int, int, int]]:
    return {s.name: (b.index, s.offset, s.nbytes) for b in m.buckets for s in b.tensors}
