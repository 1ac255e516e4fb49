"""The controller end to end on local Ray with the tiny model: CPE and PPO steps, resume, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from cpe_ray.config import load_config

SMALL = [
    "trainer.rollout_batch_size=2", "ppo.mini_batch_size=1", "rollout.n_samples_per_prompt=2",
    "rollout.max_new_tokens=8", "post_edit.max_new_tokens=8", "learner.micro_batch_size=2",
    "logging.wandb_mode=disabled",
]
# Rewrites sampled at another temperature than answers: each row must be scored at its own.
MIXED_T = ("post_edit.temperature=0.7",)


@pytest.fixture(scope="module")
def runtime_for(local_ray):
    from cpe_ray.runtime.start import start_runtime

    started = []

    def make(*overrides: str):
        while started:  # one runtime at a time: the local cluster holds 4 CPUs
            started.pop().shutdown()
        cfg = load_config(None, [*SMALL, *overrides])
        rt = start_runtime(cfg)
        started.append(rt)
        return cfg, rt

    yield make
    for rt in started:
        rt.shutdown()


def _trainer(cfg, rt, tmp_path):
    from cpe_ray.data import load_prompts
    from cpe_ray.paths import resolve_path
    from cpe_ray.rl.trainer import Trainer
    from cpe_ray.runtime.judging import JudgeClient
    from cpe_ray.tracking import Tracker

    records = load_prompts(resolve_path(cfg.data.train_path)).records
    return Trainer(cfg, rt, JudgeClient(cfg), records, Tracker(cfg, tmp_path))


def test_cpe_step_end_to_end(runtime_for, tmp_path) -> None:
    cfg, rt = runtime_for(*MIXED_T)
    trainer = _trainer(cfg, rt, tmp_path)
    result = trainer.step(0)
    metrics = result.metrics
    # 2 prompts x 2 answers = 4 rewrites; random at ratio 0.5 keeps floor(0.5 x 4) = 2
    assert metrics["post_edit/kept_fraction"] == 0.5
    assert -5 <= metrics["reward/original/weighted"] <= 5
    assert "reward/rewrite/weighted" in metrics and "critic/value_loss" in metrics
    assert 0 < metrics["policy/edit_token_frac"] < 1  # rewrites trained with the edit loss
    assert metrics["sync/bytes"] == rt.manifest.total_bytes
    # ZeRO-0 float32 clips without reporting a norm in DeepSpeed; the learner keeps it
    assert metrics["policy/grad_norm"] > 0 and metrics["critic/grad_norm"] > 0
    # the demo prompts fit rollout.max_prompt_length: nothing was cut
    assert metrics["post_edit/truncated_prompts"] == 0 == metrics["rollout/prompts_cut_left"]
    phases = ("generate", "critique", "post_edit", "score", "select", "learner_forward",
              "train", "weight_sync")
    for phase in phases:
        assert 0 <= metrics[f"time/{phase}"] <= metrics["time/step"]
    # one after the other: the phases add up to the step (the originals' forward overlaps)
    assert sum(metrics[f"time/{p}"] for p in phases) <= metrics["time/step"]
    samples = result.records
    assert len(samples) == 4 and sum(s["kept"] for s in samples) == 2
    # random selection is drawn first: only the kept answers are critiqued and rewritten
    assert metrics["post_edit/rewritten_fraction"] == 0.5
    for s in samples:
        assert bool(s["critique"]) == s["kept"] == (s["rewrite"] is not None)
        assert (s["rewrite_reward"] is not None) == s["kept"]


def test_forward_of_originals_then_rewrites_equals_one_forward(runtime_for, tmp_path) -> None:
    """A fresh step's forward of the originals runs while the engines rewrite, the kept
    rewrites' after: the same numbers as one pass over the batch (a stale batch's)."""
    from dataclasses import replace

    cfg, rt = runtime_for(*MIXED_T)
    trainer = _trainer(cfg, rt, tmp_path)
    s = trainer.sample(0, forward_originals=True)
    assert s.kept and set(s.originals_forward) == {"old_logprobs", "old_values"}
    split = trainer.batch(s)
    one = trainer.batch(replace(s, originals_forward={}))
    # answers at rollout.temperature, rewrites at post_edit.temperature
    assert split.temperature.tolist() == pytest.approx([1.0] * 4 + [0.7] * len(s.kept))
    mask = split.response_mask
    for name in ("old_logprobs", "old_values"):
        assert getattr(split, name).shape == getattr(one, name).shape
        torch.testing.assert_close(getattr(split, name) * mask, getattr(one, name) * mask,
                                   atol=1e-5, rtol=1e-5)


def test_each_row_is_scored_at_its_sampling_temperature(runtime_for) -> None:
    """Answers sampled at rollout.temperature (1.0) and rewrites at post_edit.temperature (0.7)
    in one batch: the learner's log-probs equal the engine's on every row. Scored at the
    rollout's temperature, as before, the rewrites' tokens were off by ~0.06 nats each."""
    import ray

    from cpe_ray.algo.experience import Experience
    from cpe_ray.algo.post_edit import EditRequest

    cfg, rt = runtime_for(*MIXED_T)
    engine = rt.rollouts[0]
    persona, question = "a retired teacher who hikes", "Plan a weekend for me."
    answers = ray.get(engine.answer.remote([(persona, question)], 11))
    edits = ray.get(engine.post_edit.remote(
        [EditRequest(persona, question, c.text, "Name a trail.") for c in answers.completions],
        12))
    rows = answers.completions + edits.completions
    exp = Experience.from_tokens(
        [answers.prompt_ids[0]] * len(answers.completions) + edits.prompt_ids,
        [c.token_ids for c in rows], ray.get(engine.pad_token_id.remote()),
        temperature=[cfg.rollout.temperature] * len(answers.completions)
        + [cfg.post_edit.temperature] * len(edits.completions))
    engine_lp = [torch.tensor(c.logprobs) for c in rows]
    learner_lp = rt.learner.compute_logprobs(exp)
    for row, lp in enumerate(engine_lp):
        torch.testing.assert_close(learner_lp[row, : len(lp)], lp, atol=1e-4, rtol=1e-4)
    at_rollout_t = rt.learner.compute_logprobs(exp.with_fields(temperature=torch.ones(len(exp))))
    rewrites = range(len(answers.completions), len(rows))
    off = torch.cat([(at_rollout_t[r, : len(engine_lp[r])] - engine_lp[r]).abs()
                     for r in rewrites]).mean()
    assert off > 0.01  # what scoring every row at rollout.temperature got wrong


def test_group_advantages_are_not_whitened_over_tokens() -> None:
    """GRPO / RLOO: with lengths [40, 2, 3, 4] and rewards [2, 0.6, 0, -0.4], whitening over
    tokens made the 0.6 answer (above its group's mean 0.55) -1.25 and the best +0.46."""
    from cpe_ray.algo.advantages import compute_advantages
    from cpe_ray.algo.experience import Experience

    lengths, rewards = [40, 2, 3, 4], torch.tensor([2.0, 0.6, 0.0, -0.4])
    exp = Experience.from_tokens([[1]] * 4, [[5] * n for n in lengths], 0, temperature=1.0)
    forward = {"old_logprobs": torch.zeros(4, 40)}
    groups = torch.zeros(4, dtype=torch.long)
    for estimator in ("grpo", "rloo"):
        cfg = load_config(None, [f"ppo.advantage_estimator={estimator}"])
        assert cfg.ppo.whiten_advantages  # the default: it applies to GAE only
        adv = compute_advantages(cfg.ppo, exp, forward, rewards, groups).advantages
        first = adv[:, 0]
        assert (torch.sign(first) == torch.sign(rewards - rewards.mean())).all(), estimator
        # GRPO: (r - 0.55) / std([2, 0.6, 0, -0.4]) = 1.45 / 1.0503 = 1.381, 0.05 / 1.0503
        if estimator == "grpo":
            assert first.tolist() == pytest.approx([1.3806, 0.0476, -0.5237, -0.9045], abs=1e-3)
        for row, n in enumerate(lengths):  # one value on every token of an answer
            assert (adv[row, :n] == first[row]).all() and (adv[row, n:] == 0).all()


def test_gae_advantages_are_whitened_over_tokens() -> None:
    from cpe_ray.algo.advantages import compute_advantages
    from cpe_ray.algo.experience import Experience
    from cpe_ray.algo.tensors import masked_mean, masked_var

    exp = Experience.from_tokens([[1]] * 3, [[5] * n for n in (6, 2, 3)], 0, temperature=1.0)
    forward = {"old_logprobs": torch.zeros(3, 6), "old_values": torch.rand(3, 6)}
    cfg = load_config(None, [])
    out = compute_advantages(cfg.ppo, exp, forward, torch.tensor([1.0, -1.0, 0.5]),
                             torch.arange(3))
    mask = exp.response_mask
    assert abs(float(masked_mean(out.advantages, mask))) < 1e-6
    assert float(masked_var(out.advantages, mask)) == pytest.approx(1.0, abs=1e-4)


def test_ppo_step_without_post_edit(runtime_for, tmp_path) -> None:
    cfg, rt = runtime_for("post_edit.enabled=false", "ppo.advantage_estimator=grpo",
                          "learner.use_reference=true", "ppo.kl_coef=0.05")
    trainer = _trainer(cfg, rt, tmp_path)
    metrics = trainer.step(0).metrics
    assert "post_edit/kept_fraction" not in metrics and "reward/rewrite/weighted" not in metrics
    assert metrics["policy/edit_token_frac"] == 0.0
    assert "critic/value_loss" not in metrics and "time/critique" not in metrics
    # before the first update the policy is the reference: their KL is 0
    assert abs(metrics["policy/ref_kl"]) < 1e-6
    second = trainer.step(1).metrics
    assert abs(second["policy/ref_kl"]) > 1e-6  # the update moved it away


def test_batches_are_a_function_of_seed_and_step(runtime_for, tmp_path) -> None:
    cfg, rt = runtime_for()
    trainer = _trainer(cfg, rt, tmp_path)
    assert trainer.steps_per_epoch() == 64  # 128 demo prompts / 2
    epoch = [r.id for s in range(64) for r in trainer.batch_for(s)]
    assert sorted(epoch) == sorted(r.id for r in trainer.records)  # each prompt once
    assert [r.id for r in trainer.batch_for(5)] == [r.id for r in trainer.batch_for(5)]
    assert epoch[:2] != [r.id for r in trainer.batch_for(64)]  # next epoch reshuffles


def _policy(ckpt) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "policy" / "model.safetensors"))


