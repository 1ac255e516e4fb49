"""Start the distributed runtime from a config: placement groups, then actors in their bundles.

Order matters for failing fast: the placement is checked and reserved first (bounded wait,
one line on failure), then engines and learner ranks start in their bundles, then the
learner's DeepSpeed group forms and the weight-sync group joins the engines. `Runtime`
holds the handles the controller needs, can start any engine again in its own bundle or the
whole learner group in its bundles (fault recovery: `cpe_ray.runtime.recovery`), and tears
everything down in `shutdown`. Before all that, with Ray not started yet, `check_startup` fails
in one line on what an actor's `__init__` would fail on: a dead actor tells the driver little.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any

import ray

from cpe_ray.algo.advantages import ADVANTAGE_ESTIMATORS
from cpe_ray.algo.post_edit import load_edit_template
from cpe_ray.chat import load_policy_system_template
from cpe_ray.config import Config
from cpe_ray.config.choices import GRM_BACKENDS
from cpe_ray.errors import ConfigError
from cpe_ray.judges.registry import check_backend
from cpe_ray.models import resolve_model_path
from cpe_ray.runtime.placement import (
    PlacementPlan,
    Pool,
    create_pools,
    plan_placement,
    remove_pools,
)
from cpe_ray.runtime.remote import actor_env, wait_all
from cpe_ray.weight_sync.codec import Manifest

# When the learner and an engine share a GPU (cluster.colocate_learner_rollout) each takes
# this share of it, so Ray lets both into one bundle; sleep mode frees the memory in turn.
COLOCATED_GPU_SHARE = 0.5
ROLLOUT, GRM = "rollout", "grm"


@dataclass(frozen=True)
class EngineSlot:
    """How engine `index` of a kind was started: enough to start it again in its bundle."""

    kind: str  # ROLLOUT or GRM
    index: int
    label: str
    actor_cls: Any
    options: dict[str, Any]
    args: tuple

    def start(self) -> Any:
        return self.actor_cls.options(**self.options).remote(*self.args)


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
    slots: dict[str, EngineSlot] = field(default_factory=dict)  # by label

    def engines(self, kind: str) -> list[Any]:
        return self.rollouts if kind == ROLLOUT else self.grms

    def add_engine(self, slot: EngineSlot) -> None:
        self.slots[slot.label] = slot
        self.engines(slot.kind).append(slot.start())
        (self.rollout_labels if slot.kind == ROLLOUT else self.grm_labels).append(slot.label)

    def restart_engine(self, label: str) -> Any:
        """Start engine `label` again in its bundle (the old process is killed first, which
        frees the bundle) and wait until its model is loaded; the new handle."""
        slot = self.slots[label]
        engines = self.engines(slot.kind)
        ray.kill(engines[slot.index], no_restart=True)
        engines[slot.index] = slot.start()
        wait_all([engines[slot.index].node_id.remote()], [label],
                 self.cfg.learner.dist_timeout_s, f"{label} restart")
        return engines[slot.index]

    def start_learner(self) -> None:
        """The learner group in its bundles with its DeepSpeed group formed (a previous group
        is killed first); `connect_engines` then joins the rollout engines to it."""
        if self.learner is not None:
            self.learner.shutdown()
            self.learner = None
        self.learner = make_learner(self.cfg, self.plan, self.pools)
        self.learner.setup()

    def shutdown(self) -> None:
        handles = list(self.rollouts) + list(self.grms)
        if self.learner is not None:
            handles += list(self.learner.actors)
        for handle in handles:
            with contextlib.suppress(Exception):  # already gone with its node or the cluster
                ray.kill(handle, no_restart=True)
        with contextlib.suppress(Exception):
            remove_pools(self.pools)


def make_learner(cfg: Config, plan: PlacementPlan, pools: dict[str, Pool]) -> Any:
    """A `LearnerGroup` whose ranks sit in the learner pool's bundles (not set up yet)."""
    from cpe_ray.runtime.learner_group import LearnerGroup

    learner_pool = pools[plan.pool_for("learner")]
    strategies = [learner_pool.strategy(r) for r in range(cfg.learner.num_ranks)]
    share = COLOCATED_GPU_SHARE if plan.colocated else None
    return LearnerGroup(cfg, strategies, gpus_per_rank=share,
                        cpus_per_rank=cfg.cluster.cpus_per_bundle * (share or 1.0))


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
        "runtime_env": {"env_vars": actor_env(cfg, cfg.cluster.threads_per_actor)},
    }
    return options, bundles, share


