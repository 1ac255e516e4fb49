"""Build the configured engine in the current process (inside a rollout or GRM actor)."""

from __future__ import annotations

from cpe_ray.config.schema import CPU_KV_CACHE_BYTES
from cpe_ray.engines.base import GenerationEngine
from cpe_ray.engines.spec import EngineSpec


def make_engine(
    spec: EngineSpec,
    *,
    bundle_indices: list[int] | None = None,
    gpu_fraction: float | None = None,
) -> GenerationEngine:
    """`hf` or `vllm` (imported only here), on this actor's GPU or on the CPU.

    `bundle_indices` (one placement-group bundle per TP rank) and `gpu_fraction` (each
    worker's share of a GPU it shares with a learner) say where a vLLM engine's workers go."""
    if spec.backend == "hf":
        from cpe_ray.engines.hf import HFEngine

        return HFEngine(
            spec.model_path, dtype=spec.dtype, device=None if spec.use_gpu else "cpu",
            max_batch_rows=spec.max_batch_rows, trust_remote_code=spec.trust_remote_code,
            logprobs_mode=spec.logprobs_mode, adapter_versions=spec.adapter_versions,
        )
    if spec.backend == "vllm":
        from cpe_ray.engines.vllm import VLLMEngine
        from cpe_ray.models import resolve_model_path

        kv_bytes = spec.kv_cache_memory_bytes
        return VLLMEngine(
            model_path=resolve_model_path(spec.model_path),
            tensor_parallel_size=spec.tensor_parallel_size, dtype=spec.dtype,
            gpu_memory_utilization=spec.gpu_memory_utilization,
            max_model_len=spec.max_model_len, enable_sleep=spec.enable_sleep, seed=spec.seed,
            bundle_indices=bundle_indices, gpu_fraction=gpu_fraction, use_gpu=spec.use_gpu,
            kv_cache_memory_bytes=kv_bytes if kv_bytes or spec.use_gpu else CPU_KV_CACHE_BYTES,
            logprobs_mode=spec.logprobs_mode, lora_rank=spec.lora_rank,
            adapter_versions=spec.adapter_versions,
        )
    raise ValueError(f"unknown engine backend {spec.backend!r}")
