"""Advantages and their table: expected numbers worked out by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch

from cpe_ray.algo.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageEstimator,
    AdvantageInput,
    DimensionScores,
    batch_normalize,
    behaviour_weights,
    compute_advantages,
    dimension_metrics,
    expand_to_tokens,
    gae,
    grpo_advantages,
    per_dimension_advantages,
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
    # group 42: [10], verl's mean 0 and std 1: 10 / (1 + eps), 10 unscaled
    e, s2 = 1e-6, math.sqrt(2)
    close(grpo_advantages(scores, ids),
          [-1 / (1 + e), -1 / (s2 + e), 0.0, 10 / (1 + e), 1 / (1 + e), 1 / (s2 + e)])
    close(grpo_advantages(scores, ids, std_normalize=False), [-1.0, -1.0, 0.0, 10.0, 1.0, 1.0])
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


# ----------------------------------------------------------------------------- per dimension
def _dims(rows: list[list[float]], weights: list[float]) -> DimensionScores:
    names = ("helpfulness", "personalization", "naturalness")[: len(weights)]
    return DimensionScores(t(rows), names, torch.tensor(weights, dtype=D))


def test_grpo_group_of_one_keeps_its_score_as_verl() -> None:
    """verl's compute_grpo_outcome_advantage gives a group of one mean 0 and std 1."""
    close(grpo_advantages(t([3.0]), torch.tensor([0])), [3.0 / (1 + 1e-6)])
    close(grpo_advantages(t([-2.0, 1.0, 5.0]), torch.tensor([0, 1, 1]), std_normalize=False),
          [-2.0, -2.0, 2.0])


def test_per_dimension_hand_values() -> None:
    """GDPO on two groups, weights 1 and 0.5, by hand (e = 1e-6 in both normalisations)."""
    e, r3, r2 = 1e-6, math.sqrt(3), math.sqrt(2)
    dims = _dims([[1, 0], [2, 0], [3, 4], [5, 1], [5, 3]], [1.0, 0.5])
    ids = torch.tensor([0, 0, 0, 1, 1])
    # group 0, helpfulness [1, 2, 3]: mean 2, std 1 -> [-1, 0, 1] / (1 + e)
    # group 0, personalization [0, 0, 4]: mean 4/3, std sqrt((16 + 16 + 64)/9 / 2) = 4/sqrt(3)
    # group 1, helpfulness [5, 5]: std 0 -> 0; personalization [1, 3]: mean 2, std sqrt(2)
    hp = [-1 / (1 + e), 0.0, 1 / (1 + e), 0.0, 0.0]
    pz = [-4 / 3 / (4 / r3 + e), -4 / 3 / (4 / r3 + e), 8 / 3 / (4 / r3 + e),
          -1 / (r2 + e), 1 / (r2 + e)]
    combined = [h + 0.5 * p for h, p in zip(hp, pz, strict=True)]
    # ~[-1.288675, -0.288675, 1.577350, -0.353553, 0.353553]: mean 0 (no group of one), and
    # the sum of squares 2.75 + sqrt(3) at e = 0, so the std is sqrt((2.75 + sqrt(3)) / 4)
    mean = sum(combined) / 5
    std = math.sqrt(sum((c - mean) ** 2 for c in combined) / 4)
    expected = [(c - mean) / (std + e) for c in combined]
    close(per_dimension_advantages(dims, ids), expected, tol=1e-6)
    close(torch.tensor(expected, dtype=D),
          [x / math.sqrt((2.75 + r3) / 4) for x in [-1 - 0.5 / r3, -0.5 / r3, 1 + 1 / r3,
                                                     -0.5 / r2, 0.5 / r2]], tol=1e-5)


def _reference_gdpo(scores: list[list[float]], ids: list[int], weights: list[float],
                    eps: float = 1e-6) -> list[float]:
    """GDPO written from its formula: per group and dimension (x - mean) / (std + eps) with
    the unbiased std (a group of one: mean 0, std 1, as verl), the weighted sum, then
    (a - mean) / (std + eps) over the batch's rows (as TRL's normalize_then_sum)."""
    import statistics

    groups: dict[int, list[int]] = {}
    for row, g in enumerate(ids):
        groups.setdefault(g, []).append(row)
    combined = [0.0] * len(ids)
    for d, w in enumerate(weights):
        for rows in groups.values():
            xs = [scores[r][d] for r in rows]
            mean, std = (statistics.fmean(xs), statistics.stdev(xs)) if len(xs) > 1 else (0, 1)
            for r in rows:
                combined[r] += w * (scores[r][d] - mean) / (std + eps)
    mean, std = statistics.fmean(combined), statistics.stdev(combined)
    return [(c - mean) / (std + eps) for c in combined]


