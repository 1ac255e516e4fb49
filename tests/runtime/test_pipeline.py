"""The step pipeline on local Ray: callbacks fire in completion order, failures name the actor."""

from __future__ import annotations

import threading
import time

import pytest

from cpe_ray.runtime.pipeline import Pending, Pipeline, concat
from cpe_ray.runtime.remote import RemoteError

pytestmark = pytest.mark.usefixtures("local_ray")


def _remote():
    import ray

    @ray.remote(num_cpus=0)
    def after(seconds: float, value):
        time.sleep(seconds)
        return value

    @ray.remote(num_cpus=0)
    def fail(message: str):
        raise ValueError(message)

    return after, fail


def _gate():
    """An actor whose `hold(value)` answers only once the driver has called `open()`: work
    that cannot end before a given callback ran, so overlap is shown by order, not by timing."""
    import asyncio

    import ray

    @ray.remote(num_cpus=0)
    class Gate:
        def __init__(self) -> None:
            self._open = asyncio.Event()

        async def hold(self, value):
            await self._open.wait()
            return value

        async def open(self) -> None:
            self._open.set()

    return Gate.remote()


def test_dependent_work_starts_before_slow_work_ends() -> None:
    # The slow chunk is held by a gate that only the second stage's callback opens: a pipeline
    # that waited for the whole first phase before dispatching would stall and time out, so
    # the overlap holds however slowly a busy machine schedules the tasks.
    after, _ = _remote()
    gate = _gate()
    pipe = Pipeline(timeout_s=30)
    names: list[str] = []

    def fast_done(value):
        names.append(f"fast {value}")
        # second stage of the fast chunk: registered while the slow chunk still runs
        pipe.then(Pending.one(after.remote(0.0, value * 10), "stage-2", "second"), "second",
                  second_done)

    def second_done(value):
        names.append(f"second {value}")
        gate.open.remote()

    pipe.then(Pending.one(gate.hold.remote(2), "slow", "first"), "first",
              lambda v: names.append(f"slow {v}"))
    pipe.then(Pending.one(after.remote(0.0, 1), "fast", "first"), "first", fast_done)
    pipe.then(Pending.done("local", "local work"), "local", names.append)
    pipe.run()
    assert names.index("second 10") < names.index("slow 2")  # overlap: stage 2 did not wait
    assert set(names) == {"local", "fast 1", "second 10", "slow 2"}
    spans = pipe.spans()
    # Each phase's span runs from its first submission to its last result. "first" was
    # submitted before the other two and its result came last, so it spans both.
    assert spans["second"] < spans["first"] and spans["local"] < spans["first"]


def test_combined_parts_keep_actor_order() -> None:
    after, _ = _remote()
    pipe = Pipeline(timeout_s=30)
    got = []
    refs = [after.remote(0.6, [1, 2]), after.remote(0.0, [3])]  # the second part ends first
    pipe.then(Pending(refs, ["a", "b"], "parts", combine=concat), "p", got.append)
    pipe.run()
    assert got == [[1, 2, 3]]


def test_failure_and_stall_are_one_line_naming_the_actor() -> None:
    import ray

    after, fail = _remote()
    pipe = Pipeline(timeout_s=30)
    pipe.then(Pending.one(fail.remote("boom"), "GRM engine 1", "GRM judging"), "x",
              lambda v: pytest.fail("no result"))
    with pytest.raises(RemoteError, match=r"GRM judging: GRM engine 1 failed: .*boom"):
        pipe.run()
    pipe = Pipeline(timeout_s=0.5)
    stalled = after.remote(300, 0)
    pipe.then(Pending.one(stalled, "rollout engine 0", "generation"), "g",
              lambda v: pytest.fail("no result"))
    with pytest.raises(RemoteError, match=r"generation: no answer within 0.5 s from "
                                          r"rollout engine 0"):
        pipe.run()
    # It gave up while the work was still running (not by waiting it out); 300 s is beyond
    # the test's own timeout, so no machine is slow enough to see the work end first.
    assert ray.wait([stalled], timeout=0)[1] == [stalled]
    ray.cancel(stalled)


def test_work_in_a_thread_never_blocks_remote_work() -> None:
    """A judge calling an endpoint runs in a driver thread; engine results still dispatch."""
    from concurrent.futures import ThreadPoolExecutor

    after, _ = _remote()
    pipe = Pipeline(timeout_s=30)
    order: list[str] = []
    generated = threading.Event()

    def on_generated(value: str) -> None:
        order.append(value)
        generated.set()

    # The thread's work ends only after the engine's result was dispatched: a pipeline that
    # blocked on the thread would never dispatch it and would time out, however busy the
    # machine. (The thread's own wait is bounded so that a failure cannot hang the pool.)
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(lambda: "judged" if generated.wait(60) else "never dispatched")
        pipe.then(Pending.in_thread(slow, "GRM judging"), "judge", order.append)
        pipe.then(Pending.one(after.remote(0.0, "generated"), "rollout 0", "generation"),
                  "generate", on_generated)
        pipe.run()
    assert order == ["generated", "judged"]
    spans = pipe.spans()
    # The judging was submitted first and its result came last, so its span covers the
    # generation's.
    assert spans["generate"] < spans["judge"]


def test_a_failing_or_stalled_thread_is_reported() -> None:
    from concurrent.futures import ThreadPoolExecutor

    def fail():
        raise ConnectionError("endpoint down")

    with ThreadPoolExecutor(1) as pool:
        pipe = Pipeline(timeout_s=30)
        pipe.then(Pending.in_thread(pool.submit(fail), "GRM judging"), "j",
                  lambda v: pytest.fail("no result"))
        with pytest.raises(ConnectionError, match="endpoint down"):
            pipe.run()
        pipe = Pipeline(timeout_s=0.3)
        release = threading.Event()  # the thread answers only after the stall was reported
        pipe.then(Pending.in_thread(pool.submit(release.wait, 60), "GRM judging"), "j",
                  lambda v: pytest.fail("no result"))
        try:
            with pytest.raises(RemoteError, match=r"GRM judging: no answer within 0.3 s from "
                                                  r"this process \(GRM judging\)"):
                pipe.run()
        finally:
            release.set()
