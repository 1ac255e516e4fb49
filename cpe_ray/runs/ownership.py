"""The run directory: one live process owns it, another run's is not mixed into, a resume is
checked against the run's config, whose earlier versions are kept.

A run directory belongs to one run. Opening one that holds another run's logs or checkpoints
is refused unless the job continues it (`<section>.resume=auto`) or replaces it
(`run.overwrite=true`), so two runs never mix in one `metrics.jsonl`.

A run directory is owned by one live process: `open_run` takes an exclusive `flock` on its
`.lock` before it writes anything, and the system drops the lock when that process ends,
however it ends. Resuming a run with a config that differs in what makes the run (its
`fixed` keys: the seed, the data, the batch shape, the models) is refused unless
`<resume key>_override` is set; `config.yaml` is always the current config, and each
earlier one is kept as `config.<n>.yaml` (1 the oldest).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from cpe_ray.config import Config, config_to_yaml, save_config
from cpe_ray.errors import ConfigError, CpeError, RunIOError, describe_os_error
from cpe_ray.runs.checkpoints import find_resume, remove_partial
from cpe_ray.runs.layout import (
    CKPT_PREFIX,
    CONFIG_FILE,
    CONFIG_HISTORY,
    LOCK_FILE,
    METRICS_FILE,
    RUN_ARTIFACTS,
    SAMPLES_FILE,
    inside,
    note,
    step_of,
)

# What makes a `cpe-ray train` run: resuming it with other values of these is refused unless
# trainer.resume_override (seed and data; batch shape; the models; what the state holds)
TRAIN_RUN_KEYS = (
    "run.seed", "data.train_path", "data.shuffle", "data.on_bad_record",
    "trainer.rollout_batch_size", "rollout.n_samples_per_prompt", "ppo.mini_batch_size",
    "ppo.mini_batch_unit", "policy.model_path", "learner.critic_model_path", "grm.backend",
    "grm.model_path", "ppo.advantage_estimator", "learner.use_reference",
    "trainer.off_policy_steps")


def run_dir_for(cfg: Config, name: str | None = None) -> Path:
    """`run.output_dir/<name>`; the name is `run.name` for `cpe-ray train`."""
    return Path(cfg.run.output_dir).expanduser() / (name or cfg.run.name)


def _dir_problem(run_dir: Path, exc: OSError) -> str:
    """Why `run_dir` cannot be used, naming the path at fault (a file in the way, ...)."""
    for parent in [run_dir, *run_dir.parents]:
        if parent.exists() and not parent.is_dir():
            return f"{parent} is a file, not a directory"
    return describe_os_error(exc, "cannot write", exc.filename or run_dir)


def describe_run(run_dir: Path) -> str | None:
    """What another run left in `run_dir` (logged steps, checkpoints), or None if nothing."""
    parts = []
    metrics = run_dir / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_size:
        with metrics.open("rb") as f:
            lines = sum(1 for line in f if line.strip())
        parts.append(f"{lines} logged step(s) in {METRICS_FILE}")
    found = sorted((run_dir / "checkpoints").glob(f"{CKPT_PREFIX}*"), key=step_of)
    if found:
        parts.append(f"checkpoints {', '.join(p.name for p in found)}")
    if not parts and (run_dir / SAMPLES_FILE).is_file() and (run_dir / SAMPLES_FILE).stat(
            ).st_size:
        parts.append(f"a {SAMPLES_FILE}")
    return " and ".join(parts) or None


def clear_run(run_dir: Path) -> None:
    """Remove what a run wrote (`RUN_ARTIFACTS`, its earlier configs), for
    `run.overwrite=true`."""
    for name in RUN_ARTIFACTS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    for path in run_dir.glob("config.*.yaml"):
        if CONFIG_HISTORY.fullmatch(path.name):
            path.unlink()


_OWNED: dict[Path, int] = {}  # run directories this process holds the lock of: their fds


def own_run(run_dir: Path) -> bool:
    """Take `run_dir`'s lock for this process, True if it was not held yet; one line if
    another live process holds it. The system releases a flock when its process ends, kill -9
    included, so a lock is never stale; the file stays (removing it would race a process
    opening it)."""
    key = run_dir.resolve()
    if key in _OWNED:
        return False
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = " ".join(os.pread(fd, 4096, 0).decode("utf-8", "replace").split())
        os.close(fd)
        raise CpeError(f"{run_dir} is in use by another run ({holder or 'a process starting'}"
                       "); wait for it to end, or choose another run name") from None
    except OSError as exc:  # a file system without locks (some network mounts)
        os.close(fd)
        note(f"warning: {describe_os_error(exc, 'cannot lock', path)}; nothing stops a "
             "second run from writing into the same directory")
        return False
    _OWNED[key] = fd
    holder = (f"pid {os.getpid()} on {socket.gethostname()} since "
              f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n").encode()
    try:  # who holds it, for the line another process says; the lock does not need it
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder, 0)
    except OSError:
        pass  # a full disk: the next write (config.yaml) says so, naming its file
    return True


def release_run(run_dir: Path) -> None:
    """Give `run_dir`'s lock back (a process's end does it too)."""
    fd = _OWNED.pop(run_dir.resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the file releases its flock


def _value(tree: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, Mapping) or part not in tree:
            return _MISSING
        tree = tree[part]
    return tree


_MISSING = object()  # a key an older config.yaml does not have


def changed_run_keys(cfg: Config, saved: Path, keys: Sequence[str]) -> list[str]:
    """`key old -> new` for each of `keys` whose value in `cfg` differs from the config.yaml
    at `saved`; keys that file lacks (an older version's) are not compared."""
    try:
        old = yaml.safe_load(saved.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise RunIOError(f"{saved} is unreadable ({type(exc).__name__}), so a resume cannot "
                         "be checked against the run's config; restore or remove it") from None
    new = OmegaConf.to_container(OmegaConf.structured(cfg))
    changed = []
    for key in keys:
        before, now = _value(old, key), _value(new, key)
        if before is not _MISSING and before != now:
            changed.append(f"{key} {before} -> {now}")
    return changed


def _save_config(cfg: Config, run_dir: Path) -> str | None:
    """Write `config.yaml`; an earlier, different one is kept as `config.<n>.yaml` (its name
    returned)."""
    path = run_dir / CONFIG_FILE
    text = config_to_yaml(cfg)
    kept = None
    if path.is_file() and path.read_text(encoding="utf-8") != text:
        numbers = [int(m.group(1)) for p in run_dir.glob("config.*.yaml")
                   if (m := CONFIG_HISTORY.fullmatch(p.name))]
        kept = f"config.{max(numbers, default=0) + 1}.yaml"
        shutil.copyfile(path, run_dir / kept)
    try:
        save_config(cfg, path)
    except OSError as exc:
        exc.filename = exc.filename or str(path)
        raise
    return kept


def open_run(cfg: Config, name: str | None, resume_mode: str, resume_key: str,
             fixed: Sequence[str] = (), override: bool = False) -> tuple[Path, Path | None]:
    """The run directory (created, locked for this process, with the resolved `config.yaml`)
    and the checkpoint to resume from (`resume_mode` is the config key `resume_key`), checked
    before Ray starts.

    A directory holding another run is refused unless this job continues it (resume=auto, or a
    checkpoint inside it) or replaces it (`run.overwrite=true`): one line saying which. One
    that another live process owns is refused whatever the settings. Continuing the run with
    other values of its `fixed` keys is refused unless `override` (`<resume_key>_override`)."""
    run_dir = run_dir_for(cfg, name)
    if cfg.run.overwrite and resume_mode != "never":
        raise ConfigError(f"run.overwrite=true starts {run_dir} afresh, {resume_key}="
                          f"{resume_mode} continues it; set one of them")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        taken = own_run(run_dir)  # before anything else is written or removed
    except OSError as exc:
        raise _run_io_error(run_dir, exc) from None
    try:
        return run_dir, _prepare_run(cfg, run_dir, resume_mode, resume_key, fixed, override)
    except OSError as exc:
        if taken:
            release_run(run_dir)
        raise _run_io_error(run_dir, exc) from None
    except BaseException:
        if taken:  # refused: the directory is free for the next try
            release_run(run_dir)
        raise


def _prepare_run(cfg: Config, run_dir: Path, resume_mode: str, resume_key: str,
                 fixed: Sequence[str], override: bool) -> Path | None:
    """`open_run` once the directory is ours: the checkpoint to resume from."""
    for name in remove_partial(run_dir):
        note(f"removed the partial checkpoint {run_dir / 'checkpoints' / name}")
    resume = find_resume(resume_mode, run_dir, resume_key, cfg.run.checkpoint_checksums)
    continues = resume_mode == "auto" or (resume is not None and inside(resume, run_dir))
    held = None if continues else describe_run(run_dir)
    if held and not cfg.run.overwrite:
        raise ConfigError(
            f"{run_dir} holds another run ({held}); continue it with {resume_key}=auto, "
            "replace it with run.overwrite=true, or choose another run name")
    if held:
        note(f"run.overwrite=true: removing the previous run in {run_dir} ({held})")
        clear_run(run_dir)
    changed = changed_run_keys(cfg, run_dir / CONFIG_FILE, fixed) if (
        resume is not None and inside(resume, run_dir)) else []
    if changed and not override:
        raise ConfigError(
            f"{resume_key}={resume_mode}: this config differs from the run's in {run_dir} in "
            f"what makes the run ({', '.join(changed)}); resume with the run's values (its "
            f"{CONFIG_FILE}), choose another run name, or set {resume_key}_override=true to "
            "go on with these")
    kept = _save_config(cfg, run_dir)
    if changed:
        note(f"{resume_key}_override=true: going on with {', '.join(changed)}; the run's "
             f"earlier config is kept as {run_dir / str(kept)}")
    return resume


def _run_io_error(run_dir: Path, exc: OSError) -> RunIOError:
    if exc.errno == errno.ENOSPC:
        return RunIOError(describe_os_error(exc, "writing") + "; free space there")
    return RunIOError(f"run directory {run_dir}: {_dir_problem(run_dir, exc)}; set "
                      "run.output_dir to a writable directory")
