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
    metrics = trainer.step(0, trainer.batch_for(0))
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
    for phase in ("generate", "critique", "post_edit", "score", "score_rewrites", "train",
                  "weight_sync"):
        assert 0 <= metrics[f"time/{phase}"] <= metrics["time/step"]
    samples = trainer._last_samples
    assert len(samples) == 4 and sum(s["kept"] for s in samples) == 2
    # random selection is drawn first: only the kept answers are critiqued and rewritten
    assert metrics["post_edit/rewritten_fraction"] == 0.5
    for s in samples:
        assert bool(s["critique"]) == s["kept"] == (s["rewrite"] is not None)
        assert (s["rewrite_reward"] is not None) == s["kept"]


def test_forward_of_originals_then_rewrites_equals_one_forward(runtime_for, tmp_path) -> None:
    """The step overlaps the originals' forward with post-edit: same numbers as one pass."""
    from cpe_ray.runtime.pipeline import Pipeline

    cfg, rt = runtime_for(*MIXED_T)
    trainer = _trainer(cfg, rt, tmp_path)
    batch = trainer.batch_for(0)
    s = trainer.sampler.collect(batch, 7, Pipeline(60), lambda *args: None)
    kept = [s.rewrites[k] for k in s.kept]
    assert kept
    whole = trainer._experience(s.prompt_ids, s.answers, kept)
    # answers at rollout.temperature, rewrites at post_edit.temperature
    assert whole.temperature.tolist() == pytest.approx([1.0] * 4 + [0.7] * len(kept))

    def forward(exp):
        return {name: p.wait(60) for name, p in trainer._submit_forward(exp).items()}

    originals = forward(trainer._experience(s.prompt_ids, s.answers, []))
    parts = trainer._with_rewrites(whole, originals, s.prompt_ids, kept)
    one = forward(whole)
    assert parts.keys() == one.keys() == {"old_logprobs", "old_values"}
    for name in one:
        assert parts[name].shape == one[name].shape
        torch.testing.assert_close(parts[name] * whole.response_mask,
                                   one[name] * whole.response_mask, atol=1e-5, rtol=1e-5)


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
    from cpe_ray.algo.experience import Experience
    from cpe_ray.rl.trainer import compute_advantages

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
    from cpe_ray.algo.algorithms import masked_mean, masked_var
    from cpe_ray.algo.experience import Experience
    from cpe_ray.rl.trainer import compute_advantages

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
    metrics = trainer.step(0, trainer.batch_for(0))
    assert "post_edit/kept_fraction" not in metrics and "reward/rewrite/weighted" not in metrics
    assert metrics["policy/edit_token_frac"] == 0.0
    assert "critic/value_loss" not in metrics and "time/critique" not in metrics
    # before the first update the policy is the reference: their KL is 0
    assert abs(metrics["policy/ref_kl"]) < 1e-6
    second = trainer.step(1, trainer.batch_for(1))
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
    from cpe_ray.rl.trainer import INFLIGHT_FILE
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


def test_a_batch_in_flight_pickled_before_sampling_split_off_still_loads(monkeypatch,
                                                                         tmp_path) -> None:
    """inflight.pkl of an older checkpoint names cpe_ray.rl.trainer.{Samples,Answer,...}."""
    import pickle

    from cpe_ray.engines.base import Completion
    from cpe_ray.rl import sampling
    from cpe_ray.rl.trainer import Trainer

    answer = sampling.Answer(0, Completion(0, 0, [5, 6], [-0.5, -0.25], "hi", "stop"))
    for cls in (sampling.Samples, sampling.Answer, sampling.PromptFits):
        monkeypatch.setattr(cls, "__module__", "cpe_ray.rl.trainer")
    old = pickle.dumps({3: sampling.Samples([[1, 2]], [answer], {}, {}, [], {"generate": 0.5},
                                             sampling.PromptFits(cut_left=1))})
    monkeypatch.undo()
    assert b"cpe_ray.rl.trainer" in old and b"cpe_ray.rl.sampling" not in old
    trainer = Trainer.__new__(Trainer)  # restore_files needs no runtime
    (tmp_path / "inflight.pkl").write_bytes(old)
    trainer.restore_files(tmp_path)
    got = trainer.inflight[3]
    assert isinstance(got, sampling.Samples) and got.prompt_fits.cut_left == 1
    assert got.answers[0].completion.logprobs == [-0.5, -0.25]


def test_stale_originals_loss_is_behaviour_weighted_rewrites_are_not() -> None:
    """The one-step off-policy loss on hand-computed numbers, through the trainer's staleness
    correction and the learner's loss: an original's token advantage times
    w = min(pi_prox / pi_behav, cap) inside PPO's clip; a rewrite keeps its ratio against
    log pi_e and no w."""
    import math

    from cpe_ray.algo import algorithms as alg
    from cpe_ray.algo.experience import Experience
    from cpe_ray.engines.base import Completion
    from cpe_ray.rl.sampling import Answer
    from cpe_ray.rl.trainer import Trainer

    trainer = Trainer.__new__(Trainer)  # _correct_staleness reads only the config
    trainer.cfg = load_config(None, ["trainer.off_policy_steps=1",
                                     "trainer.behaviour_weight_cap=2.0"])
    behaviour = [-1.0, -2.0, -3.0]  # the engine's log-probs when it sampled the answer
    answer = Answer(0, Completion(0, 0, [5, 6, 7], behaviour, "abc", "stop"))
    exp = Experience.from_tokens([[1, 2], [1, 2]], [[5, 6, 7], [8]], 0,
                                 is_edited=[False, True], edit_logprobs=[[], [-1.0]])
    proximal = torch.tensor([[-0.5, -2.5, -1.0], [-1.2, 0.0, 0.0]])  # the learner's, now
    exp = exp.with_fields(old_logprobs=proximal,
                          advantages=torch.tensor([[1.0, 1.0, -1.0], [2.0, 0.0, 0.0]]))
    fixed, metrics = trainer._correct_staleness(exp, [answer], staleness=1)
    w = [math.exp(0.5), math.exp(-0.5), 2.0]  # exp(2.0) = 7.39 is cut to the cap
    torch.testing.assert_close(fixed.advantages, torch.tensor([[w[0], w[1], -w[2]],
                                                               [2.0, 0.0, 0.0]]))
    assert metrics["off_policy/staleness"] == 1.0
    assert metrics["off_policy/weight_mean"] == pytest.approx(
        (math.exp(0.5) + math.exp(-0.5) + math.exp(2.0)) / 3)
    assert metrics["off_policy/weight_clipped_frac"] == pytest.approx(1 / 3)

    logp = torch.tensor([[-0.2, -2.5, -1.5], [-0.9, 0.0, 0.0]])  # the policy being trained
    loss, _ = alg.cpe_policy_loss(logp, fixed.old_logprobs, fixed.edit_logprobs,
                                  fixed.advantages, fixed.response_mask, fixed.is_edited,
                                  0.2, 0.2, 0.2, 0.2)
    # original: r = exp(0.3) = 1.35 -> clipped 1.2; r = 1; r = exp(-0.5) = 0.61 with A < 0:
    # min(0.61 * -2, 0.8 * -2) = -1.6. Rewrite: exp(-0.9) / (exp(-1.0) + 1e-6) = 1.105.
    rewrite_ratio = math.exp(-0.9) / (math.exp(-1.0) + 1e-6)
    terms = [1.2 * w[0], 1.0 * w[1], 0.8 * -w[2], rewrite_ratio * 2.0]
    assert float(loss) == pytest.approx(-sum(terms) / 4, abs=1e-6)
