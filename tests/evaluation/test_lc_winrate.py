"""The length-controlled win rate: synthetic judges with known answers, and alpaca_eval's fit."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from cpe_ray.evaluation.lc_winrate import CS, RANDOM_STATE, lc_winrate


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=float)))


def lengths(seed: int, n: int, mean_extra: float, spread: float = 300.0):
    """Baseline lengths around 1000 characters; the model's are `mean_extra` longer on average."""
    rng = np.random.default_rng(seed)
    base = rng.integers(600, 1400, n)
    model = np.maximum(50, base + rng.normal(mean_extra, spread, n).astype(int))
    return model, base


def judge(model, base, quality: float, length_bias: float = 2.0):
    """P(model wins) of a judge that likes length: sigmoid(quality + bias * tanh(dlen / sd))."""
    dlen = model - base
    return sigmoid(quality + length_bias * np.tanh(dlen / dlen.std(ddof=1)))


def test_verbose_model_raw_win_rate_is_length_only() -> None:
    # Same quality as the baseline, 300 characters longer on average, a judge that likes
    # length: the raw win rate is ~71, the truth at equal length is 50.
    model, base = lengths(0, 300, mean_extra=300)
    p = judge(model, base, quality=0.0)
    r = lc_winrate(p, model, base)
    assert r.win_rate == pytest.approx(100 * p.mean()) and r.win_rate > 70
    assert r.lc_win_rate == pytest.approx(50.0, abs=0.01)
    assert r.phi == pytest.approx(-2.0, abs=0.01)  # alpaca_eval's sign: len(baseline) - len(model)
    assert r.n_total == 300 and r.n_unjudged == 0
    assert r.extreme_change  # alpaca_eval's own warning fires: 70.7 -> 50.0


def test_better_model_keeps_its_lc_win_rate() -> None:
    # Better at equal length (quality 1.0: sigmoid(1) = 73.11%), with or without verbosity.
    expected = 100 * float(sigmoid(1.0))
    for extra in (0, 300):
        model, base = lengths(1, 300, mean_extra=extra)
        r = lc_winrate(judge(model, base, quality=1.0), model, base)
        assert r.lc_win_rate == pytest.approx(expected, abs=0.05)
    model, base = lengths(1, 300, mean_extra=-300)  # better and shorter: raw understates it
    r = lc_winrate(judge(model, base, quality=1.0), model, base)
    assert r.win_rate < 50 < r.lc_win_rate == pytest.approx(expected, abs=0.05)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noisy_binary_judgements(seed: int) -> None:
    # A real judge says win or lose: sample the verdicts, 400 instructions.
    rng = np.random.default_rng(seed)
    model, base = lengths(10 + seed, 400, mean_extra=300)
    verbose = (rng.random(400) < judge(model, base, 0.0)).astype(float)
    r = lc_winrate(verbose, model, base)
    assert r.win_rate > 65 and r.win_rate - r.lc_win_rate > 12
    assert abs(r.lc_win_rate - 50) < 2.5 * r.lc_standard_error
    better = (rng.random(400) < judge(model, base, 0.8)).astype(float)
    r = lc_winrate(better, model, base)
    assert r.lc_win_rate > 55 and r.lc_win_rate > 50 + 2 * r.lc_standard_error


def test_no_length_effect_with_balanced_lengths_gives_the_raw_rate() -> None:
    # Every preference appears once with the model longer by d and once shorter by d: the
    # length column is orthogonal to the constant, phi = 0, and the LC win rate is the raw
    # mean (up to the L1 shrinkage of theta). The robust standard error is then
    # sqrt(sum (p - mean)^2 / (n (n - 2))), by hand.
    rng = np.random.default_rng(7)
    d = rng.integers(20, 400, 50)
    p = rng.choice([0.0, 0.5, 1.0, 1.0, 1.0, 0.75], 50)
    base = np.full(100, 1000)
    model = np.concatenate([base[:50] + d, base[:50] - d])
    prefs = np.concatenate([p, p])
    r = lc_winrate(prefs, model, base)
    assert r.phi == 0.0
    assert r.win_rate == pytest.approx(100 * prefs.mean())
    assert r.lc_win_rate == pytest.approx(r.win_rate, abs=0.5)
    n = len(prefs)
    by_hand = 100 * math.sqrt(((prefs - prefs.mean()) ** 2).sum() / (n * (n - 2)))
    assert r.lc_standard_error == pytest.approx(by_hand, rel=0.01)
    assert r.standard_error == pytest.approx(100 * prefs.std(ddof=1) / math.sqrt(n))


