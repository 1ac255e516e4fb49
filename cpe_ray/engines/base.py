"""The `GenerationEngine` contract shared by the HF and vLLM engines, and its value types.

An engine turns prompt token ids into sampled completions that carry the per-token
log-probabilities of the sampled tokens under the *sampling* distribution (after temperature
and top-p; with top_p = 1 this is log_softmax(logits / T), what the learner recomputes), or
with `logprobs_mode="raw"` under the model's own (log_softmax(logits): rollout.logprobs_mode).
Engines also take part in weight sync: they join the sync group as one or more ranks and
load the tensors they receive. Everything here is plain data so that it crosses Ray cleanly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from cpe_ray.weight_sync.codec import Manifest
from cpe_ray.weight_sync.group import GroupSpec, SyncStats

FINISH_STOP = "stop"  # an EOS or stop token was sampled (and is included in token_ids)
FINISH_LENGTH = "length"  # max_new_tokens was reached


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. `temperature == 0` means greedy (log-probs are then of the raw logits)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_new_tokens < 1:
            raise ValueError(
                f"n and max_new_tokens must be >= 1, got {self.n}, {self.max_new_tokens}"
            )
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """One sampled answer. `prompt_index` points into the request's prompt list."""

    prompt_index: int
    sample_index: int
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError("a completion needs one log-prob per token")


@dataclass
class EngineInfo:
    """What an engine reports about itself (for logs and placement checks)."""

    backend: str
    model_path: str
    device: str
    sync_ranks: int  # how many ranks this engine contributes to the weight-sync group
    extra: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class GenerationEngine(Protocol):
    """Generation plus weight loading; `sleep`/`wake` are no-ops where unsupported."""

    def info(self) -> EngineInfo: ...

    def generate(
        self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[Completion]:
        """n completions per prompt, prompt-major: result[i * n + j] is prompt i, sample j."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def load_adapter(self, version: int, peft_config: Mapping[str, Any],
                     named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Hold LoRA adapter `version` (`peft_config`: `LoraConfig.to_dict()`; tensors named
        as `get_peft_model_state_dict` names them) beside the untouched base, and generate
        with it until a newer one comes; older versions beyond the engine's count are dropped."""
        ...

    def join_weight_group(self, spec: GroupSpec, first_rank: int) -> None:
        """Join the sync group; this engine's ranks are first_rank .. first_rank+sync_ranks-1."""
        ...

    def receive_weights(self, manifest: Manifest) -> SyncStats:
        """Receive every bucket of `manifest` from rank 0 and load it: into the model, or, when
        the manifest carries an adapter, as adapter version `manifest.version`."""
        ...

    def sleep(self) -> None: ...

    def wake(self) -> None: ...


def order_completions(completions: list[Completion], num_prompts: int, n: int) -> list[Completion]:
    """Check and sort completions into the prompt-major order the contract promises."""
    ordered = sorted(completions, key=lambda c: (c.prompt_index, c.sample_index))
    expected = [(i, j) for i in range(num_prompts) for j in range(n)]
    if [(c.prompt_index, c.sample_index) for c in ordered] != expected:
        raise RuntimeError(
            f"engine returned {len(completions)} completions, expected {num_prompts}x{n}"
        )
    return ordered
