"""Run tracking: `metrics.jsonl` and `samples.jsonl` under the run directory, mirrored to wandb.

wandb runs online, offline (the default and the tests) or not at all, from
`logging.wandb_mode`; the local files always hold the same keys. Keys (API keys) come only
from the environment.

Logs match the weights: a run that resumes from the checkpoint of step N first cuts both files
back to the rows of steps before N (written to a temporary file and renamed, so a crash leaves
either the old file or the cut one) and rewinds its wandb run to step N, so a step between
that checkpoint and the crash is never logged twice. The local files are the record: a wandb
failure (a full disk while it writes a table) is reported once and wandb is left off for the
rest of the run; a failure to write a local file is one line naming it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cpe_ray.config import Config
from cpe_ray.errors import CpeError, RunIOError, describe_os_error

SAMPLE_COLUMNS = ("step", "prompt_id", "persona", "question", "answer", "critique", "rewrite",
                  "answer_reward", "rewrite_reward", "kept")


def _row_step(line: bytes) -> int | None:
    """The step of one JSONL row, or None for a row cut short by a crash."""
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def cut_log(path: Path, start_step: int) -> int:
    """Keep the rows of `path` whose step is below `start_step` (and drop rows a crash cut
    short); atomic. The number of rows dropped."""
    if not path.exists():
        return 0
    tmp = path.with_name(f".{path.name}.tmp")
    dropped = 0
    with path.open("rb") as src, tmp.open("wb") as dst:
        for line in src:
            if not line.strip():
                continue
            step = _row_step(line)
            if step is None or step >= start_step:
                dropped += 1
                continue
            dst.write(line if line.endswith(b"\n") else line + b"\n")
        dst.flush()
        os.fsync(dst.fileno())
    if dropped:
        os.replace(tmp, path)
    else:
        tmp.unlink()
    return dropped


class Tracker:
    def __init__(self, cfg: Config, run_dir: Path, run_id: str | None = None,
                 name: str | None = None, job_type: str | None = None,
                 start_step: int | None = None) -> None:
        """`name`: the wandb run's name (default `run.name`); `job_type`: e.g. "sft";
        `start_step`: the first step this process logs; the local files are cut back to the
        steps before it and wandb rewinds there (None: append to the files as they are)."""
        self.cfg, self.run_dir = cfg, run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.samples_path = run_dir / "samples.jsonl"
        self.dropped = 0  # rows cut from the local files (steps past the resume point)
        # The first step not logged yet: a step replayed after a restart is not logged again
        self.next_step = start_step
        self._next_samples = start_step
        if start_step is not None:
            for path in (self.metrics_path, self.samples_path):
                try:
                    self.dropped += cut_log(path, start_step)
                except OSError as exc:
                    raise RunIOError(describe_os_error(
                        exc, f"cutting {path} back to step {start_step}: cannot write")) from None
        self.run = None
        mode = cfg.logging.wandb_mode
        if mode != "disabled":
            self.run = self._init_wandb(name, job_type, run_id, start_step or 0)

    def _init_wandb(self, name: str | None, job_type: str | None, run_id: str | None,
                    start_step: int) -> Any:
        import wandb

        cfg = self.cfg
        os.environ.setdefault("WANDB_SILENT", "true")
        kwargs: dict[str, Any] = dict(
            project=cfg.logging.project, entity=cfg.logging.entity, name=name or cfg.run.name,
            job_type=job_type, dir=str(self.run_dir), mode=cfg.logging.wandb_mode,
            config=asdict(cfg), tags=list(cfg.logging.tags), reinit="finish_previous")
        if run_id and start_step > 0:
            # rewind: the run's history after the last step before `start_step` is dropped
            try:
                return wandb.init(resume_from=f"{run_id}?_step={start_step - 1}", **kwargs)
            except Exception as exc:  # an older server without rewind: continue the run
                print(f"cpe-ray: wandb could not rewind run {run_id} to step {start_step} "
                      f"({type(exc).__name__}); continuing it as it is", flush=True)
        try:
            return wandb.init(id=run_id, resume="allow" if run_id else None, **kwargs)
        except Exception as exc:  # no network or key online, a full disk: one line
            detail = " ".join(str(exc).split())[:200]
            raise CpeError(f"wandb could not start a {cfg.logging.wandb_mode} run in "
                           f"{self.run_dir} ({type(exc).__name__}: {detail}); fix that or set "
                           "logging.wandb_mode=offline / disabled") from None

    @property
    def run_id(self) -> str | None:
        return None if self.run is None else self.run.id

    def _append(self, path: Path, lines: Sequence[str]) -> None:
        try:
            with path.open("a") as f:
                f.write("".join(lines))
        except OSError as exc:
            raise RunIOError(describe_os_error(exc, "writing", path)) from None

    def _to_wandb(self, data: Mapping[str, Any], step: int) -> None:
        try:
            self.run.log(dict(data), step=step)
        except Exception as exc:
            detail = " ".join(str(exc).split())[:200]
            print(f"cpe-ray: wandb failed at step {step} ({type(exc).__name__}: {detail}); "
                  f"wandb is off for the rest of this run, {self.metrics_path} goes on",
                  flush=True)
            self.run = None

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Append one step's metrics; a step already logged by this tracker is ignored."""
        if self.next_step is not None:
            if step < self.next_step:
                return
            self.next_step = step + 1
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self._append(self.metrics_path, [json.dumps(record) + "\n"])
        if self.run is not None:
            self._to_wandb(metrics, step)

    def log_samples(self, step: int, samples: Sequence[Mapping[str, Any]]) -> None:
        if self._next_samples is not None:
            if step < self._next_samples:
                return
            self._next_samples = step + 1
        self._append(self.samples_path,
                     [json.dumps(dict(s), ensure_ascii=False) + "\n" for s in samples])
        if self.run is not None and step % self.cfg.trainer.sample_table_every == 0:
            import wandb

            table = wandb.Table(columns=list(SAMPLE_COLUMNS))
            for s in samples:
                table.add_data(*[s.get(c) for c in SAMPLE_COLUMNS])
            self._to_wandb({"samples": table}, step)

    def finish(self) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            try:
                run.finish()
            except Exception as exc:
                print(f"cpe-ray: wandb could not finish its run ({type(exc).__name__})",
                      flush=True)
