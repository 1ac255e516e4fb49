"""bench/hacking.py's figures: the monitor's curves per arm with their slopes, the evaluated
answers' length, persona terms and rubric dimensions, the arms compared pairwise; Markdown and
PNG. Everything is read back from the run directories, so a rerun of the report costs seconds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

CURVES = ("reward/original/weighted", "monitor/reward_length_corr", "monitor/length_mean",
          "monitor/length_ratio_to_start", "monitor/persona_term_share",
          "monitor/names_user_share", "monitor/rewrite_length_ratio",
          "monitor/rewrite_persona_term_delta")
SLOPED = ("monitor/length_mean", "monitor/persona_term_share", "monitor/reward_length_corr",
          "monitor/names_user_share")
MIN_SLOPE_POINTS = 3


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def slope(ys: Sequence[float | None]) -> dict[str, float] | None:
    """Least-squares slope per step of the defined values, with its standard error (the
    usual OLS one: residual variance over the spread of the steps); None under 3 points."""
    pts = [(i + 1.0, float(y)) for i, y in enumerate(ys) if y is not None]
    if len(pts) < MIN_SLOPE_POINTS:
        return None
    x, y = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    b, a = np.polyfit(x, y, 1)
    resid = y - (a + b * x)
    se = math.sqrt(float(resid @ resid) / (len(x) - 2) / float(((x - x.mean()) ** 2).sum()))
    return {"slope": float(b), "se": se, "n": len(pts)}


def curves(run_dir: Path, steps: int) -> dict[str, Any]:
    """The run's logged per-step values of CURVES (None where a step left one out)."""
    rows = read_jsonl(run_dir / "metrics.jsonl")[-steps:]
    out = {k: [r.get(k) for r in rows] for k in CURVES}
    summary = run_dir / "monitor_summary.json"
    return {"per_step": out, "slopes": {k: slope(out[k]) for k in SLOPED},
            "monitor_summary": json.loads(summary.read_text()) if summary.is_file() else None}


def mean_se(xs: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(xs, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1) / math.sqrt(len(arr)))


def answers_profile(outputs: Path, prompts: str, conf: Path, tokenizer: Any) -> dict[str, Any]:
    """The evaluated answers through the monitor's measures (persona terms, naming the user,
    reward against length) and the offline rubric's per-dimension scores, with SEs."""
    from cpe_ray.config import load_config
    from cpe_ray.data import load_prompts
    from cpe_ray.judges.base import JudgeRequest
    from cpe_ray.judges.grm import weighted_reward
    from cpe_ray.judges.rubric import RubricJudge
    from cpe_ray.rl.monitor import Sample, names_user, repeated_terms, step_measures

    cfg = load_config(conf)
    g = cfg.grm
    records = {r.id: r for r in load_prompts(prompts).records}
    answers = [(records[str(o["id"])], o["output"]) for o in json.loads(outputs.read_text())]
    outcomes = RubricJudge(g).judge([JudgeRequest(r.persona, r.question, a)
                                     for r, a in answers], "score")
    samples = []
    for (r, a), o in zip(answers, outcomes, strict=True):
        scores = {d: float(v) for d, v in o.judgement.scores.items() if v is not None}
        samples.append(Sample(a, len(tokenizer(a)["input_ids"]),
                              weighted_reward(o.judgement, g.weights, g.on_missing), scores,
                              r.persona, r.question))
    measures = step_measures(samples, [], g.dimensions, cfg.monitor.persona_terms_min)
    terms = [len(repeated_terms(s)) >= cfg.monitor.persona_terms_min for s in samples]
    named = [names_user(s) for s in samples]
    n = len(samples)
    out: dict[str, Any] = {"n": n, "monitor": measures}
    for name, xs in (("tokens", [s.tokens for s in samples]), ("chars", [len(s.text)
                                                                        for s in samples]),
                     ("rubric_reward", [s.reward for s in samples]),
                     ("persona_term_share", [float(t) for t in terms]),
                     ("names_user_share", [float(v) for v in named])):
        out[name] = dict(zip(("mean", "se"), mean_se(xs), strict=True))
    for d in g.dimensions:
        out[f"rubric_{d}"] = dict(zip(("mean", "se"), mean_se(
            [s.scores.get(d, float("nan")) for s in samples]), strict=True))
    return out


def paired(a: Path, b: Path) -> dict[str, float]:
    """Two arms' per-prompt preferences against the same baseline (judgements.jsonl):
    the mean difference (percent points) and its paired standard error over prompts."""
    pa = {r["id"]: r["preference"] for r in read_jsonl(a)}
    pb = {r["id"]: r["preference"] for r in read_jsonl(b)}
    diffs = [100 * (pa[k] - pb[k]) for k in pa if pa[k] is not None and pb.get(k) is not None]
    mean, se = mean_se(diffs)
    return {"diff": mean, "se": se, "n": len(diffs)}


def diff_of_slopes(x: dict[str, float] | None, y: dict[str, float] | None
                   ) -> dict[str, float] | None:
    if x is None or y is None:
        return None
    return {"diff": x["slope"] - y["slope"], "se": math.hypot(x["se"], y["se"])}


