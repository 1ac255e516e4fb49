"""Tests for cpe_ray.runtime.placement: pure plans, then real groups on a two-node local Ray cluster."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from cpe_ray.config import load_config
from cpe_ray.errors import CpeError
from cpe_ray.runtime.placement import (
    PlacementError,
    PlacementPlan,
    Pool,
    PoolSpec,
    create_pools,
    plan_placement,
    remove_pools,
)


def plan(*overrides: str) -> PlacementPlan:
    return plan_placement(load_config(None, list(overrides)))


def shapes(p: PlacementPlan) -> dict[str, tuple[int, dict[str, float]]]:
    return {name: (spec.num_bundles, spec.bundle) for name, spec in p.pools.items()}


# ---------------------------------------------------------------- pure plans (no Ray)


def test_cpu_defaults() -> None:
    p = plan()
    assert shapes(p) == {"rollout": (1, {"CPU": 1.0}), "learner": (1, {"CPU": 1.0})}
    assert not p.colocated
    assert {s.strategy for s in p.pools.values()} == {"PACK"}
    assert p.totals() == {"CPU": 2.0}
    assert p.describe() == "rollout 1x{CPU:1}, learner 1x{CPU:1} (PACK)"


def test_gpu_tensor_parallel_and_cpus_per_bundle() -> None:
    p = plan("cluster.use_gpu=true", "cluster.cpus_per_bundle=4", "rollout.num_engines=2",
             "rollout.tensor_parallel_size=2", "learner.num_ranks=4",
             "cluster.placement_strategy=SPREAD")
    gpu = {"GPU": 1.0, "CPU": 4.0}
    assert shapes(p) == {"rollout": (4, gpu), "learner": (4, gpu)}
    assert p.totals() == {"GPU": 8.0, "CPU": 32.0}
    assert p.pools["rollout"].strategy == "SPREAD"
    assert p.describe() == "rollout 4x{GPU:1, CPU:4}, learner 4x{GPU:1, CPU:4} (SPREAD)"


@pytest.mark.parametrize(("ranks", "engines", "tp", "bundles"),
                         # on GPUs each engine GPU sits beside one learner rank (CUDA IPC)
                         [(3, 3, 1, 3), (4, 2, 2, 4), (2, 1, 2, 2)])
def test_colocated_pool_is_the_larger_side(ranks: int, engines: int, tp: int,
                                           bundles: int) -> None:
    p = plan("cluster.use_gpu=true", "cluster.colocate_learner_rollout=true",
             f"learner.num_ranks={ranks}", f"rollout.num_engines={engines}",
             f"rollout.tensor_parallel_size={tp}")
    assert p.colocated
    assert shapes(p) == {"learner_rollout": (bundles, {"GPU": 1.0, "CPU": 1.0})}
    assert p.pool_for("rollout") == p.pool_for("learner") == "learner_rollout"


@pytest.mark.parametrize(("overrides", "grm"), [
    (["grm.backend=hf", "grm.model_path=m", "grm.num_engines=3"], 3),
    (["grm.backend=vllm", "grm.model_path=m", "cluster.use_gpu=true",
      "grm.num_engines=2", "grm.tensor_parallel_size=4"], 8),
    (["grm.backend=rubric"], None),
    (["grm.backend=openai", "grm.api.base_url=http://x", "grm.api.model=m"], None),
    (["grm.backend=bt", "grm.model_path=m", "post_edit.enabled=false"], None),
    # on GPUs a BT reward model gets one GPU per scorer (grm.tensor_parallel_size ignored)
    (["grm.backend=bt", "grm.model_path=m", "post_edit.enabled=false", "cluster.use_gpu=true",
      "grm.num_engines=2", "grm.tensor_parallel_size=4"], 2),
])
def test_grm_pool_only_for_engine_backends(overrides: list[str], grm: int | None) -> None:
    p = plan(*overrides)
    if grm is None:
        assert set(p.pools) == {"rollout", "learner"}
        with pytest.raises(KeyError):
            p.pool_for("grm")
    else:
        assert list(p.pools) == ["rollout", "grm", "learner"]
        assert p.pools["grm"].num_bundles == grm
        assert p.pool_for("grm") == "grm"


def test_colocated_keeps_a_separate_grm_pool() -> None:
    p = plan("cluster.colocate_learner_rollout=true", "grm.backend=hf", "grm.model_path=m",
             "learner.num_ranks=2", "cluster.placement_strategy=STRICT_PACK")
    assert p.describe() == "learner_rollout 2x{CPU:1}, grm 1x{CPU:1} (STRICT_PACK)"


def test_engine_bundles_and_strategy_bounds() -> None:
    pool = Pool(PoolSpec("rollout", 4, {"CPU": 1.0}, "PACK"), pg=None)  # type: ignore[arg-type]
    assert pool.engine_bundles(0, 2) == [0, 1]
    assert pool.engine_bundles(1, 2) == [2, 3]
    assert pool.engine_bundles(3, 1) == [3]
    with pytest.raises(IndexError):
        pool.engine_bundles(2, 2)
    with pytest.raises(IndexError):
        pool.strategy(4)


def test_create_pools_without_ray_says_so() -> None:
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("Ray is already initialised in this process")
    with pytest.raises(PlacementError, match="Ray is not initialised"):
        create_pools(plan(), timeout_s=1)


# ---------------------------------------------------------------- a two-node Ray cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[object]:
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    c.add_node(num_cpus=2, num_gpus=2)  # fake GPUs: declared, not present
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
    c.wait_for_nodes()
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture
def ray_cluster(cluster: object) -> object:
    """The shared cluster, with every resource free at the start of the test."""
    settle()
    return cluster


def live_groups() -> dict[str, str]:
    from ray.util import placement_group_table

    return {pid: g["state"] for pid, g in placement_group_table().items()
            if g["state"] != "REMOVED"}


def wait_removed(before: dict[str, str], deadline_s: float = 5.0) -> dict[str, str]:
    """Removal is asynchronous in the GCS: poll (bounded) until no group beyond `before`."""
    end = time.monotonic() + deadline_s
    while True:
        extra = {k: v for k, v in live_groups().items() if k not in before}
        if not extra or time.monotonic() > end:
            return extra
        time.sleep(0.05)


def settle(deadline_s: float = 10.0) -> None:
    """Wait (bounded) until an earlier test's groups and actors have given their resources back."""
    import ray

    end = time.monotonic() + deadline_s
    keys = ("CPU", "GPU")
    while time.monotonic() < end:
        total, free = ray.cluster_resources(), ray.available_resources()
        if all(free.get(k, 0.0) == total.get(k, 0.0) for k in keys):
            return
        time.sleep(0.05)
    raise AssertionError(f"resources still held after {deadline_s}s: {free} of {total}")


