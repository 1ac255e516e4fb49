"""Losses and the policy losses' table: expected numbers worked out by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cpe_ray.algo.advantages import gae
from cpe_ray.algo.losses import (
    EDIT_RATIO_EPS,
    POLICY_LOSSES,
    PolicyLossInput,
    PolicyLossStats,
    aggregate_loss,
    bradley_terry_loss,
    policy_loss_name,
    sft_loss,
    value_loss,
)
from cpe_ray.config import load_config
from tests.algo.numbers import D, close, t


def ppo(*args, **kw) -> tuple[torch.Tensor, PolicyLossStats]:
    return POLICY_LOSSES["ppo"](PolicyLossInput(*args, **kw))


def cpe(**kw) -> tuple[torch.Tensor, PolicyLossStats]:
    return POLICY_LOSSES["cpe"](PolicyLossInput(**kw))


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
    extra=st.integers(1, 3),
    garbage=st.sampled_from([100.0, -1e6, float("inf"), float("nan")]),
)
def test_padding_invariance(lengths: list[int], seed: int, extra: int, garbage: float) -> None:
    g = torch.Generator().manual_seed(seed)
    b, n = len(lengths), 5
    mask = (torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]).to(D)
    rew, val, lp, old = (torch.randn(b, n, generator=g, dtype=D) for _ in range(4))
    adv, ret = gae(rew, val, mask, 0.95, 0.9)
    losses = [aggregate_loss(rew, mask, mode) for mode in ("token_mean", "seq_mean_token_mean",
                                                          "seq_mean_token_sum")]
    pg, _ = ppo(lp, old, adv, mask)

    def pad(x: torch.Tensor) -> torch.Tensor:
        out = torch.cat([x, torch.full((b, extra), garbage, dtype=D)], dim=1)
        return torch.where(torch.cat([mask, torch.zeros(b, extra, dtype=D)], 1) > 0, out,
                           torch.full_like(out, garbage))

    mask_p = torch.cat([mask, torch.zeros(b, extra, dtype=D)], dim=1)
    adv_p, ret_p = gae(pad(rew), pad(val), mask_p, 0.95, 0.9)
    assert torch.equal(adv_p[:, :n], adv) and torch.equal(ret_p[:, :n], ret)
    assert not adv_p[mask_p == 0].any() and not ret_p[mask_p == 0].any()
    for mode, expected in zip(("token_mean", "seq_mean_token_mean", "seq_mean_token_sum"),
                              losses, strict=True):
        close(aggregate_loss(pad(rew), mask_p, mode), expected, tol=1e-12)
    pg_p, _ = ppo(pad(lp), pad(old), pad(adv), mask_p)
    close(pg_p, pg, tol=1e-12)



# ----------------------------------------------------------------------------- aggregation
def test_aggregation_modes_hand_values() -> None:
    loss = t([[1, 2, 3, 4], [10, 20, 99, 99], [5, 5, 5, 5]])
    mask = t([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])  # row 2 empty: never counts
    close(aggregate_loss(loss, mask, "token_mean"), (1 + 2 + 3 + 4 + 10 + 20) / 6)
    close(aggregate_loss(loss, mask, "seq_mean_token_mean"), (2.5 + 15) / 2)
    close(aggregate_loss(loss, mask, "seq_mean_token_sum"), (10 + 30) / 2)
    assert aggregate_loss(loss, torch.zeros_like(mask), "seq_mean_token_mean").item() == 0.0
    with pytest.raises(ValueError, match="token_mean"):
        aggregate_loss(loss, mask, "mean")


# ----------------------------------------------------------------------------- PPO
def ppo_case() -> tuple[torch.Tensor, ...]:
    # ratios (old = 0 so logp = log ratio) and advantages; row 1 is padded after 2 tokens
    ratio = t([[1.1, 1.5, 0.5, 0.9], [0.5, 1.5, 1.0, 1.0]])
    adv = t([[1.0, 1.0, -1.0, -1.0], [1.0, -1.0, 50.0, 50.0]])
    mask = t([[1, 1, 1, 1], [1, 1, 0, 0]])
    return ratio.log().requires_grad_(), torch.zeros_like(ratio), adv, mask


def test_ppo_clipped_surrogate_hand_values_and_grad() -> None:
    lp, old, adv, mask = ppo_case()
    loss, stats = ppo(lp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    # token: max(-A r, -A clip(r, 0.8, 1.2))
    #   A=+1 r=1.1: max(-1.1, -1.1) = -1.1   A=+1 r=1.5: max(-1.5, -1.2) = -1.2 (clipped)
    #   A=-1 r=0.5: max(0.5, 0.8) = 0.8 (clipped)   A=-1 r=0.9: 0.9
    #   A=+1 r=0.5: max(-0.5, -0.8) = -0.5          A=-1 r=1.5: max(1.5, 1.2) = 1.5
    # token_mean = (-1.1 - 1.2 + 0.8 + 0.9 - 0.5 + 1.5) / 6 = 0.4 / 6
    close(loss, 0.4 / 6)
    close(stats.clip_frac, 2 / 6)
    close(stats.dual_clip_frac, 0.0)
    # approx_kl = mean(old - logp) = -mean(log r) over the 6 tokens
    close(stats.approx_kl, -sum(math.log(r) for r in (1.1, 1.5, 0.5, 0.9, 0.5, 1.5)) / 6)
    loss.backward()
    # d(-A r)/d logp = -A r on unclipped tokens, 0 on clipped ones and padding; / 6 tokens
    close(lp.grad, [[-1.1 / 6, 0.0, 0.0, 0.9 / 6], [-0.5 / 6, 1.5 / 6, 0.0, 0.0]])
    # seq_mean_token_mean: row 0 (-1.1 - 1.2 + 0.8 + 0.9)/4 = -0.15; row 1 (-0.5 + 1.5)/2 = 0.5
    loss_seq, _ = ppo(lp, old, adv, mask, agg="seq_mean_token_mean")
    close(loss_seq, (-0.15 + 0.5) / 2)
    # asymmetric clip: clip_high 0.6 leaves r=1.5, A=+1 unclipped -> -1.5 instead of -1.2
    loss_hi, st_hi = ppo(lp, old, adv, mask, clip_high=0.6)
    close(loss_hi, (0.4 - 0.3) / 6)
    close(st_hi.clip_frac, 1 / 6)


def test_ppo_dual_clip() -> None:
    lp = torch.tensor([[5.0, 2.0, 5.0]], dtype=D).log().requires_grad_()
    adv = t([[-1.0, -1.0, 1.0]])
    mask = t([[1, 1, 1]])
    loss, stats = ppo(lp, torch.zeros_like(lp), adv, mask, dual_clip=3.0)
    # A=-1 r=5: max(5, 1.2) = 5 -> min(5, -A*3 = 3) = 3 (dual clipped)
    # A=-1 r=2: max(2, 1.2) = 2 -> min(2, 3) = 2;  A=+1 r=5: max(-5, -1.2) = -1.2 (clipped)
    close(loss, (3 + 2 - 1.2) / 3)
    close(stats.dual_clip_frac, 1 / 3)
    close(stats.clip_frac, 1 / 3)
    loss.backward()
    close(lp.grad, [[0.0, 2.0 / 3, 0.0]])  # d(-A r)/dlogp = 2 on the one live token


def test_policy_loss_validation() -> None:
    lp, old, adv, mask = ppo_case()
    with pytest.raises(ValueError, match="clip_low"):
        ppo(lp, old, adv, mask, clip_low=-0.1)
    with pytest.raises(ValueError, match="dual_clip"):
        ppo(lp, old, adv, mask, dual_clip=1.0)
    with pytest.raises(ValueError, match="aggregation"):
        ppo(lp, old, adv, mask, agg="sum")
    with pytest.raises(ValueError, match="shape mismatch"):
        ppo(lp, old[:, :3], adv, mask)


# ----------------------------------------------------------------------------- CPE
def cpe_case() -> dict[str, torch.Tensor]:
    lp = t([[-0.1, -0.3, -0.2], [math.log(0.5), math.log(1e-6), -0.2], [-0.5, 0.0, 0.0]])
    return {
        "logprobs": lp.requires_grad_(),
        "old_logprobs": t([[-0.2, 0.0, -0.2], [-0.4, -0.4, 9.0], [-0.4, 3.0, 3.0]]),
        # row 1 is the rewrite: log pi_e = [log 0.5, log 1e-6, log 0.25]; other rows garbage
        "edit_logprobs": t([[float("nan")] * 3, [math.log(0.5), math.log(1e-6),
                                                 math.log(0.25)], [float("inf")] * 3]),
        "advantages": t([[1.0, -1.0, 0.5], [2.0, 1.0, -1.0], [-2.0, 0.0, 0.0]]),
        "mask": t([[1, 1, 1], [1, 1, 1], [1, 0, 0]]),
        "is_edited": torch.tensor([False, True, False]),
    }


def test_cpe_edit_ratio_hand_values_and_mixing() -> None:
    c = cpe_case()
    loss, stats = cpe(**c, clip_low=0.2, clip_high=0.2, edit_clip_low=0.2,
                                  edit_clip_high=0.2)
    # Rewrite row, ratio = exp(logp) / (exp(logp_e) + 1e-6), clip [0.8, 1.2], loss -A clip(r):
    #   tok0: 0.5 / (0.5 + 1e-6) = 0.999998000004 (inside) -> -2 * 0.999998000004
    #   tok1: 1e-6 / (1e-6 + 1e-6) = 0.5 -> clipped to 0.8 -> -1 * 0.8
    #   tok2: e^-0.2 / (0.25 + 1e-6) = 0.818730753 / 0.250001 = 3.27491 -> 1.2 -> +1 * 1.2
    r0 = 0.5 / (0.5 + EDIT_RATIO_EPS)
    assert abs(r0 - 0.999998000004) < 1e-12
    edit_sum = -2 * r0 - 0.8 + 1.2
    # Originals (rows 0 and 2) are PPO on those rows: 4 tokens; total tokens 4 + 3 = 7.
    keep = [0, 2]
    ppo_orig, _ = ppo(*(c[k][keep] for k in ("logprobs", "old_logprobs",
                                                          "advantages", "mask")))
    close(loss, (ppo_orig.item() * 4 + edit_sum) / 7)
    # ...and by hand: row 0 r = e^0.1, e^-0.3, 1 ; row 2 r = e^-0.1
    #   A=1  r=1.10517: max(-1.10517, -1.10517) = -1.105171
    #   A=-1 r=0.74082: max(0.74082, 0.8) = 0.8 (clipped);  A=0.5 r=1: -0.5
    #   A=-2 r=0.904837: max(1.809675, 1.6) = 1.809675
    close(ppo_orig * 4, -math.exp(0.1) + 0.8 - 0.5 + 2 * math.exp(-0.1))
    close(stats.orig_clip_frac, 1 / 4)
    close(stats.edit_clip_frac, 2 / 3)
    close(stats.clip_frac, 3 / 7)
    close(stats.edit_token_frac, 3 / 7)
    close(stats.edit_ratio_mean, (r0 + 0.5 + math.exp(-0.2) / (0.25 + 1e-6)) / 3)
    loss.backward()
    assert torch.isfinite(c["logprobs"].grad).all()
    # Rewrite grads: d(-A r)/dlogp = -A r on tok0 only (tok1, tok2 clipped): -2 * r0 / 7
    close(c["logprobs"].grad[1], [-2 * r0 / 7, 0.0, 0.0])


def test_cpe_edit_ratio_unclipped_like_the_release() -> None:
    """edit_clip_* = None: the release's off_policy_{min,max}_clip = -1, every rewrite token
    keeps its gradient (clipped to [0.8, 1.2], tok1 and tok2 of cpe_case got none)."""
    c = cpe_case()
    r0, r2 = 0.5 / (0.5 + EDIT_RATIO_EPS), math.exp(-0.2) / (0.25 + EDIT_RATIO_EPS)
    loss, stats = cpe(**c, clip_low=0.2, clip_high=0.2, edit_clip_low=None,
                                  edit_clip_high=None)
    keep = [0, 2]
    ppo_orig, _ = ppo(*(c[k][keep] for k in ("logprobs", "old_logprobs",
                                                          "advantages", "mask")))
    # rewrite row: -A r with r = r0, 0.5, r2 and A = 2, 1, -1
    close(loss, (ppo_orig.item() * 4 - 2 * r0 - 0.5 + r2) / 7)
    close(stats.edit_clip_frac, 0.0)
    loss.backward()
    close(c["logprobs"].grad[1], [-2 * r0 / 7, -0.5 / 7, r2 / 7])
    # one side open: only the upper bound (1.2) binds, on tok2
    c = cpe_case()
    _, stats = cpe(**c, clip_low=0.2, clip_high=0.2, edit_clip_low=None,
                               edit_clip_high=0.2)
    close(stats.edit_clip_frac, 1 / 3)


def test_cpe_edit_loss_off_is_plain_ppo_and_all_original_is_ppo() -> None:
    c = cpe_case()
    args = dict(clip_low=0.2, clip_high=0.28, edit_clip_low=0.2, edit_clip_high=0.2)
    ppo_all, ppo_stats = ppo(c["logprobs"], c["old_logprobs"], c["advantages"],
                                         c["mask"], clip_low=0.2, clip_high=0.28)
    off, off_stats = ppo(**{**c, "edit_logprobs": None}, **args)
    close(off, ppo_all)
    close(off_stats.clip_frac, ppo_stats.clip_frac)
    none_edited, _ = cpe(**{**c, "is_edited": torch.zeros(3, dtype=torch.bool)},
                                     **args)
    close(none_edited, ppo_all)
    with pytest.raises(ValueError, match="edit_logprobs"):
        cpe(**{**c, "edit_logprobs": None}, **args)
    with pytest.raises(ValueError, match="edit_clip_low"):
        cpe(**c, **{**args, "edit_clip_low": -1.0})


# ----------------------------------------------------------------------------- value loss
def test_value_loss_hand_values() -> None:
    values = t([[1.5, 1.1, 0.5, 42.0]])
    old = t([[1.0, 1.0, 1.0, 0.0]])
    ret = t([[2.0, 0.0, 2.0, -7.0]])
    mask = t([[1, 1, 1, 0]])
    loss, frac = value_loss(values, old, ret, mask, clip=0.2)
    # tok0: (1.5-2)^2 = 0.25; clipped v = 1.2 -> (1.2-2)^2 = 0.64 -> 0.5*0.64 = 0.32 (clipped)
    # tok1: v inside [0.8, 1.2] -> (1.1)^2 = 1.21 both -> 0.605
    # tok2: (0.5-2)^2 = 2.25; clipped v = 0.8 -> 1.44 -> max 2.25 -> 1.125 (not clipped)
    close(loss, (0.32 + 0.605 + 1.125) / 3)
    close(frac, 1 / 3)
    unclipped, frac0 = value_loss(values, old, ret, mask, clip=None)
    close(unclipped, (0.125 + 0.605 + 1.125) / 3)
    assert frac0.item() == 0.0



@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_aggregate_normalizer_splits_a_mean_exactly(mode: str) -> None:
    gen = torch.Generator().manual_seed(0)
    loss = torch.randn(6, 5, generator=gen)
    mask = (torch.rand(6, 5, generator=gen) > 0.3).float()
    mask[2] = 0  # an empty row counts for no sequence
    whole = aggregate_loss(loss, mask, mode)
    count = mask.sum() if mode == "token_mean" else (mask.sum(-1) > 0).sum()
    parts = [aggregate_loss(loss[i : i + 2], mask[i : i + 2], mode, normalizer=float(count))
             for i in range(0, 6, 2)]
    torch.testing.assert_close(sum(parts), whole)
    local = aggregate_loss(loss, mask, mode, normalizer=float(count))
    torch.testing.assert_close(local, whole)
    with pytest.raises(ValueError, match="normalizer must be positive"):
        aggregate_loss(loss, mask, mode, normalizer=0.0)


def test_sft_loss_hand_values_and_split_by_global_count() -> None:
    # log-probs of the targets; the mask keeps 3 tokens: -(-1 - 2 - 0.5) / 3 = 3.5 / 3
    logp = t([[-1.0, -9.0, -2.0], [-0.5, -7.0, -7.0]])
    mask = t([[1, 0, 1], [1, 0, 0]])
    close(sft_loss(logp, mask), 3.5 / 3)
    # rows split over two "ranks" with the global count 3 add up to the same mean
    whole = sft_loss(logp, mask, normalizer=3)
    parts = sft_loss(logp[:1], mask[:1], normalizer=3) + sft_loss(logp[1:], mask[1:], 3)
    close(whole, 3.5 / 3)
    close(parts, 3.5 / 3)
    close(sft_loss(logp, torch.zeros_like(mask)), 0.0)  # nothing labelled: 0, not NaN


def test_bradley_terry_loss_hand_values_and_gradient() -> None:
    chosen, rejected = t([2.0, 0.0]), t([0.0, 1.0])
    # -log sigmoid(2) = log(1 + e^-2) = 0.126928; -log sigmoid(-1) = log(1 + e) = 1.313262
    a, b = math.log1p(math.exp(-2.0)), math.log1p(math.exp(1.0))
    close(bradley_terry_loss(chosen, rejected), (a + b) / 2)
    close(bradley_terry_loss(chosen, rejected, weight=t([1.0, 0.0])), a)  # filler pair out
    close(bradley_terry_loss(chosen, rejected, normalizer=4), (a + b) / 4)
    # no overflow far from 0: softplus, not log(sigmoid)
    close(bradley_terry_loss(t([0.0]), t([1000.0])), 1000.0)
    close(bradley_terry_loss(t([1000.0]), t([0.0])), 0.0)
    c = chosen.clone().requires_grad_(True)
    bradley_terry_loss(c, rejected).backward()
    # d/dc of mean softplus(r - c) = -sigmoid(r - c) / 2: -(1 - sigmoid(2)) / 2, -sigmoid(1) / 2
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    close(c.grad, [-(1 - sig(2.0)) / 2, -sig(1.0) / 2])
    with pytest.raises(ValueError, match="shape mismatch"):
        bradley_terry_loss(t([1.0, 2.0]), t([1.0]))





# ----------------------------------------------------------------------------- the table
def test_policy_loss_table_refuses_a_second_entry_and_lists_known_names() -> None:
    assert tuple(POLICY_LOSSES) == ("ppo", "cpe")
    with pytest.raises(ValueError, match="policy loss 'cpe' is registered already"):
        POLICY_LOSSES.register("cpe", POLICY_LOSSES["ppo"])
    with pytest.raises(ValueError, match="unknown policy loss 'grpo'; use one of ppo, cpe"):
        POLICY_LOSSES["grpo"]


@pytest.mark.parametrize(("overrides", "name"), [
    ([], "cpe"), (["ppo.edit_loss=false"], "ppo"), (["post_edit.enabled=false"], "ppo")])
def test_the_config_picks_the_edit_loss_only_with_rewrites(overrides: list[str],
                                                           name: str) -> None:
    assert policy_loss_name(load_config(None, overrides)) == name


def test_the_ppo_loss_reads_no_edit_logprobs_and_logs_every_stat() -> None:
    c = cpe_case()
    loss, stats = ppo(**{**c, "edit_logprobs": None})
    assert torch.isfinite(loss)
    assert list(stats.to_dict()) == ["clip_frac", "approx_kl", "dual_clip_frac",
                                     "orig_clip_frac", "edit_clip_frac", "edit_ratio_mean",
                                     "edit_token_frac", "edit_truncated_frac"]
