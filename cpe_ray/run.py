"""`cpe-ray train`: check everything cheap first, then start Ray, the runtime and the loop.

Order: config (already validated), data records, judge backend, model path (the tiny model is
built here if needed) - each failing with one line before any actor starts - then Ray, the
placement and actors, an optional resume, the loop, checkpoints, and a summary of where
everything is. Checkpoints are written to a temporary directory and renamed when complete.
"""

from __future__ import annotations

from cpe_ray.config import Config
from cpe_ray.data import load_prompts
from cpe_ray.errors import ConfigError
from cpe_ray.judges.client import JudgeClient, check_backend
from cpe_ray.models import resolve_model_path
from cpe_ray.paths import resolve_path
from cpe_ray.runs import (
    POLICY_DIR,
    checkpoints,
    init_ray,
    is_due,
    open_run,
    progress_bar,
    restore,
    write_checkpoint,
)


def train(cfg: Config, progress: bool = True) -> dict:
    import ray

    from cpe_ray.rl.trainer import Trainer, step_summary
    from cpe_ray.runtime.start import start_runtime
    from cpe_ray.tracking import Tracker

    records = load_prompts(resolve_path(cfg.data.train_path), cfg.data.on_bad_record).records
    if len(records) < cfg.trainer.rollout_batch_size:
        raise ConfigError(f"{cfg.data.train_path} has {len(records)} prompts, fewer than "
                          f"trainer.rollout_batch_size ({cfg.trainer.rollout_batch_size})")
    check_backend(cfg)
    resolve_model_path(cfg.policy.model_path)
    if cfg.grm.model_path:
        resolve_model_path(cfg.grm.model_path)
    run_dir, resume = open_run(cfg, None, cfg.trainer.resume, "trainer.resume")

    started_ray = init_ray(cfg)
    rt = start_runtime(cfg)
    tracker = None
    try:
        start, run_id = 0, None
        if resume is not None:
            start, run_id = restore(rt.learner, resume)
            rt.learner.sync_weights()  # engines must sample from the restored policy
        tracker = Tracker(cfg, run_dir, run_id)
        trainer = Trainer(cfg, rt, JudgeClient(cfg, rt.grms, rt.grm_labels), records, tracker)
        total = trainer.total_steps()
        last: dict = {}
        bar = progress_bar(total, start, cfg.run.name, progress)
        for step in range(start, total):
            last = trainer.fit_one(step)
            done = step + 1
            if is_due(done, total, cfg.trainer.save_every):
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
