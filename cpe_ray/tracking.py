"""Run tracking: `metrics.jsonl` and `samples.jsonl` under the run directory, mirrored to wandb.

wandb runs online, offline (the default and the tests) or not at all, from
`logging.wandb_mode`; the local files always hold the same keys. The wandb run id is kept so
that a resumed run continues the same run. Keys (API keys) come only from the environment.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cpe_ray.config import Config

SAMPLE_COLUMNS = ("step", "prompt_id", "persona", "question", "answer", "critique", "rewrite",
                  "answer_reward", "rewrite_reward", "kept")


class Tracker:
    def __init__(self, cfg: Config, run_dir: Path, run_id: str | None = None,
                 name: str | None = None, job_type: str | None = None) -> None:
        """`name`: the wandb run's name (default `run.name`); `job_type`: e.g. "sft"."""
        self.cfg, self.run_dir = cfg, run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.samples_path = run_dir / "samples.jsonl"
        self.run = None
        mode = cfg.logging.wandb_mode
        if mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.run = wandb.init(
                project=cfg.logging.project, entity=cfg.logging.entity,
                name=name or cfg.run.name, job_type=job_type,
                dir=str(run_dir), mode=mode, config=asdict(cfg), tags=list(cfg.logging.tags),
                id=run_id, resume="allow" if run_id else None, reinit="finish_previous",
            )

    @property
    def run_id(self) -> str | None:
        return None if self.run is None else self.run.id

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.run is not None:
            self.run.log(dict(metrics), step=step)

    def log_samples(self, step: int, samples: Sequence[Mapping[str, Any]]) -> None:
        with self.samples_path.open("a") as f:
            for s in samples:
                f.write(json.dumps(dict(s), ensure_ascii=False) + "\n")
        if self.run is not None and step % self.cfg.trainer.sample_table_every == 0:
            import wandb

            table = wandb.Table(columns=list(SAMPLE_COLUMNS))
            for s in samples:
                table.add_data(*[s.get(c) for c in SAMPLE_COLUMNS])
            self.run.log({"samples": table}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
