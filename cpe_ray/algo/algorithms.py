"""The RL math on [batch, tokens] tensors with masks: advantages, KL, PPO / CPE / value losses.

Conventions every function follows:

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

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

WHITEN_EPS = 1e-8
GROUP_STD_EPS = 1e-6  # verl's GRPO epsilon
EDIT_RATIO_EPS = 1e-6  # the release's pi_theta / (pi_e + 1e-6) (method.md 3.7)
# exp() of a log-ratio beyond this overflows float32 products; verl clamps the same way.
LOG_RATIO_CLAMP = 20.0
# k3 grows like |log-ratio| for a policy far from the reference (12.9 at log-ratio 13.9): one
# such token would dominate a KL penalty. verl's low_var_kl and OpenRLHF clamp it to +-10.
KL_CLAMP = 10.0
AGG_MODES: tuple[str, ...] = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")
KL_KINDS: tuple[str, ...] = ("k1", "k2", "k3")


# ----------------------------------------------------------------------------- validation
def _check_shapes(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch: {shapes}; pass tensors of one [batch, tokens] shape")


def _check_agg(mode: str) -> None:
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation {mode!r}; use one of {AGG_MODES}")


def _check_clip(name: str, value: float, upper: float | None = None) -> None:
    if value < 0 or (upper is not None and value > upper):
        bound = f"in [0, {upper}]" if upper is not None else ">= 0"
        raise ValueError(f"{name}={value} is invalid; it must be {bound}")


def _check_dual_clip(dual_clip: float | None) -> None:
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip={dual_clip} must be > 1 (typically 3.0), or None to disable")


def _zero_pad(x: Tensor, mask: Tensor) -> Tensor:
    """x on masked positions, exactly 0 elsewhere (also when x holds inf / NaN there)."""
    return torch.where(mask != 0, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _at_least_f32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


# ----------------------------------------------------------------------------- reductions
def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum(x * mask) over `dim` (all elements when None)."""
    _check_shapes(x=x, mask=mask)
    weighted = _zero_pad(x * mask.to(x.dtype), mask)
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
    var = masked_mean((_zero_pad(x, mask) - mean) ** 2, mask)
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
    whitened = (_zero_pad(x, mask) - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_pad(whitened, mask)


# ----------------------------------------------------------------------------- advantages
def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over response tokens -> (advantages, returns).

    The value after a response's last token is 0. Masked-out positions are skipped (the
    next value and the running advantage carry across them), which for right padding is the
    usual bootstrap-0-at-the-end rule. No whitening here.
    """
    _check_shapes(rewards=rewards, values=values, mask=mask)
    _check_clip("gamma", gamma, upper=1.0)
    _check_clip("lam", lam, upper=1.0)
    on = mask != 0
    r, v = _zero_pad(rewards, mask), _zero_pad(values, mask)
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
    advantages = _zero_pad(stacked, mask)
    returns = _zero_pad(advantages + v, mask)
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
    s = _at_least_f32(scores)
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
    _check_clip("eps", eps)
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
    return _zero_pad(seq_values[:, None].expand(mask.shape), mask)


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
    _check_shapes(proximal_logprobs=proximal_logprobs, behaviour_logprobs=behaviour_logprobs,
                  mask=mask)
    if cap <= 0:
        raise ValueError(f"the importance-weight cap must be > 0, got {cap}")
    log_ratio = (_zero_pad(_at_least_f32(proximal_logprobs), mask)
                 - _zero_pad(_at_least_f32(behaviour_logprobs), mask))
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
    _check_clip("kl_coef", kl_coef)
    on = mask != 0
    positions = torch.arange(mask.shape[1], device=mask.device).expand(mask.shape)
    # Last masked position; an all-zero row gives 0, which _zero_pad then drops.
    last = torch.where(on, positions, torch.zeros_like(positions)).amax(dim=1, keepdim=True)
    rewards = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
    rewards = _zero_pad(rewards.scatter(1, last, scores[:, None]), mask)
    if kl is not None:
        _check_shapes(kl=kl, mask=mask)
        rewards = rewards - kl_coef * _zero_pad(kl, mask)
    return rewards


def kl_estimate(
    logprobs: Tensor, ref_logprobs: Tensor, kind: str, mask: Tensor | None = None
) -> Tensor:
    """Per-token estimate of KL(pi || ref) (Schulman's k1 / k2 / k3); padding 0 if masked.

    k3 (non-negative, low variance) is clamped at KL_CLAMP as the peers do; k1 and k2 are not
    (verl and OpenRLHF leave them unclamped too).
    """
    _check_shapes(logprobs=logprobs, ref_logprobs=ref_logprobs)
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL estimator {kind!r}; use one of {KL_KINDS}")
    log_ratio = logprobs - ref_logprobs
    if mask is not None:
        _check_shapes(logprobs=logprobs, mask=mask)
        log_ratio = _zero_pad(log_ratio, mask)
    if kind == "k1":
        kl = log_ratio
    elif kind == "k2":
        kl = 0.5 * log_ratio**2
    else:
        kl = torch.clamp(torch.exp(-log_ratio) - 1 + log_ratio, -KL_CLAMP, KL_CLAMP)
    return kl if mask is None else _zero_pad(kl, mask)


# ----------------------------------------------------------------------------- losses
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
    _check_shapes(loss_mat=loss_mat, mask=mask)
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


@dataclass
class PolicyLossStats:
    """Detached 0-dim tensors over masked tokens.

    clip_frac: fraction where the clipped branch is active (strictly larger loss);
    approx_kl: masked mean of old_logprobs - logprobs (k1 of KL(old || new));
    dual_clip_frac: fraction where the dual clip (-A * c, A < 0) is active.
    """

    clip_frac: Tensor
    approx_kl: Tensor
    dual_clip_frac: Tensor

    def to_dict(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}


@dataclass
class CpeLossStats(PolicyLossStats):
    """Adds: orig/edit clip fractions, mean ratio on rewrite tokens, rewrite token share."""

    orig_clip_frac: Tensor
    edit_clip_frac: Tensor
    edit_ratio_mean: Tensor
    edit_token_frac: Tensor


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
    _check_shapes(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    _check_clip("clip_low", clip_low, upper=1.0)
    _check_clip("clip_high", clip_high)
    _check_dual_clip(dual_clip)
    adv = _zero_pad(_at_least_f32(advantages), mask)
    log_ratio = _zero_pad(_at_least_f32(logprobs) - _at_least_f32(old_logprobs), mask)
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
    return _zero_pad(loss, mask), is_clipped & (mask != 0), is_dual & (mask != 0), ratio


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    agg: str = "token_mean",
    normalizer: float | None = None,
) -> tuple[Tensor, PolicyLossStats]:
    """PPO clipped surrogate: max(-A r, -A clip(r, 1-lo, 1+hi)), dual clip for A < 0."""
    _check_agg(agg)
    loss_mat, is_clipped, is_dual, _ = _ppo_tokens(
        logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip
    )
    stats = PolicyLossStats(
        clip_frac=masked_mean(is_clipped.float(), mask).detach(),
        approx_kl=masked_mean(_at_least_f32(old_logprobs - logprobs), mask).detach(),
        dual_clip_frac=masked_mean(is_dual.float(), mask).detach(),
    )
    return aggregate_loss(loss_mat, mask, agg, normalizer), stats


def cpe_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    edit_logprobs: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    is_edited: Tensor,
    clip_low: float,
    clip_high: float,
    edit_clip_low: float | None,
    edit_clip_high: float | None,
    dual_clip: float | None = None,
    agg: str = "token_mean",
    edit_eps: float = EDIT_RATIO_EPS,
    edit_loss: bool = True,
    normalizer: float | None = None,
) -> tuple[Tensor, CpeLossStats]:
    """PPO on originals, the off-policy edit loss on rewrites (method.md 3.7), mixed per row.

    Rewrite tokens: ratio = exp(logp) / (exp(edit_logp) + edit_eps), clipped to
    [1 - edit_clip_low, 1 + edit_clip_high], loss = -clip(ratio) * A (no PPO min, no dual
    clip). A bound given as None is not applied: both None is the release's main CPE run
    (`off_policy_max_clip = off_policy_min_clip = -1`, method.md 3.7).

    edit_logprobs are the behaviour policy's log-probs of the rewrite under the edit prompt,
    as the engine sampled it: at the rewrite's temperature and, with top_p < 1, renormalised
    over the nucleus (the density the tokens were really drawn from, and what the release's
    vLLM reported). logprobs are the learner's at the same temperature over the whole
    vocabulary, as verl and OpenRLHF train every row. Rows that are not rewrites are ignored
    (may hold anything, or pass None when edit_loss=False, which trains rewrites with plain
    PPO against old_logprobs instead).
    """
    _check_agg(agg)
    if is_edited.dim() != 1 or is_edited.shape[0] != mask.shape[0]:
        raise ValueError(
            f"is_edited {tuple(is_edited.shape)} must be [B] for mask {tuple(mask.shape)}"
        )
    ppo_mat, ppo_clipped, is_dual, ppo_ratio = _ppo_tokens(
        logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip
    )
    on = mask != 0
    edited = is_edited.to(torch.bool)[:, None] & on
    loss_mat, edit_clipped, ratio = ppo_mat, ppo_clipped, ppo_ratio
    if edit_loss:
        if edit_logprobs is None:
            raise ValueError("edit_logprobs is None but edit_loss=True; pass them or disable")
        _check_shapes(edit_logprobs=edit_logprobs, mask=mask)
        if edit_clip_low is not None:
            _check_clip("edit_clip_low", edit_clip_low, upper=1.0)
        if edit_clip_high is not None:
            _check_clip("edit_clip_high", edit_clip_high)
        _check_clip("edit_eps", edit_eps)
        # Read only rewrite tokens, so garbage on other rows cannot reach values or grads.
        logp = _zero_pad(_at_least_f32(logprobs), edited)
        logp_e = _zero_pad(_at_least_f32(edit_logprobs), edited)
        ratio = torch.exp(logp) / (torch.exp(logp_e) + edit_eps)
        low = None if edit_clip_low is None else 1 - edit_clip_low
        high = None if edit_clip_high is None else 1 + edit_clip_high
        bounded = ratio if low is None and high is None else torch.clamp(ratio, low, high)
        edit_mat = -_zero_pad(_at_least_f32(advantages), edited) * bounded
        edit_clipped = torch.zeros_like(edited)
        if low is not None:
            edit_clipped = edit_clipped | (ratio < low)
        if high is not None:
            edit_clipped = edit_clipped | (ratio > high)
        loss_mat = _zero_pad(torch.where(edited, edit_mat, ppo_mat), mask)
    orig = on & ~edited
    clipped = torch.where(edited, edit_clipped, ppo_clipped) & on
    stats = CpeLossStats(
        clip_frac=masked_mean(clipped.float(), mask).detach(),
        approx_kl=masked_mean(_at_least_f32(old_logprobs - logprobs), mask).detach(),
        dual_clip_frac=masked_mean((is_dual & orig).float(), mask).detach(),
        orig_clip_frac=masked_mean(ppo_clipped.float(), orig).detach(),
        edit_clip_frac=masked_mean(edit_clipped.float(), edited).detach(),
        edit_ratio_mean=masked_mean(ratio, edited).detach(),
        edit_token_frac=masked_mean(edited.float(), mask).detach(),
    )
    return aggregate_loss(loss_mat, mask, agg, normalizer), stats


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
    _check_shapes(values=values, old_values=old_values, returns=returns, mask=mask)
    v, old_v, ret = (_zero_pad(_at_least_f32(t), mask) for t in (values, old_values, returns))
    unclipped = (v - ret) ** 2
    if clip is None:
        loss_mat, is_clipped = unclipped, torch.zeros_like(mask, dtype=torch.bool)
    else:
        _check_clip("clip", clip)
        clipped = (old_v + torch.clamp(v - old_v, -clip, clip) - ret) ** 2
        loss_mat, is_clipped = torch.maximum(unclipped, clipped), clipped > unclipped
    loss = aggregate_loss(0.5 * _zero_pad(loss_mat, mask), mask, agg, normalizer)
    return loss, masked_mean(is_clipped.float(), mask).detach()


def sft_loss(logprobs: Tensor, mask: Tensor, normalizer: float | None = None) -> Tensor:
    """Masked token cross-entropy: -sum(log p(target) x mask) / normalizer.

    `logprobs` [B, T] are the targets' log-probabilities (`logprobs_from_logits`); `mask`
    marks the tokens to learn (assistant turns). With `normalizer` = the optimiser step's
    global count of such tokens (over every micro-batch and rank), the micro-batch losses add
    up to the step's token mean, however the rows are split: 2 ranks train exactly like 1.
    None: the local token mean.
    """
    return aggregate_loss(-_at_least_f32(logprobs), mask, "token_mean", normalizer)


def bradley_terry_loss(
    chosen: Tensor, rejected: Tensor, weight: Tensor | None = None,
    normalizer: float | None = None,
) -> Tensor:
    """-log sigmoid(r_chosen - r_rejected) summed over pairs, / normalizer (default: mean).

    `weight` (1 per real pair, 0 per filler) keeps placeholder pairs out of the sum; the
    normaliser plays the role of `sft_loss`'s (the step's global pair count). softplus(-d)
    is -log sigmoid(d) without overflow for large |d|.
    """
    _check_shapes(chosen=chosen, rejected=rejected)
    per_pair = F.softplus(-(_at_least_f32(chosen) - _at_least_f32(rejected)))
    w = torch.ones_like(per_pair) if weight is None else weight.to(per_pair.dtype)
    _check_shapes(per_pair=per_pair, weight=w)
    if normalizer is None:
        return masked_mean(per_pair, w)
    if normalizer <= 0:
        raise ValueError(f"normalizer must be positive, got {normalizer}")
    return masked_sum(per_pair, w) / normalizer


# ----------------------------------------------------------------------------- logits
def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dim: logsumexp(z) - sum(p * z)."""
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got {tuple(logits.shape)}")
    out = []
    for row in logits:
        # Upcast inside the loop: a float32 copy of the whole [B, T, V] is the memory peak.
        z = _at_least_f32(row)
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
        z = _at_least_f32(row)  # one row upcast at a time, not the whole batch
        out.append(z.gather(-1, ids.long()[:, None]).squeeze(-1) - torch.logsumexp(z, dim=-1))
    return torch.stack(out) if out else logits.new_zeros(logits.shape[:2])
