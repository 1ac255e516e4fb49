"""Benchmark: the paper's ablation arms (conf/experiment/ablation-*.yaml) at toy scale on a CPU.

Run by hand: `python bench/ablation.py [--steps 12] [--window 4] [--arms NAME] [--out FILE]`
(default `bench/results/ablation.json`).

Each arm is the CPU default (tiny model, rubric judge, demo data) changed in exactly the keys
its GPU config changes relative to the release's recipe
(conf/experiment/qwen2.5-7b-cpe-release.yaml): the selection strategy and ratio, post-edit
off with 6 answers a prompt for the PPO arms (equal trained samples, method.md 4), and for
the BT arm a Bradley-Terry reward model, which `cpe-ray rm train` trains first for a few
epochs on data/demo/pairwise.jsonl. All arms run one after the other in one Ray session,
with one seed, for `--steps` steps.

Per arm: the final reward is the mean rubric reward of the originals over the last
`--window` steps (the BT arm's answers are re-scored by the rubric judge, so every arm is
read by the same judge); the trained reward is what the arm optimised (the BT arm's is a BT
logit, on another scale); mean length is in tokens; kept fraction is kept rewrites per
answer; seconds are the arm's whole run (start-up included) and its median step. At this
scale (a tiny model from noise, a rule-based judge, a dozen steps) differences between arms
are mostly noise: the bench shows that every arm runs and what it costs, not the paper's
ranking. Writes JSON and a Markdown table next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

RECIPE = REPO / "conf" / "experiment" / "qwen2.5-7b-cpe-release.yaml"
ARMS = sorted((REPO / "conf" / "experiment").glob("ablation-*.yaml"))
# Keys of an arm's config that are not part of the arm: its name, and the BT model's path on
# the cluster (replaced by the toy model trained here).
NOT_THE_ARM = ("run.name", "grm.model_path")
BT_EPOCHS = 3


def arm_overrides(path: Path) -> list[str]:
    """The arm's own keys (what its config changes in the recipe) as CPU-default overrides."""
    from cpe_ray.config import flat_items, load_config

    base, arm = flat_items(load_config(RECIPE)), flat_items(load_config(path))
    return [f"{k}={v}" for k, v in arm.items() if v != base[k] and k not in NOT_THE_ARM]


def train_bt(out: Path) -> tuple[str, dict]:
    from cpe_ray.config import load_config
    from cpe_ray.stages.rm import run_rm

    result = run_rm(load_config(None, [f"run.output_dir={out}", f"rm.epochs={BT_EPOCHS}",
                                       "logging.wandb_mode=disabled"]), progress=False)
    return str(result.model_path), {"steps": result.steps, **result.evaluation}


def rubric_reward(samples: list[dict]) -> float:
    from cpe_ray.config import load_config
    from cpe_ray.judges.base import JudgeRequest
    from cpe_ray.judges.grm import weighted_reward
    from cpe_ray.judges.rubric import RubricJudge

    g = load_config().grm
    outcomes = RubricJudge(g).judge([JudgeRequest(s["persona"], s["question"], s["answer"])
                                     for s in samples], "score")
    return statistics.mean(weighted_reward(o.judgement, g.weights, g.on_missing) or 0.0
                           for o in outcomes)


def run_arm(path: Path, out: Path, steps: int, window: int, bt_model: str) -> dict:
    from cpe_ray.config import load_config
    from cpe_ray.run import train

    overrides = arm_overrides(path)
    extra = [f"grm.model_path={bt_model}"] if "grm.backend=bt" in overrides else []
    cfg = load_config(None, [*overrides, *extra, f"run.name={path.stem}",
                             f"run.output_dir={out}", f"trainer.max_steps={steps}",
                             "logging.wandb_mode=disabled"])
    start = time.perf_counter()
    summary = train(cfg, progress=False)
    seconds = time.perf_counter() - start
    run_dir = Path(summary["run_dir"])
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    last = {m["step"] for m in metrics[-window:]}
    tail = metrics[-window:]
    kept = [m["post_edit/kept_fraction"] for m in metrics if "post_edit/kept_fraction" in m]
    row = {
        "arm": path.stem, "overrides": overrides, "steps": len(metrics),
        "final_reward_rubric": rubric_reward([s for s in samples if s["step"] in last]),
        "trained_reward": statistics.mean(m["reward/original/weighted"] for m in tail),
        "first_reward_rubric": rubric_reward([s for s in samples if s["step"] < window]),
        "mean_length": statistics.mean(m["length/original"] for m in tail),
        "kept_fraction": statistics.mean(kept) if kept else None,
        "seconds": seconds,
        "step_seconds_median": statistics.median(m["time/step"] for m in metrics[1:]),
    }
    print(f"{path.stem}: reward {row['first_reward_rubric']:+.3f} -> "
          f"{row['final_reward_rubric']:+.3f} (rubric), length {row['mean_length']:.1f}, "
          f"{seconds:.0f}s", flush=True)
    return row


def markdown(result: dict) -> str:
    def fmt(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    lines = [
        "# Ablation arms at toy scale (CPU default: tiny model, rubric judge, demo data)", "",
        f"{result['steps']} steps per arm; rewards over the last {result['window']} steps "
        "(originals). Final reward: the rubric judge's, for every arm; trained reward: what the "
        "arm optimised (BT: a Bradley-Terry logit). Kept: rewrites kept per answer.", "",
        "| arm | final reward (rubric) | trained reward | mean length (tokens) | kept fraction "
        "| seconds | s/step |",
        "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["arms"]:
        lines.append(
            f"| {r['arm']} | {r['final_reward_rubric']:+.3f} | {r['trained_reward']:+.3f} | "
            f"{r['mean_length']:.1f} | {fmt(r['kept_fraction'], '.3f')} | {r['seconds']:.0f} | "
            f"{r['step_seconds_median']:.2f} |")
    bt = result["bt_model"]
    lines += ["", f"BT reward model: `rm train` for {bt['steps']} steps, held-out pairwise "
              f"accuracy {bt.get('eval/accuracy', float('nan')):.3f}. Wall time "
              f"{result['seconds']:.0f} s on {result['machine']['cpus']} CPUs.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/ablation.json")
    ap.add_argument("--steps", type=int, default=12, help="PPO steps per arm")
    ap.add_argument("--window", type=int, default=4, help="final steps averaged")
    ap.add_argument("--arms", default="", help="only arms whose name contains this")
    args = ap.parse_args()
    import ray

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            bt_model, bt_info = train_bt(Path(tmp))
            rows = [run_arm(p, Path(tmp), args.steps, args.window, bt_model) for p in ARMS
                    if args.arms in p.stem]
    finally:
        ray.shutdown()
    result = {"steps": args.steps, "window": args.window, "arms": rows, "bt_model": bt_info,
              "seconds": time.perf_counter() - start,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    print(f"{out}, {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
