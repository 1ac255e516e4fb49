"""Start the distributed runtime from a config: placement groups, then actors in their bundles.

Order matters for failing fast: the placement is checked and reserved first (bounded wait,
one line on failure), then engines and learner ranks start in their bundles, then the
learner's DeepSpeed group forms and the weight-sync group joins the engines. `Runtime`
holds the handles the controller needs and tears everything down in `shutdown`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ray

from cpe_ray.config import Config
from cpe_ray.config.choices import GRM_BACKENDS
from cpe_ray.runtime.placement import (
    PlacementPlan,
    Pool,
    create_pools,
    plan_placement,
    remove_pools,
)
from cpe_ray.runtime.remote import actor_env, threads_per_actor, wait_all
from cpe_ray.runtime.weight_sync import Manifest

# When the learner and an engine share a GPU (cluster.colocate_learner_rollout) each takes
# this share of it, so Ray lets both into one bundle; sleep mode frees the memory in turn.
COLOCATED_GPU_SHARE = 0.5


@dataclass
class Runtime:
    cfg: Config
    plan: PlacementPlan
    pools: dict[str, Pool]
    rollouts: list[Any] = field(default_factory=list)
    rollout_labels: list[str] = field(default_factory=list)
    grms: list[Any] = field(default_factory=list)
    grm_labels: list[str] = field(default_factory=list)
    learner: Any = None  # actors.learner.LearnerGroup
    manifest: Manifest | None = None

    def shutdown(self) -> None:
        handles = list(self.rollouts) + list(self.grms)
        if self.learner is not None:
            handles += list(self.learner.actors)
        for handle in handles:
            ray.kill(handle)
        remove_pools(self.pools)


def _engine_options(cfg: Config, pool: Pool, engine: int, tp: int, colocated: bool
                    ) -> tuple[dict[str, Any], list[int], float | None]:
    """Ray options for engine `engine` of a pool, its bundle indices, and its GPU share."""
    bundles = pool.engine_bundles(engine, tp)
    cpus = cfg.cluster.cpus_per_bundle * (COLOCATED_GPU_SHARE if colocated else 1.0)
    share = COLOCATED_GPU_SHARE if colocated else None
    if not cfg.cluster.use_gpu:
        gpus = 0.0
    elif tp > 1:
        gpus = 0.0  # vLLM's Ray workers take the GPUs of the engine's bundles themselves
    else:
        gpus = share if share is not None else 1.0
    options = {
        "num_cpus": cpus,
        "num_gpus": gpus,
        "scheduling_strategy": pool.strategy(bundles[0], capture_child_tasks=tp > 1),
        "runtime_env": {"env_vars": actor_env(cfg, threads_per_actor(cfg))},
    }
    return options, bundles, share


def start_runtime(cfg: Config, with_learner: bool = True) -> Runtime:
    from actors.grm import GRMJudge
    from actors.learner import LearnerGroup
    from actors.rollout import PolicyRollout

    plan = plan_placement(cfg)
    pools = create_pools(plan, cfg.cluster.placement_timeout_s)
    rt = Runtime(cfg, plan, pools)
    try:
        tp = cfg.rollout.tensor_parallel_size
        rollout_pool = pools[plan.pool_for("rollout")]
        for i in range(cfg.rollout.num_engines):
            options, bundles, share = _engine_options(cfg, rollout_pool, i, tp, plan.colocated)
            rt.rollouts.append(PolicyRollout.options(**options).remote(
                cfg, i, bundles if tp > 1 else None, share))
            rt.rollout_labels.append(f"rollout engine {i}")
        if "grm" in pools:
            gtp = (cfg.grm.tensor_parallel_size if GRM_BACKENDS[cfg.grm.backend].tensor_parallel
                   else 1)
            for i in range(cfg.grm.num_engines):
                options, bundles, _ = _engine_options(cfg, pools["grm"], i, gtp, False)
                rt.grms.append(GRMJudge.options(**options).remote(
                    cfg, i, bundles if gtp > 1 else None))
                rt.grm_labels.append(f"GRM engine {i}")
        # Engines load their models while the learner starts; wait for both at the end.
        engine_ready = [h.node_id.remote() for h in rt.rollouts + rt.grms]
        if with_learner:
            learner_pool = pools[plan.pool_for("learner")]
            strategies = [learner_pool.strategy(r) for r in range(cfg.learner.num_ranks)]
            gpus = COLOCATED_GPU_SHARE if plan.colocated else None
            rt.learner = LearnerGroup(cfg, strategies, gpus_per_rank=gpus,
                                      cpus_per_rank=cfg.cluster.cpus_per_bundle * (
                                          COLOCATED_GPU_SHARE if plan.colocated else 1.0))
            rt.learner.setup()
        wait_all(engine_ready, rt.rollout_labels + rt.grm_labels,
                 cfg.learner.dist_timeout_s, "engine start-up")
        if with_learner:
            rt.manifest = rt.learner.connect_engines(rt.rollouts, rt.rollout_labels)
    except BaseException:
        rt.shutdown()
        raise
    return rt
