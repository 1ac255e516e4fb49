"""What the algo tests share: float64 tensors from rows, and an exact-to-tolerance check."""

from __future__ import annotations

import torch

D = torch.float64


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=D)


def close(a: torch.Tensor, b, tol: float = 1e-9) -> None:
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), atol=tol, rtol=0)