@pytest.mark.parametrize("seed", range(5))
def test_per_dimension_matches_an_independent_reference_on_random_inputs(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    rows = 24
    ids = torch.randint(0, 7, (rows,), generator=g)  # uneven groups, some of one
    scores = torch.randint(-5, 6, (rows, 3), generator=g).to(D)  # GRM-like integer scores
    weights = [0.35, 0.40, 0.25]
    got = per_dimension_advantages(DimensionScores(scores, ("h", "p", "n"),
                                                   torch.tensor(weights, dtype=D)), ids)
    close(got, _reference_gdpo(scores.tolist(), ids.tolist(), weights), tol=1e-6)
    # in float32, as the trainer passes them
    got32 = per_dimension_advantages(DimensionScores(scores.float(), ("h", "p", "n"),
                                                     torch.tensor(weights)), ids)
    close(got32.double(), _reference_gdpo(scores.tolist(), ids.tolist(), weights), tol=1e-5)


def test_per_dimension_with_rloo_differs_from_the_sum_only_by_the_batch_normalisation() -> None:
    g = torch.Generator().manual_seed(3)
    scores, ids = torch.randn(12, 3, generator=g, dtype=D), torch.randint(0, 4, (12,), generator=g)
    w = torch.tensor([0.35, 0.40, 0.25], dtype=D)
    dims = DimensionScores(scores, ("h", "p", "n"), w)
    close(per_dimension_advantages(dims, ids, rloo_advantages),
          batch_normalize(rloo_advantages((scores * w).sum(dim=1), ids)), tol=1e-9)
    close(batch_normalize(t([[2.0]])[0]), [0.0])  # a batch of one row


def _exp_and_forward() -> tuple[Experience, dict[str, torch.Tensor]]:
    exp = Experience.from_tokens([[1], [1], [2], [2], [1]], [[5, 6, 7], [8], [9, 9], [4, 4, 4],
                                                            [3, 3]], 0)
    g = torch.Generator().manual_seed(1)
    mask = exp.response_mask
    return exp, {"old_logprobs": -torch.rand(mask.shape, generator=g),
                 "ref_logprobs": -torch.rand(mask.shape, generator=g)}


def test_weighted_sum_is_todays_advantage_and_per_dimension_goes_through_the_table() -> None:
    base = ["ppo.advantage_estimator=grpo", "rollout.n_samples_per_prompt=2", "ppo.kl_coef=0.1",
            "learner.use_reference=true"]
    exp, forward = _exp_and_forward()
    mask = exp.response_mask
    kl = (forward["old_logprobs"] - forward["ref_logprobs"]) * mask
    dims = _dims([[3, -1, 2], [1, 4, 2], [0, 0, 5], [2, 2, -1], [4, 1, 2]], [0.35, 0.40, 0.25])
    dims = DimensionScores(dims.scores.float(), dims.names, dims.weights.float())
    groups = torch.tensor([0, 0, 1, 1, 0])
    scores = (dims.scores * dims.weights).sum(dim=1)
    today = expand_to_tokens(grpo_advantages(scores, groups), mask) - 0.1 * kl * mask
    summed = compute_advantages(load_config(None, base).ppo, exp, forward, scores, groups)
    assert torch.equal(summed.advantages, today * mask)
    per_dim = load_config(None, [*base, "ppo.reward_aggregation=per_dimension"]).ppo
    out = compute_advantages(per_dim, exp, forward, scores, groups, dims)
    gdpo = expand_to_tokens(per_dimension_advantages(dims, groups), mask) - 0.1 * kl * mask
    assert torch.equal(out.advantages, gdpo * mask) and torch.equal(out.returns, gdpo)
    with pytest.raises(ValueError, match="exactly when it is per_dimension"):
        compute_advantages(per_dim, exp, forward, scores, groups)
    with pytest.raises(ValueError, match="exactly when it is per_dimension"):
        compute_advantages(load_config(None, base).ppo, exp, forward, scores, groups, dims)
    with pytest.raises(ValueError, match="group estimator"):
        ADVANTAGE_ESTIMATORS["gae"].compute(AdvantageInput(
            scores, groups, mask, values=torch.zeros(mask.shape), dimensions=dims))
    metrics = dimension_metrics(per_dim, dims, groups)
    h = grpo_advantages(dims.scores[:, 0], groups)
    assert metrics["advantages/helpfulness_mean"] == pytest.approx(float(h.mean()))
    assert metrics["advantages/helpfulness_std"] == pytest.approx(float(h.std()))
    assert set(metrics) == {f"advantages/{d}_{s}" for d in dims.names for s in ("mean", "std")}
    assert dimension_metrics(load_config(None, base).ppo, None, groups) == {}
    with pytest.raises(ValueError, match=r"must be \[B, 3\]"):
        DimensionScores(dims.scores[:, :2], dims.names, dims.weights)


@pytest.mark.parametrize(("overrides", "message"), [
    ([], "ppo.advantage_estimator=gae has not"),
    (["ppo.advantage_estimator=grpo", "rollout.n_samples_per_prompt=2", "grm.backend=bt",
      "grm.model_path=bt.pt", "post_edit.enabled=false"], "grm.backend=bt gives one scalar"),
])
def test_per_dimension_config_refusals(overrides: list[str], message: str) -> None:
    from cpe_ray.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(None, ["ppo.reward_aggregation=per_dimension", *overrides])
    for estimator in GROUP_ESTIMATOR_NAMES:
        load_config(None, ["ppo.reward_aggregation=per_dimension", "rollout.n_samples_per_prompt=2",
                           f"ppo.advantage_estimator={estimator}"])
