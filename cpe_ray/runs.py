"""What every training job shares: its run directory, atomic checkpoints, resume, joining Ray.

`cpe-ray train`, `sft`, `grm train` and `rm train` all write

    <run.output_dir>/<name>/config.yaml, metrics.jsonl, wandb/
    <run.output_dir>/<name>/checkpoints/step-N/{<model dir> (HF), state/, trainer_state.json}

A checkpoint is written into a hidden temporary directory and renamed into place when
complete, so a crash never leaves a partial `step-N`; only directories holding
`trainer_state.json` count as checkpoints. `resume=auto` takes the newest one.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cpe_ray.config import Config, save_config
from cpe_ray.errors import ConfigError
from cpe_ray.paths import resolve_path

# Set by Ray's job supervisor for a job's driver only (not by `ray start`, not in a shell).
JOB_DRIVER_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
CKPT_PREFIX = "step-"
TRAINER_STATE = "trainer_state.json"
STATE_DIR = "state"  # the full training state (DeepSpeed's files) inside a checkpoint
POLICY_DIR = "policy"  # the HF policy inside a checkpoint (`policy.model_path` takes it)


def ray_address(cfg: Config, environ: Mapping[str, str] = os.environ) -> str | None:
    """Where to run: `cluster.address`, else the job's cluster when this is a Ray job's driver
    (a driver that started a Ray of its own there could not run the job's actors: they
    inherit its runtime env, whose working dir lives in the outer cluster), else None: a
    fresh local Ray, whatever RAY_ADDRESS a user's shell holds."""
    if cfg.cluster.address:
        return cfg.cluster.address
    return "auto" if JOB_DRIVER_ENV in environ else None


def init_ray(cfg: Config) -> bool:
    """Connect to (or start) Ray unless this process already has; True if it did."""
    import ray

    if ray.is_initialized():
        return False
    address = ray_address(cfg)
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    return True


def progress_bar(total: int, start: int, desc: str, progress: bool) -> Any:
    """A step counter on a terminal; none when output goes to a file or `ray job logs`
    (carriage-return redraws would fill the log), where each step's line still prints."""
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", desc=desc,
                disable=None if progress else True, dynamic_ncols=True)


def run_dir_for(cfg: Config, name: str | None = None) -> Path:
    """`run.output_dir/<name>`; the name is `run.name` for `cpe-ray train`."""
    return Path(cfg.run.output_dir).expanduser() / (name or cfg.run.name)


def open_run(cfg: Config, name: str | None, resume_mode: str, resume_key: str
             ) -> tuple[Path, Path | None]:
    """The run directory (created, with the resolved `config.yaml`) and the checkpoint to
    resume from (`resume_mode` is the config key `resume_key`), checked before Ray starts."""
    run_dir = run_dir_for(cfg, name)
    run_dir.mkdir(parents=True, exist_ok=True)
    resume = find_resume(resume_mode, run_dir, resume_key)
    save_config(cfg, run_dir / "config.yaml")
    return run_dir, resume


def is_due(done: int, total: int, every: int) -> bool:
    """Checkpoint (or evaluate) after `done` steps: at the last step, and every `every`
    steps when `every` > 0."""
    return done == total or bool(every and done % every == 0)


def checkpoints(run_dir: Path) -> list[Path]:
    """Whole checkpoints, oldest first (a crash mid-write leaves only a .tmp directory)."""
    root = run_dir / "checkpoints"
    found = [p for p in root.glob(f"{CKPT_PREFIX}*") if (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(CKPT_PREFIX)))


def find_resume(mode: str, run_dir: Path, key: str) -> Path | None:
    """The checkpoint `mode` ("never", "auto" or a path; the config key `key`) points to."""
    if mode == "never":
        return None
    if mode == "auto":
        found = checkpoints(run_dir)
        return found[-1] if found else None
    path = resolve_path(mode)
    if not (path / TRAINER_STATE).is_file():
        raise ConfigError(f"{key}={mode}: {path} is not a whole checkpoint "
                          f"(no {TRAINER_STATE}); use auto, never or a step-N directory")
    return path


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / TRAINER_STATE).read_text())


def restore(learners: Any, checkpoint: Path) -> tuple[int, str | None]:
    """Load `checkpoint`'s full training state into `learners` (a learner group); the step
    it was written at and its wandb run id."""
    state = read_trainer_state(checkpoint)
    learners.load_state(str(checkpoint / STATE_DIR))
    return int(state["step"]), state.get("wandb_run_id")


def write_checkpoint(learners: Any, run_dir: Path, step: int, model_dir: str,
                     run_id: str | None) -> Path:
    """`checkpoints/step-<step>`: `learners` (a learner group: PPO or supervised) exports its
    model in HF format to `<model_dir>/` and its full training state to `state/`, beside
    `trainer_state.json`; all in a temporary directory renamed once complete."""
    root = run_dir / "checkpoints"
    final = root / f"{CKPT_PREFIX}{step}"
    tmp = root / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    learners.export_hf(str(tmp / model_dir))
    learners.save_state(str(tmp / STATE_DIR))
    state = {"step": step, "wandb_run_id": run_id, "model_dir": model_dir}
    (tmp / TRAINER_STATE).write_text(json.dumps(state) + "\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)  # atomic: a checkpoint either exists whole or not at all
    return final