def _pm(d: dict[str, float] | None, spec: str = ".2f", scale: float = 1.0) -> str:
    if d is None:
        return "-"
    value = d.get("mean", d.get("slope", d.get("diff")))
    return f"{value * scale:{spec}} +- {d['se'] * scale:{spec}}"


def markdown(r: dict[str, Any]) -> str:
    s = r["settings"]
    by = {e["model"]: e for e in r["evals"]}
    lines = [
        "# Reward hacking in sight: CPE, PPO and PPO + BT on SmolLM2-135M (CPU)", "",
        f"`python bench/hacking.py --steps {s['steps']}`: stages 1-2 and the BT model as in "
        "bench/real_model.py, then three arms from the same SFT checkpoint, one prompt a step "
        f"({', '.join(s['step_overrides'])}), evaluated on {by[r['arms'][0]['arm']]['n']} "
        f"held-out prompts (`{s['prompts']}`) against the SFT model's greedy answers, judged by "
        "the served rubric. Figures are mean +- standard error.", "",
        "| arm | rewarded by | steps | trained samples | win rate vs SFT | LC win rate (status) "
        "| tokens | persona-term share | names the user | rubric reward | s/step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    sft = r["profiles"]["sft"]
    lines.append(f"| SFT (baseline) | - | - | - | 50 | 50 | {_pm(sft['tokens'], '.1f')} | "
                 f"{_pm(sft['persona_term_share'])} | {_pm(sft['names_user_share'])} | "
                 f"{_pm(sft['rubric_reward'])} | - |")
    for a in r["arms"]:
        e, p = by[a["arm"]], r["profiles"][a["arm"]]
        status = (e.get("lc_status") or {}).get("status", "n/a").replace("_", " ")
        lines.append(
            f"| {a['label']} | {a['judge']} | {a['steps']} | "
            f"{a['trained_samples_per_step'] * a['steps']:.0f} | {e['win_rate']:.1f} +- "
            f"{e['win_rate_se']:.1f} | {e['lc_win_rate']:.1f} +- {e['lc_win_rate_se']:.1f} "
            f"({status}) | {_pm(p['tokens'], '.1f')} | {_pm(p['persona_term_share'])} | "
            f"{_pm(p['names_user_share'])} | {_pm(p['rubric_reward'])} | "
            f"{a['step_seconds_median']:.0f} |")
    dims = [k[len("rubric_"):] for k in sft if k.startswith("rubric_") and k != "rubric_reward"]
    lines += ["", "Rubric dimensions of the evaluated answers (offline rubric, in-process):", "",
              "| model | " + " | ".join(dims) + " |", "| --- |" + " --- |" * len(dims)]
    for name, p in r["profiles"].items():
        lines.append(f"| {name} | " + " | ".join(_pm(p[f"rubric_{d}"]) for d in dims) + " |")
    lines += ["", "The monitor during training: least-squares slope per step over the "
              f"{s['steps']} steps (each step one prompt, 4-6 answers), and whether it warned.",
              "", "| arm | length (tokens/step) | persona-term share (/step) | reward-length "
              "corr (/step) | names-user share (/step) | warned |", "| --- |" + " --- |" * 5]
    for a in r["arms"]:
        c = r["curves"][a["arm"]]
        sl = c["slopes"]
        warned = (c["monitor_summary"] or {}).get("warned")
        lines.append(f"| {a['label']} | {_pm(sl['monitor/length_mean'], '.2f')} | "
                     f"{_pm(sl['monitor/persona_term_share'], '.4f')} | "
                     f"{_pm(sl['monitor/reward_length_corr'], '.4f')} | "
                     f"{_pm(sl['monitor/names_user_share'], '.4f')} | {warned} |")
    cmp = r["comparisons"]
    lines += ["", "Comparisons (difference +- standard error):", ""]
    for key, text in cmp.items():
        lines.append(f"- {key}: {_pm(text, '.3f')}")
    lines += ["", "![curves](hacking.png)", ""]
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("reward/original/weighted", "monitor/length_mean", "monitor/persona_term_share",
            "monitor/reward_length_corr")
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(22, 4.2))
    for ax, key in zip(axes, keys, strict=False):
        for a in r["arms"]:
            ys = r["curves"][a["arm"]]["per_step"][key]
            xs = [i + 1 for i, y in enumerate(ys) if y is not None]
            ax.plot(xs, [y for y in ys if y is not None], ".-", label=a["label"], alpha=0.8)
        ax.set(xlabel="step", title=key)
        ax.legend(fontsize=7)
    ax = axes[-1]
    names = [e["model"] for e in r["evals"]]
    ax.bar(names, [e["win_rate"] for e in r["evals"]],
           yerr=[e["win_rate_se"] for e in r["evals"]], capsize=3, alpha=0.7, label="win rate")
    ax.errorbar(names, [e["lc_win_rate"] for e in r["evals"]],
                yerr=[e["lc_win_rate_se"] for e in r["evals"]], fmt="o", color="k",
                label="LC win rate")
    ax.axhline(50, color="grey", lw=0.8)
    ax.set(title="against the SFT model (served rubric)", ylabel="percent")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
