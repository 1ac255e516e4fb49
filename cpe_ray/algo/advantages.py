"""Advantages (method.md 3.7): GAE, GRPO, RLOO, and the staleness weights of stale samples.

`ADVANTAGE_ESTIMATORS` is the table `ppo.advantage_estimator` names; each entry says what it
needs (a critic's values, several samples of a prompt) and computes (advantages, returns)
from one `AdvantageInput`. `compute_advantages` fills a batch's targets through it. With
`ppo.reward_aggregation=per_dimension` a group estimator takes each GRM dimension against its
group on its own, then weights them (GDPO, `per_dimension_advantages`).

Adding an estimator: its name in `cpe_ray.config.choices.ADVANTAGE_ESTIMATOR_NAMES` (and in
`GROUP_ESTIMATOR_NAMES` if it compares the samples of a prompt), one `register` call below,
and its test in `tests/algo/test_advantages.py`. The conventions of `tensors.py` hold here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from cpe_ray.algo.experience import Experience
from cpe_ray.algo.tensors import (
    LOG_RATIO_CLAMP,
    at_least_f32,
    check_clip,
    check_shapes,
    kl_estimate,
    masked_mean,
    masked_whiten,
    zero_pad,
)
from cpe_ray.config import PPOConfig
from cpe_ray.config.choices import Table

GROUP_STD_EPS = 1e-6  # verl's GRPO epsilon


# ----------------------------------------------------------------------------- estimators
def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over response tokens -> (advantages, returns).

    The value after a response's last token is 0. Masked-out positions are skipped (the
    next value and the running advantage carry across them), which for right padding is the
    usual bootstrap-0-at-the-end rule. No whitening here.
    """
    check_shapes(rewards=rewards, values=values, mask=mask)
    check_clip("gamma", gamma, upper=1.0)
    check_clip("lam", lam, upper=1.0)
    on = mask != 0
    r, v = zero_pad(rewards, mask), zero_pad(values, mask)
    next_value = v.new_zeros(v.shape[0])
    running = v.new_zeros(v.shape[0])
    columns: list[Tensor] = []
    # The reverse recursion A_t = delta_t + gamma*lam*A_{t+1} is sequential in t only.
    for t in range(r.shape[1] - 1, -1, -1):
        delta = r[:, t] + gamma * next_value - v[:, t]
        running = torch.where(on[:, t], delta + gamma * lam * running, running)
        next_value = torch.where(on[:, t], v[:, t], next_value)
        columns.append(running)
    stacked = torch.stack(columns[::-1], dim=1) if columns else torch.zeros_like(v)
    advantages = zero_pad(stacked, mask)
    returns = zero_pad(advantages + v, mask)
    return advantages, returns


