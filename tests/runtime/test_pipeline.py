"""The step pipeline on local Ray: callbacks fire in completion order, failures name the actor."""

from __future__ import annotations

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


def test_dependent_work_starts_before_slow_work_ends() -> None:
    after, _ = _remote()
    pipe = Pipeline(timeout_s=30)
    events: list[tuple[str, float]] = []
    t0 = time.perf_counter()

    def fast_done(value):
        events.append((f"fast {value}", time.perf_counter() - t0))
        # second stage of the fast chunk: registered while the slow chunk still runs
        pipe.then(Pending.one(after.remote(0.0, value * 10), "stage-2", "second"), "second",
                  lambda v: events.append((f"second {v}", time.perf_counter() - t0)))

    pipe.then(Pending.one(after.remote(1.5, 2), "slow", "first"), "first",
              lambda v: events.append((f"slow {v}", time.perf_counter() - t0)))
    pipe.then(Pending.one(after.remote(0.0, 1), "fast", "first"), "first", fast_done)
    pipe.then(Pending.done("local", "local work"), "local",
              lambda v: events.append((v, time.perf_counter() - t0)))
    pipe.run()
    names = [e for e, _ in events]
    assert names.index("second 10") < names.index("slow 2")  # overlap: stage 2 did not wait
    assert set(names) == {"local", "fast 1", "second 10", "slow 2"}
    spans = pipe.spans()
    assert spans["first"] >= 1.5 and spans["second"] < 1.5 and spans["local"] < 1.0


def test_combined_parts_keep_actor_order() -> None:
    after, _ = _remote()
    pipe = Pipeline(timeout_s=30)
    got = []
    refs = [after.remote(0.6, [1, 2]), after.remote(0.0, [3])]  # the second part ends first
    pipe.then(Pending(refs, ["a", "b"], "parts", combine=concat), "p", got.append)
    pipe.run()
    assert got == [[1, 2, 3]]


def test_failure_and_stall_are_one_line_naming_the_actor() -> None:
    after, fail = _remote()
    pipe = Pipeline(timeout_s=30)
    pipe.then(Pending.one(fail.remote("boom"), "GRM engine 1", "GRM judging"), "x",
              lambda v: pytest.fail("no result"))
    with pytest.raises(RemoteError, match=r"GRM judging: GRM engine 1 failed: .*boom"):
        pipe.run()
    pipe = Pipeline(timeout_s=0.5)
    pipe.then(Pending.one(after.remote(30, 0), "rollout engine 0", "generation"), "g",
              lambda v: pytest.fail("no result"))
    start = time.monotonic()
    with pytest.raises(RemoteError, match=r"generation: no answer within 0.5 s from "
                                          r"rollout engine 0"):
        pipe.run()
    assert time.monotonic() - start < 5


def test_work_in_a_thread_never_blocks_remote_work() -> None:
    """A judge calling an endpoint runs in a driver thread; engine results still dispatch."""
    from concurrent.futures import ThreadPoolExecutor

    after, _ = _remote()
    pipe = Pipeline(timeout_s=30)
    order: list[str] = []
    with ThreadPoolExecutor(1) as pool:
        start = time.perf_counter()
        slow = pool.submit(lambda: time.sleep(1.0) or "judged")
        pipe.then(Pending.in_thread(slow, "GRM judging"), "judge", order.append)
        pipe.then(Pending.one(after.remote(0.1, "generated"), "rollout 0", "generation"),
                  "generate", order.append)
        pipe.run()
    assert order == ["generated", "judged"]
    assert 1.0 <= time.perf_counter() - start < 3.0
    spans = pipe.spans()
    assert spans["generate"] < 0.9 <= spans["judge"]


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
        pipe.then(Pending.in_thread(pool.submit(time.sleep, 2), "GRM judging"), "j",
                  lambda v: pytest.fail("no result"))
        with pytest.raises(RemoteError, match=r"GRM judging: no answer within 0.3 s from "
                                              r"this process \(GRM judging\)"):
            pipe.run()