def actor_nodes(pool: Pool) -> list[str]:
    """Where an actor scheduled on each bundle of `pool` really runs."""
    import ray

    @ray.remote(num_cpus=0.5)
    class Where:
        def node(self) -> str:
            return ray.get_runtime_context().get_node_id()

    actors = [Where.options(scheduling_strategy=pool.strategy(i)).remote()
              for i in range(pool.spec.num_bundles)]
    try:
        return ray.get([a.node.remote() for a in actors], timeout=60)
    finally:
        for a in actors:
            ray.kill(a)


def test_strict_pack_pools_each_on_one_node(ray_cluster: object) -> None:
    p = plan("cluster.placement_strategy=STRICT_PACK", "rollout.num_engines=2",
             "learner.num_ranks=2")
    pools = create_pools(p, timeout_s=20)
    try:
        assert list(pools) == ["rollout", "learner"]
        nodes = {name: pool.bundle_nodes() for name, pool in pools.items()}
        for where in nodes.values():
            assert len(where) == 2 and where[0] and where[0] == where[1]
        # 2 CPUs per node and 2 CPUs per pool: the two pools fill the two nodes.
        assert nodes["rollout"][0] != nodes["learner"][0]
        assert actor_nodes(pools["rollout"]) == nodes["rollout"]
    finally:
        remove_pools(pools)


def test_spread_uses_both_nodes_and_actors_land_on_their_bundle(ray_cluster: object) -> None:
    p = plan("cluster.placement_strategy=SPREAD", "rollout.num_engines=2")
    pools = create_pools(p, timeout_s=20)
    try:
        where = pools["rollout"].bundle_nodes()
        assert len(set(where)) == 2 and all(where)
        assert actor_nodes(pools["rollout"]) == where
    finally:
        remove_pools(pools)


