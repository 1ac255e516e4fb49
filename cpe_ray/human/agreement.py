"""Statistics of human judgements: people's win rates, how much raters agree, and how much each
automatic judge agrees with people. Pure functions over `HumanTask` / `Judgement` records.

Conventions (docs/human.md, "Figures and exports"):
- A pair task compares a target (`model`, or `rewrite`) with a reference (`baseline`,
  `original`). A rater's preference counts 1 for the target, 0.5 for a tie, 0 for the
  reference.
- Win rate: the mean over tasks of the per-task mean over raters, in percent. Its standard
  error is the normal one of those per-task means; its 95% interval a percentile bootstrap
  over tasks (`BOOTSTRAP_RESAMPLES` resamples, seeded by run.seed).
- People's majority on a task: the side of the per-task mean (ties counting half to each
  side); a mean of exactly 0.5 is a tie, left out of a judge's accuracy and counted.
- Krippendorff's alpha from the coincidence matrix (Krippendorff 2011, "Computing
  Krippendorff's Alpha-Reliability"): nominal on preferences (target / reference / tie),
  interval on scores, where a unit is one answer of one task. Fleiss' kappa only where every
  task has the same number of raters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median
from typing import Any

from cpe_ray.errors import DataError
from cpe_ray.human.records import OVERALL, TIE, HumanTask, Judgement, read_judgements, read_tasks
from cpe_ray.human.stats import (
    BOOTSTRAP_RESAMPLES,
    Correlation,
    fleiss_kappa,
    krippendorff_alpha,
    mean_estimate,
    spearman,
)

TASKS_FILE = "tasks.jsonl"
JUDGEMENTS_FILE = "judgements.jsonl"
TARGET_LABELS = ("model", "rewrite")  # the side a win rate is of, first one present
TARGET, REFERENCE = "target", "reference"
POINTS = {TARGET: 1.0, TIE: 0.5, REFERENCE: 0.0}
PERCENT = 100.0


@dataclass(frozen=True)
class Ratings:
    """The tasks and the judgements analysis uses: the last one per rater and task."""

    tasks: dict[str, HumanTask]
    judgements: tuple[Judgement, ...]
    superseded: int  # earlier judgements replaced by a later one of the same rater and task


def latest(judgements: Iterable[Judgement]) -> tuple[list[Judgement], int]:
    """The last judgement per (task, rater), in file order of the first, and how many were
    replaced."""
    last: dict[tuple[str, str], Judgement] = {}
    total = 0
    for j in judgements:
        last[(j.task_id, j.rater)] = j
        total += 1
    return list(last.values()), total - len(last)


def collect_ratings(tasks: Sequence[HumanTask], judgements: Sequence[Judgement],
                    score_range: tuple[float, float], where: str) -> Ratings:
    """Check that every judgement fits its task (labels, score range); keep the last ones."""
    by_id = {t.task_id: t for t in tasks}
    low, high = score_range
    kept, superseded = latest(judgements)
    for j in kept:
        task = by_id.get(j.task_id)
        if task is None:
            raise DataError(f"{where}: a judgement by '{j.rater}' names task '{j.task_id}', "
                            f"which is not in {TASKS_FILE}; use the folder the tasks came from")
        if set(j.shown_order) != set(task.labels):
            raise DataError(f"{where}: task '{j.task_id}' has answers {list(task.labels)} but "
                            f"'{j.rater}' was shown {list(j.shown_order)}")
        for label, dims in j.scores.items():
            for dim, value in dims.items():
                if not low <= value <= high:
                    raise DataError(f"{where}: task '{j.task_id}', rater '{j.rater}': score "
                                    f"{label}.{dim}={value} is outside [{low:g}, {high:g}] "
                                    "(grm.score_min..grm.score_max)")
    return Ratings(by_id, tuple(kept), superseded)


def load_ratings(folder: str | Path, score_range: tuple[float, float]) -> Ratings:
    """`<folder>/tasks.jsonl` and `<folder>/judgements.jsonl`, as `cpe-ray rate` writes them."""
    folder = Path(folder).expanduser()
    tasks, judged = folder / TASKS_FILE, folder / JUDGEMENTS_FILE
    for path in (tasks, judged):
        if not path.is_file():
            raise DataError(f"{path} not found; give the folder `cpe-ray rate` wrote "
                            f"({TASKS_FILE} and {JUDGEMENTS_FILE})")
    return collect_ratings(read_tasks(tasks), read_judgements(judged), score_range, str(judged))


@dataclass(frozen=True)
class Accuracy:
    """A judge's agreement with people's majority; a judge's tie counts half."""

    value: float | None
    se: float | None  # binomial
    n: int  # tasks with a people's majority and a judge verdict
    people_ties: int  # left out: people's mean exactly 0.5
    judge_ties: int  # counted half
    missing: int  # left out: the judge said nothing on the task


