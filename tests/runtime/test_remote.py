"""Bounded waits on local Ray: every way a remote call can fail is one line naming the actor."""

from __future__ import annotations

import time

import pytest

from cpe_ray.runtime.remote import RemoteError, wait_all

pytestmark = pytest.mark.usefixtures("local_ray")


def _tasks():
    import ray

    @ray.remote(num_cpus=0)
    def value(x, seconds: float = 0.0):
        time.sleep(seconds)
        return x

    @ray.remote(num_cpus=0)
    def fail():
        raise KeyError("no such weight")

    return value, fail


def test_results_keep_order() -> None:
    value, _ = _tasks()
    refs = [value.remote(1, 0.5), value.remote(2)]
    assert wait_all(refs, ["a", "b"], 30, "work") == [1, 2]


def test_task_error_names_the_actor_and_the_cause() -> None:
    value, fail = _tasks()
    with pytest.raises(RemoteError, match=r"^weight sync: rollout 1 failed: .*no such weight"):
        wait_all([value.remote(0), fail.remote()], ["rollout 0", "rollout 1"], 30,
                 "weight sync")


def test_runtime_env_that_cannot_be_set_up_is_one_line() -> None:
    value, _ = _tasks()
    ref = value.options(runtime_env={"conda": "cpe-ray-no-such-env"}).remote(0)
    with pytest.raises(RemoteError, match=r"^engine start-up: rollout engine 0 could not run: "
                                          r"Failed to set up runtime environment"):
        wait_all([ref], ["rollout engine 0"], 60, "engine start-up")


def test_laggard_is_named_after_the_deadline() -> None:
    value, _ = _tasks()
    start = time.monotonic()
    with pytest.raises(RemoteError, match=r"no answer within 0.5 s from GRM engine 1; "
                                          r"the others finished"):
        wait_all([value.remote(0), value.remote(1, 30)], ["GRM engine 0", "GRM engine 1"], 0.5,
                 "GRM judging")
    assert time.monotonic() - start < 5
