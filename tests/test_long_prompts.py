"""A training run whose questions are longer than rollout.max_prompt_length: the answer
prompts and the edit prompts shorten them, and none is cut from the start (the persona)."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from cpe_ray.paths import DATA_DIR, REPO_ROOT

pytestmark = pytest.mark.slow

SMALL = ["trainer.rollout_batch_size=2", "ppo.mini_batch_size=1",
         "rollout.n_samples_per_prompt=2", "rollout.max_new_tokens=8",
         "post_edit.max_new_tokens=8", "learner.micro_batch_size=2",
         "logging.wandb_mode=disabled", "trainer.max_steps=1"]
# The demo's longest persona with the edit template takes 520 tokens of the tiny tokenizer.
LIMIT = 768
WORDS = ("the", "trail", "lake", "picnic", "徒步", "湖边", "野餐", "日出", "山里", "周末")


def test_long_questions_are_shortened_never_cut_from_the_start(tmp_path) -> None:
    """Before, every edit prompt of such a question was cut from the start (2 of 2 here)."""
    rng = random.Random(0)
    lines = (DATA_DIR / "demo" / "train.jsonl").read_text().splitlines()[:2]
    with (tmp_path / "long.jsonl").open("w") as f:
        for line in lines:
            record = json.loads(line)
            filler = "".join(rng.choice(WORDS) for _ in range(2500))
            record["question"] = f"START {filler} {record['question']}"
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "cpe_ray", "train", *SMALL, f"run.output_dir={tmp_path}",
         f"data.train_path={tmp_path / 'long.jsonl'}", f"rollout.max_prompt_length={LIMIT}"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=280)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [metrics] = [json.loads(m) for m in next(tmp_path.glob("*/metrics.jsonl")).open()]
    assert metrics["rollout/questions_shortened"] == 2  # both answer prompts
    assert metrics["post_edit/truncated_prompts"] == 2  # both rewrites' edit prompts
    assert metrics["rollout/prompts_cut_left"] == 0
