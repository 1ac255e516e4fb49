"""The `SupervisedRank` Ray actor: one DeepSpeed rank of SFT or BT training.

It sets up its process and forwards to `cpe_ray.learners.supervised.SupervisedCore`; the
driver speaks to the ranks through `cpe_ray.runtime.groups.SupervisedGroup`, which cuts each
step's examples into equal shards and micro-batch counts, counts the step's targets once for
every rank (the loss normaliser), and reduces the ranks' metrics.
"""

from __future__ import annotations

import ray
import torch

from actors.ranks import RankActor
from cpe_ray.config import Config
from cpe_ray.learners.supervised import SupervisedCore, SupervisedShard, SupervisedSpec


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