@pytest.mark.slow
def test_four_steps_equal_two_plus_resume_plus_two(tmp_path) -> None:
    from cpe_ray.run import checkpoints, train

    base = [*SMALL, f"run.output_dir={tmp_path}"]
    straight = train(load_config(None, [*base, "run.name=straight", "trainer.max_steps=4"]),
                     progress=False)
    train(load_config(None, [*base, "run.name=resumed", "trainer.max_steps=2"]),
          progress=False)
    resumed = train(load_config(None, [*base, "run.name=resumed", "trainer.max_steps=4",
                                       "trainer.resume=auto"]), progress=False)
    assert resumed["resumed_from"] == 2 and straight["resumed_from"] == 0
    a = _policy(checkpoints(tmp_path / "straight")[-1])
    b = _policy(checkpoints(tmp_path / "resumed")[-1])
    assert [p.name for p in checkpoints(tmp_path / "resumed")] == ["step-2", "step-4"]
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=0, rtol=0)
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2, 3]
    # the checkpoint carried the reward-hacking monitor's baseline and streaks
    assert (checkpoints(tmp_path / "resumed")[0] / "monitor.json").is_file()
    summaries = [json.loads((tmp_path / name / "monitor_summary.json").read_text())
                 for name in ("straight", "resumed")]
    assert summaries[0] == summaries[1] and summaries[0]["baseline_steps"] == 3


