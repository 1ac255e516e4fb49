"""`cpe-ray train`: check everything cheap first, then start Ray, the runtime and the loop.

Order: config (already validated), data records, judge backend, model path (the tiny model is
built here if needed) - each failing with one line before any actor starts - then Ray, the
placement and actors, an optional resume, the loop, checkpoints, and a summary of where
everything is. Checkpoints are written to a temporary directory and renamed when complete.
"""

from __future__ import annotations

from pathlib import Path

from cpe_ray.config import Config, save_config
from cpe_ray.data import load_prompts
from cpe_ray.errors import ConfigError
from cpe_ray.judge_client import JudgeClient, check_backend
from cpe_ray.models import resolve_model_path
from cpe_ray.paths import resolve_path
from cpe_ray.runs import (
    STATE_DIR,
    checkpoints,
    find_resume,
    init_ray,
    progress_bar,
    read_trainer_state,
    run_dir_for,
    write_checkpoint,
)

POLICY_DIR = "policy"  # the HF policy inside a checkpoint (`policy.model_path` takes it)


def resume_point(cfg: Config, run_dir: Path) -> Path | None:
    return find_resume(cfg.trainer.resume, run_dir, "trainer.resume")


def train(cfg: Config, progress: bool = True) -> dict:
    import ray

    from cpe_ray.runtime import start_runtime
    from cpe_ray.tracking import Tracker
    from cpe_ray.trainer import Trainer, step_summary

    records = load_prompts(resolve_path(cfg.data.train_path), cfg.data.on_bad_record).records
    if len(records) < cfg.trainer.rollout_batch_size:
        raise ConfigError(f"{cfg.data.train_path} has {len(records)} prompts, fewer than "
                          f"trainer.rollout_batch_size ({cfg.trainer.rollout_batch_size})")
    check_backend(cfg)
    resolve_model_path(cfg.policy.model_path)
    if cfg.grm.model_path:
        resolve_model_path(cfg.grm.model_path)
    run_dir = run_dir_for(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    resume = resume_point(cfg, run_dir)
    save_config(cfg, run_dir / "config.yaml")

    started_ray = init_ray(cfg)
    rt = start_runtime(cfg)
    tracker = None
    try:
        start, run_id = 0, None
        if resume is not None:
            state = read_trainer_state(resume)
            rt.learner.load_state(str(resume / STATE_DIR))
            rt.learner.sync_weights()  # engines must sample from the restored policy
            start, run_id = int(state["step"]), state.get("wandb_run_id")
        tracker = Tracker(cfg, run_dir, run_id)
        trainer = Trainer(cfg, rt, JudgeClient(cfg, rt.grms, rt.grm_labels), records, tracker)
        total = trainer.total_steps()
        last: dict = {}
        every = cfg.trainer.save_every
        bar = progress_bar(total, start, cfg.run.name, progress)
        for step in range(start, total):
            last = trainer.fit_one(step)
            done = step + 1
            if done == total or (every and done % every == 0):
                write_checkpoint(rt.learner, run_dir, done, POLICY_DIR, tracker.run_id)
            if progress:
                bar.write(step_summary(step, total, last))
                bar.set_postfix(reward=f"{last.get('reward/original/weighted', 0.0):+.3f}")
                bar.update(1)
        bar.close()
        return {"run_dir": str(run_dir), "steps": total, "resumed_from": start,
                "last": last, "checkpoints": [str(p) for p in checkpoints(run_dir)]}
    finally:
        if tracker is not None:
            tracker.finish()
        rt.shutdown()
        if started_ray:
            ray.shutdown()
