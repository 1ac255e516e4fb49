"""`EngineSpec`: one engine's settings, read from the config in one place per role.

Every engine is built from a spec by `make_engine` (factory.py). The classmethods say which
config fields each role uses: the policy's rollout engines, the GRM judge's engines (training
and the judge server), and evaluation's policy and judges. Tests and benchmarks build a spec
by hand. Where an engine is placed (Ray bundles, a GPU share) is not config: the caller
passes it to `make_engine` beside the spec.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from cpe_ray.config import Config


@dataclass(frozen=True)
class EngineSpec:
    backend: str  # "hf" or "vllm"
    model_path: str  # a directory, a Hugging Face id or "tiny"
    dtype: str
    seed: int
    use_gpu: bool
    tensor_parallel_size: int = 1  # vLLM only
    gpu_memory_utilization: float = 0.9  # vLLM only
    max_model_len: int | None = None  # vLLM: prompt plus completion tokens; None: the model's
    enable_sleep: bool = False  # vLLM's sleep mode: CUDA only
    max_batch_rows: int = 64  # HF only: sequences decoded together
    trust_remote_code: bool = False
    # vLLM's KV cache in bytes; None: gpu_memory_utilization on a GPU, CPU_KV_CACHE_BYTES on a CPU
    kv_cache_memory_bytes: int | None = None
    # which log-probs a sampled token carries: "processed" or "raw" (rollout.logprobs_mode)
    logprobs_mode: str = "processed"
    # LoRA: the adapters' rank (0: no adapters, full weights are synced) and how many adapter
    # versions an engine holds (`trainer.off_policy_steps + 1`: in-flight work keeps its own)
    lora_rank: int = 0
    adapter_versions: int = 1

    @classmethod
    def for_policy(cls, cfg: Config, engine_index: int = 0) -> EngineSpec:
        """Rollout engine `engine_index`: long enough for an answer prompt plus the longer of
        an answer and a rewrite; each engine samples from its own seed."""
        r = cfg.rollout
        return cls(
            backend=r.backend, model_path=cfg.policy.model_path, dtype=cfg.policy.dtype,
            seed=cfg.run.seed + engine_index, use_gpu=cfg.cluster.use_gpu,
            tensor_parallel_size=r.tensor_parallel_size,
            gpu_memory_utilization=r.gpu_memory_utilization,
            max_model_len=r.max_prompt_length + max(r.max_new_tokens,
                                                    cfg.post_edit.max_new_tokens),
            enable_sleep=r.enable_sleep, max_batch_rows=r.max_batch_rows,
            trust_remote_code=cfg.policy.trust_remote_code,
            kv_cache_memory_bytes=r.kv_cache_memory_bytes, logprobs_mode=r.logprobs_mode,
            lora_rank=cfg.policy.lora.rank,
            adapter_versions=cfg.trainer.off_policy_steps + 1,
        )

    @classmethod
    def for_judge_model(cls, cfg: Config, backend: str, model_path: str,
                        engine_index: int = 0) -> EngineSpec:
        """What every judge model's engine shares (the GRM's, evaluation's judges).

        The one place that reads the settings the GRM has none of its own for: it runs at
        the policy's precision and trust_remote_code (`policy.dtype`,
        `policy.trust_remote_code`) and, on the HF backend, the rollout's batch rows
        (`rollout.max_batch_rows`)."""
        return cls(
            backend=backend, model_path=model_path, dtype=cfg.policy.dtype,
            seed=cfg.run.seed + engine_index, use_gpu=cfg.cluster.use_gpu,
            gpu_memory_utilization=cfg.grm.gpu_memory_utilization,
            max_batch_rows=cfg.rollout.max_batch_rows,
            trust_remote_code=cfg.policy.trust_remote_code,
        )

    @classmethod
    def for_grm(cls, cfg: Config, engine_index: int = 0) -> EngineSpec:
        """GRM engine `engine_index` (an engine backend: `grm.backend` hf or vllm)."""
        g = cfg.grm
        if g.model_path is None:
            raise ValueError("grm.model_path is required for an engine-backed GRM")
        return replace(cls.for_judge_model(cfg, g.backend, g.model_path, engine_index),
                       tensor_parallel_size=g.tensor_parallel_size,
                       kv_cache_memory_bytes=g.kv_cache_memory_bytes)

    @classmethod
    def for_eval_policy(cls, cfg: Config, model_path: str) -> EngineSpec:
        """The evaluated policy: the rollout's engine sized for evaluation prompts and
        answers, without sleep mode, its KV cache sized by default."""
        from cpe_ray.models import context_length

        e = cfg.eval
        # eval.max_prompt_tokens defaults to 4,096 (PersonaMem histories): a model with a
        # 4,096-token window would be asked for more than it has, which vLLM refuses
        window = context_length(model_path)
        wanted = e.max_prompt_tokens + e.max_new_tokens
        return replace(cls.for_policy(cfg), model_path=model_path,
                       max_model_len=wanted if window is None else min(wanted, window),
                       enable_sleep=False, kv_cache_memory_bytes=None)

    @classmethod
    def for_eval_judge(cls, cfg: Config, backend: str, model_path: str) -> EngineSpec:
        """An evaluation judge (the GRM as a scorer, or `eval.judge_model_path`): a judge
        model on one GPU, sized for evaluation prompts and verdicts."""
        e = cfg.eval
        return replace(cls.for_judge_model(cfg, backend, model_path),
                       max_model_len=e.max_prompt_tokens + e.judge_max_new_tokens)
