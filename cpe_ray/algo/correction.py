"""Rollout correction: importance weights against the engines' log-probs that stay bounded.

The engines sample a batch with log-probs (pi_engine) that differ from the learner's old
log-probs (pi_old) of the same tokens: by the numerics of two implementations (bf16 against
float32, vLLM's kernels against HF's), by a step of staleness with one-step off-policy
training, and by the nucleus with top_p < 1. The ratio r_t = pi_old / pi_engine of a token
corrects for that gap, and is unbounded where pi_engine is small. `ppo.rollout_correction`
(`RolloutCorrectionConfig`) bounds it for the originals:

- token_tis: each token's policy loss times min(r_t, C), detached (verl's
  `rollout_is=token` with `rollout_is_threshold`, slime's `--use-tis`);
- seq_mis: times the sequence's weight prod_t r_t, and a sequence whose weight leaves
  [low, high] leaves the loss (slime's mask mode; verl's `seq_sum_k1` rejection);
- token_tis_seq_mis: token weights on the sequences the band keeps;
- with `token_veto`, a token with r_t below it rejects its sequence (verl's and slime's veto).

Rejected tokens leave the loss and its denominator (verl's modified response mask). Rewrites
are not weighted here: their behaviour policy is pi_e under the edit prompt, whose gap to
pi_old is the method, not noise. The edit loss bounds their own ratio pi_theta / pi_e with
`truncate_weight` at `rewrite_clip`. All weights are detached; log-ratios are clamped at
+-LOG_RATIO_CLAMP before exp(), as verl's SAFETY_BOUND. The conventions of `tensors.py` hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from cpe_ray.algo.tensors import (
    LOG_RATIO_CLAMP,
    at_least_f32,
    check_shapes,
    masked_mean,
    masked_sum,
    zero_pad,
)
from cpe_ray.config.schema import RolloutCorrectionConfig

TOKEN_MODES = ("token_tis", "token_tis_seq_mis")
KEPT_STATS = ("weight_mean", "weight_max", "ess")  # over the kept tokens, the rest over all
SEQ_MODES = ("seq_mis", "token_tis_seq_mis")


# ----------------------------------------------------------------------------- formulas
def log_ratio(old_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor) -> Tensor:
    """log pi_old - log pi_engine per token, in at least float32; 0 on padding."""
    check_shapes(old_logprobs=old_logprobs, behaviour_logprobs=behaviour_logprobs, mask=mask)
    return zero_pad(at_least_f32(old_logprobs) - at_least_f32(behaviour_logprobs), mask)


def safe_exp(log_w: Tensor) -> Tensor:
    return torch.exp(torch.clamp(log_w, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def token_weights(log_r: Tensor, mask: Tensor, truncation: float) -> tuple[Tensor, Tensor]:
    """Truncated token weights min(r_t, C) and where r_t > C (both 0 / False on padding)."""
    if truncation <= 0:
        raise ValueError(f"the truncation must be > 0, got {truncation}")
    raw = zero_pad(safe_exp(log_r), mask)
    return raw.clamp(max=truncation), (raw > truncation) & (mask != 0)


def sequence_log_weights(log_r: Tensor, mask: Tensor) -> Tensor:
    """[B] log prod_t r_t = sum_t log r_t over each sequence's tokens."""
    return masked_sum(log_r, mask, dim=-1)


def band_keep(seq_log_w: Tensor, low: float, high: float) -> Tensor:
    """[B] True where low <= exp(seq_log_w) <= high, compared in log space (verl's k1 rule)."""
    if not 0 <= low < high:
        raise ValueError(f"the band [{low}, {high}] must have 0 <= low < high")
    lower = -math.inf if low == 0 else math.log(low)
    return (seq_log_w >= lower) & (seq_log_w <= math.log(high))


def veto_keep(log_r: Tensor, mask: Tensor, threshold: float) -> Tensor:
    """[B] False for a sequence with any token whose r_t < threshold."""
    if not 0 < threshold <= 1:
        raise ValueError(f"the veto threshold must be in (0, 1], got {threshold}")
    vetoed = (log_r < math.log(threshold)) & (mask != 0)
    return ~vetoed.any(dim=-1)


def effective_sample_size(weights: Tensor, mask: Tensor) -> Tensor:
    """(sum w)^2 / (N sum w^2) over masked tokens: 1 for equal weights, 1/N for one heavy
    token (verl's 1 / mean((w / mean w)^2)); 1 when nothing is masked in."""
    w = zero_pad(at_least_f32(weights), mask)
    n, total, squares = mask.to(w.dtype).sum(), masked_sum(w, mask), masked_sum(w * w, mask)
    ok = (n > 0) & (squares > 0)
    return torch.where(ok, total**2 / torch.where(ok, n * squares, torch.ones_like(n)),
                       torch.ones_like(n))


