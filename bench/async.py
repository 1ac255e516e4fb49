"""Benchmark: one-step off-policy training against the synchronous loop on the CPU default.

Run by hand: `python bench/async.py [--steps 16] [--seeds 3]` writes
`bench/results/async.{json,png}`.

For each seed, the CPU default (`cpe-ray train`'s embedded configuration) runs `--steps` steps
with `trainer.off_policy_steps=0` and then with `1`, one run after the other, the same
prompts and seeds. Seconds per step = (T(10 steps) - T(2 steps)) / 8, T(k) being the wall
clock when step k is logged (`time/elapsed`: start-up and the first steps' warm-up
excluded); the speed-up is the ratio of the two modes' medians over seeds, from this one
run. Each run also records its median seconds per phase (`time/*`) over those steps, which
show where a step goes: on the learner (`learner_forward`, `train`) or on the engines. The
reward curves (mean weighted reward of the originals per step) are compared by the last
`--window` steps' mean per mode, against the spread (standard deviation) of that mean over
seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

from cpe_ray.config import load_config
from cpe_ray.run import train

SPEED_FROM, SPEED_TO = 2, 10  # (T(10) - T(2)) / 8, as the issue measures it
TARGET_SPEEDUP = 1.3


def run(mode: int, seed: int, steps: int, out: Path) -> list[dict]:
    name = f"off{mode}-seed{seed}"
    cfg = load_config(None, [f"trainer.off_policy_steps={mode}", f"run.seed={seed}",
                             f"trainer.max_steps={steps}", f"run.output_dir={out}",
                             f"run.name={name}", "logging.wandb_mode=disabled",
                             "trainer.save_every=0", "trainer.save_every_minutes=0"])
    train(cfg, progress=False)
    return [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]


def seconds_per_step(metrics: list[dict]) -> float:
    """(T(10) - T(2)) / 8: metrics[k - 1] is step k's line."""
    elapsed = [m["time/elapsed"] for m in metrics]
    return (elapsed[SPEED_TO - 1] - elapsed[SPEED_FROM - 1]) / (SPEED_TO - SPEED_FROM)


def phase_medians(metrics: list[dict]) -> dict[str, float]:
    window = metrics[SPEED_FROM:SPEED_TO]
    keys = sorted({k for m in window for k in m if k.startswith("time/") and k != "time/elapsed"})
    return {k[5:]: statistics.median(m.get(k, 0.0) for m in window) for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--out", default="bench/results/async.json")
    args = parser.parse_args()
    if args.steps < SPEED_TO:
        parser.error(f"--steps must be >= {SPEED_TO}")

    runs: dict[str, list[dict]] = {"0": [], "1": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for mode in (0, 1):
                metrics = run(mode, seed, args.steps, Path(tmp))
                runs[str(mode)].append({
                    "seed": seed,
                    "seconds_per_step": seconds_per_step(metrics),
                    "phase_seconds_median": phase_medians(metrics),
                    "reward": [m["reward/original/weighted"] for m in metrics],
                    "final": statistics.mean(m["reward/original/weighted"]
                                             for m in metrics[-args.window:]),
                })
    summary = {}
    for mode, items in runs.items():
        finals = [r["final"] for r in items]
        summary[mode] = {
            "seconds_per_step_median": statistics.median(r["seconds_per_step"] for r in items),
            "final_reward_mean": statistics.mean(finals),
            "final_reward_sd": statistics.stdev(finals) if len(finals) > 1 else 0.0,
        }
    speedup = summary["0"]["seconds_per_step_median"] / summary["1"]["seconds_per_step_median"]
    gap = abs(summary["0"]["final_reward_mean"] - summary["1"]["final_reward_mean"])
    spread = max(summary["0"]["final_reward_sd"], summary["1"]["final_reward_sd"])
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "settings": vars(args),
        "runs": runs, "summary": summary,
        "speedup": speedup, "speedup_target": TARGET_SPEEDUP,
        "final_reward_gap": gap, "seed_spread": spread, "agree_within_spread": gap <= spread,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(runs, out.with_suffix(".png"), speedup)
    print(json.dumps({k: result[k] for k in ("summary", "speedup", "final_reward_gap",
                                              "seed_spread", "agree_within_spread")}, indent=2))


def plot(runs: dict[str, list[dict]], path: Path, speedup: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, color in (("0", "tab:blue"), ("1", "tab:orange")):
        for i, r in enumerate(runs[mode]):
            ax.plot(r["reward"], color=color, alpha=0.7,
                    label=f"off_policy_steps={mode}" if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("mean weighted reward (originals)")
    ax.set_title(f"CPU default, {len(runs['0'])} seeds a mode; off-policy {speedup:.2f}x "
                 "faster a step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
