"""One data-parallel rank of supervised training: SFT (and GRM distillation) or a BT reward model.

The same DeepSpeed set-up as the PPO learner (`cpe_ray.learners.ppo.init_trained_engine`: ZeRO,
offload, clipping and precision from `learner` / `policy`), for one model and one loss:
- `sft`: a causal LM, masked token cross-entropy on assistant tokens (`algorithms.sft_loss`);
- `bt`: a sequence-classification model with one logit, the Bradley-Terry loss on pairs
  (`algorithms.bradley_terry_loss`); the scalar head is new and seeded.
Each `train` call is one optimiser step over this rank's shard of the step's examples, cut
into `num_micro` micro-batches (equal on all ranks: ZeRO-3 gathers are collective per
forward; a rank with fewer rows runs placeholder micro-batches that contribute nothing).
Losses are normalised by the step's global count of targets (assistant tokens or pairs), so
the update does not depend on how examples are split over micro-batches and ranks. The Ray
actor in `actors/supervised.py` is a thin wrapper.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cpe_ray.algo.experience import split_even
from cpe_ray.algo.losses import bradley_terry_loss, sft_loss
from cpe_ray.algo.tensors import logprobs_from_logits, masked_mean
from cpe_ray.config import Config, lora_enabled
from cpe_ray.learners import lora
from cpe_ray.learners.ppo import (
    MetricSums,
    export_hf_model,
    gathered_state,
    init_trained_engine,
    load_engine_state,
    save_engine_state,
    step_and_report,
)
from cpe_ray.models import load_causal_lm, load_tokenizer, torch_dtype


@dataclass(frozen=True)
class SFTTokens:
    """One conversation: token ids and a 0/1 label per token (1: an assistant token)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def num_targets(self) -> int:
        """Tokens the loss sees: labelled tokens after the first (which has no context)."""
        return sum(self.labels[1:])


@dataclass(frozen=True)
class PairTokens:
    """A preference pair for the Bradley-Terry loss: the chosen and the rejected chat."""

    chosen: tuple[int, ...]
    rejected: tuple[int, ...]

    @property
    def num_targets(self) -> int:
        return 1


TASKS = ("sft", "bt")
SCHEDULES = ("constant", "cosine")
STATE_TAG = "model"  # DeepSpeed's tag for the training state inside a checkpoint's state/


@dataclass(frozen=True)
class SupervisedSpec:
    """What to train: the task, the starting model and the learning-rate schedule."""

    task: str  # "sft" | "bt"
    model_path: str  # resolved: an HF directory (or a hub id already in the local cache)
    lr: float
    schedule: str = "constant"  # "constant" | "cosine" (to 0 at total_steps)
    warmup_steps: int = 0
    total_steps: int = 1

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r} is not one of {TASKS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} is not one of {SCHEDULES}")

    def lr_factor(self, step: int) -> float:
        """Linear warm-up over `warmup_steps`, then constant or a cosine decay to 0."""
        warm = min(1.0, (step + 1) / (self.warmup_steps + 1))
        if self.schedule == "constant":
            return warm
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, max(0, step - self.warmup_steps) / span)
        return warm * 0.5 * (1.0 + math.cos(math.pi * progress))


Example = SFTTokens | PairTokens


@dataclass
class SupervisedShard:
    """This rank's examples of one step, and what every rank must agree on for it."""

    examples: list[Example]
    num_micro: int  # equal on all ranks
    global_targets: int  # assistant tokens (sft) or pairs (bt) in the whole step, all ranks


