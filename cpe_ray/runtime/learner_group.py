"""`LearnerGroup`: the driver's handle on the PPO learner's ranks (`actors.learner.PPOLearner`).

It cuts batches into equal shards and micro-batch counts, reduces metrics, and runs weight
syncs against the rollout engines with a bounded wait that names a failing peer. Each sync is
numbered (the manifest's `version`: 1, 2, ...), so that engines serving a LoRA policy's
adapters keep the versions apart.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from actors.learner import PPOLearner
from cpe_ray.algo.experience import Experience, split_even
from cpe_ray.config import Config
from cpe_ray.learners.ppo import TrainShard, reduce_metrics
from cpe_ray.runtime.groups import RankGroup
from cpe_ray.runtime.pipeline import Pending
from cpe_ray.runtime.remote import RemoteError, wait_all
from cpe_ray.weight_sync.codec import Manifest
from cpe_ray.weight_sync.group import GroupSpec, SyncStats


class LearnerGroup(RankGroup):
    """Creates `learner.num_ranks` PPOLearner actors and speaks to them as one."""

    def __init__(self, cfg: Config, strategies: list[Any] | None = None,
                 gpus_per_rank: float | None = None,
                 cpus_per_rank: float | None = None) -> None:
        super().__init__(cfg, PPOLearner, (), "learner", strategies, gpus_per_rank,
                         cpus_per_rank)
        self._manifest: Manifest | None = None
        self._engines: list[Any] = []
        self._engine_labels: list[str] = []
        self.zero_copy_send = False  # rank 0's parameters live in the bucket buffers
        self._syncs = 0  # syncs begun: the next one's version is one more, never reused
        # Called with the RemoteError of an engine that died during a sync: it starts the
        # engine again and calls connect_engines, or raises (cpe_ray.runtime.recovery)
        self.engine_recovery: Callable[[RemoteError], None] | None = None

    def _num_micro(self, rows_per_rank: list[int]) -> int:
        return max(1, math.ceil(max(rows_per_rank) / self.cfg.learner.micro_batch_size))

    def _submit_per_row(self, method: str, exp: Experience) -> Pending:
        """Start a per-row forward over the ranks; its result is one [B, R] tensor."""
        shards = [exp.select(rows) for rows in split_even(len(exp), self.world)]
        k = self._num_micro([len(s) for s in shards])
        refs = [getattr(a, method).remote(s, k) for a, s in zip(self.actors, shards, strict=True)]
        return Pending(refs, list(self.labels), method, combine=torch.cat)

    def submit_logprobs(self, exp: Experience) -> Pending:
        """Start the policy's per-token log-probs of `exp`'s responses (pi_old)."""
        return self._submit_per_row("compute_logprobs", exp)

    def submit_ref_logprobs(self, exp: Experience) -> Pending:
        """Start the reference model's per-token log-probs."""
        return self._submit_per_row("compute_ref_logprobs", exp)

    def submit_values(self, exp: Experience) -> Pending:
        """Start the critic's per-token values."""
        return self._submit_per_row("compute_values", exp)

    def compute_logprobs(self, exp: Experience) -> torch.Tensor:
        return self.submit_logprobs(exp).wait(self.cfg.learner.dist_timeout_s)

    def compute_ref_logprobs(self, exp: Experience) -> torch.Tensor:
        return self.submit_ref_logprobs(exp).wait(self.cfg.learner.dist_timeout_s)

    def compute_values(self, exp: Experience) -> torch.Tensor:
        return self.submit_values(exp).wait(self.cfg.learner.dist_timeout_s)

    def next_token_logits(self, prompts: list[list[int]]) -> torch.Tensor:
        return self._call("next_token_logits", [(prompts,)] * self.world, "logits")[0]

    def train(self, exp: Experience, num_mini_batches: int, seed: int) -> dict[str, float]:
        """`ppo.epochs` passes; each a fresh seeded shuffle cut into optimiser steps."""
        return self.submit_train(exp, num_mini_batches, seed).wait(
            self.cfg.learner.dist_timeout_s)

    def submit_train(self, exp: Experience, num_mini_batches: int, seed: int) -> Pending:
        """Start `train` on every rank; the result is its reduced metrics. The caller may
        dispatch other work (the next batch's generation) before waiting."""
        per_rank = self._shards(exp, num_mini_batches, seed)
        refs = [a.train.remote(s) for a, s in zip(self.actors, per_rank, strict=True)]
        return Pending(refs, list(self.labels), "PPO update", combine=reduce_metrics)

    def _shards(self, exp: Experience, num_mini_batches: int, seed: int
                ) -> list[list[TrainShard]]:
        per_rank: list[list[TrainShard]] = [[] for _ in range(self.world)]
        for epoch in range(self.cfg.ppo.epochs):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = torch.randperm(len(exp), generator=gen)
            for rows in split_even(len(exp), min(num_mini_batches, len(exp))):
                mini = exp.select(order[rows])
                shards = [mini.select(r) for r in split_even(len(mini), self.world)]
                k = self._num_micro([len(s) for s in shards])
                tokens, seqs = mini.num_tokens(), mini.num_nonempty()
                for rank, shard in enumerate(shards):
                    per_rank[rank].append(TrainShard(shard, k, tokens, seqs, len(mini)))
        return per_rank

    def policy_state(self) -> dict[str, torch.Tensor]:
        return self._on_all("policy_state")[0]

    # --- weight sync ------------------------------------------------------------------------
    @property
    def uses_ipc(self) -> bool:
        """Colocated on GPUs: engine i shares learner rank i's GPU and maps its buckets."""
        return self.cfg.cluster.use_gpu and self.cfg.cluster.colocate_learner_rollout

    def connect_engines(self, engines: list[Any], engine_labels: list[str]) -> Manifest:
        """Form the sync group: learner rank 0 is rank 0, engine workers follow in order."""
        timeout = self.cfg.learner.weight_sync_timeout_s
        self._manifest = wait_all([self.actors[0].weight_manifest.remote()], self.labels[:1],
                                  timeout, "weight manifest")[0]
        if self.uses_ipc:
            if len(engines) * self.cfg.rollout.tensor_parallel_size != self.world:
                raise ValueError("CUDA IPC sync needs one learner rank per engine GPU")
            self._engines, self._engine_labels = list(engines), list(engine_labels)
            return self._manifest
        # Asking an engine is also waiting for it to finish loading: a start-up, not a sync.
        ranks = wait_all([e.sync_ranks.remote() for e in engines], engine_labels,
                         self.cfg.learner.dist_timeout_s, "engine sync ranks")
        host, port = wait_all([self.actors[0].address.remote()], self.labels[:1], timeout,
                              "sync address")[0]
        spec = GroupSpec(
            backend="nccl" if self.cfg.cluster.use_gpu else "gloo", host=host, port=port,
            world_size=1 + sum(ranks), timeout_s=timeout,
        )
        firsts = [1 + sum(ranks[:i]) for i in range(len(engines))]
        futures = [self.actors[0].join_weight_group.remote(spec, self._manifest)]
        futures += [e.join_weight_group.remote(spec, f) for e, f in zip(engines, firsts,
                                                                       strict=True)]
        joined = wait_all(futures, self.labels[:1] + engine_labels, timeout + 1,
                          "join weight-sync group")
        self.zero_copy_send = bool(joined[0])
        self._engines, self._engine_labels = list(engines), list(engine_labels)
        return self._manifest

    def sync_weights(self) -> SyncStats:
        """Broadcast the policy to every connected engine; one RPC per engine, buckets inside.
        An engine that dies meanwhile is started again (`engine_recovery`) and the sync redone:
        the learner's weights have not moved, so every engine ends with them."""
        while True:
            try:
                return self._sync_once()
            except RemoteError as exc:
                if (self.engine_recovery is None or not exc.died
                        or exc.actor not in self._engine_labels):
                    raise
                self.engine_recovery(exc)

    def _sync_once(self) -> SyncStats:
        if self._manifest is None:
            raise RuntimeError("sync_weights before connect_engines")
        self._syncs += 1
        manifest = replace(self._manifest, version=self._syncs)
        timeout = self.cfg.learner.weight_sync_timeout_s
        if self.uses_ipc:
            tp = self.cfg.rollout.tensor_parallel_size
            # rank r shares a GPU with worker r % tp of engine r // tp; its first rank calls it
            # (a LoRA adapter goes by value instead: WeightSender.push_adapter)
            futures = [a.push_weights_ipc.remote(
                manifest, self._engines[r // tp] if r % tp == 0 else None, tp)
                for r, a in enumerate(self.actors)]
            deadline = timeout * (1 + len(manifest.buckets))
            return wait_all(futures, self.labels, deadline, "weight sync (CUDA IPC)")[0]
        futures = [a.broadcast_weights.remote(manifest) for a in self.actors]
        futures += [e.receive_weights.remote(manifest) for e in self._engines]
        # Each bucket's broadcast times out on its own within `timeout` (naming the rank);
        # this outer deadline only catches a peer that hangs outside the group.
        deadline = timeout * (1 + len(manifest.buckets))
        results = wait_all(futures, self.labels + self._engine_labels, deadline, "weight sync")
        return results[0]
