"""PPO learner on local Ray with DeepSpeed (gloo, 2 ranks): training, sync to engines, state."""

from __future__ import annotations

import pytest
import torch

from cpe_ray.algo.experience import Experience
from cpe_ray.config import load_config

pytestmark = pytest.mark.usefixtures("local_ray")

QUESTIONS = [
    ("a vegetarian line cook who loves spice", "What should I make for dinner?"),
    ("a retired teacher who hikes", "Plan a weekend for me."),
    ("a student on a budget", "How do I save money on books?"),
]


def _config(stage: int, ranks: int, **extra: str):
    overrides = [
        f"learner.num_ranks={ranks}", f"learner.zero_stage={stage}",
        "learner.micro_batch_size=2", "learner.actor_lr=1e-2", "learner.critic_lr=1e-2",
        "learner.weight_sync_bucket_mb=0.05",  # ~10 buckets for the tiny model
        "learner.weight_sync_timeout_s=10", "rollout.max_new_tokens=12",
        "trainer.rollout_batch_size=4", "ppo.mini_batch_size=2",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides)


def _batch(rollout, seed: int = 0):
    import ray

    batch = ray.get(rollout.answer.remote(QUESTIONS, seed))
    prompts = [batch.prompt_ids[c.prompt_index] for c in batch.completions]
    # the answers' sampling temperature (rollout.temperature's default)
    exp = Experience.from_tokens(prompts, [c.token_ids for c in batch.completions], 0,
                                 temperature=1.0)
    return batch, exp


def _with_targets(group, exp: Experience, seed: int = 0) -> Experience:
    lp = group.compute_logprobs(exp)
    values = group.compute_values(exp)
    adv = torch.randn(lp.shape, generator=torch.Generator().manual_seed(seed))
    adv = adv * exp.response_mask
    return exp.with_fields(old_logprobs=lp, old_values=values, advantages=adv,
                           returns=values + adv)


def _kill(*handles) -> None:
    import ray

    for h in handles:
        ray.kill(h)


@pytest.mark.parametrize("stage", [0, 3])
def test_update_then_sync_makes_engine_logits_equal_learner(stage: int) -> None:
    from actors.rollout import PolicyRollout
    from cpe_ray.runtime.learner_group import LearnerGroup

    cfg = _config(stage, ranks=2)
    group = LearnerGroup(cfg)
    infos = group.setup()
    assert [i["rank"] for i in infos] == [0, 1] and {i["zero_stage"] for i in infos} == {stage}
    engines = [PolicyRollout.remote(cfg, 0), PolicyRollout.remote(cfg, 1)]
    manifest = group.connect_engines(engines, ["rollout 0", "rollout 1"])
    # embeddings (tied to the head) + 2 layers x 12 + final norm
    assert manifest.num_tensors == 26 and len(manifest.buckets) >= 8
    # float32 at ZeRO-0: rank 0 sends straight from its parameters (checked below: the
    # update still moves the policy and reaches the engines)
    assert group.zero_copy_send == (stage == 0)
    batch, exp = _batch(engines[0])
    # the learner's teacher-forced log-probs are the engine's sampling log-probs (T = 1)
    lp = group.compute_logprobs(exp)
    for row, c in enumerate(batch.completions):
        torch.testing.assert_close(lp[row, : len(c.logprobs)], torch.tensor(c.logprobs),
                                   atol=1e-5, rtol=1e-5)
    metrics = group.train(_with_targets(group, exp), num_mini_batches=2, seed=0)
    assert metrics["policy/lr"] == pytest.approx(1e-2)
    assert 0 <= metrics["policy/clip_frac"] <= 1 and metrics["critic/value_loss"] > 0

    import ray

    probe = batch.prompt_ids
    learner_logits = group.next_token_logits(probe)
    stale = ray.get(engines[1].next_token_logits.remote(probe))
    assert (stale - learner_logits).abs().max() > 1e-3  # the update moved the policy
    stats = group.sync_weights()
    assert stats.buckets == len(manifest.buckets) and stats.bytes == manifest.total_bytes
    for engine in engines:
        synced = ray.get(engine.next_token_logits.remote(probe))
        torch.testing.assert_close(synced, learner_logits, atol=1e-5, rtol=1e-5)
    # a second sync after a second update reuses the same group and manifest
    group.train(_with_targets(group, exp, seed=1), num_mini_batches=1, seed=1)
    group.sync_weights()
    torch.testing.assert_close(ray.get(engines[0].next_token_logits.remote(probe)),
                               group.next_token_logits(probe), atol=1e-5, rtol=1e-5)
    if stage == 0:  # a peer that dies is named, and the sync fails within its timeout
        import time

        from cpe_ray.runtime.remote import RemoteError

        _kill(engines[1])
        start = time.monotonic()
        with pytest.raises(RemoteError, match=r"weight sync: rollout 1 died"):
            group.sync_weights()
        assert time.monotonic() - start < cfg.learner.weight_sync_timeout_s + 5
    _kill(*group.actors, *engines)


