"""Whole checkpoints: written under a temporary name with a manifest last, verified on resume,
restored into a learner group; and when to write one.

A checkpoint is written into a hidden temporary directory, its `manifest.json` (the size and,
with `run.checkpoint_checksums`, the sha256 of every file) written last, and the directory is
renamed into place. It is *whole* when every file of its manifest is there with that size
(and checksum): `resume=auto` takes the newest whole one and says which newer ones it skipped
and why; temporary directories that a crash left behind are removed when a run opens.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpe_ray.errors import ConfigError, CpeError, RunIOError, describe_os_error
from cpe_ray.paths import resolve_path, sha256_file
from cpe_ray.runs.layout import (
    CKPT_PREFIX,
    MANIFEST,
    MANIFEST_FORMAT,
    OLD_INFIX,
    STATE_DIR,
    TMP_INFIX,
    TRAINER_STATE,
    inside,
    note,
    step_of,
)

# A checkpoint write that fails with less than this free on its file system ran out of space
# (DeepSpeed's torch.save then says "unexpected pos ...", not ENOSPC).
DISK_FULL_MARGIN_BYTES = 1024**2
MB = 1024**2


def is_due(done: int, total: int, every: int) -> bool:
    """Checkpoint (or evaluate) after `done` steps: at the last step, and every `every`
    steps when `every` > 0."""
    return done == total or bool(every and done % every == 0)


def remove_partial(run_dir: Path) -> list[str]:
    """Remove checkpoint directories a crash left half-written or half-replaced."""
    removed = []
    for path in sorted((run_dir / "checkpoints").glob(f".{CKPT_PREFIX}*")):
        if TMP_INFIX in path.name or OLD_INFIX in path.name:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints that finished writing (they hold a manifest), oldest first. Whether each
    is still whole is `verify_checkpoint`'s question, asked on resume."""
    root = run_dir / "checkpoints"
    found = [p for p in root.glob(f"{CKPT_PREFIX}*")
             if step_of(p) >= 0 and (p / MANIFEST).is_file()]
    return sorted(found, key=step_of)


def _files(root: Path) -> Iterator[Path]:
    for dirpath, _, names in os.walk(root):
        for name in sorted(names):
            yield Path(dirpath, name)


def write_manifest(ckpt: Path, step: int, checksums: bool) -> dict[str, Any]:
    """`manifest.json`: every file under `ckpt` with its size (and sha256), fsynced."""
    files = {}
    for path in _files(ckpt):
        rel = path.relative_to(ckpt).as_posix()
        if rel == MANIFEST:
            continue
        entry: dict[str, Any] = {"bytes": path.stat().st_size}
        if checksums:
            entry["sha256"] = sha256_file(path)
        files[rel] = entry
    manifest = {"format": MANIFEST_FORMAT, "step": step, "files": files}
    _write_json(ckpt / MANIFEST, manifest)
    return manifest


def verify_checkpoint(ckpt: Path, checksums: bool = True) -> str | None:
    """Why `ckpt` is not whole (naming the file), or None. Sizes are always compared;
    checksums too when the manifest has them and `checksums` is set."""
    manifest_path = ckpt / MANIFEST
    if not manifest_path.is_file():
        return f"no {MANIFEST} (interrupted while written, or written before manifests)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        return f"{MANIFEST} is unreadable ({type(exc).__name__})"
    if TRAINER_STATE not in files:
        return f"{MANIFEST} lists no {TRAINER_STATE}"
    for rel, entry in sorted(files.items()):
        path = ckpt / rel
        if not path.is_file():
            return f"{rel} is missing"
        size = path.stat().st_size
        if size != entry.get("bytes"):
            return f"{rel} is {size} bytes, the manifest says {entry.get('bytes')}"
        if checksums and entry.get("sha256") and sha256_file(path) != entry["sha256"]:
            return f"{rel} does not match its sha256 in the manifest"
    try:
        state = read_trainer_state(ckpt)
    except CpeError as exc:
        return str(exc)
    if state["step"] != step_of(ckpt):
        return f"{TRAINER_STATE} says step {state['step']}, the folder step {step_of(ckpt)}"
    return None


