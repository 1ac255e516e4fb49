"""Masked maths on [batch, tokens] tensors: checks, reductions, KL estimators, log-probs.

Conventions every function of `cpe_ray.algo` follows:

* `mask` is 1 (or True) on response tokens and 0 on padding; bool, int or float all work.
  `masked_sum` / `masked_mean` also accept non-negative float weights.
* Padding never leaks into a number: inputs are read through `torch.where(mask, x, 0)`, so
  garbage (even inf / NaN) on padded positions changes neither outputs nor gradients; padded
  positions of [B, T] outputs are exactly 0; sequences whose mask is all zero do not count
  in sequence means; an empty reduction is 0, never NaN.
* Policy-loss math runs in at least float32 (bf16 log-probs are upcast) because ratios are
  exponentials of differences of nearly equal numbers.
* Stats are detached 0-dim tensors (no host sync inside the loss); call `.to_dict()` to log.
"""

from __future__ import annotations

import torch
from torch import Tensor

WHITEN_EPS = 1e-8
# exp() of a log-ratio beyond this overflows float32 products; verl clamps the same way.
LOG_RATIO_CLAMP = 20.0
# k3 grows like |log-ratio| for a policy far from the reference (12.9 at log-ratio 13.9): one
# such token would dominate a KL penalty. verl's low_var_kl and OpenRLHF clamp it to +-10.
KL_CLAMP = 10.0
KL_KINDS: tuple[str, ...] = ("k1", "k2", "k3")


# ----------------------------------------------------------------------------- validation
def check_shapes(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch: {shapes}; pass tensors of one [batch, tokens] shape")


def check_clip(name: str, value: float, upper: float | None = None) -> None:
    if value < 0 or (upper is not None and value > upper):
        bound = f"in [0, {upper}]" if upper is not None else ">= 0"
        raise ValueError(f"{name}={value} is invalid; it must be {bound}")


def zero_pad(x: Tensor, mask: Tensor) -> Tensor:
    """x on masked positions, exactly 0 elsewhere (also when x holds inf / NaN there)."""
    return torch.where(mask != 0, x, torch.zeros((), dtype=x.dtype, device=x.device))


def at_least_f32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


# ----------------------------------------------------------------------------- reductions
def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum(x * mask) over `dim` (all elements when None)."""
    check_shapes(x=x, mask=mask)
    weighted = zero_pad(x * mask.to(x.dtype), mask)
    return weighted.sum() if dim is None else weighted.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum(x * mask) / sum(mask), and 0 (not NaN) where the mask sums to 0."""
    total = masked_sum(x, mask, dim)
    count = mask.to(total.dtype).sum() if dim is None else mask.to(total.dtype).sum(dim)
    safe = torch.where(count > 0, count, torch.ones_like(count))
    return torch.where(count > 0, total / safe, torch.zeros_like(total))


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked elements; 0 when there are too few (n < 2 unbiased, n < 1)."""
    mean = masked_mean(x, mask)
    var = masked_mean((zero_pad(x, mask) - mean) ** 2, mask)
    if unbiased:
        n = mask.to(var.dtype).sum()
        # Bessel's correction n / (n - 1); n <= 1 has no spread to estimate.
        var = torch.where(n > 1, var * n / torch.clamp(n - 1, min=1), torch.zeros_like(var))
    return var


def masked_whiten(
    x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = WHITEN_EPS
) -> Tensor:
    """(x - mean) / sqrt(var + eps) over masked elements; shift_mean=False keeps the mean."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (zero_pad(x, mask) - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return zero_pad(whitened, mask)


def kl_estimate(
    logprobs: Tensor, ref_logprobs: Tensor, kind: str, mask: Tensor | None = None
) -> Tensor:
    """Per-token estimate of KL(pi || ref) (Schulman's k1 / k2 / k3); padding 0 if masked.

    k3 (non-negative, low variance) is clamped at KL_CLAMP as the peers do; k1 and k2 are not
    (verl and OpenRLHF leave them unclamped too).
    """
    check_shapes(logprobs=logprobs, ref_logprobs=ref_logprobs)
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL estimator {kind!r}; use one of {KL_KINDS}")
    log_ratio = logprobs - ref_logprobs
    if mask is not None:
        check_shapes(logprobs=logprobs, mask=mask)
        log_ratio = zero_pad(log_ratio, mask)
    if kind == "k1":
        kl = log_ratio
    elif kind == "k2":
        kl = 0.5 * log_ratio**2
    else:
        kl = torch.clamp(torch.exp(-log_ratio) - 1 + log_ratio, -KL_CLAMP, KL_CLAMP)
    return kl if mask is None else zero_pad(kl, mask)


# ----------------------------------------------------------------------------- logits
def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dim: logsumexp(z) - sum(p * z)."""
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got {tuple(logits.shape)}")
    out = []
    for row in logits:
        # Upcast inside the loop: a float32 copy of the whole [B, T, V] is the memory peak.
        z = at_least_f32(row)
        out.append(torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1))
    return torch.stack(out) if out else logits.new_zeros(logits.shape[:2])


def logprobs_from_logits(logits: Tensor, token_ids: Tensor) -> Tensor:
    """log softmax(logits)[token_ids] as [B, T], without materialising [B, T, V] log-probs."""
    if logits.dim() != 3 or tuple(token_ids.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"logits {tuple(logits.shape)} must be [B, T, V] and token_ids "
            f"{tuple(token_ids.shape)} [B, T]"
        )
    out = []
    for row, ids in zip(logits, token_ids, strict=True):
        z = at_least_f32(row)  # one row upcast at a time, not the whole batch
        out.append(z.gather(-1, ids.long()[:, None]).squeeze(-1) - torch.logsumexp(z, dim=-1))
    return torch.stack(out) if out else logits.new_zeros(logits.shape[:2])