@pytest.mark.parametrize("correction", ["none", "token_tis_seq_mis"])
def test_two_ranks_train_exactly_like_one_rank(correction: str) -> None:
    """Normalising by the global token count makes the update independent of the split; with
    the rollout correction, rejected sequences leave that count on every rank."""
    from actors.rollout import PolicyRollout
    from cpe_ray.runtime.learner_group import LearnerGroup

    states = []
    exp_fixed = None
    for ranks in (1, 2):
        # ZeRO-2 reports the gradient norm, which (unlike Adam's step) shows a scale error
        cfg = _config(2, ranks=ranks, **{"ppo.advantage_estimator": "grpo",
                                         "ppo.rollout_correction.mode": correction})
        group = LearnerGroup(cfg)
        group.setup()
        if exp_fixed is None:
            rollout = PolicyRollout.remote(cfg)
            _, exp = _batch(rollout)
            lp = group.compute_logprobs(exp)
            adv = torch.randn(lp.shape, generator=torch.Generator().manual_seed(3))
            # engine log-probs off by noise: some tokens truncated, some sequences rejected
            noise = 0.3 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(4))
            exp_fixed = exp.with_fields(old_logprobs=lp, advantages=adv * exp.response_mask,
                                        behaviour_logprobs=(lp + noise) * exp.response_mask)
            _kill(rollout)
        metrics = group.train(exp_fixed, num_mini_batches=2, seed=5)
        assert "critic/value_loss" not in metrics  # GRPO trains no critic
        states.append((group.policy_state(), metrics))
        _kill(*group.actors)
    (one, m1), (two, m2) = states
    assert one.keys() == two.keys()
    # Adam's first step moves weights by ~lr = 1e-2. Its g / (|g| + eps) amplifies rounding
    # where a gradient is ~0 (k_proj's bias has an exactly-zero gradient: softmax ignores a
    # shift), so compare over all weights at once rather than element by element.
    diff = torch.cat([(two[k] - one[k]).abs().flatten() for k in one])
    assert diff.max() < 1e-4
    assert diff.mean() < 1e-7  # 1e-5 of the mean step
    assert m2["policy/loss"] == pytest.approx(m1["policy/loss"], rel=1e-4, abs=1e-7)
    assert m2["policy/approx_kl"] == pytest.approx(m1["policy/approx_kl"], rel=1e-4, abs=1e-7)
    assert m1["policy/grad_norm"] > 0
    assert m2["policy/grad_norm"] == pytest.approx(m1["policy/grad_norm"], rel=1e-4)
    if correction != "none":
        assert 0 < m1["rollout_correction/masked_frac"] < 1
        assert m1["rollout_correction/clipped_frac"] > 0
        for key in ("weight_mean", "weight_max", "ratio_max", "masked_frac", "mismatch_kl"):
            assert m2[f"rollout_correction/{key}"] == pytest.approx(
                m1[f"rollout_correction/{key}"], rel=1e-6), key


def test_save_load_state_and_export_hf(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from actors.rollout import PolicyRollout
    from cpe_ray.runtime.learner_group import LearnerGroup

    # verl's micro-batch weighting (each micro-batch's mean by its rows): the policy and the
    # critic train through it here; its numbers are in tests/algo/test_micro_batch_weighting.py
    cfg = _config(0, ranks=2, **{"ppo.micro_batch_weighting": "rows"})
    group = LearnerGroup(cfg)
    group.setup()
    rollout = PolicyRollout.remote(cfg)
    _, exp = _batch(rollout)
    metrics = group.train(_with_targets(group, exp), num_mini_batches=1, seed=0)
    assert metrics["policy/grad_norm"] > 0 and metrics["critic/value_loss"] > 0
    group.save_state(str(tmp_path / "state"))
    saved = group.policy_state()
    group.export_hf(str(tmp_path / "hf"))
    # after more training the weights differ; loading brings back the saved ones exactly
    group.train(_with_targets(group, exp, seed=2), num_mini_batches=1, seed=2)
    moved = group.policy_state()
    assert any(not torch.equal(moved[k], saved[k]) for k in saved)
    group.load_state(str(tmp_path / "state"))
    restored = group.policy_state()
    assert all(torch.equal(restored[k], saved[k]) for k in saved)
    # the HF export loads with plain transformers and holds the saved weights
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    params = dict(model.named_parameters())
    assert all(torch.equal(params[k], saved[k]) for k in saved)
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    _kill(*group.actors, rollout)


def _gpu_sync_roundtrip(cfg) -> None:
    import ray

    from cpe_ray.runtime.start import start_runtime

    rt = start_runtime(cfg)
    try:
        _, exp = _batch(rt.rollouts[0])
        rt.learner.train(_with_targets(rt.learner, exp), num_mini_batches=1, seed=0)
        probe = [list(exp.sequences[0, exp.prompt_width - 8 : exp.prompt_width])]
        before = ray.get(rt.rollouts[0].next_token_logits.remote(probe))
        learner_logits = rt.learner.next_token_logits(probe)
        assert (before - learner_logits).abs().max() > 1e-3
        stats = rt.learner.sync_weights()
        assert stats.bytes == rt.manifest.total_bytes
        after = ray.get(rt.rollouts[0].next_token_logits.remote(probe))
        torch.testing.assert_close(after, learner_logits, atol=1e-4, rtol=1e-4)
    finally:
        rt.shutdown()


@pytest.mark.gpu
def test_colocated_learner_and_engine_sync_by_cuda_ipc_on_one_gpu() -> None:
    cfg = _config(3, ranks=1, **{"cluster.use_gpu": "true",
                                 "cluster.colocate_learner_rollout": "true"})
    _gpu_sync_roundtrip(cfg)


@pytest.mark.gpu
def test_learner_and_engine_on_two_gpus_sync_over_nccl() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL refuses two ranks on one GPU; needs 2 GPUs")
    _gpu_sync_roundtrip(_config(0, ranks=1, **{"cluster.use_gpu": "true"}))
