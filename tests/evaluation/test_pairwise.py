"""Pairwise judging: verdict parsing, both-orders averaging, unjudged items, local judges."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from cpe_ray.config import GRMConfig
from cpe_ray.evaluation.lc_winrate import lc_winrate
from cpe_ray.evaluation.pairwise import (
    ORDER_MODEL_FIRST,
    ORDER_MODEL_SECOND,
    EnginePairwiseJudge,
    LengthPairwiseJudge,
    PairRequest,
    PairVerdict,
    build_pairwise_messages,
    compare_with_retries,
    judge_against_baseline,
    load_pairwise_template,
    parse_verdict,
    position_stats,
)
from cpe_ray.evaluation.scorers import GRMScorer, ScorerPairwiseJudge
from cpe_ray.judges.base import JudgeRequest
from cpe_ray.judges.rubric import RubricJudge

PERSONA = "Name: Ada\nOccupation: nurse on night shifts"
QUESTION = "How can I stay alert at 4 a.m.?"


class FirstShownJudge:
    """A judge with pure position bias: the answer shown first always wins."""

    order_free = False

    def describe(self) -> str:
        return "first-shown judge"

    def compare(self, requests: Sequence[PairRequest]) -> list[PairVerdict]:
        return [PairVerdict("A", "[[A]]") for _ in requests]


class MuteOnSwapJudge:
    """Prefers the longer answer, but never answers when the longer one is shown second."""

    order_free = False

    def describe(self) -> str:
        return "mute-on-swap judge"

    def compare(self, requests: Sequence[PairRequest]) -> list[PairVerdict]:
        out = []
        for r in requests:
            if len(r.answer_a) >= len(r.answer_b):
                out.append(PairVerdict("A", "[[A]]"))
            else:
                out.append(PairVerdict(None, "I cannot decide.", "no verdict", attempts=3))
        return out


@pytest.mark.parametrize(("text", "verdict"), [
    ("Answer A is clearer.\n[[A]]", "A"),
    ("b wins\n[[ b ]]", "B"),
    ("Both fine. [[TIE]]", "tie"),
    ("Format: [[A]], [[B]] or [[TIE]]. My verdict: [[B]]", "B"),  # the last one counts
    ("Verdict: **A**", "A"),
    ("I prefer the first answer.", None),
    ("", None),
])
def test_parse_verdict(text: str, verdict: str | None) -> None:
    assert parse_verdict(text) == verdict


def test_template_renders_both_answers_verbatim() -> None:
    tpl = load_pairwise_template("pairwise_en.txt")
    req = PairRequest(PERSONA, QUESTION, "Walk {around}.", "Drink water.")
    (msg,) = build_pairwise_messages(tpl, req)
    assert msg["role"] == "user"
    assert "[Answer A]\nWalk {around}.\n[End of Answer A]" in msg["content"]
    assert "[Answer B]\nDrink water.\n[End of Answer B]" in msg["content"]
    assert PERSONA in msg["content"] and QUESTION in msg["content"]


def test_both_orders_cancel_position_bias() -> None:
    items = [(PERSONA, QUESTION, "model answer", "baseline answer")] * 4
    one = judge_against_baseline(FirstShownJudge(), items, both_orders=False)
    assert [c.preference for c in one] == [1.0] * 4  # biased: the model is always shown first
    both = judge_against_baseline(FirstShownJudge(), items, both_orders=True)
    assert [c.preference for c in both] == [0.5] * 4
    assert set(both[0].verdicts) == {ORDER_MODEL_FIRST, ORDER_MODEL_SECOND}
    stats = position_stats(both)
    assert stats["first_position_win_rate"] == 1.0 and stats["order_agreement"] == 0.0
    assert stats["decided_verdicts"] == 8 and stats["items_judged_both_orders"] == 4


def test_length_judge_is_asked_once_and_prefers_longer() -> None:
    judge = LengthPairwiseJudge()
    items = [(PERSONA, QUESTION, "long answer here", "short"),
             (PERSONA, QUESTION, "tiny", "a longer baseline"),
             (PERSONA, QUESTION, "same", "four")]
    out = judge_against_baseline(judge, items, both_orders=True)
    assert [c.preference for c in out] == [1.0, 0.0, 0.5]
    assert all(list(c.verdicts) == [ORDER_MODEL_FIRST] for c in out)


def test_an_order_without_verdict_leaves_the_item_unjudged_and_counted() -> None:
    items = [(PERSONA, QUESTION, "a long model answer", "short"),
             (PERSONA, QUESTION, "short", "a long baseline answer")]
    out = judge_against_baseline(MuteOnSwapJudge(), items, both_orders=True)
    # item 0: model first -> A (model); swapped, the longer model answer is second -> mute
    assert [c.preference for c in out] == [None, None]
    assert out[0].reason == f"{ORDER_MODEL_SECOND}: no verdict"
    assert out[1].reason == f"{ORDER_MODEL_FIRST}: no verdict"
    result = lc_winrate([c.preference for c in out], [19, 5], [5, 22])
    assert result.n_unjudged == 2 and result.n_total == 0


def test_compare_with_retries_reasks_unparsed_only() -> None:
    calls: list[list[int]] = []

    def generate(indices: list[int], attempt: int):
        calls.append(list(indices))
        replies = {0: ("[[A]]", None), 1: ("hmm" if attempt == 1 else "[[B]]", None),
                   2: (None, "HTTP 503: unavailable")}
        return [replies[i] for i in indices]

    out = compare_with_retries(generate, 3, max_parse_retries=2)
    assert calls == [[0, 1, 2], [1]]  # the transport failure is final (already retried)
    assert [v.verdict for v in out] == ["A", "B", None]
    assert [v.attempts for v in out] == [1, 2, 1]
    assert out[2].error == "HTTP 503: unavailable"


def test_rubric_judge_as_pairwise_judge_agrees_with_its_rewards() -> None:
    cfg = GRMConfig()
    scorer = GRMScorer(RubricJudge(cfg), cfg, "rubric")
    good = "At 4 a.m. on night shifts, a nurse can stay alert by walking the ward and drinking water."
    bad = "ok"
    out = judge_against_baseline(ScorerPairwiseJudge(scorer), [(PERSONA, QUESTION, good, bad),
                                                               (PERSONA, QUESTION, bad, good)])
    r_good, r_bad = (s.reward for s in scorer.score([JudgeRequest(PERSONA, QUESTION, good),
                                                     JudgeRequest(PERSONA, QUESTION, bad)]))
    assert r_good is not None and r_bad is not None and r_good > r_bad
    assert [c.preference for c in out] == [1.0, 0.0]


@pytest.mark.slow
def test_local_judge_model_on_the_hf_engine() -> None:
    # The tiny model cannot write a verdict: every item is unjudged, with the reason, and a
    # greedy judge is not re-asked (it would repeat itself) while a sampled one is.
    from cpe_ray.engines.hf import HFEngine

    engine = HFEngine("tiny", device="cpu")
    tpl = load_pairwise_template("pairwise_en.txt")
    items = [(PERSONA, QUESTION, "Walk around the ward.", "Drink cold water.")]
    greedy = EnginePairwiseJudge(engine, engine.tokenizer, tpl, max_new_tokens=8,
                                 temperature=0.0, max_parse_retries=3, max_prompt_tokens=512)
    (c,) = judge_against_baseline(greedy, items)
    assert c.preference is None and len(c.verdicts) == 2
    assert all(v.attempts == 1 and "no [[A]]" in (v.error or "") for v in c.verdicts.values())
    sampled = EnginePairwiseJudge(engine, engine.tokenizer, tpl, max_new_tokens=8,
                                  temperature=1.0, max_parse_retries=1, max_prompt_tokens=512)
    (c,) = judge_against_baseline(sampled, items)
    assert all(v.attempts == 2 for v in c.verdicts.values() if v.verdict is None)
