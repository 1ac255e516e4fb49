"""Build the configured engine in the current process (inside a rollout or GRM actor)."""

from __future__ import annotations

from cpe_ray.config.schema import CPU_KV_CACHE_BYTES
from cpe_ray.engines.base import GenerationEngine


def make_engine(
    backend: str,
    model_path: str,
    *,
    dtype: str,
    seed: int,
    use_gpu: bool,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.9,
    max_model_len: int | None = None,
    enable_sleep: bool = False,
    max_batch_rows: int = 64,
    bundle_indices: list[int] | None = None,
    gpu_fraction: float | None = None,
    trust_remote_code: bool = False,
    kv_cache_memory_bytes: int | None = None,
) -> GenerationEngine:
    """`hf` or `vllm` (imported only here), on this actor's GPU or on the CPU.

    `kv_cache_memory_bytes` sizes vLLM's KV cache; None means `gpu_memory_utilization` on a
    GPU and `CPU_KV_CACHE_BYTES` on a CPU."""
    if backend == "hf":
        from cpe_ray.engines.hf import HFEngine

        return HFEngine(
            model_path, dtype=dtype, device=None if use_gpu else "cpu",
            max_batch_rows=max_batch_rows, trust_remote_code=trust_remote_code,
        )
    if backend == "vllm":
        from cpe_ray.engines.vllm import VLLMEngine
        from cpe_ray.models import resolve_model_path

        return VLLMEngine(
            model_path=resolve_model_path(model_path),
            tensor_parallel_size=tensor_parallel_size, dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
            enable_sleep=enable_sleep, seed=seed, bundle_indices=bundle_indices,
            gpu_fraction=gpu_fraction, use_gpu=use_gpu,
            kv_cache_memory_bytes=kv_cache_memory_bytes if kv_cache_memory_bytes or use_gpu
            else CPU_KV_CACHE_BYTES,
        )
    raise ValueError(f"unknown engine backend {backend!r}")
