"""Benchmark: does the CPU default learn, and what does post-edit cost per step?

Run by hand: `python bench/learning.py [--epochs 3] [--out bench/results/learning.json]`.

Three runs of `cpe-ray train` on the CPU default (tiny model, rubric judge, demo data), one
after the other in this process, at the same number of trained samples per prompt
(method.md 4):
- cpe: the default, 4 answers + 2 kept rewrites per prompt (random selection at 0.5);
- ppo: post-edit off, 6 answers per prompt;
- cpe_off1: cpe one step off-policy (`trainer.off_policy_steps=1`): does the stale mode
  learn as the synchronous one does, over the whole run?
Learning: the mean weighted reward of the originals over the first and the last `--window`
steps of each run, their difference and its standard error (Welch). Cost: the median step
time of cpe over that of ppo, first step excluded (start-up). Writes JSON and a PNG of the
reward curves next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

TARGET_COST_RATIO = 1.3  # one CPE step / one PPO step at equal trained samples
TARGET_GAIN_SE = 2.0  # "clearly above": last-window mean over first by >= 2 standard errors
CPE_SAMPLES, CPE_KEPT_RATIO = 4, 0.5
PPO_SAMPLES = int(CPE_SAMPLES * (1 + CPE_KEPT_RATIO))  # 6: the same trained samples


def run(name: str, out_dir: Path, epochs: int, overrides: list[str]) -> list[dict]:
    from cpe_ray.config import load_config
    from cpe_ray.run import train

    cfg = load_config(None, [f"run.output_dir={out_dir}", f"run.name={name}",
                             f"trainer.total_epochs={epochs}", "logging.wandb_mode=disabled",
                             *overrides])
    summary = train(cfg, progress=True)
    lines = (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def window_gain(rewards: list[float], window: int) -> dict[str, float]:
    first, last = rewards[:window], rewards[-window:]
    se = (statistics.variance(first) / len(first) + statistics.variance(last) / len(last)) ** 0.5
    gain = statistics.mean(last) - statistics.mean(first)
    return {"first_mean": statistics.mean(first), "last_mean": statistics.mean(last),
            "gain": gain, "gain_se": se, "gain_in_se": gain / se if se > 0 else float("inf")}


def plot(curves: dict[str, list[float]], window: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, values in curves.items():
        steps = list(range(1, len(values) + 1))
        line, = ax.plot(steps, values, alpha=0.35, linewidth=1)
        smooth = [statistics.mean(values[max(0, i - window + 1): i + 1])
                  for i in range(len(values))]
        ax.plot(steps, smooth, color=line.get_color(), linewidth=2,
                label=f"{label} (mean of last {window})")
    ax.set_xlabel("step")
    ax.set_ylabel("mean weighted reward (rubric judge)")
    ax.set_title("CPU default: tiny model, demo data")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/learning.json")
    ap.add_argument("--epochs", type=int, default=3, help="passes over the 128 demo prompts")
    ap.add_argument("--window", type=int, default=8, help="steps averaged at each end")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every arm (repeatable), e.g. "
                         "ppo.rollout_correction.preset=tis_mis")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cpe_overrides = [f"rollout.n_samples_per_prompt={CPE_SAMPLES}", "post_edit.enabled=true",
                     "post_edit.strategy=random", f"post_edit.ratio={CPE_KEPT_RATIO}"]
    arms = {"cpe": cpe_overrides,
            "ppo": [f"rollout.n_samples_per_prompt={PPO_SAMPLES}", "post_edit.enabled=false"],
            "cpe_off1": [*cpe_overrides, "trainer.off_policy_steps=1"]}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: run(name, Path(tmp), args.epochs, [*o, *args.override])
                for name, o in arms.items()}
    cpe = runs["cpe"]
    rewards = {name: [m["reward/original/weighted"] for m in ms] for name, ms in runs.items()}
    step_s = {name: statistics.median(m["time/step"] for m in ms[1:])
              for name, ms in runs.items()}
    phases = {name: {k[5:]: statistics.median(m.get(k, 0.0) for m in ms[1:])
                     for k in ms[-1] if k.startswith("time/") and k != "time/elapsed"}
              for name, ms in runs.items()}
    kept = statistics.mean(m["post_edit/kept_fraction"] for m in cpe)  # per answer
    result = {
        "steps": len(cpe), "window": args.window,
        "learning": {name: window_gain(r, args.window) for name, r in rewards.items()},
        "rewards": rewards,
        "rewrite_rewards": [m.get("reward/rewrite/weighted") for m in cpe],
        "trained_samples_per_prompt": {"cpe": CPE_SAMPLES * (1 + kept), "ppo": PPO_SAMPLES},
        "step_seconds_median": step_s,
        "phase_seconds_median": phases,
        "cost_ratio_cpe_over_ppo": step_s["cpe"] / step_s["ppo"],
        "targets": {"cost_ratio": TARGET_COST_RATIO, "gain_in_se": TARGET_GAIN_SE},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "overrides": args.override,
    }
    result["pass"] = {
        "cpe_learns": result["learning"]["cpe"]["gain_in_se"] >= TARGET_GAIN_SE,
        "cost_ratio": result["cost_ratio_cpe_over_ppo"] <= TARGET_COST_RATIO,
    }
    png = out.with_suffix(".png")
    plot({"CPE (4 answers + 2 rewrites)": rewards["cpe"], "PPO (6 answers)": rewards["ppo"],
          "CPE, one step off-policy": rewards["cpe_off1"]}, args.window, png)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for name in arms:
        g = result["learning"][name]
        print(f"{name}: reward {g['first_mean']:+.3f} (first {args.window} steps) -> "
              f"{g['last_mean']:+.3f} (last {args.window}): {g['gain']:+.3f} = "
              f"{g['gain_in_se']:.1f} SE; median step {step_s[name]:.2f} s")
    print(f"cost: one CPE step / one PPO step = {result['cost_ratio_cpe_over_ppo']:.2f} "
          f"(target <= {TARGET_COST_RATIO}); {out}, {png}")


if __name__ == "__main__":
    main()
