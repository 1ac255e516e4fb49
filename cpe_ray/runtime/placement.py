"""Config to Ray placement groups and bundle indices.

`plan_placement(cfg)` is pure: it turns the config into a `PlacementPlan`, one `PoolSpec`
per pool of identical bundles (rollout engines, GRM engines, learner ranks; or one shared
`learner_rollout` pool when the learner and the rollout engines are colocated). Engine `i`
of tensor-parallel size `tp` owns bundles `[i*tp, (i+1)*tp)` of its pool; learner rank `i`
owns bundle `i`.

`create_pools(plan, timeout_s)` first checks the plan against the live cluster's resources
(so an impossible request fails at once, with one line saying what was asked, what the
cluster has and what to change), then creates the groups and waits for them, never longer
than `timeout_s`; on timeout (resources held by other jobs) every group it created is
removed before a `PlacementError` is raised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cpe_ray.config.choices import GRM_BACKENDS
from cpe_ray.errors import CpeError

if TYPE_CHECKING:
    from ray.util.placement_group import PlacementGroup
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from cpe_ray.config import Config

SHOWN_RESOURCES = ("CPU", "GPU")
EPS = 1e-6  # Ray keeps resources to 1e-4; this only absorbs float sums


class PlacementError(CpeError):
    """The placement groups the config asks for cannot be placed on this cluster (in time)."""


# Config keys that size each pool, for the "how to fix" part of messages.
_SIZE_KEYS = {
    "rollout": "rollout.num_engines x rollout.tensor_parallel_size",
    "grm": "grm.num_engines x grm.tensor_parallel_size",
    "learner": "learner.num_ranks",
    "learner_rollout": "learner.num_ranks / rollout.num_engines x rollout.tensor_parallel_size",
}


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{k}:{v:g}" for k, v in resources.items())


@dataclass(frozen=True)
class PoolSpec:
    """A pool of `num_bundles` identical bundles placed with one strategy."""

    name: str
    num_bundles: int
    bundle: dict[str, float]
    strategy: str

    def total(self) -> dict[str, float]:
        return {k: v * self.num_bundles for k, v in self.bundle.items()}

    def describe(self) -> str:
        return f"{self.name} {self.num_bundles}x{{{_fmt(self.bundle)}}}"


@dataclass
class PlacementPlan:
    pools: dict[str, PoolSpec]
    colocated: bool

    def pool_for(self, role: str) -> str:
        """The pool that `role` ("rollout", "grm", "learner") runs in."""
        if self.colocated and role in ("rollout", "learner"):
            return "learner_rollout"
        if role not in self.pools:
            raise KeyError(f"no pool for {role!r}; the plan has {', '.join(self.pools)}")
        return role

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for spec in self.pools.values():
            for k, v in spec.total().items():
                out[k] = out.get(k, 0.0) + v
        return out

    def describe(self) -> str:
        pools = ", ".join(spec.describe() for spec in self.pools.values())
        strategies = sorted({spec.strategy for spec in self.pools.values()})
        return f"{pools} ({'/'.join(strategies)})"


def _bundle(cfg: Config) -> dict[str, float]:
    cl = cfg.cluster
    return {"GPU": 1.0, "CPU": cl.cpus_per_bundle} if cl.use_gpu else {"CPU": cl.cpus_per_bundle}


def plan_learner_only(cfg: Config) -> PlacementPlan:
    """The supervised stages (`cpe-ray sft`, `grm train`, `rm train`): the learner ranks only."""
    spec = PoolSpec("learner", cfg.learner.num_ranks, _bundle(cfg),
                    cfg.cluster.placement_strategy)
    return PlacementPlan({spec.name: spec}, colocated=False)


def plan_placement(cfg: Config) -> PlacementPlan:
    """The pools `cfg` needs; no Ray calls."""
    cl, r, g, le = cfg.cluster, cfg.rollout, cfg.grm, cfg.learner
    bundle = _bundle(cfg)

    def spec(name: str, n: int) -> PoolSpec:
        return PoolSpec(name, n, dict(bundle), cl.placement_strategy)

    rollout_workers = r.num_engines * r.tensor_parallel_size
    pools: list[PoolSpec] = []
    if cl.colocate_learner_rollout:
        # Learner rank i and engine worker i share bundle i (fractional GPUs inside it).
        pools.append(spec("learner_rollout", max(le.num_ranks, rollout_workers)))
    else:
        pools.append(spec("rollout", rollout_workers))
    # Engine-backed GRMs get a pool; "rubric" and "openai" judge from the driver (an endpoint
    # is remote anyway). "bt" (a scalar reward model) scores in the driver on CPUs and on
    # grm.num_engines GPUs of its own (one scorer each) on a GPU cluster.
    backend = GRM_BACKENDS[g.backend]
    if not backend.in_driver(cl.use_gpu):
        tp = g.tensor_parallel_size if backend.engine else 1
        pools.append(spec("grm", g.num_engines * tp))
    if not cl.colocate_learner_rollout:
        pools.append(spec("learner", le.num_ranks))
    return PlacementPlan({p.name: p for p in pools}, cl.colocate_learner_rollout)


# ---------------------------------------------------------------- live cluster


@dataclass
class Pool:
    """A created placement group and the spec it was made from."""

    spec: PoolSpec
    pg: PlacementGroup

    def strategy(self, bundle_index: int,
                 capture_child_tasks: bool = False) -> PlacementGroupSchedulingStrategy:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if not 0 <= bundle_index < self.spec.num_bundles:
            raise IndexError(f"bundle {bundle_index} is outside pool {self.spec.name} "
                             f"(0..{self.spec.num_bundles - 1})")
        return PlacementGroupSchedulingStrategy(
            placement_group=self.pg, placement_group_bundle_index=bundle_index,
            placement_group_capture_child_tasks=capture_child_tasks)

    def engine_bundles(self, engine_index: int, tp: int) -> list[int]:
        """Bundles of engine `engine_index` with tensor-parallel size `tp`."""
        if engine_index < 0 or tp < 1 or (engine_index + 1) * tp > self.spec.num_bundles:
            raise IndexError(f"engine {engine_index} with tp={tp} does not fit pool "
                             f"{self.spec.name} of {self.spec.num_bundles} bundles")
        return list(range(engine_index * tp, (engine_index + 1) * tp))

    def bundle_nodes(self) -> list[str]:
        """Ray node id of each bundle, in bundle order ("" for a bundle not placed)."""
        from ray.util import placement_group_table

        where = placement_group_table(self.pg)["bundles_to_node_id"]
        return [where.get(i, "") for i in range(self.spec.num_bundles)]

    def remove(self) -> None:
        from ray.util import remove_placement_group

        remove_placement_group(self.pg)


def create_pools(plan: PlacementPlan, timeout_s: float) -> dict[str, Pool]:
    """Check `plan` against the cluster, create its groups, wait at most `timeout_s`."""
    import ray
    from ray.util import placement_group

    if not ray.is_initialized():
        raise PlacementError("Ray is not initialised; call ray.init() before create_pools")
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    problem = _infeasible(plan, nodes)
    if problem:
        raise PlacementError(f"cannot place {plan.describe()}: {problem}; "
                             f"{_cluster_text(nodes)}; {_fix_text(plan)}")
    free = ray.available_resources()
    pools: dict[str, Pool] = {}
    try:
        for name, spec in plan.pools.items():
            bundles = [dict(spec.bundle) for _ in range(spec.num_bundles)]
            pools[name] = Pool(spec, placement_group(bundles, strategy=spec.strategy))
        refs = {pool.pg.ready(): name for name, pool in pools.items()}
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        if pending:
            waiting = ", ".join(refs[ref] for ref in pending)
            shown = ", ".join(f"{k} {free.get(k, 0.0):g}" for k in SHOWN_RESOURCES)
            raise PlacementError(
                f"placement groups not ready after {timeout_s:g}s: {plan.describe()} "
                f"(still waiting: {waiting}); {_cluster_text(nodes)}, of which free before "
                f"this request: {shown} (other jobs or groups may hold the rest); "
                + _fix_text(plan, "free them", "raise cluster.placement_timeout_s"))
        ray.get(ready)
    except BaseException:
        for pool in pools.values():
            pool.remove()
        raise
    return pools


def _fits(bundle: dict[str, float], node: dict[str, float], times: float = 1.0) -> bool:
    return all(v * times <= node.get(k, 0.0) + EPS for k, v in bundle.items())


def _capacity(bundle: dict[str, float], node: dict[str, float]) -> int:
    """How many copies of `bundle` fit on `node`."""
    return min((math.floor((node.get(k, 0.0) + EPS) / v) for k, v in bundle.items() if v > 0),
               default=0)


def _infeasible(plan: PlacementPlan, nodes: list[dict[str, float]]) -> str | None:
    """Why `plan` can never be placed on `nodes` (their total resources), or None.

    Necessary conditions only (no false alarms): each pool's own shape, then the totals, then
    per bundle shape how many bundles the nodes can hold, which is exact for a plan whose pools
    all share one shape (what `plan_placement` makes) and soft strategies.
    """
    if not nodes:
        return "the cluster has no alive node"
    for spec in plan.pools.values():
        what = f"pool {spec.name} ({spec.strategy})"
        if not any(_fits(spec.bundle, n) for n in nodes):
            return f"no node can hold one {{{_fmt(spec.bundle)}}} bundle of {what}"
        if spec.strategy == "STRICT_PACK" and not any(
                _fits(spec.bundle, n, spec.num_bundles) for n in nodes):
            return f"{what} needs {{{_fmt(spec.total())}}} on one node and none has that"
        if spec.strategy == "STRICT_SPREAD":
            able = sum(_fits(spec.bundle, n) for n in nodes)
            if able < spec.num_bundles:
                return (f"{what} needs {spec.num_bundles} distinct nodes that can each hold "
                        f"a bundle and only {able} can")
    totals = plan.totals()
    cluster = {k: sum(n.get(k, 0.0) for n in nodes) for k in totals}
    short = [k for k, v in totals.items() if v > cluster[k] + EPS]
    if short:
        need = ", ".join(f"{k} {totals[k]:g} > {cluster[k]:g}" for k in short)
        return f"it needs more in total than the cluster has ({need})"
    by_shape: dict[tuple[tuple[str, float], ...], int] = {}
    for spec in plan.pools.values():
        shape = tuple(sorted(spec.bundle.items()))
        by_shape[shape] = by_shape.get(shape, 0) + spec.num_bundles
    for shape, count in by_shape.items():
        bundle = dict(shape)
        fit = sum(_capacity(bundle, n) for n in nodes)
        if fit < count:
            return (f"it needs {count} {{{_fmt(bundle)}}} bundles and the nodes can hold only "
                    f"{fit} of them")
    return None


def _cluster_text(nodes: list[dict[str, float]]) -> str:
    def res(n: dict[str, float]) -> str:
        return " ".join(f"{k} {n.get(k, 0.0):g}" for k in SHOWN_RESOURCES)

    total = {k: sum(n.get(k, 0.0) for n in nodes) for k in (*SHOWN_RESOURCES, "memory")}
    per_node = "; ".join(f"[{res(n)}]" for n in nodes)
    return (f"the cluster has {len(nodes)} node(s): {per_node} (total {res(total)}, "
            f"memory {total['memory'] / 2**30:.1f} GiB)")


def _fix_text(plan: PlacementPlan, *first: str) -> str:
    keys = ", ".join(_SIZE_KEYS.get(name, name) for name in plan.pools)
    hints = [*first, f"lower {keys} or cluster.cpus_per_bundle"]
    if "GPU" in plan.totals():
        hints.append("set cluster.use_gpu=false to run on CPUs")
    if {spec.strategy for spec in plan.pools.values()} & {"STRICT_PACK", "STRICT_SPREAD"}:
        hints.append("use cluster.placement_strategy=PACK")
    return "to fix: " + ", ".join(hints) + ", or add nodes"


def remove_pools(pools: dict[str, Pool]) -> None:
    """Remove every pool in `pools` (a `create_pools` result)."""
    for pool in pools.values():
        pool.remove()