@pytest.mark.slow
def test_lora_four_steps_equal_two_plus_resume_plus_two(tmp_path) -> None:
    """policy.lora: the adapter, its optimiser and the RNG its dropout draws from resume
    exactly; each checkpoint's policy/ is the merged model, its adapter/ beside it."""
    from safetensors.torch import load_file

    from cpe_ray.run import checkpoints, train

    base = [*SMALL, f"run.output_dir={tmp_path}", "policy.lora.rank=4",
            "policy.lora.dropout=0.1", "learner.use_reference=true", "ppo.kl_coef=0.05"]
    train(load_config(None, [*base, "run.name=straight", "trainer.max_steps=4"]), progress=False)
    train(load_config(None, [*base, "run.name=resumed", "trainer.max_steps=2"]), progress=False)
    resumed = train(load_config(None, [*base, "run.name=resumed", "trainer.max_steps=4",
                                       "trainer.resume=auto"]), progress=False)
    assert resumed["resumed_from"] == 2
    a_ckpt, b_ckpt = checkpoints(tmp_path / "straight")[-1], checkpoints(tmp_path / "resumed")[-1]
    for part in ("policy/model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(a_ckpt / part)), load_file(str(b_ckpt / part))
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], atol=0, rtol=0)
    assert any(".lora_B." in k and a[k].abs().max() > 0 for k in a)  # (the adapter) trained