def test_fake_gpus_are_placed(ray_cluster: object) -> None:
    p = plan("cluster.use_gpu=true", "cluster.placement_strategy=STRICT_PACK",
             "rollout.num_engines=2", "cluster.cpus_per_bundle=0.5", "learner.num_ranks=2",
             "cluster.colocate_learner_rollout=true")
    pools = create_pools(p, timeout_s=20)
    try:
        import ray

        gpu_node = [n["NodeID"] for n in ray.nodes() if n["Resources"].get("GPU")]
        assert pools["learner_rollout"].bundle_nodes() == gpu_node * 2
    finally:
        remove_pools(pools)


@pytest.mark.parametrize(("overrides", "reason"), [
    (["cluster.use_gpu=true", "rollout.num_engines=8"], "GPU 9 > 2"),
    (["cluster.placement_strategy=STRICT_PACK", "rollout.num_engines=3"],
     "pool rollout (STRICT_PACK) needs {CPU:3} on one node"),
    (["cluster.placement_strategy=STRICT_SPREAD", "rollout.num_engines=3"],
     "needs 3 distinct nodes"),
    (["cluster.cpus_per_bundle=3"], "no node can hold one {CPU:3} bundle of pool rollout"),
    # 3 x 1.2 CPUs fit the total of 4, but a 2-CPU node holds only one 1.2-CPU bundle.
    (["cluster.cpus_per_bundle=1.2", "rollout.num_engines=2"],
     "it needs 3 {CPU:1.2} bundles and the nodes can hold only 2 of them"),
])
def test_impossible_plan_fails_fast(ray_cluster: object, overrides: list[str], reason: str) -> None:
    before = live_groups()
    p = plan(*overrides)
    # Fast by construction, not by a clock: refused from the cluster's resources before any
    # group exists (the reason and `live_groups` below), so there was nothing to wait on.
    with pytest.raises(PlacementError) as err:
        create_pools(p, timeout_s=30)
    msg = str(err.value)
    assert isinstance(err.value, CpeError) and "\n" not in msg
    assert reason in msg
    assert p.describe() in msg
    assert "the cluster has 2 node(s): [CPU 2 GPU 0]; [CPU 2 GPU 2] (total CPU 4 GPU 2" in msg \
        or "the cluster has 2 node(s): [CPU 2 GPU 2]; [CPU 2 GPU 0] (total CPU 4 GPU 2" in msg
    assert "add nodes" in msg
    assert live_groups() == before  # nothing was created


def test_timeout_when_resources_are_held_removes_everything(ray_cluster: object) -> None:
    import ray
    from ray.util import placement_group

    blocker = placement_group([{"CPU": 2.0}], strategy="STRICT_PACK")
    ray.get(blocker.ready(), timeout=20)
    before = live_groups()
    # 3 CPUs in total fit the cluster's 4, but only 2 are free: one pool is created, the other
    # waits, and both must be gone after the timeout.
    p = plan("rollout.num_engines=1", "learner.num_ranks=2")
    start = time.monotonic()
    try:
        with pytest.raises(PlacementError) as err:
            create_pools(p, timeout_s=2)
        elapsed = time.monotonic() - start
        # At least the timeout. The blocker holds the CPUs throughout, so only the timeout can
        # have ended the wait; the upper bound is loose on purpose, leaving a loaded machine
        # room to create and remove the groups around the 2 s wait.
        assert 2 <= elapsed < 60
        msg = str(err.value)
        assert "\n" not in msg
        assert msg.startswith("placement groups not ready after 2s: " + p.describe())
        assert "free before this request: CPU 2, GPU 2" in msg
        assert "cluster.placement_timeout_s" in msg
        assert wait_removed(before) == {}
    finally:
        ray.util.remove_placement_group(blocker)


def test_supervised_stages_place_only_the_learner_ranks() -> None:
    from cpe_ray.config import load_config
    from cpe_ray.runtime.placement import plan_learner_only

    p = plan_learner_only(load_config(None, ["learner.num_ranks=8", "cluster.use_gpu=true",
                                             "grm.backend=hf", "grm.model_path=m"]))
    assert p.describe() == "learner 8x{GPU:1, CPU:1} (PACK)" and p.pool_for("learner") == "learner"

