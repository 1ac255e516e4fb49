"""Generation engines behind one protocol: `hf` (transformers, CPU or GPU) and `vllm` (GPU)."""

from cpe_ray.engines.base import (
    FINISH_LENGTH,
    FINISH_STOP,
    Completion,
    EngineInfo,
    GenerationEngine,
    SamplingParams,
)

__all__ = [
    "FINISH_LENGTH",
    "FINISH_STOP",
    "Completion",
    "EngineInfo",
    "GenerationEngine",
    "SamplingParams",
]
