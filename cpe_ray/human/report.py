"""`cpe-ray eval human`: people's win rates, their agreement, and each automatic judge's
agreement with them, from a rating folder (`tasks.jsonl` + `judgements.jsonl`).

Writes under `<eval.output_dir>/human/`: `results.json` (every figure with its n),
`report.md`, `winrate.png` (people's win rate per dimension, +-1 s.e.) and `judges.png`
(each judge's accuracy against people's majority). Every file is written atomically.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cpe_ray.config import Config
from cpe_ray.evaluation import report
from cpe_ray.evaluation.report import fmt, markdown_table
from cpe_ray.human.agreement import analyse, load_ratings

COMMAND = "human"


def _p(value: float | None) -> str:
    return fmt(value, 3)


def _winrate_rows(win_rates: Mapping[str, Mapping[str, Any]]) -> list[list[Any]]:
    rows = []
    for name, dims in win_rates.items():
        for dim, w in dims.items():
            ci = w["ci95"]
            rows.append([name, dim, fmt(w["value"]), fmt(w["se"]),
                         "—" if ci is None else f"{ci[0]:.1f} to {ci[1]:.1f}", w["n"],
                         w["n_ratings"]])
    return rows


def _agreement_rows(agreement: Mapping[str, Any]) -> list[list[Any]]:
    rows = []
    for dim, a in agreement["preference"].items():
        alpha, kappa = a["alpha_nominal"], a["fleiss_kappa"]
        rows.append(["preference", dim, "alpha (nominal)", _p(alpha["value"]),
                     alpha["n_units"], alpha["n_values"]])
        note = f" ({kappa['note']})" if kappa["note"] else ""
        rows.append(["preference", dim, "Fleiss' kappa", _p(kappa["value"]) + note,
                     kappa["n_units"], "—" if kappa["raters"] is None
                     else kappa["raters"] * kappa["n_units"]])
    for dim, a in agreement["scores"].items():
        alpha = a["alpha_interval"]
        rows.append(["score", dim, "alpha (interval)", _p(alpha["value"]), alpha["n_units"],
                     alpha["n_values"]])
    return rows


def _judge_rows(judges: Mapping[str, Mapping[str, Any]]) -> list[list[Any]]:
    rows = []
    for name, dims in judges.items():
        for dim, j in dims.items():
            s = j["spearman"]
            acc = j.get("accuracy")
            rows.append([name, dim,
                         "—" if acc is None else _p(acc["value"]),
                         "—" if acc is None else acc["n"],
                         "—" if acc is None else f"{acc['people_ties']} / {acc['judge_ties']}"
                         f" / {acc['missing']}",
                         _p(s["rho"]), _p(s["p"]), s["n"]])
    return rows


def _plots(out: Path, results: Mapping[str, Any]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    bars = [(f"{name}\n{dim}\nn={w['n']}" if len(results["win_rates"]) > 1
             else f"{dim}\nn={w['n']}", w)
            for name, dims in results["win_rates"].items() for dim, w in dims.items()]
    if bars:
        raters = len(results["counts"]["raters"])
        names = f": {next(iter(results['win_rates']))}" if len(results["win_rates"]) == 1 else ""
        files["winrate_plot"] = report.plot_bars(
            out / "winrate.png", [b[0] for b in bars], [b[1]["value"] for b in bars],
            [b[1]["se"] for b in bars], "people's win rate, percent (+-1 s.e.)",
            f"people's win rate{names} (n = tasks, {raters} raters)"[:report.TITLE_CHARS],
            reference=report.EVEN)
    cells = [(f"{name}\n{dim}\nn={j['accuracy']['n']}", j["accuracy"])
             for name, dims in results["judges"].items() for dim, j in dims.items()
             if "accuracy" in j and j["accuracy"]["n"]]
    if cells:
        files["judges_plot"] = report.plot_bars(
            out / "judges.png", [c[0] for c in cells],
            [report.percent(c[1]["value"]) for c in cells],
            [report.percent(c[1]["se"]) for c in cells], "accuracy, percent (+-1 s.e.)",
            "automatic judges against people's majority (n = tasks)", reference=report.EVEN)
    return files


def _markdown(results: Mapping[str, Any], files: Mapping[str, Path]) -> list[str]:
    c, method = results["counts"], results["method"]
    lines = ["# Human judgements", "",
             f"Ratings: {results['folder']}: {c['tasks']} tasks ({c['pair_tasks']} pairs, "
             f"{c['single_tasks']} single answers), {c['tasks_judged']} judged; "
             f"{c['judgements']} judgements by {len(c['raters'])} raters "
             f"({c['superseded']} replaced by a later one of the same rater), "
             f"{c['critiques']} critiques, {c['edits']} edits.", "",
             "## People's win rate", "",
             f"Win rate: {method['win_rate']}. Standard error: {method['se']}. "
             f"95% interval: {method['ci95']}.", ""]
    lines += markdown_table(["comparison", "dimension", "win rate %", "s.e.", "95% interval",
                             "tasks", "ratings"], _winrate_rows(results["win_rates"]))
    if "winrate_plot" in files:
        lines += ["", f"![win rate]({files['winrate_plot'].name})"]
    lines += ["", "## Agreement between raters", "",
              "Krippendorff's alpha from the coincidence matrix (units with one value "
              "cannot be paired and are left out); Fleiss' kappa only where every task has "
              "the same number of raters.", ""]
    lines += markdown_table(["on", "dimension", "statistic", "value", "units", "values"],
                            _agreement_rows(results["agreement"]))
    lines += ["", "## Automatic judges against people", "",
              f"Accuracy {method['accuracy']}. Spearman: {method['spearman']}.", ""]
    lines += markdown_table(["judge", "dimension", "accuracy", "n",
                             "people ties / judge ties / missing", "Spearman rho", "p", "n"],
                            _judge_rows(results["judges"]))
    if "judges_plot" in files:
        lines += ["", f"![judges]({files['judges_plot'].name})"]
    return lines


def run_human_report(cfg: Config, folder: str | Path,
                     say: Callable[[str], None] = print) -> dict[str, Any]:
    """Analyse the rating folder and write the report (see the module docstring)."""
    g = cfg.grm
    ratings = load_ratings(folder, (g.score_min, g.score_max))
    say(f"analysing {len(ratings.judgements)} judgements of {len(ratings.tasks)} tasks")
    results: dict[str, Any] = {"command": COMMAND, "folder": str(folder),
                               **analyse(ratings, g.dimensions, cfg.run.seed)}
    out = Path(cfg.eval.output_dir) / COMMAND
    files = _plots(out, results)
    files["results"] = out / "results.json"
    files["report"] = out / "report.md"
    results["files"] = {k: str(v) for k, v in files.items()}
    report.write_markdown(files["report"], _markdown(results, files))
    report.write_json(files["results"], results)
    return results