def mismatch_k3(log_r: Tensor, mask: Tensor) -> Tensor:
    """Mean k3 estimate of KL(pi_engine || pi_old) over the engine's samples: r - 1 - log r
    with r = pi_old / pi_engine (verl's `rollout_corr/k3_kl`)."""
    clamped = torch.clamp(log_r, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return masked_mean(torch.exp(clamped) - 1 - clamped, mask)


def truncate_weight(ratio: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    """min(ratio, cap) as a truncated importance weight, and where ratio > cap.

    Above the cap the value is cap and the gradient cap * grad log pi (the factor
    cap / ratio is detached): the token still learns, with a bounded weight, where a clamp
    would silence it."""
    if cap <= 0:
        raise ValueError(f"the rewrite weight's bound must be > 0, got {cap}")
    over = ratio.detach() > cap
    scale = torch.where(over, cap / ratio.detach().clamp(min=cap), torch.ones_like(ratio))
    return ratio * scale, over


# ----------------------------------------------------------------------------- the correction
@dataclass
class CorrectionStats:
    """Detached 0-dim tensors over the originals' tokens (before rejection unless said).

    weight_mean / weight_max: of the weights the kept tokens get; ratio_max: the largest raw
    r_t, what an uncorrected weight could be; clipped_frac: tokens whose weight was truncated;
    masked_frac: tokens rejected (band or veto); ess: normalised effective sample size of the
    kept weights; mismatch_kl: k3 of KL(pi_engine || pi_old)."""

    weight_mean: Tensor
    weight_max: Tensor
    ratio_max: Tensor
    clipped_frac: Tensor
    masked_frac: Tensor
    ess: Tensor
    mismatch_kl: Tensor

    def to_dict(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}


@dataclass
class Correction:
    """weights: [B, T] detached factors on the token losses (1 on rewrites, 0 on padding and
    rejected tokens); keep: [B, T] bool, the tokens that stay in the loss and its
    denominator; tokens / kept_tokens: the originals' tokens, all and kept, that the stats
    are over (`KEPT_STATS` over the kept ones)."""

    weights: Tensor
    keep: Tensor
    tokens: int
    kept_tokens: int
    stats: CorrectionStats


def rollout_correction(rc: RolloutCorrectionConfig, old_logprobs: Tensor,
                       behaviour_logprobs: Tensor, mask: Tensor, is_edited: Tensor
                       ) -> Correction:
    """The weights and keep-mask of `rc.mode` for a [B, T] batch (module docstring).

    Every input is read without gradient: the weights change the measure, not the
    objective (verl detaches them the same way)."""
    if rc.mode == "none":
        raise ValueError("rollout correction is none; do not ask for its weights")
    old_logprobs, behaviour_logprobs = old_logprobs.detach(), behaviour_logprobs.detach()
    on = mask != 0
    if is_edited.dim() != 1 or is_edited.shape[0] != mask.shape[0]:
        raise ValueError(f"is_edited {tuple(is_edited.shape)} must be [B] for mask "
                         f"{tuple(mask.shape)}")
    orig = on & ~is_edited.to(torch.bool)[:, None]
    log_r = log_ratio(old_logprobs, behaviour_logprobs, orig)
    raw = zero_pad(safe_exp(log_r), orig)
    seq_log_w = sequence_log_weights(log_r, orig)
    clipped = torch.zeros_like(orig)
    if rc.mode in TOKEN_MODES:
        weights, clipped = token_weights(log_r, orig, rc.truncation)
    else:
        weights = zero_pad(safe_exp(seq_log_w)[:, None].expand_as(log_r), orig)
    keep_seq = torch.ones_like(seq_log_w, dtype=torch.bool)
    if rc.mode in SEQ_MODES:
        keep_seq = band_keep(seq_log_w, rc.seq_band[0], rc.seq_band[1])
    if rc.token_veto is not None:
        keep_seq = keep_seq & veto_keep(log_r, orig, rc.token_veto)
    kept_orig = orig & keep_seq[:, None]
    keep = kept_orig | (on & ~orig)
    weights = torch.where(kept_orig, weights, zero_pad(torch.ones_like(weights), keep))
    neg_inf = torch.tensor(-math.inf, dtype=weights.dtype, device=weights.device)
    stats = CorrectionStats(
        weight_mean=masked_mean(weights, kept_orig),
        weight_max=_max(torch.where(kept_orig, weights, neg_inf)),
        ratio_max=_max(torch.where(orig, raw, neg_inf)),
        clipped_frac=masked_mean(clipped.float(), orig),
        masked_frac=masked_mean((orig & ~kept_orig).float(), orig),
        ess=effective_sample_size(weights, kept_orig),
        mismatch_kl=mismatch_k3(log_r, orig),
    )
    return Correction(weights.detach(), keep, int(orig.sum()), int(kept_orig.sum()), stats)


def _max(x: Tensor) -> Tensor:
    """The largest element, 0 when all are -inf (nothing masked in)."""
    top = x.max() if x.numel() else torch.tensor(-math.inf)
    return torch.where(torch.isinf(top), torch.zeros_like(top), top)