def test_counts_follow_alpaca_eval() -> None:
    r = lc_winrate([1.0, 0.0, 0.5, 0.75, None], [10, 20, 30, 40, 50], [30, 30, 30, 30, 30])
    assert r.win_rate == pytest.approx(100 * (1 + 0 + 0.5 + 0.75) / 4)
    assert r.standard_error == pytest.approx(100 * np.std([1, 0, 0.5, 0.75], ddof=1) / 2)
    assert (r.n_wins, r.n_wins_base, r.n_draws, r.n_total, r.n_unjudged) == (2, 1, 1, 4, 1)
    assert r.discrete_win_rate == pytest.approx(100 * (1 + 0 + 0.5 + 1) / 4)
    assert r.length_scale == pytest.approx(np.std([20, 10, 0, -10, -20], ddof=1))
    assert r.lc_standard_error_alpaca == pytest.approx(0.0, abs=1e-9)  # minimal GLM: constant


@pytest.mark.parametrize(("low", "tol"), [(0.01, 1e-6), (0.0, 1e-3)])
def test_matches_logistic_regression_cv_as_alpaca_eval_calls_it(low: float, tol: float) -> None:
    # alpaca_eval's fit_LogisticRegressionCV: duplicated rows, GroupKFold(5), soft-label log
    # loss routed through metadata, L1 liblinear, no intercept, random_state 123. With
    # preferences of exactly 0 or 1 liblinear drops the zero-weight rows we keep at 1e-12:
    # the two problems then agree only to liblinear's tolerance (1e-4).
    import sklearn
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import make_scorer
    from sklearn.model_selection import GroupKFold

    rng = np.random.default_rng(1)
    model, base = lengths(3, 120, mean_extra=300)
    p = np.clip(judge(model, base, 0.3, 1.5) + rng.normal(0, 0.2, 120), low, 1 - low)
    ours = lc_winrate(p, model, base)

    def logloss_continuous(y_true, y_pred, true_prob, true_sample_weight=None):
        y = np.where(y_true == 1, true_prob, 1 - true_prob)
        y_pred = np.clip(y_pred, 1e-15, 1 - 1e-15)
        return -np.mean(y * np.log(y_pred) + (1 - y) * np.log(1 - y_pred))

    delta = base - model
    x = np.column_stack([np.tanh(delta / delta.std(ddof=1)), np.ones(120)])
    xd, yd = np.vstack([x, x]), np.r_[np.ones(120), np.zeros(120)]
    prob, groups = np.r_[p, 1 - p], np.r_[np.arange(120), np.arange(120)]
    major, minor = (int(v) for v in sklearn.__version__.split(".")[:2])
    l1 = {"l1_ratios": (1.0,), "use_legacy_attributes": False} if (major, minor) >= (1, 8) else {
        "penalty": "l1"}
    with sklearn.config_context(enable_metadata_routing=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scorer = make_scorer(logloss_continuous, response_method="predict_proba",
                             greater_is_better=False).set_score_request(
            true_sample_weight=True, true_prob=True)
        ref = LogisticRegressionCV(cv=GroupKFold(n_splits=5), scoring=scorer, Cs=len(CS),
                                   solver="liblinear", fit_intercept=False,
                                   random_state=RANDOM_STATE, **l1)
        ref.set_fit_request(sample_weight=True)
        ref.fit(xd, yd, sample_weight=prob, groups=groups, true_prob=prob,
                true_sample_weight=None)
    assert float(np.ravel(ref.C_)[0]) == pytest.approx(ours.C)
    assert ref.coef_[0] == pytest.approx([ours.phi, ours.theta], abs=tol)
    assert ours.lc_win_rate == pytest.approx(100 * float(sigmoid(ref.coef_[0][1])), abs=100 * tol)


def test_degenerate_inputs(capfd: pytest.CaptureFixture[str]) -> None:
    losses = lc_winrate([0, 0, 0, 0], [10, 20, 30, 40], [50, 50, 50, 50])
    assert losses.win_rate == 0 and losses.lc_win_rate < 1
    assert "WARNING" not in capfd.readouterr().out  # liblinear kept both classes
    ties = lc_winrate([0.5] * 6, [10, 20, 30, 40, 5, 6], [50] * 6)
    assert ties.lc_win_rate == pytest.approx(50.0) and ties.n_draws == 6
    same_length = lc_winrate([1, 0, 1, 1], [5, 5, 5, 5], [5, 5, 5, 5])
    assert same_length.length_scale == 0 and same_length.phi == 0
    # every model answer far shorter than its baseline: tanh(dlen / sd) is 1 on every row, so
    # theta and phi cannot be told apart and the LC win rate is an extrapolation
    rng = np.random.default_rng(5)
    base = rng.integers(150, 190, 32)
    one_sided = lc_winrate(np.zeros(32), np.full(32, 32), base)
    assert not one_sided.lc_identified and one_sided.lc_standard_error == 50.0
    assert losses.lc_identified and ties.lc_identified
    nothing = lc_winrate([None, float("nan")], [1, 2], [3, 4])
    assert nothing.n_total == 0 and nothing.n_unjudged == 2 and math.isnan(nothing.lc_win_rate)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match=r"preference 1.5 at index 1 is outside \[0, 1\]"):
        lc_winrate([0.5, 1.5], [1, 2], [3, 4])
    with pytest.raises(ValueError, match="2 preferences, 1 model lengths and 2 baseline"):
        lc_winrate([0.5, 1.0], [1], [3, 4])