# Preferences, per task


def sides(task: HumanTask) -> tuple[str, str]:
    """(target, reference) labels of a pair task."""
    labels = task.labels
    target = next((lab for lab in TARGET_LABELS if lab in labels), labels[0])
    return target, next(lab for lab in labels if lab != target)


def comparison(task: HumanTask) -> str:
    target, reference = sides(task)
    return f"{target} vs {reference}"


def _category(choice: str, target: str) -> str:
    return TIE if choice == TIE else TARGET if choice == target else REFERENCE


def votes(ratings: Ratings, dimension: str) -> dict[str, list[str]]:
    """Pair task id -> the categories its raters chose on `dimension` (raters who left it
    out are left out)."""
    out: dict[str, list[str]] = {}
    for j in ratings.judgements:
        task = ratings.tasks[j.task_id]
        if task.kind == "pair" and dimension in j.preference:
            out.setdefault(j.task_id, []).append(_category(j.preference[dimension],
                                                           sides(task)[0]))
    return out


def task_mean(categories: Sequence[str]) -> float:
    return sum(POINTS[c] for c in categories) / len(categories)


def majority(categories: Sequence[str]) -> str:
    # Points are multiples of 0.5, so twice their sum compares exactly with the count.
    twice = 2 * sum(POINTS[c] for c in categories)
    n = len(categories)
    return TARGET if twice > n else REFERENCE if twice < n else TIE


def win_rates(ratings: Ratings, dimensions: Sequence[str], seed: int
              ) -> dict[str, dict[str, dict[str, Any]]]:
    """Comparison ("model vs baseline") -> dimension -> the win rate in percent."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for dim in dimensions:
        by_comparison: dict[str, list[list[str]]] = {}
        for task_id, cats in votes(ratings, dim).items():
            by_comparison.setdefault(comparison(ratings.tasks[task_id]), []).append(cats)
        for name, per_task in by_comparison.items():
            est = mean_estimate([task_mean(c) for c in per_task], seed).scaled(PERCENT)
            out.setdefault(name, {})[dim] = {**asdict(est),
                                             "n_ratings": sum(len(c) for c in per_task)}
    return out


# Scores, per answer


def score_units(ratings: Ratings, dimension: str) -> dict[tuple[str, str], list[float]]:
    """(task id, label) -> the scores raters gave that answer on `dimension`."""
    out: dict[tuple[str, str], list[float]] = {}
    for j in ratings.judgements:
        for label, dims in j.scores.items():
            if dimension in dims:
                out.setdefault((j.task_id, label), []).append(float(dims[dimension]))
    return out


def agreement(ratings: Ratings, dimensions: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Inter-rater agreement: preferences (nominal alpha, Fleiss' kappa) per dimension and
    overall, scores (interval alpha) per dimension."""
    prefs = {}
    for dim in [*dimensions, OVERALL]:
        units = list(votes(ratings, dim).values())
        prefs[dim] = {"alpha_nominal": asdict(krippendorff_alpha(units, "nominal")),
                      "fleiss_kappa": asdict(fleiss_kappa(units))}
    scores = {dim: {"alpha_interval": asdict(krippendorff_alpha(
        score_units(ratings, dim).values(), "interval"))} for dim in dimensions}
    return {"preference": prefs, "scores": scores}


# Automatic judges against people

Margin = Callable[[HumanTask, str], float | None]  # > 0: the judge prefers the target


