"""The runtime on two simulated nodes: actors land in their bundles and work end to end."""

from __future__ import annotations

import time

import pytest

from cpe_ray.config import load_config
from cpe_ray.judges.base import JudgeRequest
from cpe_ray.runtime.placement import PlacementError

NODE_CPUS = 3  # per simulated node: a 2-engine pool fits one node, not two pools


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": NODE_CPUS})
    cluster.add_node(num_cpus=NODE_CPUS)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _cfg(*extra: str):
    return load_config(None, [
        "cluster.placement_strategy=STRICT_PACK", "cluster.placement_timeout_s=20",
        "rollout.num_engines=2", "rollout.max_new_tokens=8",
        "grm.backend=hf", "grm.model_path=tiny", "grm.num_engines=2", "grm.max_new_tokens=8",
        "grm.max_retries=2", "learner.weight_sync_timeout_s=30", *extra,
    ])


def test_actors_land_where_the_placement_says_and_run(two_nodes) -> None:
    import ray

    from cpe_ray.runtime.start import start_runtime

    rt = start_runtime(_cfg())
    try:
        nodes = {name: pool.bundle_nodes() for name, pool in rt.pools.items()}
        # STRICT_PACK: each pool on one node; rollout and GRM (2 CPUs each) cannot share one
        assert len(set(nodes["rollout"])) == 1 and len(set(nodes["grm"])) == 1
        assert nodes["rollout"][0] != nodes["grm"][0]
        assert ray.get([h.node_id.remote() for h in rt.rollouts]) == nodes["rollout"]
        assert ray.get([h.node_id.remote() for h in rt.grms]) == nodes["grm"]
        assert ray.get([a.node_id.remote() for a in rt.learner.actors]) == nodes["learner"]
        # the pieces work where they landed: answer, judge (the tiny GRM never parses, so
        # every item takes 1 + max_retries attempts), sync
        batch = ray.get(rt.rollouts[1].answer.remote([("a baker", "Any bread tips?")], 0))
        assert len(batch.completions) == 4
        answer = batch.completions[0].text
        outcomes = ray.get(rt.grms[0].judge.remote(
            [JudgeRequest("a baker", "Any bread tips?", answer)] * 2, "critique", 1))
        assert [o.attempts for o in outcomes] == [3, 3]
        assert not any(o.judgement.parsed for o in outcomes)
        stats = rt.learner.sync_weights()
        assert stats.bytes == rt.manifest.total_bytes
    finally:
        rt.shutdown()


def test_impossible_placement_fails_fast_with_one_line(two_nodes) -> None:
    from cpe_ray.runtime.start import start_runtime

    start = time.monotonic()
    with pytest.raises(PlacementError) as err:
        start_runtime(_cfg("rollout.num_engines=4"))  # 4 CPUs in one node of 3
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert "\n" not in message
    assert "rollout 4x{CPU:1}" in message and "2 node(s)" in message
