"""Whether a length-controlled win rate measured anything, and how many prompts it would need.

`lc_status(result, target_se)` reads a `WinRateResult` and says one of:

- `identified`: the GLM fitted a model term from both sides of equal length, on enough
  prompts, with a finite standard error;
- `degenerate`: the cross-validated L1 penalty set the model term theta to exactly 0, so the
  LC win rate is 50 by construction (the CV preferred "no preference" at this sample size);
- `not_identified`: nothing was judged, or too few prompts (under MIN_PROMPTS, two per
  cross-validation fold), or one-sided length differences (fewer than ONE_SIDED_SHARE of
  the prompts at or past equal length on the minority side: equal length is an
  extrapolation), or columns too collinear for a standard error (`lc_identified` False).

Every reason that applies is listed, in words with its numbers; `degenerate` wins the
headline because it alone explains a 50.

Prompts needed, by scaling the observed standard error as 1/sqrt(n): the SE that n prompts
gave becomes se * sqrt(n / m) at m prompts drawn like these (the same spread of preferences
and lengths), so
- `prompts_for_target_se` = ceil(n * (se / target_se)^2), where se is the LC win rate's
  sandwich SE (`se_basis` "lc"); when that SE is not measurable (not identified, or NaN) the
  raw win rate's SE stands in (`se_basis` "raw"): the LC SE is at least about as large, so
  the count is a lower bound;
- `prompts_to_separate` = ceil(n * (2 * se_raw / |win_rate - 50|)^2): where the raw win
  rate's 2-SE interval would exclude 50 (None when it is exactly 50). A count at or below n
  means it already does.
Neither accounts for the L1 selection: a degenerate fit keeps theta at 0 until the
preference beyond length is large against its noise, which the separation count estimates.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from cpe_ray.evaluation.lc_winrate import MAX_CONDITION, N_SPLITS, WinRateResult

IDENTIFIED, DEGENERATE, NOT_IDENTIFIED = "identified", "degenerate", "not_identified"
MIN_PROMPTS = 2 * N_SPLITS  # two prompts per cross-validation fold
ONE_SIDED_SHARE = 0.05
SEPARATION_SES = 2.0
EVEN = 50.0  # percent
METHOD = ("observed SE scaled by sqrt(n / m): m = ceil(n * (se / target)^2); separation: "
          "m = ceil(n * (2 * raw SE / |raw - 50|)^2)")


@dataclass(frozen=True)
class LCStatus:
    """What the LC win rate can tell, and the prompts it would need (see the module)."""

    status: str  # identified, degenerate or not_identified
    reasons: tuple[str, ...]  # empty when identified
    n: int  # judged prompts
    target_se: float  # points
    se: float | None  # the SE scaled for prompts_for_target_se, points
    se_basis: str  # lc: the LC sandwich SE; raw: the raw win rate's (a lower bound); none
    prompts_for_target_se: int | None
    prompts_to_separate: int | None
    method: str = METHOD

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _needed(n: int, se: float, gap: float) -> int | None:
    """Prompts at which `se`, measured on n, falls to `gap`: ceil(n * (se / gap)^2)."""
    if not (math.isfinite(se) and gap > 0):
        return None
    return math.ceil(n * (se / gap) ** 2)


def _reasons(r: WinRateResult) -> list[str]:
    out = []
    if r.theta == 0.0:
        chosen = (f", chosen by {r.cv_folds}-fold cross-validation" if r.cv_folds else
                  " (no cross-validation)")
        out.append(f"the L1 penalty set the model term to 0 at C={r.C:.3g}{chosen}")
    if r.n_total < MIN_PROMPTS:
        out.append(f"too few prompts: {r.n_total} judged, under {MIN_PROMPTS} (two per "
                   "cross-validation fold)")
    longer, shorter = r.model_longer_share, r.model_shorter_share
    equal = 1.0 - longer - shorter
    if min(longer, shorter) + equal < ONE_SIDED_SHARE:
        out.append(f"one-sided length differences: the model is longer on {longer:.0%} and "
                   f"shorter on {shorter:.0%} of prompts, so equal length is extrapolated")
    if not r.lc_identified:
        what = ("near-collinear columns" if not r.condition_number < MAX_CONDITION
                else "a standard error above 50 points")
        out.append(f"{what} (condition number {r.condition_number:.3g})")
    return out


def lc_status(r: WinRateResult, target_se: float) -> LCStatus:
    """The status of `r`'s LC win rate and the prompts for an SE of `target_se` points."""
    if r.n_total == 0:
        return LCStatus(NOT_IDENTIFIED, ("nothing was judged",), 0, target_se, None, "none",
                        None, None)
    reasons = _reasons(r)
    status = DEGENERATE if r.theta == 0.0 else NOT_IDENTIFIED if reasons else IDENTIFIED
    se, basis = r.lc_standard_error, "lc"
    if not (r.lc_identified and math.isfinite(se)):
        se, basis = r.standard_error, "raw"
    if not math.isfinite(se):
        se, basis = math.nan, "none"
    return LCStatus(status, tuple(reasons), r.n_total, target_se,
                    se if basis != "none" else None, basis,
                    _needed(r.n_total, se, target_se),
                    _needed(r.n_total, SEPARATION_SES * r.standard_error,
                            abs(r.win_rate - EVEN)))


