"""Raw and length-controlled (LC) win rates, as AlpacaEval 2's "length_controlled_minimal" GLM.

`lc_winrate(preferences, model_lengths, baseline_lengths)` takes, per instruction, the judge's
probability p in [0, 1] that the model's answer beats the baseline's (1 model, 0 baseline,
0.5 tie; None or NaN: the judge could not judge it) and both answers' lengths in characters.

What was matched, read from tatsu-lab/alpaca_eval `src/alpaca_eval/metrics/glm_winrate.py`
(`GLM_INFO["length_controlled_minimal"]`, `_get_featurized_data`, `fit_LogisticRegressionCV`,
`get_length_controlled_winrate`) and `metrics/helpers.py` (`describe_head2head`); this is our
own code, not a copy:
- Length feature: delta_len = len(baseline) - len(model) (alpaca_eval's output_1 is the
  baseline, output_2 the model), divided by its sample standard deviation (pandas' ddof=1,
  over every annotated row before unjudged ones are dropped), through tanh. method.md writes
  the opposite sign; only phi's sign depends on it, never the LC win rate.
- Formula "np.tanh(std_delta_len) + not_gamed_baseline.astype(float) - 1": two columns, the
  tanh feature (phi) and a column of ones (theta), no sklearn intercept; no
  instruction-difficulty term and no regularisation towards gamed baselines (those belong
  to "length_controlled_v1").
- Soft labels: every judged row twice, once with label 1 weighted by p and once with label 0
  weighted by 1 - p.
- Fit: L1 logistic regression, solver liblinear, fit_intercept=False, random_state=123,
  chosen over LogisticRegressionCV's default grid Cs = logspace(-4, 4, 10) by 5-fold
  GroupKFold (a row's two copies share a fold), scored by the log loss of the held-out rows
  against their soft label p (unweighted, eps 1e-15), the C with the best summed score
  (first on ties) refit on all rows. The loop is written out with plain LogisticRegression
  because LogisticRegressionCV needs sklearn's global metadata routing for the soft-label
  scorer and its `penalty` argument is deprecated since sklearn 1.8; the test suite checks
  that the two agree.
- LC win rate: mean over instructions of the predicted P(model wins) with delta_len = 0,
  times 100. Raw win rate: mean of p times 100, standard error pandas' sem (ddof=1) times
  100; wins p > 0.5, baseline wins p < 0.5, draws p == 0.5; `discrete_win_rate` rounds each
  preference first (ZeroOneScoringRule). `extreme_change` is alpaca_eval's warning rule
  (`get_is_extreme_changes`, abs_diff 10, rel_diff 4).
Deviations, all where alpaca_eval has no answer or a degenerate one:
- `lc_standard_error`: alpaca_eval reports the sem of the per-instruction predictions, which
  for this formula is always 0 (every prediction is sigmoid(theta)); we keep that value as
  `lc_standard_error_alpaca` and report instead the delta-method standard error of
  sigmoid(theta) with a heteroskedasticity-robust (sandwich, HC1) covariance of the fitted
  coefficients, right for fractional labels; it ignores the L1 selection. When the length
  feature barely varies and sits far from 0 (say every model answer is much shorter than its
  baseline), theta and phi cannot be told apart and that error explodes: it is capped at 50
  points (a probability's largest standard deviation), also when the information matrix is
  singular (condition number above 1e12), and `lc_identified` is False: the LC win rate is
  then an extrapolation, not a measurement.
- Soft-label weights are floored at 1e-12: liblinear drops zero-weight rows, and when every
  preference is 0 (or 1) in a training split that leaves one class, which liblinear answers
  with a warning on stdout and all-zero coefficients (an LC win rate of exactly 50).
- Fewer judged rows than folds: n_splits = number of judged rows; a single judged row: no
  cross-validation, C = 100 (alpaca_eval's `n_splits=0` branch). Zero length spread (or one
  row): the tanh column is 0 (alpaca_eval would divide by zero).
The result also carries what `lc_status.py` needs to say whether the LC win rate measured
anything: the information matrix's condition number, the folds that chose C, and the shares
of judged prompts whose model answer is longer / shorter than the baseline's.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

PERCENT = 100.0
N_SPLITS = 5  # glm_info["kwargs"]["n_splits"]
CS = tuple(float(c) for c in np.logspace(-4, 4, 10))  # LogisticRegressionCV(Cs=10)
C_WITHOUT_CV = 100.0  # fit_LogisticRegressionCV(C=100) when there is no cross-validation
RANDOM_STATE = 123
LOGLOSS_EPS = 1e-15
TIE = 0.5
# The largest standard deviation a probability can have: a delta-method standard error
# above it means the LC win rate is not identified by the data.
MAX_PROBABILITY_SE = 0.5
MAX_CONDITION = 1e12  # of the GLM's information matrix; above it theta is not identified
# liblinear drops zero-weight rows; when that removes a class it warns on stdout and fits
# nothing. A floor keeps both classes and moves the objective by ~1e-12.
WEIGHT_FLOOR = 1e-12
# get_is_extreme_changes defaults
EXTREME_ABS_DIFF = 10.0
EXTREME_REL_DIFF = 4.0


@dataclass(frozen=True)
class WinRateResult:
    """Win rates in percent (NaN when nothing was judged) and the fitted GLM."""

    win_rate: float
    standard_error: float
    lc_win_rate: float
    lc_standard_error: float
    lc_standard_error_alpaca: float
    discrete_win_rate: float
    n_wins: int
    n_wins_base: int
    n_draws: int
    n_total: int  # judged instructions
    n_unjudged: int
    theta: float  # coefficient of the constant column
    phi: float  # coefficient of tanh((len(baseline) - len(model)) / length_scale)
    length_scale: float  # sample sd of len(baseline) - len(model); 0 when undefined
    C: float  # the regularisation strength chosen by cross-validation
    extreme_change: bool
    lc_identified: bool  # False: the data say nothing about equal lengths (see above)
    condition_number: float  # of the GLM's information matrix (NaN with too few rows)
    cv_folds: int  # GroupKFold splits that chose C (0: no cross-validation)
    model_longer_share: float  # judged prompts whose model answer is longer than the baseline's
    model_shorter_share: float  # ... shorter (the rest have equal lengths)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _l1_kwargs() -> dict[str, Any]:
    """L1 in this sklearn's spelling: `l1_ratio=1` from 1.8 on, `penalty="l1"` before."""
    import sklearn

    found = re.match(r"(\d+)\.(\d+)", sklearn.__version__)
    major, minor = (int(found.group(1)), int(found.group(2))) if found else (1, 8)
    return {"l1_ratio": 1.0} if (major, minor) >= (1, 8) else {"penalty": "l1"}


