"""Advantages and their table: expected numbers worked out by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch

from cpe_ray.algo.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageEstimator,
    AdvantageInput,
    behaviour_weights,
    compute_advantages,
    expand_to_tokens,
    gae,
    grpo_advantages,
    rloo_advantages,
    token_level_rewards,
)
from cpe_ray.algo.experience import Experience
from cpe_ray.algo.tensors import masked_whiten
from cpe_ray.config import load_config
from cpe_ray.config.choices import ADVANTAGE_ESTIMATOR_NAMES, GROUP_ESTIMATOR_NAMES
from tests.algo.numbers import D, close, t


# ----------------------------------------------------------------------------- GAE
def test_gae_hand_values_with_padding_garbage() -> None:
    gamma, lam = 0.9, 0.8  # gamma * lam = 0.72
    rewards = t([[0.0, 0.0, 0.0, 1.0], [0.2, 1.0, 100.0, 100.0]])
    values = t([[0.5, 0.5, 0.5, 0.5], [1.0, 2.0, 100.0, 100.0]])
    mask = t([[1, 1, 1, 1], [1, 1, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma, lam)
    # Row 0 fills T, so V after the last token is 0:
    #   delta3 = 1 + 0.9*0 - 0.5 = 0.5;  delta2 = delta1 = delta0 = 0 + 0.9*0.5 - 0.5 = -0.05
    #   A3 = 0.5; A2 = -0.05 + 0.72*0.5 = 0.31; A1 = -0.05 + 0.72*0.31 = 0.1732
    #   A0 = -0.05 + 0.72*0.1732 = 0.074704
    # Row 1 (length 2): delta1 = 1.0 + 0 - 2.0 = -1.0; delta0 = 0.2 + 0.9*2.0 - 1.0 = 1.0
    #   A1 = -1.0; A0 = 1.0 + 0.72*(-1.0) = 0.28
    close(adv, [[0.074704, 0.1732, 0.31, 0.5], [0.28, -1.0, 0.0, 0.0]])
    close(ret, [[0.574704, 0.6732, 0.81, 1.0], [1.28, 1.0, 0.0, 0.0]])
    assert torch.equal((ret - (adv + values)) * mask, torch.zeros_like(ret))
    assert adv[1, 2:].tolist() == [0.0, 0.0] and ret[1, 2:].tolist() == [0.0, 0.0]
    # Other garbage (inf / NaN) on padded positions changes nothing.
    rewards2, values2 = rewards.clone(), values.clone()
    rewards2[1, 2:], values2[1, 2:] = float("nan"), float("inf")
    adv2, ret2 = gae(rewards2, values2, mask, gamma, lam)
    assert torch.equal(adv2, adv) and torch.equal(ret2, ret)


def test_gae_gamma_lam_one_is_reward_to_go_minus_value() -> None:
    rewards = t([[0.1, -0.2, 0.3, 1.0, 7.0], [2.0, 0.5, 9.0, 9.0, 9.0]])
    values = t([[0.3, 0.1, -0.4, 0.2, 7.0], [1.0, 1.5, 9.0, 9.0, 9.0]])
    mask = t([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    # Row 0 reward-to-go: [1.2, 1.1, 1.3, 1.0]; row 1: [2.5, 0.5]
    close(adv, [[1.2 - 0.3, 1.1 - 0.1, 1.3 + 0.4, 1.0 - 0.2, 0.0], [1.5, -1.0, 0, 0, 0]])
    close(ret, [[1.2, 1.1, 1.3, 1.0, 0.0], [2.5, 0.5, 0, 0, 0]])


def test_gae_skips_masked_holes() -> None:
    # A hole (e.g. a tool-output span) is skipped: the next value and the running advantage
    # carry across it.  A2 = 1 - 0.5 = 0.5;  delta0 = 0 + 0.9*0.5 - 0.5 = -0.05
    # A0 = -0.05 + 0.72*0.5 = 0.31
    adv, ret = gae(t([[0.0, 99.0, 1.0]]), t([[0.5, 99.0, 0.5]]), t([[1, 0, 1]]), 0.9, 0.8)
    close(adv, [[0.31, 0.0, 0.5]])
    close(ret, [[0.81, 0.0, 1.0]])


def test_gae_rejects_bad_arguments() -> None:
    m = t([[1, 1]])
    with pytest.raises(ValueError, match="shape mismatch"):
        gae(t([[1.0, 2.0, 3.0]]), t([[1.0, 2.0]]), m, 0.9, 0.9)
    with pytest.raises(ValueError, match="gamma"):
        gae(t([[1.0, 2.0]]), t([[1.0, 2.0]]), m, 1.5, 0.9)



# ----------------------------------------------------------------------------- group advantages
def test_grpo_and_rloo_hand_values() -> None:
    scores = torch.tensor([1.0, 5.0, 2.0, 10.0, 3.0, 7.0], dtype=D)
    ids = torch.tensor([7, 3, 7, 42, 7, 3])  # interleaved, non-contiguous; 42 is a singleton
    # group 7: [1, 2, 3], mean 2, unbiased std sqrt((1 + 0 + 1)/2) = 1
    # group 3: [5, 7], mean 6, unbiased std sqrt((1 + 1)/1) = sqrt(2)
    e, s2 = 1e-6, math.sqrt(2)
    close(grpo_advantages(scores, ids),
          [-1 / (1 + e), -1 / (s2 + e), 0.0, 0.0, 1 / (1 + e), 1 / (s2 + e)])
    close(grpo_advantages(scores, ids, std_normalize=False), [-1.0, -1.0, 0.0, 0.0, 1.0, 1.0])
    # RLOO: 1 - (2+3)/2 = -1.5; 2 - (1+3)/2 = 0; 3 - (1+2)/2 = 1.5; 5 - 7 = -2; 7 - 5 = 2
    close(rloo_advantages(scores, ids), [-1.5, -2.0, 0.0, 0.0, 1.5, 2.0])
    with pytest.raises(ValueError, match="integer"):
        grpo_advantages(scores, ids.to(D))
    with pytest.raises(ValueError, match="same length"):
        rloo_advantages(scores, ids[:3])


def test_expand_and_token_level_rewards() -> None:
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    scores = torch.tensor([2.0, -1.0, 5.0], dtype=D)
    close(expand_to_tokens(scores, mask), [[2, 2, 2, 0], [-1, 0, 0, 0], [0, 0, 0, 0]])
    close(token_level_rewards(scores, mask), [[0, 0, 2, 0], [-1, 0, 0, 0], [0, 0, 0, 0]])
    kl = torch.full((3, 4), 0.5, dtype=D)
    # 0.1 * 0.5 = 0.05 off every response token; last token 2 - 0.05 = 1.95
    close(token_level_rewards(scores, mask, kl=kl, kl_coef=0.1),
          [[-0.05, -0.05, 1.95, 0], [-1.05, 0, 0, 0], [0, 0, 0, 0]])



def test_behaviour_weights_truncate_and_scale_the_surrogate() -> None:
    """One-step off-policy: w = min(pi_prox / pi_behav, cap), and w * A inside PPO's clipped
    surrogate equals w times the surrogate (hand-computed)."""
    prox = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, 0.0, 0.0]])
    behav = torch.tensor([[-1.0, -2.5, -2.0], [-0.8, 9.0, 9.0]])  # padding holds garbage
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    bw = behaviour_weights(prox, behav, mask, cap=2.0)
    expected = [[1.0, math.exp(0.5), 2.0], [math.exp(-0.2), 0.0, 0.0]]  # exp(1.5)=4.48 -> 2
    torch.testing.assert_close(bw.weights, torch.tensor(expected))
    assert bw.mean == pytest.approx((1 + math.exp(0.5) + math.exp(1.5) + math.exp(-0.2)) / 4)
    assert bw.clipped_frac == pytest.approx(0.25)
    # scaling advantages by w scales the clipped surrogate by w, token by token
    logp = torch.tensor([[-0.7, -1.9, -0.1], [-1.3, 0.0, 0.0]])
    adv = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, 0.0]])
    ratio = torch.exp(logp - prox)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
    weighted = torch.minimum(ratio * adv * bw.weights,
                             ratio.clamp(0.8, 1.2) * adv * bw.weights)
    torch.testing.assert_close(weighted, surrogate * bw.weights)
    with pytest.raises(ValueError, match="cap must be > 0"):
        behaviour_weights(prox, behav, mask, cap=0.0)


# ----------------------------------------------------------------------------- the table
def test_estimator_table_matches_the_config_choices() -> None:
    assert tuple(ADVANTAGE_ESTIMATORS) == ADVANTAGE_ESTIMATOR_NAMES
    assert tuple(n for n in ADVANTAGE_ESTIMATORS
                 if ADVANTAGE_ESTIMATORS[n].compares_group) == GROUP_ESTIMATOR_NAMES
    assert [n for n in ADVANTAGE_ESTIMATORS if ADVANTAGE_ESTIMATORS[n].needs_critic] == ["gae"]


def test_estimator_table_refuses_a_second_entry_and_lists_known_names() -> None:
    with pytest.raises(ValueError, match="advantage estimator 'gae' is registered already"):
        ADVANTAGE_ESTIMATORS.register("gae", AdvantageEstimator(lambda inp: (inp.mask,) * 2))
    assert ADVANTAGE_ESTIMATORS["gae"].needs_critic  # the first entry stays
    with pytest.raises(ValueError,
                       match="unknown advantage estimator 'ppo'; use one of gae, grpo, rloo"):
        ADVANTAGE_ESTIMATORS["ppo"]
    with pytest.raises(ValueError, match="critic's values"):
        ADVANTAGE_ESTIMATORS["gae"].compute(AdvantageInput(t([1.0]), torch.tensor([0]),
                                                           t([[1.0]])))


@pytest.mark.parametrize("estimator", ADVANTAGE_ESTIMATOR_NAMES)
def test_compute_advantages_is_the_estimators_maths(estimator: str) -> None:
    """compute_advantages through the table gives, bit for bit, the functions' numbers: the
    KL (k1 to the reference) in the reward, GAE whitened, group advantages on every token."""
    cfg = load_config(None, [f"ppo.advantage_estimator={estimator}", "ppo.kl_coef=0.1",
                             "learner.use_reference=true", "rollout.n_samples_per_prompt=2"])
    exp = Experience.from_tokens([[1], [1], [2], [2]], [[5, 6, 7], [8], [9, 9], [4, 4, 4]], 0)
    mask = exp.response_mask
    g = torch.Generator().manual_seed(0)
    forward = {"old_logprobs": -torch.rand(mask.shape, generator=g),
               "ref_logprobs": -torch.rand(mask.shape, generator=g),
               "old_values": torch.randn(mask.shape, generator=g)}
    scores, groups = torch.tensor([1.0, 0.2, -0.5, 0.7]), torch.tensor([0, 0, 1, 1])
    kl = (forward["old_logprobs"] - forward["ref_logprobs"]) * mask
    if estimator == "gae":
        rewards = token_level_rewards(scores, mask, kl, 0.1)
        adv, returns = gae(rewards, forward["old_values"], mask, 1.0, 1.0)
        adv = masked_whiten(adv, mask)
    else:
        relative = grpo_advantages if estimator == "grpo" else rloo_advantages
        adv = expand_to_tokens(relative(scores, groups), mask) - 0.1 * kl * mask
        returns = adv
    out = compute_advantages(cfg.ppo, exp, forward, scores, groups)
    assert torch.equal(out.advantages, adv * mask) and torch.equal(out.returns, returns)
    assert torch.equal(out.old_logprobs, forward["old_logprobs"])