def engine_slots(cfg: Config, plan: PlacementPlan, pools: dict[str, Pool]) -> list[EngineSlot]:
    """Every rollout and GRM engine of the plan, with its bundle and constructor arguments."""
    from actors.grm import GRMJudge
    from actors.rollout import PolicyRollout

    slots = []
    tp = cfg.rollout.tensor_parallel_size
    rollout_pool = pools[plan.pool_for("rollout")]
    for i in range(cfg.rollout.num_engines):
        options, bundles, share = _engine_options(cfg, rollout_pool, i, tp, plan.colocated)
        slots.append(EngineSlot(ROLLOUT, i, f"rollout engine {i}", PolicyRollout, options,
                                (cfg, i, bundles if tp > 1 else None, share)))
    if GRM in pools:
        gtp = (cfg.grm.tensor_parallel_size if GRM_BACKENDS[cfg.grm.backend].engine
               else 1)
        for i in range(cfg.grm.num_engines):
            options, bundles, _ = _engine_options(cfg, pools[GRM], i, gtp, False)
            slots.append(EngineSlot(GRM, i, f"GRM engine {i}", GRMJudge, options,
                                    (cfg, i, bundles if gtp > 1 else None)))
    return slots


def check_startup(cfg: Config) -> None:
    """One-line errors, before Ray starts, for everything the config names that an actor would
    otherwise fail on in its `__init__`: the prompt templates, the engines' packages and the
    model paths (an alias builds its model here, once)."""
    load_policy_system_template(cfg.policy.system_template)
    load_edit_template(cfg.post_edit.template)  # every rollout engine loads it
    for key, backend in (("rollout.backend", cfg.rollout.backend),
                         ("grm.backend", cfg.grm.backend)):
        # find_spec, not an import: vLLM takes seconds to import and is needed in actors only
        if backend == "vllm" and importlib.util.find_spec("vllm") is None:
            from cpe_ray.engines.vllm import MISSING_VLLM

            raise ConfigError(f"{key}=vllm: {MISSING_VLLM}")
    models = {"policy.model_path": cfg.policy.model_path, "grm.model_path": cfg.grm.model_path}
    if ADVANTAGE_ESTIMATORS[cfg.ppo.advantage_estimator].needs_critic:
        models["learner.critic_model_path"] = cfg.learner.critic_model_path
    for key, path in models.items():
        if path:
            try:
                resolve_model_path(path)
            except ConfigError as exc:
                raise ConfigError(f"{key}: {exc}") from None
    check_backend(cfg)  # the judge's own: its templates, its endpoint's key


def start_runtime(cfg: Config, with_learner: bool = True) -> Runtime:
    plan = plan_placement(cfg)
    pools = create_pools(plan, cfg.cluster.placement_timeout_s)
    rt = Runtime(cfg, plan, pools)
    try:
        for slot in engine_slots(cfg, plan, pools):
            rt.add_engine(slot)
        # Engines load their models while the learner starts; wait for both at the end.
        engine_ready = [h.node_id.remote() for h in rt.rollouts + rt.grms]
        if with_learner:
            rt.start_learner()
        wait_all(engine_ready, rt.rollout_labels + rt.grm_labels,
                 cfg.learner.dist_timeout_s, "engine start-up")
        if with_learner:
            rt.manifest = rt.learner.connect_engines(rt.rollouts, rt.rollout_labels)
    except BaseException:
        rt.shutdown()
        raise
    return rt
