"""The LC win rate's status (identified / degenerate / not_identified) and the prompts it needs."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cpe_ray.cli import main
from cpe_ray.evaluation.lc_status import (
    DEGENERATE,
    IDENTIFIED,
    NOT_IDENTIFIED,
    lc_status,
    status_line,
    status_markdown,
)
from cpe_ray.evaluation.lc_winrate import WinRateResult, lc_winrate
from cpe_ray.paths import DATA_DIR

TARGET = 5.0


def both_sides(seed: int, n: int) -> tuple[np.ndarray, np.ndarray, np.random.Generator]:
    """Model and baseline lengths drawn alike: the model is longer on about half."""
    rng = np.random.default_rng(seed)
    return rng.integers(200, 400, n), rng.integers(200, 400, n), rng


def hand_built(**changes: object) -> WinRateResult:
    """The shape of the 32-prompt benchmark arm: raw 56.25 +- 8.9, theta zeroed at C=1e-4."""
    base = WinRateResult(
        win_rate=56.25, standard_error=8.9, lc_win_rate=50.0, lc_standard_error=7.2,
        lc_standard_error_alpaca=0.0, discrete_win_rate=56.25, n_wins=18, n_wins_base=14,
        n_draws=0, n_total=32, n_unjudged=0, theta=0.0, phi=0.0, length_scale=120.0,
        C=1e-4, extreme_change=False, lc_identified=True, condition_number=2.5, cv_folds=5,
        model_longer_share=0.5, model_shorter_share=0.5)
    return replace(base, **changes)  # type: ignore[arg-type]


def test_identified_with_enough_prompts_and_a_real_preference() -> None:
    m, b, rng = both_sides(0, 300)
    r = lc_winrate((rng.random(300) < 0.7).astype(float), m, b)
    s = lc_status(r, TARGET)
    assert s.status == IDENTIFIED and s.reasons == () and r.theta > 0
    assert s.se_basis == "lc" and s.se == r.lc_standard_error < TARGET
    assert s.prompts_for_target_se == math.ceil(300 * (r.lc_standard_error / TARGET) ** 2)
    assert "identified; 300 prompts; its SE" in status_line(s, r.lc_win_rate)


def test_degenerate_when_the_l1_penalty_zeroes_theta() -> None:
    m, b, _ = both_sides(1, 32)
    r = lc_winrate([1.0, 0.0] * 16, m, b)  # no preference at all: CV keeps the null
    s = lc_status(r, TARGET)
    assert r.theta == 0.0 and r.lc_win_rate == 50.0 and r.cv_folds == 5
    assert s.status == DEGENERATE
    assert s.reasons[0] == (f"the L1 penalty set the model term to 0 at C={r.C:.3g}, chosen "
                            "by 5-fold cross-validation")
    assert s.prompts_to_separate is None  # the raw win rate is exactly 50: never separates


def test_one_sided_lengths_are_not_identified() -> None:
    rng = np.random.default_rng(5)
    r = lc_winrate(np.zeros(32), np.full(32, 32), rng.integers(150, 190, 32))
    s = lc_status(r, TARGET)
    assert (r.model_longer_share, r.model_shorter_share) == (0.0, 1.0) and r.theta != 0
    assert s.status == NOT_IDENTIFIED
    assert s.reasons[0].startswith("one-sided length differences: the model is longer on 0% "
                                   "and shorter on 100% of prompts")
    assert s.reasons[1].startswith("near-collinear columns (condition number")
    assert s.se_basis == "raw"  # the capped LC SE is not scaled
    assert "its SE is not measurable" in status_line(s, r.lc_win_rate)


def test_too_few_prompts() -> None:
    r = lc_winrate([1, 1, 1, 1, 1, 0.5], [300, 250, 260, 240, 200, 310],
                   [250, 280, 230, 270, 260, 290])
    s = lc_status(r, TARGET)
    assert r.theta != 0 and s.status == NOT_IDENTIFIED
    assert s.reasons == ("too few prompts: 6 judged, under 10 (two per cross-validation fold)",)
    nothing = lc_status(lc_winrate([None], [1], [2]), TARGET)
    assert (nothing.status, nothing.reasons, nothing.prompts_for_target_se) == (
        NOT_IDENTIFIED, ("nothing was judged",), None)


def test_prompts_needed_by_hand() -> None:
    s = lc_status(hand_built(), TARGET)
    # SE scales as 1/sqrt(n): 7.2 * sqrt(32 / m) = 5  ->  m = 32 * (7.2 / 5)^2 = 66.36
    assert s.prompts_for_target_se == 67
    # 2 * 8.9 * sqrt(32 / m) = |56.25 - 50|  ->  m = 32 * (17.8 / 6.25)^2 = 259.56
    assert s.prompts_to_separate == 260
    assert lc_status(hand_built(), 10.0).prompts_for_target_se == 17  # 32 * 0.72^2 = 16.6
    # not identified: the raw SE stands in, a lower bound: 32 * (8.9 / 5)^2 = 101.4
    capped = lc_status(hand_built(theta=-1.0, lc_identified=False, lc_standard_error=50.0,
                                  condition_number=1e13), TARGET)
    assert (capped.se_basis, capped.prompts_for_target_se) == ("raw", 102)
    assert capped.reasons[-1] == "near-collinear columns (condition number 1e+13)"


def test_the_console_line_and_the_report_block() -> None:
    s = lc_status(hand_built(), TARGET)
    assert status_line(s, 50.0) == (
        "LC win rate 50.0 (degenerate: the L1 penalty set the model term to 0 at C=0.0001, "
        "chosen by 5-fold cross-validation; 32 prompts; about 67 would put its SE under 5 "
        "points)")
    block = status_markdown(s, 50.0)
    assert block[0] == "**LC status: degenerate** (LC win rate 50.0, 32 prompts):"
    assert block[1] == f"- {s.reasons[0]}" and len(block) == 3
    assert "for the raw preference to separate from 50 at 2 SE: about 260" in block[-1]


def test_winrate_command_prints_and_writes_the_status(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    answers = tmp_path / "answers.jsonl"
    baseline = [json.loads(line) for line in (DATA_DIR / "demo" / "eval_baseline.jsonl").open()]
    answers.write_text("".join(json.dumps({"id": b["id"], "output": b["output"] + " More."})
                               + "\n" for b in baseline))
    rc = main(["eval", "winrate", "--limit", "4", "--answers", str(answers), "--out",
               str(tmp_path / "out"), "eval.judge=length", "eval.lc_target_se=2.5"])
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("LC win rate"))
    assert rc == 0 and "(not_identified: too few prompts: 4 judged" in line
    folder = tmp_path / "out" / "winrate"
    status = json.loads((folder / "results.json").read_text())["lc_status"]
    assert status["status"] == NOT_IDENTIFIED and status["target_se"] == 2.5
    assert status["summary"] == line
    assert any("one-sided length differences" in reason for reason in status["reasons"])
    assert "**LC status: not_identified** (LC win rate" in (folder / "report.md").read_text()