def _prompts_phrase(s: LCStatus) -> str:
    if s.prompts_for_target_se is None or s.se is None:
        return f"no SE to scale for a {s.target_se:g}-point target"
    if s.se_basis == "raw":  # the LC SE is at least about the raw one
        return (f"its SE is not measurable; the raw win rate's SE {s.se:.1f} "
                + (f"is under {s.target_se:g} points" if s.se <= s.target_se else
                   f"would fall under {s.target_se:g} points at about "
                   f"{s.prompts_for_target_se}"))
    if s.se <= s.target_se:
        return f"its SE {s.se:.1f} is under {s.target_se:g} points"
    return f"about {s.prompts_for_target_se} would put its SE under {s.target_se:g} points"


def status_line(s: LCStatus, lc_win_rate: float) -> str:
    """One console line: `LC win rate 50.0 (degenerate: ...; 32 prompts; about 67 ...)`."""
    rate = f"{lc_win_rate:.1f}" if math.isfinite(lc_win_rate) else "—"
    head = s.status if not s.reasons else f"{s.status}: {s.reasons[0]}"
    if s.n == 0:
        return f"LC win rate {rate} ({head})"
    return f"LC win rate {rate} ({head}; {s.n} prompts; {_prompts_phrase(s)})"


def status_markdown(s: LCStatus, lc_win_rate: float) -> list[str]:
    """The report's LC status block: the line, every reason, and both prompt counts."""
    rate = f"{lc_win_rate:.1f}" if math.isfinite(lc_win_rate) else "—"
    lines = [f"**LC status: {s.status}** (LC win rate {rate}, {s.n} prompts)"
             + (":" if s.reasons else ".")]
    lines += [f"- {reason}" for reason in s.reasons]
    if s.n:
        basis = {"lc": "the LC sandwich SE", "raw": "the raw win rate's SE (a lower bound: "
                 "the LC SE is not measurable here)", "none": "no SE"}[s.se_basis]
        m = s.prompts_to_separate
        sep = ("never (the raw win rate is exactly 50)" if m is None else
               f"already ({m} would do)" if m <= s.n else f"about {m}")
        lines += [f"- Prompts for a {s.target_se:g}-point SE: "
                  f"{s.prompts_for_target_se if s.prompts_for_target_se is not None else '—'} "
                  f"(from {basis}); for the raw preference to separate from 50 at 2 SE: "
                  f"{sep}. Method: {s.method}."]
    return lines
