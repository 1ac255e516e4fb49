"""LoRA adapters (peft) on the learners' models: wrapping, the adapter-only state, the export.

With `policy.lora.rank > 0` a model is wrapped by `peft.get_peft_model` before DeepSpeed sees
it, so only the adapter's tensors (and a classification head, which peft trains whole through
`modules_to_save`) require gradients and reach the optimiser. The base stays frozen: the
PPO learner's reference is the same module under `disable_adapter()`, and a checkpoint's
`state/` holds the trainable tensors and their optimiser only (the base is
`policy.model_path`). The export writes the merged model, which evaluation and
`policy.model_path` take as any HF model, and the adapter in peft's layout beside it
(`ADAPTER_DIR`), which `PeftModel.from_pretrained` and vLLM's LoRA API read.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from cpe_ray.config import LoraConfig
from cpe_ray.runs.layout import ADAPTER_DIR

CAUSAL_LM, TOKEN_CLS, SEQ_CLS = "CAUSAL_LM", "TOKEN_CLS", "SEQ_CLS"  # peft's task types
RNG_FILE = "rng_rank{rank}.pt"  # in a checkpoint's state/: this rank's torch RNG


def peft_config(lora: LoraConfig, task_type: str) -> Any:
    """The peft `LoraConfig` of `policy.lora` for a model of `task_type` (peft's names)."""
    import peft

    return peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                           target_modules=list(lora.target_modules), task_type=task_type)


def wrap(model: torch.nn.Module, lora: LoraConfig, task_type: str) -> Any:
    """`model` with a fresh adapter; only the adapter (and a task head) trains.

    Under gradient checkpointing the frozen embeddings' output must require gradients, or a
    reentrant checkpoint sees no input needing them and the adapters inside get none."""
    import peft

    wrapped = peft.get_peft_model(model, peft_config(lora, task_type))
    if getattr(model, "is_gradient_checkpointing", False):
        wrapped.enable_input_require_grads()
    return wrapped


def is_adapter(module: torch.nn.Module) -> bool:
    """Whether `module` is a peft model (the learners' models are wrapped exactly when LoRA
    is on)."""
    return hasattr(module, "peft_config") and hasattr(module, "disable_adapter")


def adapter_dir(model_dir: str) -> str:
    """Where the adapter of the model exported to `model_dir` goes: beside it."""
    return os.path.join(os.path.dirname(os.path.abspath(model_dir)), ADAPTER_DIR)


def export_merged(module: Any, state: dict[str, torch.Tensor], base: Callable[[], Any],
                  tokenizer: Any, path: str) -> None:
    """Rank 0's side of a LoRA export: the merged model (base weights + the scaled adapter
    product) as an HF directory at `path`, the adapter as peft saves it at `adapter_dir(path)`.

    `state` is the peft model's whole gathered state; `base()` loads a fresh base, which is
    wrapped like `module` and given that state, so the merge never touches the trained module
    (under ZeRO its parameters are DeepSpeed's, partitioned or flattened). Costs one more copy
    of the model in rank 0's CPU memory while it runs."""
    import copy

    import peft

    with torch.random.fork_rng(devices=[]):  # a new head's init must not move the run's RNG
        twin = peft.get_peft_model(base(), copy.deepcopy(module.peft_config["default"]))
    differ = {name for name, _ in twin.named_parameters()} ^ state.keys()
    if differ:
        raise RuntimeError(f"the exported adapter model and its base differ in {sorted(differ)}")
    twin.load_state_dict(state, strict=False)  # strict would want tied weights named twice
    twin.save_pretrained(adapter_dir(path), safe_serialization=True)
    merged = twin.merge_and_unload()
    os.makedirs(path, exist_ok=True)
    merged.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def save_rng(path: str, rank: int) -> None:
    """This rank's torch RNG under `path`: the adapter's dropout draws from it, so an exact
    resume needs it where DeepSpeed's checkpoint does not keep it."""
    os.makedirs(path, exist_ok=True)
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    torch.save({"cpu": torch.get_rng_state(), "cuda": cuda},
               os.path.join(path, RNG_FILE.format(rank=rank)))


def load_rng(path: str, rank: int) -> None:
    state = torch.load(os.path.join(path, RNG_FILE.format(rank=rank)))
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
