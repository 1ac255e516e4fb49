"""LoRA in the learners (policy.lora), one DeepSpeed rank in this process on gloo: an update
trains only the adapter, the reference is the base, state resumes bit-equal, the merged export
generates what the adapter generates; the same for the supervised (SFT) rank."""

from __future__ import annotations

import pytest
import torch

from cpe_ray.algo.experience import Experience
from cpe_ray.config import load_config

PROMPTS = [[5, 6, 7, 8, 9], [9, 10, 11], [20, 21, 22, 23]]
RESPONSES = [[12, 13, 14, 15], [15, 16], [30, 31, 32]]
LORA = ["policy.lora.rank=4", "learner.micro_batch_size=2", "learner.actor_lr=1e-2",
        "learner.critic_lr=1e-2"]


@pytest.fixture(scope="module")
def rank0():
    """This process as rank 0 of a one-rank gloo group (as actors/ranks.py sets a rank up)."""
    from actors.ranks import init_rank_process
    from cpe_ray.weight_sync.group import free_port

    init_rank_process(load_config(), 0, 1, "127.0.0.1", free_port())
    yield torch.device("cpu")
    torch.distributed.destroy_process_group()


def _core(device, *overrides: str):
    from cpe_ray.learners.ppo import PPOLearnerCore

    return PPOLearnerCore(load_config(None, [*LORA, *overrides]), 0, 1, device)


def _shard(core, seed: int):
    from cpe_ray.learners.ppo import TrainShard

    exp = Experience.from_tokens(PROMPTS, RESPONSES, 0, temperature=1.0)
    lp = core.compute_logprobs(exp, 2)
    values = core.compute_values(exp, 2) if core.critic is not None else torch.zeros_like(lp)
    adv = torch.randn(lp.shape, generator=torch.Generator().manual_seed(seed))
    adv = adv * exp.response_mask
    exp = exp.with_fields(old_logprobs=lp, old_values=values, advantages=adv,
                          returns=values + adv)
    return TrainShard(exp, 2, int(exp.response_mask.sum()), len(exp), len(exp))


def _base_logprobs(core, exp: Experience) -> torch.Tensor:
    """The plain base model's log-probs of `exp`, through the learner's own forward."""
    from cpe_ray.algo.tensors import logprobs_from_logits
    from cpe_ray.learners.forward import ResponseForward
    from cpe_ray.learners.ppo import scale_by_row_temperature
    from cpe_ray.models import load_causal_lm

    base = load_causal_lm(core.model_path, "float32").eval()
    forward = ResponseForward(base, core.cfg.learner.share_prompts)
    with torch.no_grad():
        logits = scale_by_row_temperature(forward(exp), exp)
    return logprobs_from_logits(logits, exp.responses) * exp.response_mask  # 0 past the end


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_update_trains_only_the_adapter_and_the_reference_is_the_base(rank0, stage) -> None:
    core = _core(rank0, f"learner.zero_stage={stage}", "learner.use_reference=true",
                 "policy.lora.critic=true")
    assert type(core.policy.module).__name__ == "PeftModelForCausalLM"
    assert core.ref is core.policy  # no second copy of the weights
    before = core.policy_state()
    trained = {n for n, p in core.policy.module.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    shard = _shard(core, 0)
    ref = core.compute_ref_logprobs(shard.experience, 1)  # one micro-batch: the same sums
    mask = shard.experience.response_mask
    torch.testing.assert_close(ref * mask, _base_logprobs(core, shard.experience), atol=0, rtol=0)
    for step in range(2):  # lora_B starts at 0, so lora_A first moves on the second step
        metrics = core.train([_shard(core, step)])
        assert metrics["policy/grad_norm"][0] > 0 and metrics["critic/value_loss"][0] > 0
    after = core.policy_state()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == trained  # every adapter tensor moved, the base not by one bit
    assert not torch.equal(core.compute_logprobs(shard.experience, 2), shard.experience.old_logprobs)
    torch.testing.assert_close(core.compute_ref_logprobs(shard.experience, 1), ref, atol=0, rtol=0)


def test_state_resumes_bit_equal_and_holds_only_what_trains(rank0, tmp_path) -> None:
    overrides = ("learner.zero_stage=2", "ppo.advantage_estimator=gae", "policy.lora.critic=true",
                 "policy.lora.dropout=0.1")  # dropout: the RNG must resume too (it is seeded)
    straight = _core(rank0, *overrides)
    for step in range(2):
        straight.train([_shard(straight, step)])
    straight.save_state(str(tmp_path / "state"))
    for step in range(2, 4):
        straight.train([_shard(straight, step)])
    resumed = _core(rank0, *overrides)
    resumed.load_state(str(tmp_path / "state"))
    for step in range(2, 4):
        resumed.train([_shard(resumed, step)])
    a, b = straight.policy_state(), resumed.policy_state()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=0, rtol=0)
    saved = torch.load(tmp_path / "state" / "policy" / "mp_rank_00_model_states.pt",
                       weights_only=False)["module"]
    # not the frozen base; DeepSpeed keeps the tied head (the embedding under a second name)
    assert {k for k in saved if ".lora_" not in k} == {"base_model.model.lm_head.weight"}


def test_merged_export_generates_what_the_adapter_generates(rank0, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cpe_ray.models import load_causal_lm

    core = _core(rank0, "ppo.advantage_estimator=grpo", "learner.actor_lr=5e-2")
    for step in range(3):
        core.train([_shard(core, step)])
    core.export_hf(str(tmp_path / "policy"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "policy").eval()
    assert (tmp_path / "policy" / "tokenizer.json").is_file()
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    adapter = PeftModel.from_pretrained(load_causal_lm(core.model_path, "float32"),
                                        tmp_path / "adapter").eval()
    base = load_causal_lm(core.model_path, "float32").eval()
    ids = torch.tensor([PROMPTS[0], PROMPTS[0]])
    ids[1, :2] = torch.tensor([40, 41])
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        want = adapter.generate(input_ids=ids, **kwargs)
        assert torch.equal(merged.generate(input_ids=ids, **kwargs), want)
        assert not torch.equal(base.generate(input_ids=ids, **kwargs), want)  # it trained
        # the exported adapter is the learner's: same logits as the module that trained it
        torch.testing.assert_close(adapter(input_ids=ids).logits,
                                   core.policy.module(input_ids=ids).logits, atol=0, rtol=0)


def test_supervised_sft_trains_the_adapter_and_exports_merged(rank0, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from cpe_ray.learners.supervised import (
        SFTTokens,
        SupervisedCore,
        SupervisedShard,
        SupervisedSpec,
    )
    from cpe_ray.models import resolve_model_path

    cfg = load_config(None, [*LORA, "learner.zero_stage=2"])
    core = SupervisedCore(cfg, SupervisedSpec("sft", resolve_model_path("tiny"), 1e-2), 0, 1,
                          rank0)
    before = core.model_state()
    rows = [SFTTokens(tuple(p + r), (0,) * len(p) + (1,) * len(r))
            for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    shard = SupervisedShard(rows, 2, sum(r.num_targets for r in rows))
    losses = [core.train(shard)["train/loss"][0] for _ in range(3)]
    assert losses[-1] < losses[0]
    after = core.model_state()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(".lora_" in k for k in moved)
    core.export_hf(str(tmp_path / "policy"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "policy").eval()
    ids = torch.tensor([rows[0].input_ids])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits,
                                   core.engine.module(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)