def _fit(x: np.ndarray, y: np.ndarray, w: np.ndarray, c: float) -> np.ndarray:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, solver="liblinear", fit_intercept=False,
                               random_state=RANDOM_STATE, **_l1_kwargs())
    with warnings.catch_warnings():  # separable data (every preference 0 or 1) at large C
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y, sample_weight=w)
    return model.coef_[0].astype(float)


def _sigmoid(z: np.ndarray | float) -> np.ndarray | float:
    return np.exp(-np.logaddexp(0.0, -np.asarray(z, dtype=float)))


def _duplicated(x: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = len(p)
    weights = np.maximum(np.concatenate([p, 1.0 - p]), WEIGHT_FLOOR)
    return np.vstack([x, x]), np.concatenate([np.ones(n), np.zeros(n)]), weights


def _folds(n: int) -> int:
    """Cross-validation folds for n judged rows; 0: no cross-validation."""
    return min(N_SPLITS, n) if n >= 2 else 0


def _choose_c(x: np.ndarray, p: np.ndarray) -> float:
    """LogisticRegressionCV's choice: best summed held-out soft-label log loss over folds."""
    from sklearn.model_selection import GroupKFold

    n = len(p)
    if not _folds(n):
        return C_WITHOUT_CV
    xd, yd, wd = _duplicated(x, p)
    groups = np.concatenate([np.arange(n), np.arange(n)])
    target = np.concatenate([p, p])  # y_true of logloss_continuous for both copies
    scores = np.zeros(len(CS))
    for train, test in GroupKFold(n_splits=_folds(n)).split(xd, yd, groups):
        for k, c in enumerate(CS):
            coef = _fit(xd[train], yd[train], wd[train], c)
            pred = np.clip(_sigmoid(xd[test] @ coef), LOGLOSS_EPS, 1 - LOGLOSS_EPS)
            t = target[test]
            scores[k] += np.mean(t * np.log(pred) + (1 - t) * np.log(1 - pred))
    return CS[int(np.argmax(scores))]


def _theta_variance(x: np.ndarray, p: np.ndarray, coef: np.ndarray) -> tuple[float, float]:
    """Sandwich (HC1) variance of theta, over the columns that are not all zero, and the
    condition number of the information matrix (NaN for both with too few rows)."""
    keep = np.any(x != 0, axis=0)
    keep[-1] = True  # theta's column of ones
    xk = x[:, keep]
    n, k = xk.shape
    if n <= k:
        return math.nan, math.nan
    mu = _sigmoid(x @ coef)
    bread = (xk * (mu * (1 - mu))[:, None]).T @ xk
    scores = xk * (p - mu)[:, None]
    meat = scores.T @ scores * n / (n - k)
    cond = float(np.linalg.cond(bread))
    if not cond < MAX_CONDITION:  # columns (nearly) collinear: unidentified
        return math.inf, cond
    inv = np.linalg.inv(bread)
    return float((inv @ meat @ inv)[-1, -1]), cond


def _is_extreme(raw: float, lc: float) -> bool:
    too_small = lc < min(raw - raw / EXTREME_REL_DIFF, raw - EXTREME_ABS_DIFF)
    too_large = lc > max(raw + (PERCENT - raw) / EXTREME_REL_DIFF, raw + EXTREME_ABS_DIFF)
    return bool(too_small or too_large)


def _sem(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan


def _preferences(preferences: Sequence[float | None]) -> np.ndarray:
    prefs = np.array([math.nan if v is None else float(v) for v in preferences], dtype=float)
    bad = ~np.isnan(prefs) & ((prefs < 0) | (prefs > 1))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"preference {prefs[i]} at index {i} is outside [0, 1] "
                         "(1: model wins, 0: baseline wins, 0.5: tie)")
    return prefs


def lc_winrate(
    preferences: Sequence[float | None],
    model_lengths: Sequence[int],
    baseline_lengths: Sequence[int],
) -> WinRateResult:
    """Raw and length-controlled win rates with standard errors (see the module docstring)."""
    prefs = _preferences(preferences)
    m_len = np.asarray(model_lengths, dtype=float)
    b_len = np.asarray(baseline_lengths, dtype=float)
    if not len(prefs) == len(m_len) == len(b_len):
        raise ValueError(f"lc_winrate: {len(prefs)} preferences, {len(m_len)} model lengths "
                         f"and {len(b_len)} baseline lengths; give one of each per instruction")
    if (m_len < 0).any() or (b_len < 0).any():
        raise ValueError("lc_winrate: lengths must be >= 0 characters")
    delta = b_len - m_len
    scale = float(delta.std(ddof=1)) if len(delta) > 1 else 0.0
    feature = np.tanh(delta / scale) if scale > 0 else np.zeros_like(delta)
    x_all = np.column_stack([feature, np.ones_like(feature)])

    judged = ~np.isnan(prefs)
    p, x = prefs[judged], x_all[judged]
    n, nan = len(p), math.nan
    if n == 0:
        return WinRateResult(nan, nan, nan, nan, nan, nan, 0, 0, 0, 0, int((~judged).sum()),
                             nan, nan, scale, nan, False, False, nan, 0, nan, nan)
    c = _choose_c(x, p)
    coef = _fit(*_duplicated(x, p), c)
    at_zero = np.asarray(_sigmoid(np.column_stack([np.zeros(len(prefs)), np.ones(len(prefs))])
                                  @ coef))
    lc = float(at_zero.mean())
    var_theta, cond = _theta_variance(x, p, coef)
    lc_se = math.inf if var_theta == math.inf else (
        float(lc * (1 - lc) * math.sqrt(var_theta)) if var_theta >= 0 else nan)
    identified = not lc_se > MAX_PROBABILITY_SE  # NaN (too few rows) is not a failure
    if not identified:
        lc_se = MAX_PROBABILITY_SE
    raw = float(p.mean())
    discrete = np.where(p == TIE, TIE, np.round(p))
    return WinRateResult(
        win_rate=raw * PERCENT,
        standard_error=_sem(p) * PERCENT,
        lc_win_rate=lc * PERCENT,
        lc_standard_error=lc_se * PERCENT,
        lc_standard_error_alpaca=_sem(at_zero) * PERCENT,
        discrete_win_rate=float(discrete.mean()) * PERCENT,
        n_wins=int((p > TIE).sum()),
        n_wins_base=int((p < TIE).sum()),
        n_draws=int((p == TIE).sum()),
        n_total=n,
        n_unjudged=int((~judged).sum()),
        theta=float(coef[1]),
        phi=float(coef[0]),
        length_scale=scale,
        C=c,
        extreme_change=_is_extreme(raw * PERCENT, lc * PERCENT),
        lc_identified=identified,
        condition_number=cond,
        cv_folds=_folds(n),
        model_longer_share=float((delta[judged] < 0).mean()),
        model_shorter_share=float((delta[judged] > 0).mean()),
    )
