"""The controller's view of the judge: the rubric judge in process, or the GRM actors.

Requests are split evenly over the GRM actors and judged in parallel; the result keeps the
request order. Backends without an implementation yet fail before any actor starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cpe_ray.config import Config
from cpe_ray.errors import ConfigError
from cpe_ray.experience import split_even
from cpe_ray.grm import JudgeOutcome
from cpe_ray.judge import JudgeRequest, check_mode
from cpe_ray.pipeline import Pending, concat
from cpe_ray.remote import wait_all

SUPPORTED_BACKENDS = ("rubric", "hf", "vllm")


def check_backend(cfg: Config) -> None:
    if cfg.grm.backend not in SUPPORTED_BACKENDS:
        raise ConfigError(
            f"grm.backend={cfg.grm.backend} is not wired into training yet; use one of "
            f"{', '.join(SUPPORTED_BACKENDS)}"
        )


class JudgeClient:
    def __init__(self, cfg: Config, grm_actors: Sequence[Any] = (),
                 labels: Sequence[str] = ()) -> None:
        check_backend(cfg)
        self.cfg, self.actors, self.labels = cfg, list(grm_actors), list(labels)
        self.local = None
        if cfg.grm.backend == "rubric":
            from cpe_ray.rubric import RubricJudge

            self.local = RubricJudge(cfg.grm)
        elif not self.actors:
            raise ValueError(f"grm.backend={cfg.grm.backend} needs GRM actors")

    def submit(self, requests: Sequence[JudgeRequest], mode: str, seed: int) -> Pending:
        """Start judging: work in flight that yields one outcome per request, in order."""
        check_mode(mode)
        what = f"GRM judging ({mode})"
        if self.local is not None:
            return Pending.done(self.local.judge(requests, mode, seed), what)
        parts = [rows for rows in split_even(len(requests), len(self.actors)) if rows]
        refs = [a.judge.remote([requests[i] for i in rows], mode, seed * len(self.actors) + k)
                for k, (a, rows) in enumerate(zip(self.actors, parts, strict=False))]
        return Pending(refs, self.labels[: len(refs)], what, combine=concat)

    def judge(self, requests: Sequence[JudgeRequest], mode: str, seed: int
              ) -> list[JudgeOutcome]:
        """Judge and wait (for callers with nothing to overlap)."""
        pending = self.submit(requests, mode, seed)
        if not pending.refs:
            return pending.value
        return pending.combine(wait_all(pending.refs, pending.labels,
                                        self.cfg.learner.dist_timeout_s, pending.what))
