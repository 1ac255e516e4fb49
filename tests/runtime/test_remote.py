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


def test_a_dead_actor_ends_the_wait_at_once_and_is_named() -> None:
    """A peer blocked in a collective would hold the wait to its deadline: the death of the
    other ends it within seconds, marked as a death (what fault recovery restarts)."""
    import os
    import signal

    import ray

    @ray.remote(num_cpus=0)
    class Peer:
        def pid(self) -> int:
            return os.getpid()

        def block(self, seconds: float) -> float:
            time.sleep(seconds)
            return seconds

    stuck, victim = Peer.remote(), Peer.remote()
    pid = ray.get(victim.pid.remote())
    futures = [stuck.block.remote(120), victim.block.remote(120)]
    time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(RemoteError) as err:
        wait_all(futures, ["learner rank 0", "rollout engine 0"], 300, "weight sync")
    assert time.monotonic() - start < 10
    assert err.value.died and err.value.actor == "rollout engine 0"
    assert str(err.value) == "weight sync: rollout engine 0 died (ActorDiedError)"
    ray.kill(stuck)


def test_a_failure_without_a_message_names_its_type() -> None:
    import ray

    @ray.remote(num_cpus=0)
    def eof():
        raise EOFError()

    with pytest.raises(RemoteError, match=r"^load: learner rank 0 failed: EOFError$") as err:
        wait_all([eof.remote()], ["learner rank 0"], 30, "load")
    assert not err.value.died and err.value.actor == "learner rank 0"


def test_an_actor_that_fails_in_init_brings_its_exception_line() -> None:
    """Ray reports an actor whose `__init__` raised as dead on its next call; the cause was
    only in the worker's log. The line ends with what `__init__` raised (short type name)."""
    import ray

    from cpe_ray.errors import TemplateError

    @ray.remote(num_cpus=0)
    class Engine:
        def __init__(self, template: str, ours: bool) -> None:
            message = f"prompt template {template!r} not found"
            raise TemplateError(message) if ours else FileNotFoundError(message)

        def node_id(self) -> str:
            return "never"

    for ours, kind in ((False, "FileNotFoundError"), (True, "TemplateError")):
        engine = Engine.remote("/nonexistent/sys.txt", ours)
        with pytest.raises(RemoteError) as err:
            wait_all([engine.node_id.remote()], ["rollout engine 0"], 60, "engine start-up")
        assert str(err.value) == (
            "engine start-up: rollout engine 0 died during start-up: "
            f"{kind}: prompt template '/nonexistent/sys.txt' not found")
        assert err.value.died and err.value.actor == "rollout engine 0"
