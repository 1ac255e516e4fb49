"""Masked reductions, KL estimators and logits maths: expected numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from cpe_ray.algo.tensors import (
    KL_CLAMP,
    entropy_from_logits,
    kl_estimate,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)
from tests.algo.numbers import D, close, t


# ----------------------------------------------------------------------------- reductions
def test_masked_mean_sum_and_empty_mask() -> None:
    x = t([[1.0, 2.0, 99.0], [4.0, float("nan"), float("inf")]])
    m = t([[1, 1, 0], [1, 0, 0]])
    close(masked_sum(x, m), 1 + 2 + 4)
    close(masked_mean(x, m), 7 / 3)
    close(masked_mean(x, m, dim=1), [1.5, 4.0])
    zero = masked_mean(x, torch.zeros_like(m))  # nothing masked: 0, not NaN
    assert zero.item() == 0.0
    close(masked_mean(x, t([[1, 1, 0], [0, 0, 0]]), dim=1), [1.5, 0.0])


def test_masked_var_and_whiten() -> None:
    x = t([[1.0, 2.0, 3.0, 100.0], [5.0, 7.0, -50.0, 1e9]])
    m = t([[1, 1, 1, 0], [1, 1, 0, 0]])
    # masked elements 1, 2, 3, 5, 7: mean 18/5 = 3.6;
    # squared devs 6.76 + 2.56 + 0.36 + 1.96 + 11.56 = 23.2 -> unbiased 23.2/4 = 5.8
    close(masked_var(x, m), 5.8)
    close(masked_var(x, m, unbiased=False), 23.2 / 5)
    w = masked_whiten(x, m)
    close(w[0, 0], (1 - 3.6) / math.sqrt(5.8 + 1e-8))
    close(masked_mean(w, m), 0.0)
    close(masked_var(w, m), 1.0, tol=1e-6)
    assert w[0, 3] == 0 and w[1, 2] == 0 and w[1, 3] == 0
    kept = masked_whiten(x, m, shift_mean=False)
    close(masked_mean(kept, m), 3.6)
    assert kept[1, 3] == 0
    # One element: no spread, whitening gives 0 rather than NaN.
    assert masked_whiten(t([[3.0, 1.0]]), t([[1, 0]])).tolist() == [[0.0, 0.0]]


# ----------------------------------------------------------------------------- KL
def test_kl_estimators_hand_values() -> None:
    lp = t([[0.0, 1.0, -1.0, 3.0]])
    ref = torch.zeros_like(lp)  # log_ratio = [0, 1, -1, 3]
    mask = t([[1, 1, 1, 0]])
    close(kl_estimate(lp, ref, "k1", mask), [[0.0, 1.0, -1.0, 0.0]])
    close(kl_estimate(lp, ref, "k2", mask), [[0.0, 0.5, 0.5, 0.0]])
    # k3 = exp(-lr) - 1 + lr: e^-1 - 1 + 1 = e^-1; e^1 - 1 - 1 = e - 2
    close(kl_estimate(lp, ref, "k3", mask), [[0.0, math.exp(-1), math.e - 2, 0.0]])
    close(kl_estimate(lp, ref, "k3")[0, 3], math.exp(-3) + 2)
    wide = torch.linspace(-8, 8, 101, dtype=D)[None]
    assert (kl_estimate(wide, torch.zeros_like(wide), "k3") >= 0).all()
    with pytest.raises(ValueError, match="k1"):
        kl_estimate(lp, ref, "k4")


def test_k3_is_clamped_at_ten_like_the_peers() -> None:
    # log-ratio 13.9: unclamped k3 = e^-13.9 - 1 + 13.9 = 12.9; -13.9: e^13.9 - 14.9 ~ 1.1e6.
    # verl's low_var_kl and OpenRLHF clamp at 10; a small log-ratio (2) is untouched.
    assert KL_CLAMP == 10.0
    lp = t([[13.9, -13.9, 2.0]])
    close(kl_estimate(lp, torch.zeros_like(lp), "k3"), [[10.0, 10.0, math.exp(-2) + 1]])


# ----------------------------------------------------------------------------- logits
def test_entropy_and_logprobs_from_logits() -> None:
    logits = torch.tensor([[[0.0, math.log(3.0)], [1000.0, 0.0]]], dtype=D)
    # probs [1/4, 3/4]: H = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.5623351446; [1000, 0] -> ~0
    close(entropy_from_logits(logits), [[0.5623351446188083, 0.0]], tol=1e-9)
    ids = torch.tensor([[1, 1]])
    # ln(3/4); and ln softmax([1000, 0])[1] = -1000 - ln(1 + e^-1000) = -1000
    close(logprobs_from_logits(logits, ids), [[math.log(0.75), -1000.0]])
    uniform = torch.zeros(2, 3, 8, dtype=torch.bfloat16)
    close(entropy_from_logits(uniform), torch.full((2, 3), math.log(8)).float(), tol=1e-6)
    close(logprobs_from_logits(uniform, torch.zeros(2, 3, dtype=torch.long)),
          torch.full((2, 3), -math.log(8)).float(), tol=1e-6)
    with pytest.raises(ValueError, match="token_ids"):
        logprobs_from_logits(logits, ids[:, :1])