def _group_stats(scores: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample (deviation from its group mean, group size, group sum of squared devs)."""
    if scores.dim() != 1 or group_ids.shape != scores.shape:
        raise ValueError(
            f"scores {tuple(scores.shape)} and group_ids {tuple(group_ids.shape)} must both "
            "be 1-D of the same length [B]"
        )
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    s = at_least_f32(scores)
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    n = counts.to(s.dtype)
    sums = torch.zeros_like(n).index_add_(0, inverse, s)
    dev = s - (sums / n)[inverse]
    sq = torch.zeros_like(n).index_add_(0, inverse, dev**2)
    return dev, n[inverse], sq[inverse]


def grpo_advantages(
    scores: Tensor, group_ids: Tensor, eps: float = GROUP_STD_EPS, std_normalize: bool = True
) -> Tensor:
    """(r - group mean) / (unbiased group std + eps).

    A group of one takes mean 0 and std 1, as verl's `compute_grpo_outcome_advantage` does, so
    it keeps its score: r / (1 + eps), or r without `std_normalize`.
    """
    check_clip("eps", eps)
    dev, n, sq = _group_stats(scores, group_ids)
    single = n == 1
    dev = torch.where(single, at_least_f32(scores), dev)
    if std_normalize:
        std = torch.sqrt(sq / torch.clamp(n - 1, min=1))
        dev = dev / (torch.where(single, torch.ones_like(std), std) + eps)
    return dev


def rloo_advantages(scores: Tensor, group_ids: Tensor) -> Tensor:
    """r_i - mean of the other members of its group; a group of size 1 gets 0."""
    dev, n, _ = _group_stats(scores, group_ids)
    # r_i - (S - r_i)/(n - 1) == n/(n - 1) * (r_i - S/n)
    loo = dev * n / torch.clamp(n - 1, min=1)
    return torch.where(n > 1, loo, torch.zeros_like(loo))


def batch_normalize(values: Tensor, eps: float = GROUP_STD_EPS) -> Tensor:
    """(v - mean) / (unbiased std + eps) over the rows of a [B] tensor; a single row gives 0."""
    if values.dim() != 1:
        raise ValueError(f"values {tuple(values.shape)} must be 1-D [B]")
    check_clip("eps", eps)
    dev = values - values.mean()
    std = torch.sqrt((dev**2).sum() / max(values.shape[0] - 1, 1))
    return dev / (std + eps)


@dataclass(frozen=True)
class DimensionScores:
    """Each row's GRM score by dimension, for `ppo.reward_aggregation=per_dimension`."""

    scores: Tensor  # [B, D], a missing score already counted as grm.on_missing says
    names: tuple[str, ...]  # the D columns' dimensions
    weights: Tensor  # [D] their grm.weights

    def __post_init__(self) -> None:
        d = len(self.names)
        if self.scores.dim() != 2 or self.scores.shape[1] != d or self.weights.shape != (d,):
            raise ValueError(f"scores {tuple(self.scores.shape)} must be [B, {d}] and weights "
                             f"{tuple(self.weights.shape)} [{d}] for the dimensions {self.names}")


def dimension_advantages(dims: DimensionScores, group_ids: Tensor,
                         relative: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """[B, D]: each dimension's scores through the group estimator `relative` on their own."""
    return torch.stack([relative(dims.scores[:, d], group_ids) for d in range(len(dims.names))],
                       dim=1)


def per_dimension_advantages(dims: DimensionScores, group_ids: Tensor,
                             relative: Callable[[Tensor, Tensor], Tensor] = grpo_advantages
                             ) -> Tensor:
    """GDPO: each dimension against its group, their weighted sum, then normalised over the
    batch's rows -> [B].

    A weighted sum first gives (2, 0) and (0, 2) in a group with (0, 0) the same advantage,
    and lets the dimension that varies most drive the sign; normalising each one first keeps
    each dimension's own ranking. The last normalisation is GDPO's (TRL's
    `normalize_then_sum`; verl's whitens over tokens instead, which would weight each answer by
    its length, see `compute_advantages`). RLOO is linear in the scores, so with it only this
    last normalisation differs from the weighted sum.
    """
    per_dim = dimension_advantages(dims, group_ids, relative)
    combined = (per_dim * dims.weights.to(per_dim.dtype)).sum(dim=1)
    return batch_normalize(combined)


def expand_to_tokens(seq_values: Tensor, mask: Tensor) -> Tensor:
    """Broadcast a [B] value onto every response token of [B, T]; padding 0."""
    if seq_values.dim() != 1 or mask.dim() != 2 or seq_values.shape[0] != mask.shape[0]:
        raise ValueError(
            f"seq_values {tuple(seq_values.shape)} must be [B] for mask {tuple(mask.shape)} [B, T]"
        )
    return zero_pad(seq_values[:, None].expand(mask.shape), mask)


@dataclass(frozen=True)
class BehaviourWeights:
    """Truncated importance weights of stale samples and what to log of them."""

    weights: Tensor  # [B, T], 0 on padding
    mean: float  # over tokens, before truncation
    clipped_frac: float  # share of tokens whose weight was cut to the cap


def behaviour_weights(proximal_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor,
                      cap: float) -> BehaviourWeights:
    """w = min(pi_prox / pi_behav, cap) per token, detached (decoupled PPO, as AReaL's
    `behav_imp_weight_cap` and verl's truncated rollout importance sampling).

    With one-step off-policy training an answer was sampled by the engines' weights of the
    previous step (pi_behav, their log-probs), while the PPO ratio is taken against the
    learner's weights at the start of this update (pi_prox, its old log-probs). Scaling the
    advantage of every token by w makes PPO's clipped surrogate w * min(r A, clip(r) A) an
    importance-corrected estimate of the on-policy one (w >= 0 moves through the min);
    truncation at `cap` bounds the variance a token with a tiny pi_behav could add.
    """
    check_shapes(proximal_logprobs=proximal_logprobs, behaviour_logprobs=behaviour_logprobs,
                  mask=mask)
    if cap <= 0:
        raise ValueError(f"the importance-weight cap must be > 0, got {cap}")
    log_ratio = (zero_pad(at_least_f32(proximal_logprobs), mask)
                 - zero_pad(at_least_f32(behaviour_logprobs), mask))
    raw = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).detach()
    clipped = (raw > cap) & mask.bool()
    weights = torch.where(mask.bool(), raw.clamp(max=cap), torch.zeros_like(raw))
    tokens = int(mask.bool().sum())
    return BehaviourWeights(
        weights,
        float(masked_mean(raw, mask)) if tokens else 1.0,
        float(clipped.sum()) / tokens if tokens else 0.0,
    )


def token_level_rewards(
    scores: Tensor, mask: Tensor, kl: Tensor | None = None, kl_coef: float = 0.0
) -> Tensor:
    """Score on each sequence's last response token, minus kl_coef * kl on every token."""
    if scores.dim() != 1 or mask.dim() != 2 or scores.shape[0] != mask.shape[0]:
        raise ValueError(f"scores {tuple(scores.shape)} must be [B] for mask {tuple(mask.shape)}")
    check_clip("kl_coef", kl_coef)
    on = mask != 0
    positions = torch.arange(mask.shape[1], device=mask.device).expand(mask.shape)
    # Last masked position; an all-zero row gives 0, which zero_pad then drops.
    last = torch.where(on, positions, torch.zeros_like(positions)).amax(dim=1, keepdim=True)
    rewards = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
    rewards = zero_pad(rewards.scatter(1, last, scores[:, None]), mask)
    if kl is not None:
        check_shapes(kl=kl, mask=mask)
        rewards = rewards - kl_coef * zero_pad(kl, mask)
    return rewards


# ----------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class AdvantageInput:
    """What an estimator reads of one batch: rewards [B] and per-token tensors [B, T]."""

    scores: Tensor  # [B] each row's reward
    group_ids: Tensor  # [B] integers: rows of one id are samples of one prompt
    mask: Tensor  # [B, T] response tokens
    values: Tensor | None = None  # [B, T] the critic's values (estimators that need a critic)
    kl: Tensor | None = None  # [B, T] per-token KL to the reference, if there is one
    kl_coef: float = 0.0  # weight of `kl` in the reward (0: the KL is not in the reward)
    gamma: float = 1.0  # GAE's discount
    lam: float = 1.0  # GAE's lambda
    whiten: bool = False  # GAE: whiten advantages over the batch's tokens
    # group estimators: per-dimension scores to normalise one by one (GDPO) instead of `scores`
    dimensions: DimensionScores | None = None


@dataclass(frozen=True)
class AdvantageEstimator:
    """One `ppo.advantage_estimator`: (advantages, returns) [B, T] from an `AdvantageInput`."""

    compute: Callable[[AdvantageInput], tuple[Tensor, Tensor]]
    needs_critic: bool = False  # the learner trains a critic; `values` must be given
    # relative to a prompt's other samples (n >= 2 of them): [B] scores -> [B] advantages
    relative: Callable[[Tensor, Tensor], Tensor] | None = None

    @property
    def compares_group(self) -> bool:
        return self.relative is not None


def _gae(inp: AdvantageInput) -> tuple[Tensor, Tensor]:
    """The reward on the last token (minus the KL on every token), then GAE on the critic's
    values; whitened over the batch's tokens if asked (after the returns are taken)."""
    if inp.values is None:
        raise ValueError("gae needs the critic's values; pass AdvantageInput.values")
    if inp.dimensions is not None:
        raise ValueError("gae learns one return: per-dimension scores need a group estimator")
    rewards = token_level_rewards(inp.scores, inp.mask, inp.kl, inp.kl_coef)
    adv, returns = gae(rewards, inp.values, inp.mask, inp.gamma, inp.lam)
    if inp.whiten:
        adv = masked_whiten(adv, inp.mask)
    return adv, returns


def _group(relative: Callable[[Tensor, Tensor], Tensor]) -> Callable[[AdvantageInput],
                                                                       tuple[Tensor, Tensor]]:
    """A group estimator on every token of its row, minus the KL if it is in the reward; the
    returns are the advantages (there is no critic to fit). Never whitened: over tokens, one
    long answer would shift every other answer's sign (verl, OpenRLHF, TRL agree)."""

    def compute(inp: AdvantageInput) -> tuple[Tensor, Tensor]:
        seq = (relative(inp.scores, inp.group_ids) if inp.dimensions is None
               else per_dimension_advantages(inp.dimensions, inp.group_ids, relative))
        adv = expand_to_tokens(seq, inp.mask)
        if inp.kl is not None and inp.kl_coef > 0:
            adv = adv - inp.kl_coef * inp.kl * inp.mask
        return adv, adv

    return compute


ADVANTAGE_ESTIMATORS: Table[AdvantageEstimator] = Table("advantage estimator")
ADVANTAGE_ESTIMATORS.register("gae", AdvantageEstimator(_gae, needs_critic=True))
ADVANTAGE_ESTIMATORS.register("grpo", AdvantageEstimator(_group(grpo_advantages),
                                                         relative=grpo_advantages))
ADVANTAGE_ESTIMATORS.register("rloo", AdvantageEstimator(_group(rloo_advantages),
                                                         relative=rloo_advantages))


def compute_advantages(ppo: PPOConfig, exp: Experience, forward: dict[str, Tensor],
                       scores: Tensor, groups: Tensor,
                       dimensions: DimensionScores | None = None) -> Experience:
    """3.7's targets: advantages and returns from the learner's forward and the rewards.

    `dimensions`, given exactly when `ppo.reward_aggregation=per_dimension`, replace `scores`
    in the group estimators (`per_dimension_advantages`).

    `ppo.whiten_advantages` whitens GAE's advantages over the batch's tokens. GRPO / RLOO
    advantages are left as their group made them: whitening them over tokens weights each
    answer by its length, so with lengths [40, 2, 3, 4] and rewards [2, 0.6, 0, -0.4] the
    0.6 answer (above its group's mean) would get -1.25 instead of +0.05.
    """
    if (dimensions is not None) != (ppo.reward_aggregation == "per_dimension"):
        raise ValueError(f"ppo.reward_aggregation={ppo.reward_aggregation} takes per-dimension "
                         "scores exactly when it is per_dimension")
    mask = exp.response_mask
    fields = dict(forward)
    kl = None
    if "ref_logprobs" in fields:
        kl = kl_estimate(fields["old_logprobs"], fields["ref_logprobs"], ppo.kl_estimator, mask)
    estimator = ADVANTAGE_ESTIMATORS[ppo.advantage_estimator]
    adv, fields["returns"] = estimator.compute(AdvantageInput(
        scores, groups, mask, values=fields.get("old_values"), kl=kl,
        kl_coef=ppo.kl_coef if ppo.kl_in_reward else 0.0, gamma=ppo.gamma, lam=ppo.lam,
        whiten=ppo.whiten_advantages, dimensions=dimensions))
    fields["advantages"] = adv * mask
    return exp.with_fields(**fields)


def dimension_metrics(ppo: PPOConfig, dims: DimensionScores | None, groups: Tensor
                      ) -> dict[str, float]:
    """advantages/<dim>_mean and _std over the rows: each dimension's advantage against its
    group, before the weighting ({} without per-dimension scores)."""
    relative = ADVANTAGE_ESTIMATORS[ppo.advantage_estimator].relative
    if dims is None or relative is None:
        return {}
    per_dim = dimension_advantages(dims, groups, relative)
    out: dict[str, float] = {}
    for d, name in enumerate(dims.names):
        column = per_dim[:, d]
        out[f"advantages/{name}_mean"] = float(column.mean())
        out[f"advantages/{name}_std"] = float(column.std()) if len(column) > 1 else 0.0
    return out
