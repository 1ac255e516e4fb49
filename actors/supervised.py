"""The `SupervisedRank` Ray actor (one DeepSpeed rank of SFT or BT training) and its group.

The actor sets up its process and forwards to `cpe_ray.supervised.SupervisedCore`. The group
places the ranks like the PPO learner's (`actors/ranks.py`), cuts each step's examples into
equal shards and micro-batch counts, counts the step's targets once for every rank (the loss
normaliser), and reduces the ranks' metrics.
"""

from __future__ import annotations

import math
from typing import Any

import ray
import torch

from actors.ranks import form_group, init_rank_process, rank_address, rank_options
from cpe_ray.config import Config
from cpe_ray.experience import split_even
from cpe_ray.learner import reduce_metrics
from cpe_ray.remote import threads_per_actor, wait_all
from cpe_ray.supervised import Example, SupervisedCore, SupervisedShard, SupervisedSpec


@ray.remote
class SupervisedRank:
    def __init__(self, cfg: Config, spec: SupervisedSpec, rank: int, world: int) -> None:
        torch.set_num_threads(threads_per_actor(cfg))
        self.cfg, self.spec, self.rank, self.world = cfg, spec, rank, world
        self.core: SupervisedCore | None = None

    def address(self) -> tuple[str, int]:
        return rank_address()

    def setup(self, master_addr: str, master_port: int) -> dict[str, Any]:
        device = init_rank_process(self.cfg, self.rank, self.world, master_addr, master_port)
        self.core = SupervisedCore(self.cfg, self.spec, self.rank, self.world, device)
        return self.core.info()

    def train(self, shard: SupervisedShard) -> dict[str, tuple[float, float]]:
        return self.core.train(shard)

    def evaluate(self, shard: SupervisedShard) -> dict[str, tuple[float, float]]:
        return self.core.evaluate(shard)

    def save_state(self, path: str) -> None:
        self.core.save_state(path)

    def load_state(self, path: str) -> None:
        self.core.load_state(path)

    def export_hf(self, path: str) -> None:
        self.core.export_hf(path)

    def model_state(self) -> dict[str, torch.Tensor]:
        return self.core.model_state()


class SupervisedGroup:
    """`learner.num_ranks` SupervisedRank actors, spoken to as one."""

    def __init__(self, cfg: Config, spec: SupervisedSpec, strategies: list[Any] | None = None,
                 gpus_per_rank: float | None = None,
                 cpus_per_rank: float | None = None) -> None:
        self.cfg, self.spec = cfg, spec
        n = cfg.learner.num_ranks
        options = rank_options(cfg, n, strategies, gpus_per_rank, cpus_per_rank)
        self.actors = [SupervisedRank.options(**options[r]).remote(cfg, spec, r, n)
                       for r in range(n)]
        self.labels = [f"{spec.task} rank {r}" for r in range(n)]

    @property
    def world(self) -> int:
        return len(self.actors)

    def setup(self) -> list[dict[str, Any]]:
        return form_group(self.actors, self.labels, self.cfg.learner.dist_timeout_s,
                          self.spec.task)

    def _call(self, method: str, args_per_rank: list[tuple], what: str) -> list[Any]:
        futures = [getattr(a, method).remote(*args) for a, args in
                   zip(self.actors, args_per_rank, strict=True)]
        return wait_all(futures, self.labels, self.cfg.learner.dist_timeout_s, what)

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

    def save_state(self, path: str) -> None:
        self._call("save_state", [(path,)] * self.world, "save training state")

    def load_state(self, path: str) -> None:
        self._call("load_state", [(path,)] * self.world, "load training state")

    def export_hf(self, path: str) -> None:
        self._call("export_hf", [(path,)] * self.world, "export model")

    def model_state(self) -> dict[str, torch.Tensor]:
        return self._call("model_state", [()] * self.world, "gather weights")[0]

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
