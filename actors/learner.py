"""The `PPOLearner` Ray actor: one DeepSpeed data-parallel rank of the PPO learner.

It only sets up its process (threads, `torch.distributed`) and forwards calls to
`cpe_ray.learners.ppo.PPOLearnerCore`; the driver speaks to the ranks through
`cpe_ray.runtime.learner_group.LearnerGroup`.
"""

from __future__ import annotations

from typing import Any

import ray
import torch

from actors.ranks import RankActor
from cpe_ray.algo.experience import Experience
from cpe_ray.learners.ppo import PPOLearnerCore, TrainShard
from cpe_ray.weight_sync.codec import Manifest
from cpe_ray.weight_sync.group import GroupSpec, SyncStats


@ray.remote
class PPOLearner(RankActor):
    def make_core(self, device: torch.device) -> PPOLearnerCore:
        return PPOLearnerCore(self.cfg, self.rank, self.world, device)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def compute_logprobs(self, exp: Experience, num_micro: int) -> torch.Tensor:
        return self.core.compute_logprobs(exp, num_micro)

    def compute_ref_logprobs(self, exp: Experience, num_micro: int) -> torch.Tensor:
        return self.core.compute_ref_logprobs(exp, num_micro)

    def next_token_logits(self, prompts: list[list[int]]) -> torch.Tensor:
        return self.core.next_token_logits(prompts)

    def compute_values(self, exp: Experience, num_micro: int) -> torch.Tensor:
        return self.core.compute_values(exp, num_micro)

    def train(self, shards: list[TrainShard]) -> dict[str, tuple[float, float]]:
        return self.core.train(shards)

    def policy_state(self) -> dict[str, torch.Tensor]:
        return self.core.policy_state()

    def weight_manifest(self) -> Manifest:
        return self.core.weights.manifest()

    def join_weight_group(self, spec: GroupSpec, manifest: Manifest) -> bool:
        return self.core.weights.join(spec, manifest)

    def broadcast_weights(self, manifest: Manifest) -> SyncStats | None:
        return self.core.weights.broadcast(manifest)

    def push_weights_ipc(self, manifest: Manifest, engine: Any | None, tp: int) -> SyncStats:
        if manifest.adapter is not None:  # a LoRA adapter is small: by value, not by handle
            def load_adapter(*args):
                ray.get(engine.load_adapter.remote(*args))

            return self.core.weights.push_adapter(
                manifest, load_adapter if engine is not None else None)

        def load(handles, bucket):
            ray.get(engine.load_ipc.remote(handles, bucket))

        return self.core.weights.push_ipc(manifest, load if engine is not None else None, tp)
