"""The controller's view of the judge: a judge in this process, or the GRM actors.

Which backend judges where is `cpe_ray.judges.registry` (the one table of backends). Requests
for actors are split evenly over them and judged in parallel; the result keeps the request
order.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cpe_ray.algo.experience import split_even
from cpe_ray.config import Config
from cpe_ray.config.choices import GRM_BACKENDS
from cpe_ray.judges.base import JudgeRequest, check_mode
from cpe_ray.judges.registry import build_judge, check_backend, judge_in_driver
from cpe_ray.runtime.pipeline import Pending, concat


class JudgeClient:
    def __init__(self, cfg: Config, grm_actors: Sequence[Any] = (),
                 labels: Sequence[str] = ()) -> None:
        check_backend(cfg)
        self.cfg, self.actors, self.labels = cfg, list(grm_actors), list(labels)
        self.local = build_judge(cfg) if judge_in_driver(cfg) else None
        if self.local is None and not self.actors:
            raise ValueError(f"grm.backend={cfg.grm.backend} needs GRM actors")
        # one worker: the judge sees one batch at a time, as an actor would
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="judge") if (
            self.local is not None and GRM_BACKENDS[cfg.grm.backend].threaded) else None

    def submit(self, requests: Sequence[JudgeRequest], mode: str, seed: int) -> Pending:
        """Start judging: work in flight that yields one outcome per request, in order."""
        check_mode(mode)
        what = f"GRM judging ({mode})"
        if self._thread is not None:
            return Pending.in_thread(self._thread.submit(self.local.judge, list(requests), mode,
                                                         seed), what)
        if self.local is not None:
            return Pending.done(self.local.judge(requests, mode, seed), what)
        parts = [rows for rows in split_even(len(requests), len(self.actors)) if rows]
        refs = [a.judge.remote([requests[i] for i in rows], mode, seed * len(self.actors) + k)
                for k, (a, rows) in enumerate(zip(self.actors, parts, strict=False))]
        return Pending(refs, self.labels[: len(refs)], what, combine=concat)
