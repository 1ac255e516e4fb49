"""Overlapping dependent remote work: run each callback as soon as the futures it needs are in.

One training step is a small graph: a rollout engine's answers can be critiqued and scored
while other engines still generate, and an answer's rewrite can start as soon as its
critique is back. `Pipeline.then(pending, phase, callback)` registers work in flight;
`run()` waits on every outstanding future at once and fires callbacks in completion order
(callbacks may register more work). Each phase's span (first submission to last result) is
recorded for the step's timing. Work in a thread of this process (a judge that calls an
HTTP endpoint) is waited on beside the Ray futures, so it never blocks the driver. A failure
or a stall becomes one `RemoteError` line naming the actor, as in `cpe_ray.runtime.remote.wait_all`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from typing import Any

import ray

from cpe_ray.runtime.remote import RemoteError, wait_all

# While a thread's work is pending, Ray futures are polled this often (seconds): the thread
# cannot wake `ray.wait`.
THREAD_POLL_S = 0.02


@dataclass
class Pending:
    """Work in flight: Ray futures with a label each and how to combine their results; work
    already done in this process (`Pending.done`), whose callback runs on the next turn; or
    work in a thread of this process (`Pending.in_thread`)."""

    refs: list[Any]
    labels: list[str]
    what: str
    combine: Callable[[list[Any]], Any] = field(default=lambda parts: parts)
    value: Any = None
    thread: Future | None = None

    @classmethod
    def done(cls, value: Any, what: str) -> Pending:
        return cls([], [], what, value=value)

    @classmethod
    def in_thread(cls, future: Future, what: str) -> Pending:
        return cls([], [], what, thread=future)

    @classmethod
    def one(cls, ref: Any, label: str, what: str) -> Pending:
        """A single remote call; its result is the call's return value."""
        return cls([ref], [label], what, combine=lambda parts: parts[0])

    def __post_init__(self) -> None:
        if len(self.refs) != len(self.labels):
            raise ValueError("one label per future")

    def wait(self, timeout_s: float) -> Any:
        """The result, for a caller with nothing to overlap (Ray futures within `timeout_s`,
        else one `RemoteError` line)."""
        if self.refs:
            return self.combine(wait_all(self.refs, self.labels, timeout_s, self.what))
        return self.thread.result() if self.thread is not None else self.value


class Pipeline:
    def __init__(self, timeout_s: float, timeout_key: str = "learner.dist_timeout_s") -> None:
        self.timeout_s = timeout_s
        self.timeout_key = timeout_key  # the setting a stall's message tells the user to raise
        self._waiting: list[tuple[Pending, set[Any], str, Callable[[Any], None]]] = []
        self._threads: list[tuple[Pending, str, Callable[[Any], None]]] = []
        self._ready: deque[tuple[Pending, str, Callable[[Any], None]]] = deque()
        self._start: dict[str, float] = {}
        self._end: dict[str, float] = {}

    def then(self, pending: Pending, phase: str, callback: Callable[[Any], None]) -> None:
        self._start.setdefault(phase, time.perf_counter())
        if pending.refs:
            self._waiting.append((pending, set(pending.refs), phase, callback))
        elif pending.thread is not None:
            self._threads.append((pending, phase, callback))
        else:
            self._ready.append((pending, phase, callback))

    def run(self) -> None:
        """Until nothing is left: fire what is ready, else wait for the next completion."""
        deadline = time.monotonic() + self.timeout_s
        while self._ready or self._waiting or self._threads:
            self._collect_threads()
            if not self._ready:
                self._wait_once(deadline)
                continue
            pending, phase, callback = self._ready.popleft()
            result = pending.wait(0)  # complete by now; a thread's own error is raised as is
            self._end[phase] = time.perf_counter()
            callback(result)
            deadline = time.monotonic() + self.timeout_s

    def _collect_threads(self) -> None:
        # One look per thread: asking done() twice could see a thread finish in between and
        # drop it from both lists, so its callback would never run.
        still = []
        for item in self._threads:
            (self._ready if item[0].thread.done() else still).append(item)
        self._threads = still

    def _wait_once(self, deadline: float) -> None:
        """Wait for the next Ray future or thread, up to `deadline` (then one line)."""
        left = deadline - time.monotonic()
        if left <= 0:
            late = sorted({label for p, refs, _, _ in self._waiting
                           for r, label in zip(p.refs, p.labels, strict=True) if r in refs})
            late += [f"this process ({p.what})" for p, _, _ in self._threads]
            what = (self._waiting or self._threads)[0][0].what
            raise RemoteError(f"{what}: no answer within {self.timeout_s:g} s from "
                              f"{', '.join(late)}; check that actor's log (ray logs), or "
                              f"raise {self.timeout_key}")
        outstanding = [r for _, refs, _, _ in self._waiting for r in refs]
        if not outstanding:
            futures_wait([t[0].thread for t in self._threads], timeout=left,
                         return_when=FIRST_COMPLETED)
            return
        timeout = min(left, THREAD_POLL_S) if self._threads else left
        done, _ = ray.wait(outstanding, num_returns=1, timeout=timeout)
        still: list[tuple[Pending, set[Any], str, Callable[[Any], None]]] = []
        for pending, refs, phase, callback in self._waiting:
            refs.difference_update(done)
            if refs:
                still.append((pending, refs, phase, callback))
            else:
                self._ready.append((pending, phase, callback))
        self._waiting = still

    def spans(self) -> dict[str, float]:
        """Seconds from each phase's first submission to its last result."""
        return {k: self._end.get(k, v) - v for k, v in self._start.items()}


def gather(pendings: Sequence[Pending], timeout_s: float,
           timeout_key: str = "learner.dist_timeout_s") -> list[Any]:
    """Every result of `pendings`, in their order, waited on all at once (a failure or a
    stall is one `RemoteError` line, as in `Pipeline.run`)."""
    results: list[Any] = [None] * len(pendings)
    pipe = Pipeline(timeout_s, timeout_key)
    for i, pending in enumerate(pendings):
        pipe.then(pending, pending.what, lambda value, i=i: results.__setitem__(i, value))
    pipe.run()
    return results


def concat(parts: Sequence[Sequence[Any]]) -> list[Any]:
    """Combine per-actor result lists in actor order."""
    return [item for part in parts for item in part]