@pytest.mark.parametrize("override, expected", [
    ("data.train_path=nope.jsonl", "nope.jsonl"),
    ("ppo.kl_coeff=0.1", "did you mean 'ppo.kl_coef'"),
    ("grm.backend=openai", "grm.backend=openai needs grm.api.base_url"),
])
def test_bad_input_exits_with_one_line_before_any_actor(override, expected, tmp_path) -> None:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "cpe_ray", "train", override],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cpe-ray: error:") and expected in lines[0]
    assert "Ray" not in proc.stderr + proc.stdout  # nothing started
    assert time.monotonic() - start < 60


def test_bad_record_exits_with_file_and_line(tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"persona": "a cook", "question": "hi"}\n{"persona": "x"}\n')
    proc = subprocess.run([sys.executable, "-m", "cpe_ray", "train", f"data.train_path={bad}"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert f"{bad}:2" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_off_policy_four_steps_equal_two_plus_resume_plus_two(tmp_path) -> None:
    """trainer.off_policy_steps=1: batch t+1 is sampled while batch t trains; the checkpoint
    carries the batch in flight, so a resume trains exactly what the unbroken run did."""
    from cpe_ray.rl.schedule import INFLIGHT_FILE
    from cpe_ray.run import checkpoints, train

    base = [*SMALL, f"run.output_dir={tmp_path}", "trainer.off_policy_steps=1",
            "trainer.save_every=2"]
    straight = train(load_config(None, [*base, "run.name=straight", "trainer.max_steps=4"]),
                     progress=False)
    train(load_config(None, [*base, "run.name=resumed", "trainer.max_steps=2"]), progress=False)
    ckpt = checkpoints(tmp_path / "resumed")[-1]
    assert (ckpt / INFLIGHT_FILE).is_file()  # batch 2, sampled with step 1's weights
    resumed = train(load_config(None, [*base, "run.name=resumed", "trainer.max_steps=4",
                                       "trainer.resume=auto"]), progress=False)
    assert resumed["resumed_from"] == 2 and straight["resumed_from"] == 0
    a = _policy(checkpoints(tmp_path / "straight")[-1])
    b = _policy(checkpoints(tmp_path / "resumed")[-1])
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=0, rtol=0)
    lines = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1, 2, 3]
    assert [m["off_policy/staleness"] for m in lines] == [0.0, 1.0, 1.0, 1.0]
    for m in lines[1:]:  # a step of training apart: weights near 1, none cut at the cap
        assert 0.5 < m["off_policy/weight_mean"] < 2.0 and m["off_policy/weight_clipped_frac"] < 0.5
    assert "rollout/logprob_diff" in lines[0] and "rollout/logprob_diff" not in lines[1]


def test_a_checkpoint_with_a_pickled_batch_in_flight_is_refused_in_one_line(tmp_path) -> None:
    """Checkpoints before inflight.json pickled their batch in flight; this version cannot
    train it exactly, so it says so instead of resuming on another batch."""
    from cpe_ray.errors import CpeError
    from cpe_ray.rl.schedule import OneStepAhead

    (tmp_path / "inflight.pkl").write_bytes(b"\x80\x04N.")
    schedule = OneStepAhead(trainer=None)  # restoring needs no trainer
    with pytest.raises(CpeError, match="inflight.pkl, which this version no longer reads"):
        schedule.restore(tmp_path)
    schedule.restore(None)
    assert schedule.ahead == {}


@pytest.mark.slow
def test_rollout_correction_trains_and_logs_its_metrics(tmp_path) -> None:
    """Two one-step off-policy steps under the tis_mis preset: the learner weighs every
    original (the stale one too, in place of the staleness weights) and logs the weights."""
    from cpe_ray.run import train

    cfg = load_config(None, [*SMALL, f"run.output_dir={tmp_path}", "run.name=corrected",
                             "trainer.max_steps=2", "trainer.off_policy_steps=1",
                             "ppo.rollout_correction.preset=tis_mis"])
    train(cfg, progress=False)
    lines = [json.loads(x) for x in
             (tmp_path / "corrected" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1]
    for m in lines:
        assert 0 < m["rollout_correction/weight_mean"] <= m["rollout_correction/weight_max"] <= 2
        assert 0 < m["rollout_correction/ess"] <= 1
        assert 0 <= m["rollout_correction/masked_frac"] < 0.5
        assert 0 <= m["rollout_correction/mismatch_kl"] < 0.05
        assert "off_policy/weight_mean" not in m  # folded into the learner's correction
    # fresh: the engine and the learner score alike (float32 on a CPU)
    assert lines[0]["rollout_correction/mismatch_kl"] < 1e-5
