"""`cpe-ray train`: check everything cheap first, then start Ray, the runtime and the loop.

Order: config (already validated), data records, judge backend, model path (the tiny model is
built here if needed) - each failing with one line before any actor starts - then Ray, the
placement and actors, an optional resume, the loop, checkpoints, and a summary of where
everything is. Checkpoints are written to a temporary directory and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

from cpe_ray.config import Config, save_config
from cpe_ray.data import load_prompts
from cpe_ray.errors import ConfigError
from cpe_ray.judge_client import JudgeClient, check_backend
from cpe_ray.models import resolve_model_path
from cpe_ray.paths import resolve_path

# Set by Ray's job supervisor for a job's driver only (not by `ray start`, not in a shell).
JOB_DRIVER_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
CKPT_PREFIX = "step-"
TRAINER_STATE = "trainer_state.json"


def ray_address(cfg: Config, environ: Mapping[str, str] = os.environ) -> str | None:
    """Where to run: `cluster.address`, else the job's cluster when this is a Ray job's driver
    (a driver that started a Ray of its own there could not run the job's actors: they
    inherit its runtime env, whose working dir lives in the outer cluster), else None: a
    fresh local Ray, whatever RAY_ADDRESS a user's shell holds."""
    if cfg.cluster.address:
        return cfg.cluster.address
    return "auto" if JOB_DRIVER_ENV in environ else None


def run_dir_for(cfg: Config) -> Path:
    return Path(cfg.run.output_dir).expanduser() / cfg.run.name


def checkpoints(run_dir: Path) -> list[Path]:
    """Whole checkpoints, oldest first (a crash mid-write leaves only a .tmp directory)."""
    root = run_dir / "checkpoints"
    found = [p for p in root.glob(f"{CKPT_PREFIX}*") if (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(CKPT_PREFIX)))


def resume_point(cfg: Config, run_dir: Path) -> Path | None:
    mode = cfg.trainer.resume
    if mode == "never":
        return None
    if mode == "auto":
        found = checkpoints(run_dir)
        return found[-1] if found else None
    path = resolve_path(mode)
    if not (path / TRAINER_STATE).is_file():
        raise ConfigError(f"trainer.resume={mode}: {path} is not a whole checkpoint "
                          f"(no {TRAINER_STATE}); use auto, never or a step-N directory")
    return path


def save_checkpoint(rt, run_dir: Path, step: int, run_id: str | None) -> Path:
    root = run_dir / "checkpoints"
    final = root / f"{CKPT_PREFIX}{step}"
    tmp = root / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    rt.learner.export_hf(str(tmp / "policy"))
    rt.learner.save_state(str(tmp / "state"))
    (tmp / TRAINER_STATE).write_text(json.dumps({"step": step, "wandb_run_id": run_id}) + "\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)  # atomic: a checkpoint either exists whole or not at all
    return final


def train(cfg: Config, progress: bool = True) -> dict:
    import ray
    from tqdm import tqdm

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

    started_ray = not ray.is_initialized()
    if started_ray:
        address = ray_address(cfg)
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
    rt = start_runtime(cfg)
    tracker = None
    try:
        start, run_id = 0, None
        if resume is not None:
            state = json.loads((resume / TRAINER_STATE).read_text())
            rt.learner.load_state(str(resume / "state"))
            rt.learner.sync_weights()  # engines must sample from the restored policy
            start, run_id = int(state["step"]), state.get("wandb_run_id")
        tracker = Tracker(cfg, run_dir, run_id)
        trainer = Trainer(cfg, rt, JudgeClient(cfg, rt.grms, rt.grm_labels), records, tracker)
        total = trainer.total_steps()
        last: dict = {}
        every = cfg.trainer.save_every
        bar = tqdm(total=total, initial=start, unit="step", desc=cfg.run.name,
                   disable=not progress, dynamic_ncols=True)
        for step in range(start, total):
            last = trainer.fit_one(step)
            done = step + 1
            if done == total or (every and done % every == 0):
                save_checkpoint(rt, run_dir, done, tracker.run_id)
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
