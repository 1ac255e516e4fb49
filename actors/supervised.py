"""The `SupervisedRank` Ray actor (one DeepSpeed rank of SFT or BT training) and its group.

The actor sets up its process and forwards to `cpe_ray.learners.supervised.SupervisedCore`.
The group places the ranks like the PPO learner's (`actors/ranks.py`), cuts each step's
examples into equal shards and micro-batch counts, counts the step's targets once for every
rank (the loss normaliser), and reduces the ranks' metrics.
"""

from __future__ import annotations

import math
from typing import Any

import ray
import torch

from actors.ranks import RankActor, RankGroup
from cpe_ray.config import Config
from cpe_ray.learners.ppo import reduce_metrics
from cpe_ray.learners.supervised import Example, SupervisedCore, SupervisedShard, SupervisedSpec
from cpe_ray.rl.experience import split_even


@ray.remote
class SupervisedRank(RankActor):
    def __init__(self, cfg: Config, spec: SupervisedSpec, rank: int, world: int) -> None:
        super().__init__(cfg, rank, world)
        self.spec = spec

    def make_core(self, device: torch.device) -> SupervisedCore:
        return SupervisedCore(self.cfg, self.spec, self.rank, self.world, device)

    def train(self, shard: SupervisedShard) -> dict[str, tuple[float, float]]:
        return self.core.train(shard)

    def evaluate(self, shard: SupervisedShard) -> dict[str, tuple[float, float]]:
        return self.core.evaluate(shard)

    def model_state(self) -> dict[str, torch.Tensor]:
        return self.core.model_state()


class SupervisedGroup(RankGroup):
    """`learner.num_ranks` SupervisedRank actors, spoken to as one."""

    def __init__(self, cfg: Config, spec: SupervisedSpec, strategies: list[Any] | None = None,
                 gpus_per_rank: float | None = None,
                 cpus_per_rank: float | None = None) -> None:
        super().__init__(cfg, SupervisedRank, (spec,), spec.task, strategies, gpus_per_rank,
                         cpus_per_rank)
        self.spec = spec

    def shards(self, examples: list[Example]) -> list[SupervisedShard]:
        """Equal shards, one micro-batch count for all ranks, the step's global target count."""
        if not examples:
            raise ValueError("a step needs at least one example")
        parts = [[examples[i] for i in rows] for rows in split_even(len(examples), self.world)]
        num_micro = max(1, math.ceil(max(len(p) for p in parts)
                                     / self.cfg.learner.micro_batch_size))
        total = sum(e.num_targets for e in examples)
        return [SupervisedShard(p, num_micro, total) for p in parts]

    def train(self, examples: list[Example]) -> dict[str, float]:
        """One optimiser step over `examples` (all ranks together)."""
        parts = self._call("train", [(s,) for s in self.shards(examples)],
                           f"{self.spec.task} update")
        return reduce_metrics(parts)

    def evaluate(self, examples: list[Example]) -> dict[str, float]:
        parts = self._call("evaluate", [(s,) for s in self.shards(examples)],
                           f"{self.spec.task} evaluation")
        return reduce_metrics(parts)

    def model_state(self) -> dict[str, torch.Tensor]:
        return self._on_all("model_state")[0]
