"""The loop every supervised stage shares: `cpe-ray sft`, `grm train` and `rm train`.

A stage hands over a `StageJob` (its config section, the task, the starting model, and the
tokenized training and held-out examples, all checked before this runs). `run_stage` then
does what `cpe-ray train` does for PPO: the run directory and its resolved `config.yaml`,
Ray (local, or the job's cluster), the learner ranks in a placement group, an optional
resume (`<section>.resume`), `epochs` seeded passes over the data cut into optimiser steps
of `batch_size` examples, `metrics.jsonl` + wandb, held-out evaluation, atomic checkpoints
`checkpoints/step-N/{<model dir>, state, trainer_state.json}` and `summary.json`. Batches are
a pure function of (seed, step), so a resumed run lands on the same weights as one that was
never interrupted.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpe_ray.config import Config, StageTrainConfig
from cpe_ray.data import batch_order
from cpe_ray.errors import DataError
from cpe_ray.learners.supervised import Example
from cpe_ray.runs.checkpoints import checkpoints, is_due, restore, write_checkpoint
from cpe_ray.runs.ownership import open_run, release_run
from cpe_ray.runs.ray_join import init_ray, progress_bar

SUMMARY = "summary.json"


@dataclass(frozen=True)
class StageJob:
    section: str  # the config section: "sft", "distill" or "rm"
    settings: StageTrainConfig
    task: str  # "sft" | "bt"
    model_path: str  # resolved starting model
    model_dir: str  # the HF model's folder inside a checkpoint ("policy", "grm", ...)
    train: list[Example]
    heldout: list[Example]
    data: dict[str, Any] = field(default_factory=dict)  # counts for the summary


@dataclass
class StageResult:
    run_dir: Path
    steps: int
    resumed_from: int
    first: dict[str, float]  # the first step's metrics of this process (empty if none ran)
    last: dict[str, float]
    evaluation: dict[str, float]  # held-out metrics at the end
    checkpoint: Path
    model_dir: str
    extra: dict[str, Any] = field(default_factory=dict)  # what the stage's `after` returned

    @property
    def model_path(self) -> Path:
        """The trained model in HF format: `checkpoint/<model dir>`."""
        return self.checkpoint / self.model_dir


def steps_per_epoch(settings: StageTrainConfig, num_examples: int) -> int:
    return math.ceil(num_examples / settings.batch_size)  # the last batch may be smaller


def total_steps(settings: StageTrainConfig, num_examples: int) -> int:
    total = steps_per_epoch(settings, num_examples) * settings.epochs
    return min(total, settings.max_steps) if settings.max_steps is not None else total


def batch_rows(settings: StageTrainConfig, seed: int, num_examples: int, step: int
               ) -> list[int]:
    """Step `step`'s example indices: a pure function of (seed, step)."""
    per_epoch = steps_per_epoch(settings, num_examples)
    epoch, index = divmod(step, per_epoch)
    order = batch_order(num_examples, seed, epoch, settings.shuffle)
    return order[index * settings.batch_size : (index + 1) * settings.batch_size]


def _summary_line(section: str, step: int, total: int, m: dict[str, float]) -> str:
    shown = [f"loss {m['train/loss']:.4f}"]
    for key in ("train/accuracy", "eval/loss", "eval/accuracy"):
        if key in m:
            shown.append(f"{key} {m[key]:.4f}")
    return f"{section} step {step + 1}/{total}  {'  '.join(shown)}  {m['time/step']:.1f}s"


def run_stage(cfg: Config, job: StageJob, after: Callable[[Path], dict[str, Any]] | None = None,
              progress: bool = True) -> StageResult:
    """Train `job` to the end (or resume it); `after(model dir)` runs once the ranks are gone
    and Ray is still up (e.g. generation with the trained model)."""
    import ray

    from cpe_ray.learners.supervised import SupervisedSpec
    from cpe_ray.runtime.groups import SupervisedGroup
    from cpe_ray.runtime.placement import create_pools, plan_learner_only, remove_pools
    from cpe_ray.tracking import Tracker

    s = job.settings
    if not job.train:
        raise DataError(f"{job.section}: no training examples left (see the data counts: "
                        f"{job.data}); add data or lower {job.section}.eval_fraction")
    run_dir, resume = open_run(cfg, s.name, s.resume, f"{job.section}.resume")
    total = total_steps(s, len(job.train))
    spec = SupervisedSpec(job.task, job.model_path, s.lr, s.schedule, s.warmup_steps, total)

    started_ray = init_ray(cfg)
    pools: dict[str, Any] = {}
    group: SupervisedGroup | None = None
    tracker: Tracker | None = None
    try:
        pools = create_pools(plan_learner_only(cfg), cfg.cluster.placement_timeout_s)
        pool = pools["learner"]
        group = SupervisedGroup(cfg, spec, [pool.strategy(r) for r in range(pool.spec.num_bundles)])
        group.setup()
        start, run_id = 0, None
        if resume is not None:
            start, run_id = restore(group, resume, run_dir)
        tracker = Tracker(cfg, run_dir, run_id, name=s.name, job_type=job.section,
                          start_step=start)
        first: dict[str, float] = {}
        last: dict[str, float] = {}
        evaluation: dict[str, float] = {}
        bar = progress_bar(total, start, s.name, progress)
        for step in range(start, total):
            t = time.perf_counter()
            batch = [job.train[i] for i in batch_rows(s, cfg.run.seed, len(job.train), step)]
            metrics = group.train(batch)
            metrics["train/examples"] = float(len(batch))
            metrics["train/targets"] = float(sum(e.num_targets for e in batch))
            done = step + 1
            if job.heldout and is_due(done, total, s.eval_every):
                evaluation = group.evaluate(job.heldout)
                metrics.update(evaluation)
            metrics["time/step"] = time.perf_counter() - t
            tracker.log(step, metrics)
            if is_due(done, total, s.save_every):
                write_checkpoint(group, run_dir, done, job.model_dir, tracker.run_id,
                                 cfg.run.checkpoint_checksums,
                                 resume_key=f"{job.section}.resume")
            first, last = first or metrics, metrics
            if progress:
                bar.write(_summary_line(job.section, step, total, metrics))
            bar.update(1)
        bar.close()
        found = checkpoints(run_dir)
        if not found:  # resumed from a checkpoint of another run, already at its last step
            write_checkpoint(group, run_dir, total, job.model_dir, tracker.run_id)
            found = checkpoints(run_dir)
        group.shutdown()
        group = None
        remove_pools(pools)
        pools = {}
        result = StageResult(run_dir, total, start, first, last, evaluation, found[-1],
                             job.model_dir)
        if after is not None:
            result.extra = after(result.model_path)
        _write_summary(run_dir, job, result)
        return result
    finally:
        if tracker is not None:
            tracker.finish()
        if group is not None:
            group.shutdown()
        remove_pools(pools)
        if started_ray:
            ray.shutdown()
        release_run(run_dir)


def _write_summary(run_dir: Path, job: StageJob, r: StageResult) -> None:
    summary = {
        "stage": job.section, "task": job.task, "base_model": job.model_path,
        "steps": r.steps, "resumed_from": r.resumed_from, "data": job.data,
        "train_examples": len(job.train), "heldout_examples": len(job.heldout),
        "first_train_loss": r.first.get("train/loss"), "last_train_loss": r.last.get("train/loss"),
        "evaluation": r.evaluation, "checkpoint": str(r.checkpoint),
        "model": str(r.model_path), **r.extra,
    }
    tmp = run_dir / f".{SUMMARY}.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(run_dir / SUMMARY)
