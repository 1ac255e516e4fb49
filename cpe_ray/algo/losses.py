"""Losses (method.md 3.7): the policy losses' table, value loss, SFT and Bradley-Terry.

`POLICY_LOSSES` holds the policy losses, each computed from one `PolicyLossInput`:
`ppo` (PPO's clipped surrogate on every row) and `cpe` (PPO on originals, the off-policy
edit loss on rewrites). `policy_loss_name` says which one a config trains with.

Adding a policy loss: a function from `PolicyLossInput` to (loss, `PolicyLossStats`), one
`register` call below, its test in `tests/algo/test_losses.py`, and the line of
`policy_loss_name` that picks it. The conventions of `tensors.py` hold here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from cpe_ray.algo.correction import truncate_weight
from cpe_ray.algo.tensors import (
    LOG_RATIO_CLAMP,
    at_least_f32,
    check_clip,
    check_shapes,
    masked_mean,
    masked_sum,
    zero_pad,
)
from cpe_ray.config import Config
from cpe_ray.config.choices import Table

EDIT_RATIO_EPS = 1e-6  # the release's pi_theta / (pi_e + 1e-6) (method.md 3.7)
AGG_MODES: tuple[str, ...] = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")


def _check_agg(mode: str) -> None:
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation {mode!r}; use one of {AGG_MODES}")


def _check_dual_clip(dual_clip: float | None) -> None:
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip={dual_clip} must be > 1 (typically 3.0), or None to disable")


# ----------------------------------------------------------------------------- aggregation
def aggregate_loss(
    loss_mat: Tensor, mask: Tensor, mode: str, normalizer: float | None = None
) -> Tensor:
    """Reduce a [B, T] token loss: over all tokens, or mean over non-empty sequences.

    `normalizer` replaces the local count (tokens for token_mean, non-empty sequences for
    the seq modes) as the divisor: a micro-batch that passes its mini-batch's global count
    contributes exactly its share of the mini-batch mean, however rows are split over
    micro-batches and ranks.
    """
    _check_agg(mode)
    check_shapes(loss_mat=loss_mat, mask=mask)
    if normalizer is not None and normalizer <= 0:
        raise ValueError(f"normalizer must be positive, got {normalizer}")
    if mode == "token_mean":
        if normalizer is None:
            return masked_mean(loss_mat, mask)
        return masked_sum(loss_mat, mask) / normalizer
    reduce = masked_sum if mode == "seq_mean_token_sum" else masked_mean
    per_seq = reduce(loss_mat, mask, dim=-1)
    non_empty = (mask != 0).any(dim=-1)
    if normalizer is None:
        return masked_mean(per_seq, non_empty)
    return masked_sum(per_seq, non_empty) / normalizer


def rows_normalizer(mode: str, micro_mask: Tensor, mini_batch_rows: int, world: int) -> float:
    """`aggregate_loss`'s normalizer for one micro-batch under verl's weighting
    (ppo.micro_batch_weighting=rows): the micro-batch's own mean, times its share of the
    mini-batch's rows (verl's dp_actor: loss x len(micro) / mini-batch rows).

    The micro-batch's count (tokens for token_mean, non-empty sequences for the seq modes)
    times mini_batch_rows / rows, over the `world` ranks whose gradients DeepSpeed averages.
    A token's weight is then rows / (mini_batch_rows x count): larger in a micro-batch of
    short answers than the 1 / (mini-batch count) of the default weighting.
    """
    _check_agg(mode)
    if mode == "token_mean":
        count = float(micro_mask.sum())
    else:
        count = float((micro_mask != 0).any(dim=-1).sum())
    return max(count, 1.0) * mini_batch_rows / (world * micro_mask.shape[0])


# ----------------------------------------------------------------------------- policy losses
@dataclass(frozen=True)
class PolicyLossInput:
    """One micro-batch of the policy loss: [B, T] tensors (unless marked) and the clips.

    edit_logprobs are the behaviour policy's log-probs of a rewrite under the edit prompt, as
    the engine sampled it: at the rewrite's temperature and, with top_p < 1, renormalised
    over the nucleus (the density the tokens were really drawn from, and what the release's
    vLLM reported). logprobs are the learner's at the same temperature over the whole
    vocabulary, as verl and OpenRLHF train every row. Rows that are not rewrites may hold
    anything in edit_logprobs; a loss that does not read them takes None.

    is_weights are the rollout correction's detached factors on the token losses, mask its
    kept tokens (algo/correction.py); rewrite_clip truncates a rewrite's weight pi_theta / pi_e
    in the edit loss (`truncate_weight`).
    """

    logprobs: Tensor  # the policy being trained
    old_logprobs: Tensor  # the learner's at the start of the update: PPO's ratio
    advantages: Tensor
    mask: Tensor  # response tokens
    is_edited: Tensor | None = None  # [B] the rows that are rewrites (None: no rewrites)
    edit_logprobs: Tensor | None = None  # log pi_e of the rewrites
    clip_low: float = 0.2
    clip_high: float = 0.2
    edit_clip_low: float | None = None  # None: that bound is not applied
    edit_clip_high: float | None = None
    dual_clip: float | None = None  # PPO's lower bound -A * c for A < 0 (None: off)
    agg: str = "token_mean"
    normalizer: float | None = None  # see `aggregate_loss`
    edit_eps: float = EDIT_RATIO_EPS
    is_weights: Tensor | None = None  # [B, T] factors on the token losses (None: 1)
    rewrite_clip: float | None = None  # bound of a rewrite's weight (None: none)


@dataclass
class PolicyLossStats:
    """Detached 0-dim tensors over masked tokens.

    clip_frac: fraction where the clipped branch is active (strictly larger loss), on
    rewrites under the edit loss where their ratio was cut;
    approx_kl: masked mean of old_logprobs - logprobs (k1 of KL(old || new));
    dual_clip_frac: fraction of original tokens where the dual clip (-A * c, A < 0) is active;
    orig_clip_frac / edit_clip_frac: the clip fractions over originals' / rewrites' tokens;
    edit_ratio_mean: the mean ratio on rewrite tokens; edit_token_frac: their share;
    edit_truncated_frac: rewrite tokens whose weight rewrite_clip truncated.
    """

    clip_frac: Tensor
    approx_kl: Tensor
    dual_clip_frac: Tensor
    orig_clip_frac: Tensor
    edit_clip_frac: Tensor
    edit_ratio_mean: Tensor
    edit_token_frac: Tensor
    edit_truncated_frac: Tensor

    def to_dict(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}


PolicyLoss = Callable[[PolicyLossInput], tuple[Tensor, PolicyLossStats]]


def _ppo_tokens(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Token losses of the PPO clipped surrogate -> (loss, clipped, dual_clipped, ratio)."""
    check_shapes(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    check_clip("clip_low", clip_low, upper=1.0)
    check_clip("clip_high", clip_high)
    _check_dual_clip(dual_clip)
    adv = zero_pad(at_least_f32(advantages), mask)
    log_ratio = zero_pad(at_least_f32(logprobs) - at_least_f32(old_logprobs), mask)
    ratio = torch.exp(torch.clamp(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    is_clipped = clipped > unclipped
    is_dual = torch.zeros_like(is_clipped)
    if dual_clip is not None:
        floor = -adv * dual_clip
        is_dual = (adv < 0) & (loss > floor)
        loss = torch.where(is_dual, floor, loss)
    return zero_pad(loss, mask), is_clipped & (mask != 0), is_dual & (mask != 0), ratio


def _policy_loss(inp: PolicyLossInput, edit_loss: bool) -> tuple[Tensor, PolicyLossStats]:
    """PPO on every row; with `edit_loss`, the off-policy edit loss on rewrites instead."""
    logprobs, old_logprobs, advantages, mask = (
        inp.logprobs, inp.old_logprobs, inp.advantages, inp.mask)
    _check_agg(inp.agg)
    is_edited = inp.is_edited if inp.is_edited is not None else torch.zeros(
        mask.shape[0], dtype=torch.bool, device=mask.device)
    if is_edited.dim() != 1 or is_edited.shape[0] != mask.shape[0]:
        raise ValueError(
            f"is_edited {tuple(is_edited.shape)} must be [B] for mask {tuple(mask.shape)}"
        )
    ppo_mat, ppo_clipped, is_dual, ppo_ratio = _ppo_tokens(
        logprobs, old_logprobs, advantages, mask, inp.clip_low, inp.clip_high, inp.dual_clip
    )
    on = mask != 0
    edited = is_edited.to(torch.bool)[:, None] & on
    loss_mat, edit_clipped, ratio = ppo_mat, ppo_clipped, ppo_ratio
    truncated = torch.zeros_like(edited)
    if edit_loss:
        edit_logprobs, edit_clip_low, edit_clip_high, edit_eps = (
            inp.edit_logprobs, inp.edit_clip_low, inp.edit_clip_high, inp.edit_eps)
        if edit_logprobs is None:
            raise ValueError("the cpe loss needs edit_logprobs; pass them or use the ppo loss")
        check_shapes(edit_logprobs=edit_logprobs, mask=mask)
        if edit_clip_low is not None:
            check_clip("edit_clip_low", edit_clip_low, upper=1.0)
        if edit_clip_high is not None:
            check_clip("edit_clip_high", edit_clip_high)
        check_clip("edit_eps", edit_eps)
        # Read only rewrite tokens, so garbage on other rows cannot reach values or grads.
        logp = zero_pad(at_least_f32(logprobs), edited)
        logp_e = zero_pad(at_least_f32(edit_logprobs), edited)
        ratio = torch.exp(logp) / (torch.exp(logp_e) + edit_eps)
        low = None if edit_clip_low is None else 1 - edit_clip_low
        high = None if edit_clip_high is None else 1 + edit_clip_high
        bounded = ratio if low is None and high is None else torch.clamp(ratio, low, high)
        if inp.rewrite_clip is not None:
            bounded, truncated = truncate_weight(bounded, inp.rewrite_clip)
        edit_mat = -zero_pad(at_least_f32(advantages), edited) * bounded
        edit_clipped = torch.zeros_like(edited)
        if low is not None:
            edit_clipped = edit_clipped | (ratio < low)
        if high is not None:
            edit_clipped = edit_clipped | (ratio > high)
        loss_mat = zero_pad(torch.where(edited, edit_mat, ppo_mat), mask)
    if inp.is_weights is not None:
        check_shapes(is_weights=inp.is_weights, mask=mask)
        loss_mat = loss_mat * zero_pad(at_least_f32(inp.is_weights), mask).detach()
    orig = on & ~edited
    clipped = torch.where(edited, edit_clipped, ppo_clipped) & on
    stats = PolicyLossStats(
        clip_frac=masked_mean(clipped.float(), mask).detach(),
        approx_kl=masked_mean(at_least_f32(old_logprobs - logprobs), mask).detach(),
        dual_clip_frac=masked_mean((is_dual & orig).float(), mask).detach(),
        orig_clip_frac=masked_mean(ppo_clipped.float(), orig).detach(),
        edit_clip_frac=masked_mean(edit_clipped.float(), edited).detach(),
        edit_ratio_mean=masked_mean(ratio, edited).detach(),
        edit_token_frac=masked_mean(edited.float(), mask).detach(),
        edit_truncated_frac=masked_mean((truncated & edited).float(), edited).detach(),
    )
    return aggregate_loss(loss_mat, mask, inp.agg, inp.normalizer), stats


def ppo_loss(inp: PolicyLossInput) -> tuple[Tensor, PolicyLossStats]:
    """PPO's clipped surrogate max(-A r, -A clip(r, 1-lo, 1+hi)), dual clip for A < 0, on
    every row: rewrites too, against old_logprobs (edit_logprobs are not read)."""
    return _policy_loss(inp, edit_loss=False)


def cpe_loss(inp: PolicyLossInput) -> tuple[Tensor, PolicyLossStats]:
    """PPO on originals, the off-policy edit loss on rewrites (method.md 3.7), mixed per row.

    Rewrite tokens: ratio = exp(logp) / (exp(edit_logp) + edit_eps), clipped to
    [1 - edit_clip_low, 1 + edit_clip_high], loss = -clip(ratio) * A (no PPO min, no dual
    clip). A bound given as None is not applied: both None is the release's main CPE run
    (`off_policy_max_clip = off_policy_min_clip = -1`, method.md 3.7). rewrite_clip then
    truncates the weight at its value, min(ratio, rewrite_clip), gradient included.
    """
    return _policy_loss(inp, edit_loss=True)


POLICY_LOSSES: Table[PolicyLoss] = Table("policy loss")
POLICY_LOSSES.register("ppo", ppo_loss)
POLICY_LOSSES.register("cpe", cpe_loss)


def policy_loss_name(cfg: Config) -> str:
    """The policy loss a run trains with: the edit loss when post-edit makes rewrites and
    ppo.edit_loss is on, else PPO on every row."""
    return "cpe" if cfg.post_edit.enabled and cfg.ppo.edit_loss else "ppo"


# ----------------------------------------------------------------------------- other losses
def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip: float | None = 0.2,
    agg: str = "token_mean",
    normalizer: float | None = None,
) -> tuple[Tensor, Tensor]:
    """0.5 * max((v - R)^2, (old_v + clip(v - old_v, -c, c) - R)^2) -> (loss, clip_frac)."""
    _check_agg(agg)
    check_shapes(values=values, old_values=old_values, returns=returns, mask=mask)
    v, old_v, ret = (zero_pad(at_least_f32(t), mask) for t in (values, old_values, returns))
    unclipped = (v - ret) ** 2
    if clip is None:
        loss_mat, is_clipped = unclipped, torch.zeros_like(mask, dtype=torch.bool)
    else:
        check_clip("clip", clip)
        clipped = (old_v + torch.clamp(v - old_v, -clip, clip) - ret) ** 2
        loss_mat, is_clipped = torch.maximum(unclipped, clipped), clipped > unclipped
    loss = aggregate_loss(0.5 * zero_pad(loss_mat, mask), mask, agg, normalizer)
    return loss, masked_mean(is_clipped.float(), mask).detach()


def sft_loss(logprobs: Tensor, mask: Tensor, normalizer: float | None = None) -> Tensor:
    """Masked token cross-entropy: -sum(log p(target) x mask) / normalizer.

    `logprobs` [B, T] are the targets' log-probabilities (`logprobs_from_logits`); `mask`
    marks the tokens to learn (assistant turns). With `normalizer` = the optimiser step's
    global count of such tokens (over every micro-batch and rank), the micro-batch losses add
    up to the step's token mean, however the rows are split: 2 ranks train exactly like 1.
    None: the local token mean.
    """
    return aggregate_loss(-at_least_f32(logprobs), mask, "token_mean", normalizer)


def bradley_terry_loss(
    chosen: Tensor, rejected: Tensor, weight: Tensor | None = None,
    normalizer: float | None = None,
) -> Tensor:
    """-log sigmoid(r_chosen - r_rejected) summed over pairs, / normalizer (default: mean).

    `weight` (1 per real pair, 0 per filler) keeps placeholder pairs out of the sum; the
    normaliser plays the role of `sft_loss`'s (the step's global pair count). softplus(-d)
    is -log sigmoid(d) without overflow for large |d|.
    """
    check_shapes(chosen=chosen, rejected=rejected)
    per_pair = F.softplus(-(at_least_f32(chosen) - at_least_f32(rejected)))
    w = torch.ones_like(per_pair) if weight is None else weight.to(per_pair.dtype)
    check_shapes(per_pair=per_pair, weight=w)
    if normalizer is None:
        return masked_mean(per_pair, w)
    if normalizer <= 0:
        raise ValueError(f"normalizer must be positive, got {normalizer}")
    return masked_sum(per_pair, w) / normalizer