def _pad_rows(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask: a row's last real token stays its last non-pad
    token, which is where a sequence-classification model reads its score."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


class SupervisedCore:
    """One rank. `torch.distributed` must already be initialised (the actor does it)."""

    def __init__(self, cfg: Config, spec: SupervisedSpec, rank: int, world: int,
                 device: torch.device) -> None:
        self.cfg, self.spec, self.rank, self.world, self.device = cfg, spec, rank, world, device
        # The BT head is newly initialised: seed it, or a run and its resume start apart.
        torch.manual_seed(cfg.run.seed)
        self.trust = cfg.policy.trust_remote_code
        self.tokenizer = load_tokenizer(spec.model_path, self.trust)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.zero3 = cfg.learner.zero_stage == 3
        model = self._load()
        if cfg.learner.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        if lora_enabled(cfg):
            task = lora.CAUSAL_LM if spec.task == "sft" else lora.SEQ_CLS
            model = lora.wrap(model, cfg.policy.lora, task)
        self.engine = init_trained_engine(cfg, model, spec.lr, world, spec.lr_factor)

    def _load(self) -> torch.nn.Module:
        """The starting model (its new scalar head seeded by the caller's seed)."""
        if self.spec.task == "sft":
            model = load_causal_lm(self.spec.model_path, self.cfg.policy.dtype, "cpu", self.trust)
        else:
            from transformers import AutoConfig, AutoModelForSequenceClassification

            conf = AutoConfig.from_pretrained(self.spec.model_path, num_labels=1,
                                              trust_remote_code=self.trust)
            conf.pad_token_id = self.pad_id  # the model scores each row's last non-pad token
            model = AutoModelForSequenceClassification.from_pretrained(
                self.spec.model_path, config=conf, dtype=torch_dtype(self.cfg.policy.dtype),
                trust_remote_code=self.trust)
        return model

    # --- losses -----------------------------------------------------------------------------
    def _micro_batches(self, examples: list[Example], num_micro: int
                       ) -> Iterator[tuple[list[Example], bool]]:
        for rows in split_even(len(examples), num_micro):
            if rows:
                yield [examples[i] for i in rows], True
            elif self.spec.task == "sft":  # a placeholder with nothing labelled
                yield [SFTTokens((self.pad_id, self.pad_id), (0, 0))], False
            else:
                yield [PairTokens((self.pad_id,), (self.pad_id,))], False

    def _sft(self, batch: list[SFTTokens], real: bool, normalizer: float | None,
             sums: MetricSums, prefix: str) -> torch.Tensor:
        ids, attn = _pad_rows([e.input_ids for e in batch], self.pad_id)
        labels, _ = _pad_rows([e.labels for e in batch], 0)
        ids, attn, labels = ids.to(self.device), attn.to(self.device), labels.to(self.device)
        logits = self.engine(input_ids=ids, attention_mask=attn, use_cache=False).logits
        targets, mask = ids[:, 1:], labels[:, 1:].float() * real
        logp = logprobs_from_logits(logits[:, :-1], targets)
        loss = sft_loss(logp, mask, normalizer)
        tokens = float(mask.sum())
        if tokens > 0:
            hits = (logits[:, :-1].argmax(-1) == targets).float()
            sums.add(f"{prefix}/token_accuracy", float(masked_mean(hits, mask)), tokens)
            if normalizer is None:  # evaluation: the token mean; training reports its loss
                sums.add(f"{prefix}/loss", float(sft_loss(logp, mask)), tokens)
        return loss

    def _bt(self, batch: list[PairTokens], real: bool, normalizer: float | None,
            sums: MetricSums, prefix: str) -> torch.Tensor:
        n = len(batch)
        ids, attn = _pad_rows([e.chosen for e in batch] + [e.rejected for e in batch],
                              self.pad_id)
        scores = self.engine(input_ids=ids.to(self.device), attention_mask=attn.to(self.device),
                             use_cache=False).logits[:, 0].float()
        chosen, rejected = scores[:n], scores[n:]
        weight = torch.full((n,), float(real), device=scores.device)
        loss = bradley_terry_loss(chosen, rejected, weight, normalizer)
        if real:
            margin = (chosen - rejected).detach()
            sums.add(f"{prefix}/accuracy", float((margin > 0).float().mean()), n)
            sums.add(f"{prefix}/margin", float(margin.mean()), n)
            if normalizer is None:
                sums.add(f"{prefix}/loss", float(bradley_terry_loss(chosen, rejected)), n)
        return loss

    def _loss(self) -> Callable[..., torch.Tensor]:
        return self._sft if self.spec.task == "sft" else self._bt

    # --- training and evaluation ------------------------------------------------------------
    def train(self, shard: SupervisedShard) -> dict[str, tuple[float, float]]:
        """One optimiser step; returns weighted sums for `reduce_metrics`."""
        # DeepSpeed averages gradients over ranks; dividing by count / world instead of count
        # makes the update the exact mean over the step's targets.
        norm = max(shard.global_targets, 1) / self.world
        sums, loss_fn, total = MetricSums(), self._loss(), 0.0
        self.engine.train()
        for micro, real in self._micro_batches(shard.examples, shard.num_micro):
            loss = loss_fn(micro, real, norm, sums, "train")
            self.engine.backward(loss, scale_wrt_gas=False)
            total += float(loss.detach())
        step_and_report(self.engine, sums, "train", "loss", total, self.world)
        return sums.as_dict()

    @torch.no_grad()
    def evaluate(self, shard: SupervisedShard) -> dict[str, tuple[float, float]]:
        """Held-out metrics (`eval/loss`; `eval/token_accuracy` or `eval/accuracy`)."""
        sums, loss_fn = MetricSums(), self._loss()
        self.engine.eval()
        for micro, real in self._micro_batches(shard.examples, shard.num_micro):
            loss_fn(micro, real, None, sums, "eval")
        return sums.as_dict()

    # --- state --------------------------------------------------------------------------------
    def save_state(self, path: str) -> None:
        """Weights, optimiser and scheduler under `path` (all ranks call)."""
        save_engine_state(self.engine, path, STATE_TAG)
        if lora_enabled(self.cfg):
            lora.save_rng(path, self.rank)

    def load_state(self, path: str) -> None:
        load_engine_state(self.engine, path, STATE_TAG)
        if lora_enabled(self.cfg):
            lora.load_rng(path, self.rank)

    def model_state(self) -> dict[str, torch.Tensor]:
        """Full weights on rank 0 (others get {}): for tests and small models."""
        return gathered_state(self.engine.module, self.zero3, self.rank)

    def export_hf(self, path: str) -> None:
        """The model as a Hugging Face directory with its tokenizer (rank 0 writes); with LoRA
        merged, its adapter beside it."""
        export_hf_model(self.engine.module, self.tokenizer, self.zero3, self.rank, path,
                        self._load)

    def info(self) -> dict[str, Any]:
        return {"rank": self.rank, "world": self.world, "device": str(self.device),
                "task": self.spec.task, "model": self.spec.model_path,
                "zero_stage": self.cfg.learner.zero_stage}
