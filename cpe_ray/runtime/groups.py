"""Driver-side groups of DeepSpeed ranks: every group call is a bounded wait naming the rank.

`RankGroup` places `learner.num_ranks` actors of one `actors.ranks.RankActor` class in their
bundles, asks rank 0 for a free address, has every rank join DeepSpeed's group there, and
saves, loads and exports through every rank. `SupervisedGroup` drives SFT / BT ranks; the PPO
learner's group is `cpe_ray.runtime.learner_group.LearnerGroup`. Dispatch by method name
stays inside `RankGroup._call`; callers use the typed methods.
"""

from __future__ import annotations

import math
from typing import Any

import ray
import torch

from actors.supervised import SupervisedRank
from cpe_ray.algo.experience import split_even
from cpe_ray.config import Config
from cpe_ray.learners.ppo import reduce_metrics
from cpe_ray.learners.supervised import Example, SupervisedShard, SupervisedSpec
from cpe_ray.runtime.remote import actor_env, wait_all


def rank_options(cfg: Config, num_ranks: int, strategies: list[Any] | None,
                 gpus_per_rank: float | None, cpus_per_rank: float | None
                 ) -> list[dict[str, Any]]:
    """Ray options of each rank: its CPUs and GPU, its env, its bundle when given."""
    if strategies is not None and len(strategies) != num_ranks:
        raise ValueError(f"need {num_ranks} scheduling strategies, got {len(strategies)}")
    gpus = gpus_per_rank if gpus_per_rank is not None else (1 if cfg.cluster.use_gpu else 0)
    threads = cfg.cluster.threads_per_actor
    out = []
    for rank in range(num_ranks):
        options: dict[str, Any] = {
            "num_cpus": cpus_per_rank if cpus_per_rank is not None else (
                cfg.cluster.cpus_per_bundle),
            "num_gpus": gpus,
            "runtime_env": {"env_vars": actor_env(cfg, threads)},
        }
        if strategies is not None:
            options["scheduling_strategy"] = strategies[rank]
        out.append(options)
    return out


class RankGroup:
    """`learner.num_ranks` actors of one `RankActor` class, spoken to as one; every call is a
    bounded wait (`learner.dist_timeout_s`) whose failure is one line naming the rank."""

    def __init__(self, cfg: Config, actor_cls: Any, args: tuple, what: str,
                 strategies: list[Any] | None, gpus_per_rank: float | None,
                 cpus_per_rank: float | None) -> None:
        self.cfg, self.what = cfg, what
        n = cfg.learner.num_ranks
        options = rank_options(cfg, n, strategies, gpus_per_rank, cpus_per_rank)
        self.actors = [actor_cls.options(**options[r]).remote(cfg, *args, r, n)
                       for r in range(n)]
        self.labels = [f"{what} rank {r}" for r in range(n)]

    @property
    def world(self) -> int:
        return len(self.actors)

    def setup(self) -> list[dict[str, Any]]:
        """Rank 0 picks the rendezvous address; every rank's `setup(host, port)` joins there."""
        timeout = self.cfg.learner.dist_timeout_s
        host, port = wait_all([self.actors[0].address.remote()], self.labels[:1], timeout,
                              f"{self.what} address")[0]
        return wait_all([a.setup.remote(host, port) for a in self.actors], self.labels,
                        timeout, f"{self.what} start-up")

    def _call(self, method: str, args_per_rank: list[tuple], what: str) -> list[Any]:
        futures = [getattr(a, method).remote(*args) for a, args in
                   zip(self.actors, args_per_rank, strict=True)]
        return wait_all(futures, self.labels, self.cfg.learner.dist_timeout_s, what)

    def _on_all(self, method: str, *args: Any) -> list[Any]:
        return self._call(method, [args] * self.world, f"{self.what} {method}")

    def save_state(self, path: str) -> None:
        self._on_all("save_state", path)

    def load_state(self, path: str) -> None:
        self._on_all("load_state", path)

    def export_hf(self, path: str) -> None:
        self._on_all("export_hf", path)

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)


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
