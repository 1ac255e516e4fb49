"""The judge interface every backend shares: requests in, one `JudgeOutcome` each out.

A judge takes (persona, question, answer) requests and returns one `JudgeOutcome` each, in
`critique` mode (sampled at grm.critique_temperature, a critique is required) or `score`
mode (grm.score_temperature, usually greedy). Unparseable outputs are regenerated up to
grm.max_retries times, each retry with a new seed so that a sampled GRM can change its mind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from cpe_ray.errors import CpeError
from cpe_ray.judges.grm import (
    JudgeOutcome,
)

JUDGE_MODES = ("critique", "score")


class JudgeError(CpeError):
    """A judge could not judge (its endpoint unreachable after its retries, or none of a
    step's outputs parsed): training on its rewards would train on nothing, so the run stops
    with one line naming the judge and the cause."""


@dataclass(frozen=True)
class JudgeRequest:
    persona: str
    question: str
    answer: str


class Judge(Protocol):
    def judge(
        self, requests: Sequence[JudgeRequest], mode: str, seed: int = 0
    ) -> list[JudgeOutcome]: ...


def check_mode(mode: str) -> None:
    if mode not in JUDGE_MODES:
        raise ValueError(f"judge mode must be one of {JUDGE_MODES}, got {mode!r}")


@dataclass(frozen=True)
class Score:
    """A pointwise scorer's answer: a scalar reward, or None when the judge's output did not
    parse (a parse failure, which evaluations count and report)."""

    reward: float | None
    detail: str = ""


class AnswerScorer(Protocol):
    def score(self, requests: Sequence[JudgeRequest]) -> list[Score]: ...

    def describe(self) -> str: ...
