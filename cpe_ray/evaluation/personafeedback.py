"""`cpe-ray eval personafeedback`: how often a judge prefers the human-chosen answer.

Any judge works. A pointwise scorer (`eval.personafeedback_judge=grm`: the GRM of
`grm.backend`, which may be the rubric judge, a GRM on an engine or an endpoint, or a
Bradley-Terry model) scores `chosen` and `reject` on their own; the higher reward is its
pick and equal rewards are a tie. A pairwise judge (`=pairwise`: the judge of `eval.judge`)
compares them, in both orders when `eval.both_orders`. Each case ends as `correct`,
`wrong`, `tie` or `parse_failure` (the judge's output never parsed, or the endpoint could
not answer). Accuracy counts a tie as half right and a parse failure as wrong, over all
cases; `accuracy_judged` leaves the parse failures out. The table has one cell per tier x
question kind, with totals, counts, ties and parse failures (method.md 5).

Writes under `<eval.output_dir>/personafeedback/`: `results.json`, `cases.jsonl`,
`report.md`, `accuracy.png` and `reward_vs_length.png` (or `preference_vs_length.png`).
`eval.limit` keeps the first N cases of each tier x kind cell.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cpe_ray.config import Config
from cpe_ray.data import PF_KINDS, PF_TIERS, PersonaFeedbackCase, load_personafeedback
from cpe_ray.evaluation import report
from cpe_ray.evaluation.pairwise import TIE, PairwiseJudge, judge_against_baseline
from cpe_ray.evaluation.scorers import compare_rewards
from cpe_ray.judges.base import AnswerScorer, JudgeRequest

CORRECT, WRONG, TIED, PARSE_FAILURE = "correct", "wrong", "tie", "parse_failure"
OUTCOMES = (CORRECT, WRONG, TIED, PARSE_FAILURE)
ALL = "all"
TIE_CREDIT = 0.5


@dataclass(frozen=True)
class CaseResult:
    source: str
    tier: str
    kind: str
    outcome: str
    chosen_length: int
    reject_length: int
    chosen_reward: float | None = None  # pointwise judges
    reject_reward: float | None = None
    preference: float | None = None  # pairwise judges: P(chosen better)
    detail: str = ""


def evaluate_scorer(cases: Sequence[PersonaFeedbackCase], scorer: AnswerScorer
                    ) -> list[CaseResult]:
    """Score both answers of every case (one batch) and compare the rewards."""
    requests = [JudgeRequest(c.persona, c.question, ans) for c in cases
                for ans in (c.chosen, c.reject)]
    scores = scorer.score(requests)
    out = []
    for i, c in enumerate(cases):
        ch, rj = scores[2 * i], scores[2 * i + 1]
        if ch.reward is None or rj.reward is None:
            outcome = PARSE_FAILURE
        else:
            outcome = {"A": CORRECT, "B": WRONG}.get(compare_rewards(ch.reward, rj.reward), TIED)
        out.append(CaseResult(c.source, c.tier, c.kind, outcome, len(c.chosen), len(c.reject),
                              ch.reward, rj.reward,
                              detail=f"chosen: {ch.detail} | reject: {rj.detail}"))
    return out


def evaluate_pairwise(cases: Sequence[PersonaFeedbackCase], judge: PairwiseJudge,
                      both_orders: bool = True) -> list[CaseResult]:
    """The judge compares chosen with reject; P(chosen better) > 0.5 is correct."""
    comparisons = judge_against_baseline(
        judge, [(c.persona, c.question, c.chosen, c.reject) for c in cases], both_orders)
    out = []
    for c, cmp in zip(cases, comparisons, strict=True):
        p = cmp.preference
        outcome = PARSE_FAILURE if p is None else (
            TIED if p == TIE else (CORRECT if p > TIE else WRONG))
        detail = cmp.reason or "; ".join(f"{o}: {v.verdict}" for o, v in cmp.verdicts.items())
        out.append(CaseResult(c.source, c.tier, c.kind, outcome, len(c.chosen), len(c.reject),
                              preference=p, detail=detail))
    return out


def _cell(results: Sequence[CaseResult]) -> dict[str, Any]:
    counts = {o: sum(r.outcome == o for r in results) for o in OUTCOMES}
    n = len(results)
    judged = n - counts[PARSE_FAILURE]
    credit = counts[CORRECT] + TIE_CREDIT * counts[TIED]
    acc = credit / n if n else None
    return {
        "n": n, **counts,
        "accuracy": acc,
        "standard_error": math.sqrt(acc * (1 - acc) / n) if acc is not None else None,
        "accuracy_judged": credit / judged if judged else None,
    }


def accuracy_table(results: Sequence[CaseResult]) -> dict[str, dict[str, Any]]:
    """Cells keyed "tier/kind", with "tier/all", "all/kind" and "all/all" totals."""
    table = {}
    for tier in (*PF_TIERS, ALL):
        for kind in (*PF_KINDS, ALL):
            rows = [r for r in results if tier in (ALL, r.tier) and kind in (ALL, r.kind)]
            table[f"{tier}/{kind}"] = _cell(rows)
    return table


def table_markdown(table: dict[str, dict[str, Any]]) -> list[str]:
    """Accuracy (percent) per tier x kind, then the counts behind it."""
    def pct(cell: dict[str, Any]) -> str:
        if not cell["n"]:
            return "—"
        return (f"{report.fmt(report.percent(cell['accuracy']))} ± "
                f"{report.fmt(report.percent(cell['standard_error']))}")

    kinds = (*PF_KINDS, ALL)
    lines = report.markdown_table(["tier", *kinds],
                                  [[t, *(pct(table[f"{t}/{k}"]) for k in kinds)]
                                   for t in (*PF_TIERS, ALL)])
    lines += ["", *report.markdown_table(
        ["tier/kind", "n", "correct", "wrong", "ties", "parse failures", "accuracy (judged)"],
        [[key, c["n"], c[CORRECT], c[WRONG], c[TIED], c[PARSE_FAILURE],
          report.fmt(report.percent(c["accuracy_judged"]))]
         for key, c in table.items() if c["n"]])]
    return lines


def _limit(cases: Sequence[PersonaFeedbackCase], per_cell: int | None
           ) -> list[PersonaFeedbackCase]:
    if per_cell is None:
        return list(cases)
    seen: dict[tuple[str, str], int] = {}
    kept = []
    for c in cases:
        k = (c.tier, c.kind)
        if seen.get(k, 0) < per_cell:
            seen[k] = seen.get(k, 0) + 1
            kept.append(c)
    return kept


def run_personafeedback(cfg: Config, say: Callable[[str], None] = print) -> dict[str, Any]:
    from cpe_ray.evaluation.judges import make_answer_scorer, make_pairwise_judge

    e = cfg.eval
    loaded = load_personafeedback(e.personafeedback_path, cfg.data.on_bad_record)
    cases = _limit(loaded.records, e.limit)
    if e.personafeedback_judge == "pairwise":
        judge = make_pairwise_judge(cfg)
        name = judge.describe()
        say(f"judging {len(cases)} PersonaFeedback cases with {name}")
        results = evaluate_pairwise(cases, judge, e.both_orders)
    else:
        scorer = make_answer_scorer(cfg)
        name = scorer.describe()
        say(f"scoring {len(cases)} PersonaFeedback cases with {name}")
        results = evaluate_scorer(cases, scorer)
    table = accuracy_table(results)
    out = Path(e.output_dir) / "personafeedback"
    files = {"cases": report.write_jsonl(out / "cases.jsonl", [asdict(r) for r in results])}
    cells = [f"{t}/{k}" for t in PF_TIERS for k in PF_KINDS if table[f"{t}/{k}"]["n"]]
    cells.append(f"{ALL}/{ALL}")
    files["accuracy_plot"] = report.plot_bars(
        out / "accuracy.png", [c.replace("/", "\n") for c in cells],
        [report.percent(table[c]["accuracy"]) for c in cells],
        [report.percent(table[c]["standard_error"]) for c in cells],
        "accuracy, percent (+-1 s.e.)", f"PersonaFeedback: {name}"[:report.TITLE_CHARS],
        reference=report.EVEN)
    if e.personafeedback_judge == "pairwise":
        files["preference_plot"] = report.plot_scatter(
            out / "preference_vs_length.png",
            {"cases": ([r.chosen_length - r.reject_length for r in results],
                       [r.preference for r in results])},
            "len(chosen) - len(reject), characters", "P(chosen better)",
            "preference against length difference", ylim=report.PROBABILITY_LIMITS)
    else:
        files["reward_plot"] = report.plot_scatter(
            out / "reward_vs_length.png",
            {"chosen": ([r.chosen_length for r in results], [r.chosen_reward for r in results]),
             "reject": ([r.reject_length for r in results], [r.reject_reward for r in results])},
            "answer length, characters", "reward", "reward against length")
    files["report"] = out / "report.md"
    summary: dict[str, Any] = {
        "command": "personafeedback", "judge": name, "judge_kind": e.personafeedback_judge,
        "root": str(e.personafeedback_path), "n_cases": len(results),
        "skipped_records": loaded.skipped, "table": table,
        "files": {k: str(v) for k, v in files.items()},
    }
    total = table[f"{ALL}/{ALL}"]
    lines = [f"# PersonaFeedback accuracy: {name}", "",
             f"Cases: {summary['root']} ({len(results)}); ties count half; parse failures "
             f"count as wrong ({total[PARSE_FAILURE]} here).", "", *table_markdown(table), "",
             f"![accuracy]({files['accuracy_plot'].name})"]
    plot = files.get("reward_plot") or files.get("preference_plot")
    if plot is not None:
        lines.append(f"![length]({plot.name})")
    report.write_markdown(out / "report.md", lines)
    report.write_json(out / "results.json", summary)
    return summary

