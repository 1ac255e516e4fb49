"""Pointwise answer scorers for evaluation: any GRM judge read as its weighted reward.

A scorer (`cpe_ray.judges.base.AnswerScorer`) gives each (persona, question, answer) a
scalar reward, or None when its judge's output did not parse (a parse failure, which
evaluations count and report). GRM judges go through `Judge` in `score` mode and
`weighted_reward` with the configured weights; the Bradley-Terry scorer is
`cpe_ray.judges.bt.BTScorer`.
`ScorerPairwiseJudge` turns any scorer into a pairwise judge (higher reward wins, equal
rewards tie); it cannot depend on the order of the answers.
"""

from __future__ import annotations

from collections.abc import Sequence

from cpe_ray.config import GRMConfig
from cpe_ray.evaluation.pairwise import VERDICT_A, VERDICT_B, VERDICT_TIE, PairRequest, PairVerdict
from cpe_ray.judges.base import AnswerScorer, Judge, JudgeRequest, Score
from cpe_ray.judges.grm import weighted_reward

REWARD_DECIMALS = 9  # rewards equal to this many decimals are a tie


class GRMScorer:
    """Weighted reward of a GRM judgement; an unparsed judgement is a parse failure."""

    def __init__(self, judge: Judge, cfg: GRMConfig, label: str, seed: int = 0) -> None:
        self.judge, self.cfg, self.label, self.seed = judge, cfg, label, seed

    def describe(self) -> str:
        return self.label

    def score(self, requests: Sequence[JudgeRequest]) -> list[Score]:
        out = []
        for outcome in self.judge.judge(requests, "score", self.seed):
            j = outcome.judgement
            if not j.parsed:
                out.append(Score(None, "unparsed: " + "; ".join(j.warnings)))
                continue
            reward = weighted_reward(j, self.cfg.weights, self.cfg.on_missing)  # type: ignore[arg-type]
            scores = " ".join(f"{d}={s:g}" for d, s in j.scores.items() if s is not None)
            out.append(Score(reward, scores))
        return out


def compare_rewards(a: float, b: float) -> str:
    ra, rb = round(a, REWARD_DECIMALS), round(b, REWARD_DECIMALS)
    return VERDICT_TIE if ra == rb else (VERDICT_A if ra > rb else VERDICT_B)


class ScorerPairwiseJudge:
    """Any scorer as a pairwise judge (eval.judge=grm): the higher reward wins."""

    order_free = True

    def __init__(self, scorer: AnswerScorer) -> None:
        self.scorer = scorer

    def describe(self) -> str:
        return self.scorer.describe()

    def compare(self, requests: Sequence[PairRequest]) -> list[PairVerdict]:
        singles = [JudgeRequest(r.persona, r.question, ans) for r in requests
                   for ans in (r.answer_a, r.answer_b)]
        scores = self.scorer.score(singles)
        out = []
        for i in range(len(requests)):
            a, b = scores[2 * i], scores[2 * i + 1]
            raw = f"A: {a.reward} ({a.detail}) | B: {b.reward} ({b.detail})"
            rewards = (a.reward, b.reward)
            if a.reward is None or b.reward is None:
                out.append(PairVerdict(None, raw, "the judge's output did not parse",
                                       rewards=rewards))
            else:
                out.append(PairVerdict(compare_rewards(a.reward, b.reward), raw,
                                       rewards=rewards))
        return out


