"""Advantages (method.md 3.7): GAE, GRPO, RLOO, and the staleness weights of stale samples.

`ADVANTAGE_ESTIMATORS` is the table `ppo.advantage_estimator` names; each entry says what it
needs (a critic's values, several samples of a prompt) and computes (advantages, returns)
from one `AdvantageInput`. `compute_advantages` fills a batch's targets through it.

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
    """(r - group mean) / (unbiased group std + eps); a group of size 1 gets 0."""
    check_clip("eps", eps)
    dev, n, sq = _group_stats(scores, group_ids)
    if std_normalize:
        std = torch.sqrt(sq / torch.clamp(n - 1, min=1))
        dev = dev / (std + eps)
    return torch.where(n > 1, dev, torch.zeros_like(dev))


def rloo_advantages(scores: Tensor, group_ids: Tensor) -> Tensor:
    """r_i - mean of the other members of its group; a group of size 1 gets 0."""
    dev, n, _ = _group_stats(scores, group_ids)
    # r_i - (S - r_i)/(n - 1) == n/(n - 1) * (r_i - S/n)
    loo = dev * n / torch.clamp(n - 1, min=1)
    return torch.where(n > 1, loo, torch.zeros_like(loo))


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


@dataclass(frozen=True)
class AdvantageEstimator:
    """One `ppo.advantage_estimator`: (advantages, returns) [B, T] from an `AdvantageInput`."""

    compute: Callable[[AdvantageInput], tuple[Tensor, Tensor]]
    needs_critic: bool = False  # the learner trains a critic; `values` must be given
    compares_group: bool = False  # relative to a prompt's other samples (n >= 2 of them)


def _gae(inp: AdvantageInput) -> tuple[Tensor, Tensor]:
    """The reward on the last token (minus the KL on every token), then GAE on the critic's
    values; whitened over the batch's tokens if asked (after the returns are taken)."""
    if inp.values is None:
        raise ValueError("gae needs the critic's values; pass AdvantageInput.values")
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
        adv = expand_to_tokens(relative(inp.scores, inp.group_ids), inp.mask)
        if inp.kl is not None and inp.kl_coef > 0:
            adv = adv - inp.kl_coef * inp.kl * inp.mask
        return adv, adv

    return compute


ADVANTAGE_ESTIMATORS: Table[AdvantageEstimator] = Table("advantage estimator")
ADVANTAGE_ESTIMATORS.register("gae", AdvantageEstimator(_gae, needs_critic=True))
ADVANTAGE_ESTIMATORS.register("grpo", AdvantageEstimator(_group(grpo_advantages),
                                                         compares_group=True))
ADVANTAGE_ESTIMATORS.register("rloo", AdvantageEstimator(_group(rloo_advantages),
                                                         compares_group=True))


def compute_advantages(ppo: PPOConfig, exp: Experience, forward: dict[str, Tensor],
                       scores: Tensor, groups: Tensor) -> Experience:
    """3.7's targets: advantages and returns from the learner's forward and the rewards.

    `ppo.whiten_advantages` whitens GAE's advantages over the batch's tokens. GRPO / RLOO
    advantages are left as their group made them: whitening them over tokens weights each
    answer by its length, so with lengths [40, 2, 3, 4] and rewards [2, 0.6, 0, -0.4] the
    0.6 answer (above its group's mean) would get -1.25 instead of +0.05.
    """
    mask = exp.response_mask
    fields = dict(forward)
    kl = None
    if "ref_logprobs" in fields:
        kl = kl_estimate(fields["old_logprobs"], fields["ref_logprobs"], ppo.kl_estimator, mask)
    estimator = ADVANTAGE_ESTIMATORS[ppo.advantage_estimator]
    adv, fields["returns"] = estimator.compute(AdvantageInput(
        scores, groups, mask, values=fields.get("old_values"), kl=kl,
        kl_coef=ppo.kl_coef if ppo.kl_in_reward else 0.0, gamma=ppo.gamma, lam=ppo.lam,
        whiten=ppo.whiten_advantages))
    fields["advantages"] = adv * mask
    return exp.with_fields(**fields)
