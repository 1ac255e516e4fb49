"""Overlapping dependent remote work: run each callback as soon as the futures it needs are in.

One training step is a small graph: a rollout engine's answers can be critiqued and scored
while other engines still generate, and an answer's rewrite can start as soon as its
critique is back. `Pipeline.then(pending, phase, callback)` registers work in flight;
`run()` waits on every outstanding future at once and fires callbacks in completion order
(callbacks may register more work). Each phase's span (first submission to last result) is
recorded for the step's timing. A failure or a stall becomes one `RemoteError` line naming
the actor, as in `cpe_ray.remote.wait_all`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray

from cpe_ray.remote import RemoteError, wait_all


@dataclass
class Pending:
    """Work in flight: futures with a label each and how to combine their results; or work
    already done in this process (`Pending.done`), whose callback runs on the next turn."""

    refs: list[Any]
    labels: list[str]
    what: str
    combine: Callable[[list[Any]], Any] = field(default=lambda parts: parts)
    value: Any = None

    @classmethod
    def done(cls, value: Any, what: str) -> Pending:
        return cls([], [], what, value=value)

    @classmethod
    def one(cls, ref: Any, label: str, what: str) -> Pending:
        """A single remote call; its result is the call's return value."""
        return cls([ref], [label], what, combine=lambda parts: parts[0])

    def __post_init__(self) -> None:
        if len(self.refs) != len(self.labels):
            raise ValueError("one label per future")


class Pipeline:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._waiting: list[tuple[Pending, set[Any], str, Callable[[Any], None]]] = []
        self._ready: deque[tuple[Pending, str, Callable[[Any], None]]] = deque()
        self._start: dict[str, float] = {}
        self._end: dict[str, float] = {}

    def then(self, pending: Pending, phase: str, callback: Callable[[Any], None]) -> None:
        self._start.setdefault(phase, time.perf_counter())
        if pending.refs:
            self._waiting.append((pending, set(pending.refs), phase, callback))
        else:
            self._ready.append((pending, phase, callback))

    def run(self) -> None:
        """Until nothing is left: fire what is ready, else wait for the next future."""
        while self._ready or self._waiting:
            if self._ready:
                pending, phase, callback = self._ready.popleft()
                result = pending.value if not pending.refs else pending.combine(
                    wait_all(pending.refs, pending.labels, 0, pending.what))
                self._end[phase] = time.perf_counter()
                callback(result)
                continue
            self._wait_once()

    def _wait_once(self) -> None:
        outstanding = [r for _, left, _, _ in self._waiting for r in left]
        done, _ = ray.wait(outstanding, num_returns=1, timeout=self.timeout_s)
        if not done:
            late = sorted({label for p, left, _, _ in self._waiting
                           for r, label in zip(p.refs, p.labels, strict=True) if r in left})
            raise RemoteError(f"{self._waiting[0][0].what}: no answer within "
                              f"{self.timeout_s:g} s from {', '.join(late)}; check that "
                              "actor's log (ray logs), or raise learner.dist_timeout_s")
        still: list[tuple[Pending, set[Any], str, Callable[[Any], None]]] = []
        for pending, left, phase, callback in self._waiting:
            left.difference_update(done)
            if left:
                still.append((pending, left, phase, callback))
            else:
                self._ready.append((pending, phase, callback))
        self._waiting = still

    def spans(self) -> dict[str, float]:
        """Seconds from each phase's first submission to its last result."""
        return {k: self._end.get(k, v) - v for k, v in self._start.items()}


def concat(parts: Sequence[Sequence[Any]]) -> list[Any]:
    """Combine per-actor result lists in actor order."""
    return [item for part in parts for item in part]
