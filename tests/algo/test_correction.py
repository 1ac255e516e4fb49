"""Rollout correction (algo/correction.py) against hand-computed numbers and verl's formulas.

The reference functions below are written from verl's documented formulas, not its code:
`verl/trainer/ppo/rollout_corr_helper.py` at volcengine/verl b178a3c
(`compute_rollout_correction_weights`, `compute_rollout_rejection_mask`'s seq_sum_k1,
`compute_is_metrics`'s ESS, `compute_offpolicy_metrics`'s k3_kl) and its per-token veto at
518bada (`rollout_token_veto_threshold`), slime's `examples/train_infer_mismatch_helper/mis.py`
(truncate / mask / veto) agreeing.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from cpe_ray.algo.correction import (
    band_keep,
    effective_sample_size,
    mismatch_k3,
    rollout_correction,
    token_weights,
    truncate_weight,
    veto_keep,
)
from cpe_ray.algo.losses import POLICY_LOSSES, PolicyLossInput
from cpe_ray.config import load_config
from cpe_ray.config.schema import RolloutCorrectionConfig
from tests.algo.numbers import D, close, t

L3, L4, LH = math.log(3.0), math.log(4.0), math.log(0.5)
# rows: original (r = 3, 0.5, 1), original (r = 4, 1), rewrite (not weighted here)
OLD = t([[L3, LH, 0.0], [L4, 0.0, 0.0], [-1.0, -2.0, 0.0]])
BEHAV = torch.zeros(3, 3, dtype=D)
MASK = t([[1, 1, 1], [1, 1, 0], [1, 1, 0]])
EDITED = torch.tensor([False, False, True])


def corr(mode: str, **kw):
    rc = RolloutCorrectionConfig(mode=mode, **kw)
    return rollout_correction(rc, OLD, BEHAV, MASK, EDITED)


# ----------------------------------------------------------------------------- by hand
def test_token_tis_by_hand() -> None:
    c = corr("token_tis")
    # min(r, 2): 3 -> 2, 0.5, 1 | 4 -> 2, 1 | rewrite rows weigh 1
    close(c.weights, t([[2, 0.5, 1], [2, 1, 0], [1, 1, 0]]))
    assert torch.equal(c.keep, MASK.bool()) and c.tokens == 5
    s = c.stats.to_dict()
    assert s["weight_mean"] == pytest.approx(6.5 / 5) and s["weight_max"] == 2.0
    assert s["ratio_max"] == pytest.approx(4.0) and s["clipped_frac"] == pytest.approx(0.4)
    assert s["masked_frac"] == 0.0
    # (sum w)^2 / (N sum w^2) = 6.5^2 / (5 x 10.25)
    assert s["ess"] == pytest.approx(42.25 / 51.25)
    # k3 = r - 1 - log r: (2 - log 3) + (log 2 - 0.5) + (3 - log 4), over 5 tokens
    k3 = (2 - L3) + (math.log(2) - 0.5) + (3 - L4)
    assert s["mismatch_kl"] == pytest.approx(k3 / 5)


def test_seq_mis_by_hand() -> None:
    c = corr("seq_mis")
    # row 0: W = 3 x 0.5 x 1 = 1.5, inside [0.5, 2]; row 1: W = 4, rejected
    close(c.weights, t([[1.5, 1.5, 1.5], [0, 0, 0], [1, 1, 0]]))
    assert c.keep.tolist() == [[True] * 3, [False] * 3, [True, True, False]]
    s = c.stats.to_dict()
    assert s["weight_mean"] == pytest.approx(1.5) and s["ess"] == pytest.approx(1.0)
    assert s["masked_frac"] == pytest.approx(2 / 5) and s["clipped_frac"] == 0.0


def test_token_tis_on_the_band_and_the_veto_by_hand() -> None:
    c = corr("token_tis_seq_mis")
    close(c.weights, t([[2, 0.5, 1], [0, 0, 0], [1, 1, 0]]))
    assert c.stats.to_dict()["ess"] == pytest.approx(3.5**2 / (3 * 5.25))
    # r = 0.5 < 0.6 vetoes row 0 (the rewrite's tokens are never vetoed)
    v = corr("token_tis", token_veto=0.6)
    assert v.keep.tolist() == [[False] * 3, [True, True, False], [True, True, False]]
    assert v.stats.to_dict()["masked_frac"] == pytest.approx(3 / 5)


def test_none_asks_for_nothing() -> None:
    with pytest.raises(ValueError, match="none"):
        corr("none")


# ----------------------------------------------------------------------------- verl's formulas
def verl_token_is(log_ratio, mask, threshold):
    """rollout_is=token: exp(clamp(log r, -20, 20)) * mask, truncated at the threshold."""
    return (torch.exp(torch.clamp(log_ratio, -20, 20)) * mask).clamp(max=threshold)


def verl_seq_sum_k1_keep(log_ratio, mask, lower, upper):
    """seq_sum_k1 with 'lower_upper': k1 = -log r summed per sequence, kept when
    log(lower) <= sum <= log(upper). The statistic is -log W: for a band closed under
    inversion ([0.5, 2]) the rule is lower <= W <= upper, ours."""
    stat = (-torch.clamp(log_ratio, -20, 20) * mask).sum(-1)
    return (stat >= math.log(lower)) & (stat <= math.log(upper))


def verl_veto_keep(log_ratio, mask, threshold):
    return ~((log_ratio < math.log(threshold)) & mask.bool()).any(-1)


def verl_ess(weights, mask, threshold):
    """compute_is_metrics: weights clamped to [1/C, C], normalised by their masked mean,
    ESS = 1 / masked_mean(w_n^2)."""
    w = weights.clamp(min=1 / threshold, max=threshold)
    mean = (w * mask).sum() / mask.sum()
    wn = w / (mean + 1e-8)
    return 1 / ((wn**2 * mask).sum() / mask.sum())


def verl_k3(log_ratio, mask):
    return ((torch.exp(log_ratio) - log_ratio - 1) * mask).sum() / mask.sum()


def random_batch(seed: int, scale: float = 0.4):
    g = torch.Generator().manual_seed(seed)
    b, n = 16, 12
    lengths = torch.randint(1, n + 1, (b,), generator=g)
    mask = (torch.arange(n)[None] < lengths[:, None]).to(D)
    old = -torch.rand(b, n, generator=g, dtype=D) * 3
    behav = old - scale * torch.randn(b, n, generator=g, dtype=D)
    return old, behav, mask


@pytest.mark.parametrize("seed", range(5))
def test_formulas_agree_with_verls_on_random_inputs(seed: int) -> None:
    old, behav, mask = random_batch(seed)
    log_r = (old - behav) * mask
    none = torch.zeros(len(mask), dtype=torch.bool)
    w, _ = token_weights(log_r, mask, 2.0)
    close(w, verl_token_is(log_r, mask, 2.0), 1e-6)
    seq = (log_r * mask).sum(-1)
    assert torch.equal(band_keep(seq, 0.5, 2.0), verl_seq_sum_k1_keep(log_r, mask, 0.5, 2.0))
    assert torch.equal(veto_keep(log_r, mask, 0.3), verl_veto_keep(log_r, mask, 0.3))
    close(mismatch_k3(log_r, mask), verl_k3(log_r, mask), 1e-6)
    # verl clamps the weights to [1/C, C] for its ESS: equal to ours on weights inside
    inside = w.clamp(min=0.5)
    close(effective_sample_size(inside, mask), verl_ess(inside, mask, 2.0), 1e-6)
    # the whole correction: token TIS on the band, veto
    rc = RolloutCorrectionConfig(mode="token_tis_seq_mis", token_veto=0.3)
    c = rollout_correction(rc, old, behav, mask, none)
    keep = verl_seq_sum_k1_keep(log_r, mask, 0.5, 2.0) & verl_veto_keep(log_r, mask, 0.3)
    assert torch.equal(c.keep, mask.bool() & keep[:, None])
    close(c.weights, verl_token_is(log_r, mask, 2.0) * keep[:, None], 1e-6)


# ----------------------------------------------------------------------------- mismatch
def test_a_synthetic_mismatch_is_unbounded_without_the_correction_and_bounded_with() -> None:
    """The engine samples at T = 0.7, the learner scores at 1.0: tail tokens are likelier to
    the learner, and their ratios (and a sequence's product) grow without bound."""
    g = torch.Generator().manual_seed(0)
    b, n, v = 64, 24, 50
    logits = 3 * torch.randn(b, n, v, generator=g, dtype=D)
    engine = torch.log_softmax(logits / 0.7, -1)
    tokens = torch.multinomial(engine.exp().reshape(-1, v), 1, generator=g).reshape(b, n)
    behav = engine.gather(-1, tokens[..., None])[..., 0]
    old = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    mask, none = torch.ones(b, n, dtype=D), torch.zeros(b, dtype=torch.bool)
    raw = torch.exp(old - behav)
    assert raw.max() > 10 and torch.exp((old - behav).sum(-1)).max() > 50
    for mode in ("token_tis", "seq_mis", "token_tis_seq_mis"):
        c = rollout_correction(RolloutCorrectionConfig(mode=mode), old, behav, mask, none)
        assert c.weights.max() <= 2.0 and c.stats.to_dict()["weight_max"] <= 2.0
        assert c.stats.to_dict()["ratio_max"] > 10
        if mode == "seq_mis":  # the band: every kept sequence's weight in [0.5, 2]
            assert c.weights[c.keep].min() >= 0.5
        if mode != "token_tis":
            assert c.stats.to_dict()["masked_frac"] > 0
    assert rollout_correction(RolloutCorrectionConfig(mode="token_tis"), old, behav, mask,
                              none).stats.to_dict()["clipped_frac"] > 0


def test_rejected_tokens_leave_the_denominator() -> None:
    """The loss over a batch with row 1 rejected is the loss over the batch without it."""
    g = torch.Generator().manual_seed(1)
    logp = OLD + 0.1 * torch.randn(3, 3, generator=g, dtype=D)
    adv = torch.randn(3, 3, generator=g, dtype=D) * MASK
    for agg in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum"):
        c = corr("token_tis_seq_mis")
        full, _ = POLICY_LOSSES["ppo"](PolicyLossInput(
            logp, OLD, adv, c.keep.to(D), is_edited=EDITED, is_weights=c.weights, agg=agg))
        rows = [0, 2]
        part, _ = POLICY_LOSSES["ppo"](PolicyLossInput(
            logp[rows], OLD[rows], adv[rows], MASK[rows], is_edited=EDITED[rows],
            is_weights=c.weights[rows], agg=agg))
        close(full, part, 1e-12)
    # token_mean over the 5 kept tokens: the weights enter each token's loss
    c = corr("token_tis_seq_mis")
    loss, _ = POLICY_LOSSES["ppo"](PolicyLossInput(OLD, OLD, adv, c.keep.to(D),
                                                   is_edited=EDITED, is_weights=c.weights))
    close(loss, -(adv * c.weights).sum() / 5, 1e-12)


def test_rewrites_are_bounded_by_their_own_bound() -> None:
    """The release's unclipped rewrite ratio pi_theta / pi_e reads ~1000 where pi_e gave the
    token 1e-3; rewrite_clip truncates the weight to 2, and the token still learns."""
    logp = torch.zeros(1, 2, dtype=D, requires_grad=True)  # pi_theta = 1
    edit = torch.log(t([[1e-3, 0.9]]))
    adv, mask, edited = t([[1.0, 1.0]]), t([[1.0, 1.0]]), torch.tensor([True])
    base = dict(old_logprobs=logp.detach(), advantages=adv, mask=mask, is_edited=edited,
                edit_logprobs=edit, edit_clip_low=None, edit_clip_high=None)
    loss, stats = POLICY_LOSSES["cpe"](PolicyLossInput(logp, **base))
    assert -float(loss) * 2 > 900  # unbounded: the first token's weight ~ 999
    (grad,) = torch.autograd.grad(loss, logp)
    assert -grad[0, 0] * 2 > 900
    loss, stats = POLICY_LOSSES["cpe"](PolicyLossInput(logp, **base, rewrite_clip=2.0))
    r2 = 1 / (0.9 + 1e-6)
    close(loss, -(2.0 + r2) / 2, 1e-9)
    (grad,) = torch.autograd.grad(loss, logp)
    close(grad, t([[-1.0, -r2 / 2]]), 1e-9)  # d/dlogp of -A min(r, 2) / 2: 2 -> 1, r2 / 2
    assert stats.to_dict()["edit_truncated_frac"] == 0.5
    value, over = truncate_weight(t([[0.5, 3.0]]), 2.0)
    close(value, t([[0.5, 2.0]]))
    assert over.tolist() == [[False, True]]


def test_originals_weights_do_not_touch_rewrites_and_ones_change_nothing() -> None:
    g = torch.Generator().manual_seed(2)
    logp = OLD + 0.1 * torch.randn(3, 3, generator=g, dtype=D)
    adv = torch.randn(3, 3, generator=g, dtype=D) * MASK
    inp = PolicyLossInput(logp, OLD, adv, MASK, is_edited=EDITED, edit_logprobs=OLD - 1)
    plain, _ = POLICY_LOSSES["cpe"](inp)
    ones, _ = POLICY_LOSSES["cpe"](replace(inp, is_weights=MASK.clone()))
    assert torch.equal(plain, ones)


# ----------------------------------------------------------------------------- config
def test_presets_write_out_the_section_and_keys_beside_them_win() -> None:
    rc = load_config(None, ["ppo.rollout_correction.preset=mis"]).ppo.rollout_correction
    assert (rc.mode, rc.seq_band, rc.token_veto, rc.rewrite_clip) == (
        "seq_mis", [0.5, 2.0], 1e-4, 2.0)
    rc = load_config(None, ["ppo.rollout_correction.preset=tis",
                            "ppo.rollout_correction.truncation=3.0"]).ppo.rollout_correction
    assert (rc.mode, rc.truncation, rc.token_veto) == ("token_tis", 3.0, None)
    assert load_config(None, []).ppo.rollout_correction.mode == "none"
    with pytest.raises(Exception, match="seq_band"):
        load_config(None, ["ppo.rollout_correction.seq_band=[2.0, 1.0]"])
