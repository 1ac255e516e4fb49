"""DeepSpeed configuration dicts for the learner's trained models and its frozen reference.

Gradient accumulation is unmanaged: every `backward` only accumulates and each `step` is
one optimiser update, because a PPO mini-batch holds a varying number of samples (originals
plus however many rewrites were kept) and so a varying number of micro-batches.
"""

from __future__ import annotations

from typing import Any

from cpe_ray.config import LearnerConfig

ADAM_EPS = 1e-8
# Keep every ZeRO-3 parameter partitioned: small ones too, so tests exercise the gather path.
STAGE3_PERSISTENCE_THRESHOLD = 0
STEPS_PER_PRINT = 10**9  # DeepSpeed's own progress prints would interleave with ours


def _precision(dtype: str) -> dict[str, Any]:
    return {"bf16": {"enabled": dtype == "bfloat16"}, "fp16": {"enabled": dtype == "float16"}}


def _zero(cfg: LearnerConfig, stage: int, with_optimizer: bool) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = STAGE3_PERSISTENCE_THRESHOLD
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if cfg.offload and with_optimizer and stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if cfg.offload and stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return zero


def train_config(
    cfg: LearnerConfig, lr: float, dtype: str, world_size: int, use_gpu: bool
) -> dict[str, Any]:
    """A trained model: AdamW, gradient clipping, ZeRO stage from config.

    AdamW's betas are `learner.adam_betas`: (0.9, 0.95) by default, OpenRLHF's choice; verl,
    and so the paper's release, keep torch's (0.9, 0.999) (`optim.AdamW` in its
    `fsdp_workers.py`), which conf/experiment/qwen2.5-7b-cpe-release.yaml sets.
    """
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "train_batch_size": cfg.micro_batch_size * world_size,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": _zero(cfg, cfg.zero_stage, with_optimizer=True),
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": lr,
                "betas": list(cfg.adam_betas),
                "eps": ADAM_EPS,
                "weight_decay": cfg.weight_decay,
                # DeepSpeed's fused CPU/GPU Adam needs a C++/CUDA build; torch's is exact.
                "torch_adam": not cfg.offload,
            },
        },
        "steps_per_print": STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
        **_precision(dtype),
    }


def eval_config(cfg: LearnerConfig, dtype: str, world_size: int) -> dict[str, Any]:
    """A frozen model (the reference): partitioned like the policy, no optimiser."""
    stage = 3 if cfg.zero_stage == 3 else 0
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "train_batch_size": cfg.micro_batch_size * world_size,
        "zero_optimization": _zero(cfg, stage, with_optimizer=False),
        "steps_per_print": STEPS_PER_PRINT,
        **_precision(dtype),
    }
