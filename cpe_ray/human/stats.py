"""Agreement statistics, each with its n: a mean with a bootstrap interval, Krippendorff's
alpha, Fleiss' kappa and Spearman's rho. Pure functions of plain numbers and categories.

Krippendorff's alpha follows Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability"
(the coincidence matrix); tests/human/test_agreement.py checks it on that paper's example.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95
LEVELS = ("nominal", "interval")
MIN_SPEARMAN_N = 3  # below this a rank correlation says nothing

@dataclass(frozen=True)
class Estimate:
    """A mean with its normal standard error and a bootstrap 95% interval."""

    value: float | None
    se: float | None
    ci95: tuple[float, float] | None
    n: int

    def scaled(self, factor: float) -> Estimate:
        def s(v: float | None) -> float | None:
            return None if v is None else factor * v

        ci = None if self.ci95 is None else (factor * self.ci95[0], factor * self.ci95[1])
        return Estimate(s(self.value), s(self.se), ci, self.n)


def mean_estimate(values: Sequence[float], seed: int,
                  resamples: int = BOOTSTRAP_RESAMPLES) -> Estimate:
    n = len(values)
    if not n:
        return Estimate(None, None, None, 0)
    x = np.asarray(values, dtype=float)
    se = float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else None
    means = x[np.random.default_rng(seed).integers(0, n, size=(resamples, n))].mean(axis=1)
    tail = (1.0 - CONFIDENCE) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Estimate(float(x.mean()), se, (float(low), float(high)), n)


@dataclass(frozen=True)
class Alpha:
    value: float | None  # None: undefined (fewer than two pairable values, or no variation)
    n_units: int  # units with at least two values (the others cannot be paired)
    n_values: int  # the values in those units


def krippendorff_alpha(units: Iterable[Sequence[Any]], level: str) -> Alpha:
    """Krippendorff's alpha = 1 - D_o / D_e from the coincidence matrix: a unit of m values
    adds 1 / (m - 1) to o[c, k] for each ordered pair of its values; D_o weighs o by the
    squared difference delta(c, k), D_e weighs n_c * n_k / (n - 1) by it. `level`: nominal
    (delta 1 between different values) or interval ((c - k) squared)."""
    if level not in LEVELS:
        raise ValueError(f"level {level!r}; use one of {LEVELS}")
    pairable = [list(u) for u in units if len(u) >= 2]
    values = sorted({v for u in pairable for v in u}, key=lambda v: (str(type(v)), v))
    index = {v: i for i, v in enumerate(values)}
    o = np.zeros((len(values), len(values)))
    for unit in pairable:
        weight = 1.0 / (len(unit) - 1)
        for a, first in enumerate(unit):
            for b, second in enumerate(unit):
                if a != b:
                    o[index[first], index[second]] += weight
    n_c = o.sum(axis=1)
    n = float(n_c.sum())
    if level == "nominal":
        delta = 1.0 - np.eye(len(values))
    else:
        v = np.asarray(values, dtype=float)
        delta = (v[:, None] - v[None, :]) ** 2
    expected = float((np.outer(n_c, n_c) * delta).sum())
    if n < 2 or expected == 0.0:
        return Alpha(None, len(pairable), int(round(n)))
    observed = float((o * delta).sum())
    return Alpha(1.0 - (n - 1.0) * observed / expected, len(pairable), int(round(n)))


@dataclass(frozen=True)
class Kappa:
    value: float | None
    n_units: int
    raters: int | None  # per unit; None where units differ
    note: str  # why the value is None, or ""


def fleiss_kappa(units: Sequence[Sequence[str]]) -> Kappa:
    """Fleiss' kappa = (P - P_e) / (1 - P_e) over units that each hold the categories their
    m raters chose; needs the same m >= 2 everywhere."""
    units = [u for u in units if u]
    sizes = {len(u) for u in units}
    if not units:
        return Kappa(None, 0, None, "no ratings")
    if len(sizes) > 1:
        return Kappa(None, len(units), None,
                     f"raters per task differ ({min(sizes)} to {max(sizes)})")
    m = sizes.pop()
    if m < 2:
        return Kappa(None, len(units), m, "one rater per task")
    categories = sorted({c for u in units for c in u})
    counts = np.array([[u.count(c) for c in categories] for u in units], dtype=float)
    agreement = ((counts ** 2).sum(axis=1) - m) / (m * (m - 1))
    share = counts.sum(axis=0) / (len(units) * m)
    chance = float((share ** 2).sum())
    if chance == 1.0:
        return Kappa(None, len(units), m, "every rating is the same category")
    return Kappa((float(agreement.mean()) - chance) / (1.0 - chance), len(units), m, "")


@dataclass(frozen=True)
class Correlation:
    rho: float | None
    p: float | None
    n: int


def spearman(x: Sequence[float], y: Sequence[float]) -> Correlation:
    """scipy.stats.spearmanr with n; None where fewer than 3 points or a constant side."""
    from scipy.stats import spearmanr

    n = len(x)
    if n < MIN_SPEARMAN_N or len(set(x)) < 2 or len(set(y)) < 2:
        return Correlation(None, None, n)
    result = spearmanr(x, y)
    return Correlation(float(result.statistic), float(result.pvalue), n)