def find_resume(mode: str, run_dir: Path, key: str, checksums: bool = True) -> Path | None:
    """The checkpoint `mode` ("never", "auto" or a path; the config key `key`) points to.
    "auto" takes the newest whole checkpoint of `run_dir` and says which it skipped and why."""
    if mode == "never":
        return None
    if mode == "auto":
        root = run_dir / "checkpoints"
        candidates = sorted((p for p in root.glob(f"{CKPT_PREFIX}*") if step_of(p) >= 0),
                            key=step_of, reverse=True)
        for ckpt in candidates:
            problem = verify_checkpoint(ckpt, checksums)
            if problem is None:
                note(f"{key}=auto: resuming from {ckpt} (step {step_of(ckpt)})")
                return ckpt
            note(f"{key}=auto: skipped {ckpt}: {problem}")
        if candidates:
            note(f"{key}=auto: no whole checkpoint in {root}; starting at step 0")
        return None
    path = resolve_path(mode)
    problem = verify_checkpoint(path, checksums) if path.is_dir() else "no such directory"
    if problem is not None:
        raise ConfigError(f"{key}={mode}: {path} is not a whole checkpoint: {problem}; use "
                          "auto, never or a whole step-N directory")
    return path


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """`trainer_state.json` of a checkpoint; one line naming the file if it is damaged."""
    path = checkpoint / TRAINER_STATE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise CpeError(f"{path} is missing") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CpeError(f"{path} is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CpeError(f"{path} holds no integer 'step'")
    return state


def restore(learners: Any, checkpoint: Path, run_dir: Path | None = None
            ) -> tuple[int, str | None]:
    """Load `checkpoint`'s full training state into `learners` (a learner group); the step
    it was written at and its wandb run id, which only a checkpoint inside `run_dir` gives
    (one of another run starts a wandb run of this one, rather than rewinding that run's)."""
    state = read_trainer_state(checkpoint)
    learners.load_state(str(checkpoint / STATE_DIR))
    ours = run_dir is None or inside(checkpoint, run_dir)
    return int(state["step"]), state.get("wandb_run_id") if ours else None


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    with path.open("w") as f:
        f.write(json.dumps(data) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _tree_bytes(root: Path) -> int:
    try:
        return sum(p.stat().st_size for p in _files(root))
    except OSError:
        return 0


def out_of_space(exc: BaseException, where: Path) -> bool:
    """Whether `exc` (or what caused it, through Ray's wrappers) is a full disk at `where`."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "no space left" in str(e).lower():
            return True
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    try:
        return shutil.disk_usage(where).free < DISK_FULL_MARGIN_BYTES
    except OSError:
        return False


def write_checkpoint(learners: Any, run_dir: Path, step: int, model_dir: str,
                     run_id: str | None, checksums: bool = True,
                     extra: Mapping[str, Any] | None = None,
                     resume_key: str = "trainer.resume",
                     files: Mapping[str, bytes] | None = None) -> Path:
    """`checkpoints/step-<step>`: `learners` (a learner group: PPO or supervised) exports its
    model in HF format to `<model_dir>/` and its full training state to `state/`, beside
    `trainer_state.json` (with `extra`) and `files` (name: bytes), and `manifest.json` last;
    all in a temporary directory renamed once complete. A failure removes the temporary
    directory; a full disk is one line saying so."""
    root = run_dir / "checkpoints"
    final = root / f"{CKPT_PREFIX}{step}"
    tag = uuid.uuid4().hex[:8]
    tmp = root / f".{final.name}{TMP_INFIX}{tag}"
    try:
        tmp.mkdir(parents=True)
        learners.export_hf(str(tmp / model_dir))
        learners.save_state(str(tmp / STATE_DIR))
        state = {"step": step, "wandb_run_id": run_id, "model_dir": model_dir, **(extra or {})}
        _write_json(tmp / TRAINER_STATE, state)
        for name, data in (files or {}).items():  # the trainer's own (e.g. batches in flight)
            (tmp / name).write_bytes(data)
        write_manifest(tmp, step, checksums)  # last: the proof that the rest is there
        if final.exists():  # a checkpoint of this step from before a resume: set it aside
            old = root / f".{final.name}{OLD_INFIX}{tag}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)  # atomic: a checkpoint either exists whole or not at all
    except BaseException as exc:
        written = _tree_bytes(tmp)
        full = out_of_space(exc, root)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise RunIOError(
                f"no space left on device writing checkpoint {final} ({written / MB:.1f} MB "
                f"written, removed again); free space there and resume with {resume_key}=auto"
            ) from None
        if isinstance(exc, OSError):
            raise RunIOError(describe_os_error(exc, f"writing checkpoint {final}: cannot write"
                                               )) from None
        raise
    return final


@dataclass
class SavePolicy:
    """When to checkpoint: every `every` steps, every `minutes` of training, and at the end."""

    every: int
    minutes: float
    last_save: float = 0.0  # time.monotonic() of the last checkpoint (or the start)

    def __post_init__(self) -> None:
        self.last_save = self.last_save or time.monotonic()

    def due(self, done: int, total: int) -> bool:
        late = self.minutes > 0 and time.monotonic() - self.last_save >= self.minutes * 60
        return late or is_due(done, total, self.every)

    def saved(self) -> None:
        self.last_save = time.monotonic()