def _number(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _grm_margin(task: HumanTask, dimension: str) -> float | None:
    target, reference = sides(task)
    if dimension == OVERALL:
        reward = task.hidden.get("grm_reward") or {}
        a, b = _number(reward.get(target)), _number(reward.get(reference))
    else:
        scores = task.hidden.get("grm_scores") or {}
        a = _number((scores.get(target) or {}).get(dimension))
        b = _number((scores.get(reference) or {}).get(dimension))
    return None if a is None or b is None else a - b


def _probability_margin(key: str) -> Margin:
    def margin(task: HumanTask, dimension: str) -> float | None:
        p = _number(task.hidden.get(key))
        # P(model better) says nothing of the target of a task that has no model
        if dimension != OVERALL or p is None or sides(task)[0] != "model":
            return None
        return p - 0.5

    return margin


# judge -> (its margin, whether it speaks per dimension or only overall)
JUDGES: dict[str, tuple[Margin, bool]] = {
    "grm": (_grm_margin, True),  # hidden.grm_scores per dimension, hidden.grm_reward overall
    "pairwise": (_probability_margin("judge_preference"), False),
    "lc": (_probability_margin("lc_preference"), False),
}


def judge_accuracy(people: Mapping[str, Sequence[str]], margins: Mapping[str, float | None]
                   ) -> tuple[Accuracy, Correlation]:
    """Accuracy against people's majority, and Spearman between the judge's margin and
    people's per-task mean (ties included), over the tasks people judged."""
    hits: list[float] = []
    people_ties = judge_ties = missing = 0
    xs, ys = [], []
    for task_id, cats in people.items():
        m = margins.get(task_id)
        if m is None:
            missing += 1
            continue
        xs.append(m)
        ys.append(task_mean(cats))
        side = majority(cats)
        if side == TIE:
            people_ties += 1
            continue
        judge = TARGET if m > 0 else REFERENCE if m < 0 else TIE
        judge_ties += judge == TIE
        hits.append(0.5 if judge == TIE else float(judge == side))
    n = len(hits)
    value = sum(hits) / n if n else None
    se = math.sqrt(value * (1.0 - value) / n) if value is not None else None
    return Accuracy(value, se, n, people_ties, judge_ties, missing), spearman(xs, ys)


def judges(ratings: Ratings, dimensions: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Each automatic judge's agreement with people per dimension, and the GRM's scores'
    rank correlation with people's mean scores (`grm_scores`)."""
    out: dict[str, dict[str, Any]] = {}
    for name, (margin, per_dimension) in JUDGES.items():
        for dim in [*dimensions, OVERALL] if per_dimension else [OVERALL]:
            people = votes(ratings, dim)
            acc, corr = judge_accuracy(people, {t: margin(ratings.tasks[t], dim)
                                                for t in people})
            out.setdefault(name, {})[dim] = {"accuracy": asdict(acc), "spearman": asdict(corr)}
    out["grm_scores"] = {}
    for dim in dimensions:
        xs, ys = [], []
        for (task_id, label), values in score_units(ratings, dim).items():
            grm = ratings.tasks[task_id].hidden.get("grm_scores") or {}
            score = _number((grm.get(label) or {}).get(dim))
            if score is not None:
                xs.append(score)
                ys.append(sum(values) / len(values))
        out["grm_scores"][dim] = {"spearman": asdict(spearman(xs, ys))}
    return out


def counts(ratings: Ratings) -> dict[str, Any]:
    tasks = ratings.tasks.values()
    by_rater: dict[str, list[Judgement]] = {}
    for j in ratings.judgements:
        by_rater.setdefault(j.rater, []).append(j)
    return {"tasks": len(ratings.tasks),
            "pair_tasks": sum(t.kind == "pair" for t in tasks),
            "single_tasks": sum(t.kind == "single" for t in tasks),
            "tasks_judged": len({j.task_id for j in ratings.judgements}),
            "judgements": len(ratings.judgements), "superseded": ratings.superseded,
            "critiques": sum(bool(j.critique.strip()) for j in ratings.judgements),
            "edits": sum(j.edit is not None for j in ratings.judgements),
            "raters": {r: {"judgements": len(js), "median_seconds": median(j.seconds for j in js)}
                       for r, js in sorted(by_rater.items())}}


def analyse(ratings: Ratings, dimensions: Sequence[str], seed: int) -> dict[str, Any]:
    """Every figure of the human report, as plain JSON-ready data."""
    return {"counts": counts(ratings), "dimensions": list(dimensions),
            "win_rates": win_rates(ratings, [*dimensions, OVERALL], seed),
            "agreement": agreement(ratings, dimensions),
            "judges": judges(ratings, dimensions),
            "method": {
                "win_rate": "percent; mean over tasks of the per-task mean over raters "
                            "(target 1, tie 0.5, reference 0)",
                "se": "normal: standard deviation of the per-task means / sqrt(tasks)",
                "ci95": f"percentile bootstrap over tasks, {BOOTSTRAP_RESAMPLES} resamples, "
                        f"seed {seed}",
                "accuracy": "against people's majority (per-task mean vs 0.5); people's ties "
                            "left out, a judge's tie counts half; se binomial",
                "spearman": "scipy.stats.spearmanr: judge margin vs people's per-task mean "
                            "preference; grm_scores: GRM score vs people's mean score per "
                            "answer"}}
