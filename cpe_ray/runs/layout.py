"""The names inside a run directory, and the lines a run says about it.

`cpe-ray train`, `sft`, `grm train` and `rm train` all write

    <run.output_dir>/<name>/config.yaml, metrics.jsonl, samples.jsonl, wandb/
    <run.output_dir>/<name>/checkpoints/step-N/{<model dir> (HF), state/, trainer_state.json,
                                                manifest.json, adapter/ (LoRA runs)}
"""

from __future__ import annotations

import re
from pathlib import Path

CKPT_PREFIX = "step-"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"  # written last: a checkpoint without one is not whole
MANIFEST_FORMAT = 1
STATE_DIR = "state"  # the full training state (DeepSpeed's files) inside a checkpoint
POLICY_DIR = "policy"  # the HF policy inside a checkpoint (`policy.model_path` takes it)
ADAPTER_DIR = "adapter"  # with LoRA, beside the (merged) model: the adapter in peft's layout
TMP_INFIX = ".tmp-"  # `.step-N.tmp-<id>`: a checkpoint being written
OLD_INFIX = ".old-"  # `.step-N.old-<id>`: a checkpoint being replaced by a new one
# What a run writes into its directory (config.yaml aside): what `run.overwrite` removes.
METRICS_FILE, SAMPLES_FILE = "metrics.jsonl", "samples.jsonl"
RUN_ARTIFACTS = (METRICS_FILE, SAMPLES_FILE, "checkpoints", "wandb", "summary.json")
LOCK_FILE = ".lock"  # flock'ed by the process that owns the run directory
CONFIG_FILE = "config.yaml"
CONFIG_HISTORY = re.compile(r"config\.(\d+)\.yaml")  # earlier configs of the run, 1 the oldest


def note(message: str) -> None:
    """An informational line of ours (what resume chose, what was skipped, a restart)."""
    print(f"cpe-ray: {message}", flush=True)


def step_of(path: Path) -> int:
    """The step of a `step-N` checkpoint directory; -1 for any other name."""
    tail = path.name.removeprefix(CKPT_PREFIX)
    return int(tail) if tail.isdigit() else -1


def inside(path: Path, run_dir: Path) -> bool:
    """Whether `path` lies in `run_dir`."""
    try:
        path.resolve().relative_to(run_dir.resolve())
    except ValueError:
        return False
    return True
