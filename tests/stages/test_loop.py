"""`cpe-ray sft` end to end on local Ray: checkpoint layout, PPO from its policy, exact resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cpe_ray.config import load_config
from cpe_ray.stages.loop import batch_rows, total_steps

pytestmark = pytest.mark.usefixtures("local_ray")

PPO_SMALL = [
    "trainer.rollout_batch_size=2", "ppo.mini_batch_size=1", "rollout.n_samples_per_prompt=2",
    "rollout.max_new_tokens=8", "post_edit.max_new_tokens=8", "learner.micro_batch_size=2",
]


def _weights(model_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_batches_cover_each_epoch_once_and_are_pure() -> None:
    s = load_config(None, ["sft.batch_size=3", "sft.epochs=2"]).sft
    assert total_steps(s, 7) == 6  # ceil(7 / 3) = 3 steps an epoch, the last one short
    epoch = [i for step in range(3) for i in batch_rows(s, 5, 7, step)]
    assert sorted(epoch) == list(range(7))
    assert batch_rows(s, 5, 7, 4) == batch_rows(s, 5, 7, 4)
    assert [i for step in range(3, 6) for i in batch_rows(s, 5, 7, step)] != epoch


@pytest.mark.slow
def test_sft_then_one_ppo_step_from_its_policy(tmp_path, capsys) -> None:
    from cpe_ray.cli import main
    from cpe_ray.models import resolve_model_path
    from cpe_ray.run import train
    from cpe_ray.runs.checkpoints import checkpoints

    overrides = [f"run.output_dir={tmp_path}", "sft.max_steps=2", "logging.wandb_mode=disabled"]
    assert main(["sft", *overrides]) == 0
    printed = capsys.readouterr().out
    cfg = load_config(None, overrides)
    run_dir = tmp_path / "sft-tiny"
    ckpt = run_dir / "checkpoints" / "step-2"
    assert "done: 2 steps (resumed from step 0); train loss " in printed
    assert f"next          cpe-ray train policy.model_path={ckpt / 'policy'}" in printed
    assert [p.name for p in checkpoints(run_dir)] == ["step-2"]
    assert {p.name for p in ckpt.iterdir()} == {"policy", "state", "trainer_state.json",
                                                "manifest.json"}
    assert load_config(run_dir / "config.yaml") == cfg
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1]
    assert lines[0]["train/loss"] > lines[1]["train/loss"]  # 7 demo conversations a step
    assert "eval/loss" in lines[1] and "eval/loss" not in lines[0]  # held out, at the end
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train_examples"] + summary["heldout_examples"] == 32
    assert summary["first_train_loss"] == lines[0]["train/loss"]
    # stage 3 starts from the SFT policy folder as it is (a vanishing learning rate keeps
    # the PPO step's policy where it started, which is the SFT policy, not the tiny base)
    ppo = train(load_config(None, [*PPO_SMALL, f"run.output_dir={tmp_path}", "run.name=ppo",
                                   f"policy.model_path={ckpt / 'policy'}",
                                   "learner.actor_lr=1e-12", "trainer.max_steps=1",
                                   "logging.wandb_mode=disabled"]), progress=False)
    assert ppo["steps"] == 1 and "reward/original/weighted" in ppo["last"]
    policy = _weights(tmp_path / "ppo" / "checkpoints" / "step-1" / "policy")
    sft = _weights(ckpt / "policy")
    base = _weights(Path(resolve_model_path("tiny")))
    assert policy.keys() == sft.keys()
    assert max(float((policy[k] - sft[k]).abs().max()) for k in sft) < 1e-6
    assert max(float((base[k] - sft[k]).abs().max()) for k in sft if k in base) > 1e-4


@pytest.mark.slow
def test_four_sft_steps_equal_two_plus_resume_plus_two(tmp_path) -> None:
    from cpe_ray.runs.checkpoints import checkpoints
    from cpe_ray.stages.sft import run_sft

    base = [f"run.output_dir={tmp_path}", "logging.wandb_mode=disabled", "sft.batch_size=4",
            "sft.schedule=cosine", "sft.warmup_steps=1", "sft.epochs=2"]
    straight = run_sft(load_config(None, [*base, "sft.name=straight", "sft.max_steps=4"]),
                       progress=False)
    run_sft(load_config(None, [*base, "sft.name=resumed", "sft.max_steps=4",
                               "sft.save_every=2"]), progress=False)
    # drop the last checkpoint: as if the first run had stopped after step 2
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-4")
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()[:2]
    (tmp_path / "resumed" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    resumed = run_sft(load_config(None, [*base, "sft.name=resumed", "sft.max_steps=4",
                                         "sft.resume=auto"]), progress=False)
    assert resumed.resumed_from == 2 and straight.resumed_from == 0
    assert [p.name for p in checkpoints(tmp_path / "resumed")] == ["step-2", "step-4"]
    a, b = _weights(straight.model_path), _weights(resumed.model_path)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=0, rtol=0)
    steps = [json.loads(line)["step"] for line in
             (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]
