"""EngineSpec: which config fields each role's engine reads (no engine is built)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from cpe_ray.config import load_config
from cpe_ray.engines.spec import EngineSpec
from cpe_ray.models import resolve_model_path

OVERRIDES = [
    "run.seed=7", "policy.model_path=/p", "policy.dtype=bfloat16", "rollout.backend=vllm",
    "rollout.tensor_parallel_size=2", "rollout.gpu_memory_utilization=0.5",
    "rollout.max_prompt_length=100", "rollout.max_new_tokens=20", "post_edit.max_new_tokens=30",
    "rollout.max_batch_rows=8", "rollout.kv_cache_memory_bytes=1000",
    "grm.backend=hf", "grm.model_path=/g", "grm.tensor_parallel_size=4",
    "grm.gpu_memory_utilization=0.3", "grm.kv_cache_memory_bytes=2000",
    "eval.max_prompt_tokens=300", "eval.max_new_tokens=40", "eval.judge_max_new_tokens=50",
]


@pytest.fixture(scope="module")
def cfg():
    return load_config(None, OVERRIDES)


def test_policy_spec_reads_rollout_and_policy(cfg) -> None:
    spec = EngineSpec.for_policy(cfg, engine_index=2)
    assert spec == EngineSpec(
        backend="vllm", model_path="/p", dtype="bfloat16", seed=9,
        use_gpu=cfg.cluster.use_gpu, tensor_parallel_size=2, gpu_memory_utilization=0.5,
        max_model_len=130, max_batch_rows=8,
        trust_remote_code=cfg.policy.trust_remote_code, kv_cache_memory_bytes=1000)
    assert EngineSpec.for_eval_policy(cfg, "/ckpt") == replace(
        EngineSpec.for_policy(cfg), model_path="/ckpt", max_model_len=340, enable_sleep=False,
        kv_cache_memory_bytes=None)


def test_grm_spec_shares_the_policy_precision_and_batch_rows(cfg) -> None:
    spec = EngineSpec.for_grm(cfg, engine_index=1)
    assert spec == EngineSpec(
        backend="hf", model_path="/g", dtype="bfloat16", seed=8, use_gpu=cfg.cluster.use_gpu,
        tensor_parallel_size=4, gpu_memory_utilization=0.3, max_batch_rows=8,
        trust_remote_code=cfg.policy.trust_remote_code, kv_cache_memory_bytes=2000)
    judge = EngineSpec.for_eval_judge(cfg, "vllm", "/j")
    assert judge == replace(spec, backend="vllm", model_path="/j", seed=7, tensor_parallel_size=1,
                            kv_cache_memory_bytes=None, max_model_len=350)


def test_grm_spec_needs_a_model_path(cfg) -> None:
    with pytest.raises(ValueError, match="grm.model_path"):
        EngineSpec.for_grm(replace(cfg, grm=replace(cfg.grm, model_path=None)))


def test_eval_policy_spec_stays_within_the_model_window() -> None:
    # eval.max_prompt_tokens (4,096 by default) plus the answer would exceed the tiny model's
    # 4,096-token window, which vLLM refuses; the spec keeps to the window and the prompt
    # budget shrinks to what is left beside the answer
    tiny_model_path = resolve_model_path("tiny")
    cfg = load_config(None, ["eval.max_new_tokens=256"])
    assert EngineSpec.for_eval_policy(cfg, tiny_model_path).max_model_len == 4096
    small = load_config(None, ["eval.max_prompt_tokens=300", "eval.max_new_tokens=40"])
    assert EngineSpec.for_eval_policy(small, tiny_model_path).max_model_len == 340
    assert EngineSpec.for_eval_policy(cfg, "/no/such/model").max_model_len == 4096 + 256
