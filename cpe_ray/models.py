"""Where a model lives and how it is loaded: the model aliases, dtypes, devices, tokenizers.

Shared by the HF engine, the learner and the judges so that every process resolves
`policy.model_path` and dtypes the same way and fails with the same one-line error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from cpe_ray.config import TINY_MODEL
from cpe_ray.errors import ConfigError
from cpe_ray.paths import resolve_path
from cpe_ray.smollm2 import SMOLLM2_MODEL

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _tiny() -> Path:
    from cpe_ray.tiny import ensure_tiny_model

    return ensure_tiny_model()


def _smollm2() -> Path:
    from cpe_ray.smollm2 import ensure_smollm2_model

    return ensure_smollm2_model()


# Names that stand for a model built offline into the cache on first use (atomically, safe
# when processes race): valid wherever a model path is (policy, grm, critic, stages, eval).
MODEL_ALIASES: dict[str, Callable[[], Path]] = {TINY_MODEL: _tiny, SMOLLM2_MODEL: _smollm2}


def resolve_model_path(model_path: str) -> str:
    """An alias (`MODEL_ALIASES`) builds (once) and returns its model; a local directory must
    exist.

    Anything else is taken as a hub id, which only works where the hub cache already holds it:
    nothing here downloads.
    """
    if model_path in MODEL_ALIASES:
        return str(MODEL_ALIASES[model_path]())
    local = resolve_path(model_path)
    if local.exists():
        if not (local / "config.json").is_file():
            raise ConfigError(
                f"model directory {local} has no config.json; point to an HF model dir"
            )
        return str(local)
    if model_path.startswith((".", "/", "~")) or Path(model_path).suffix:
        raise ConfigError(f"model path {model_path} does not exist (resolved to {local})")
    return model_path


def context_length(model_path: str) -> int | None:
    """The model's context window (`max_position_embeddings` in its config.json); None where
    the path is not a local model folder or its config does not say."""
    import json

    try:
        config = Path(resolve_model_path(model_path)) / "config.json"
    except ConfigError:  # a missing folder is refused where the model loads, in its words
        return None
    if not config.is_file():
        return None
    value = json.loads(config.read_text(encoding="utf-8")).get("max_position_embeddings")
    return int(value) if isinstance(value, int) and value > 0 else None


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"dtype {name!r} is not one of {sorted(DTYPES)}") from None


def pick_device(device: str | None = None) -> torch.device:
    """`None`: this process's CUDA device if Ray gave it one, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else (
        torch.device("cpu"))


def load_tokenizer(model_path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(
    model_path: str, dtype: str, device: torch.device | str = "cpu", trust_remote_code: bool = False
) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code
    )
    return model.to(device)


def stop_token_ids(tokenizer: Any, model_path: str) -> tuple[int, ...]:
    """EOS ids from the tokenizer and generation_config.json (Qwen lists several)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    try:
        from transformers import GenerationConfig

        gen_eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:  # no generation_config.json
        gen_eos = None
    if gen_eos is not None:
        ids.update([gen_eos] if isinstance(gen_eos, int) else gen_eos)
    return tuple(sorted(ids))


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), [B, width] long on the CPU: each prompt right-aligned."""
    batch, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[r, width - len(p) :] = 1
    return ids, mask


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token (padding on the left sits at 0)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def last_token_logits(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits after each left-padded prompt, [B, V] float32 on the CPU: the engine and the
    learner both score with this one call (the head on the last position only), so equal
    weights give bit-equal logits. `model` may be a DeepSpeed engine around the model."""
    keep = accepts(model, "logits_to_keep")
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                use_cache=False, **({"logits_to_keep": 1} if keep else {}))
    return out.logits[:, -1].float().cpu()


def unwrap(model: Any) -> Any:
    """The Hugging Face module inside a DeepSpeed engine (or the module itself)."""
    return getattr(model, "module", model)


def accepts(model: Any, argument: str) -> bool:
    """Whether the model's forward takes `argument` (`logits_to_keep`, `past_key_values`)."""
    import inspect

    module = unwrap(model)
    if hasattr(module, "get_base_model"):  # peft (LoRA): its forward passes them through
        module = module.get_base_model()
    return argument in inspect.signature(module.forward).parameters
