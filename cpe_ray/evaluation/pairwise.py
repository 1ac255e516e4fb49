"""Pairwise judging: the judge prompt, verdict parsing, and both-orders averaging.

A pairwise judge sees one persona, one question and two answers, A and B, and names the
better one: `[[A]]`, `[[B]]` or `[[TIE]]` on its last line (`conf/prompts/pairwise_en.txt`).
Every judge here implements `PairwiseJudge.compare`; a verdict the judge could not give
(transport failure after the endpoint's retries, or text that never parsed after
`eval.max_parse_retries` re-asks) is a `PairVerdict` with `verdict=None` and a reason: it is
counted and reported, never dropped.

`judge_against_baseline` asks each question twice, model as A then model as B, and averages
the two preferences (1 model wins, 0 baseline wins, 0.5 tie), which cancels a judge's
position bias (AlpacaEval randomises the order instead; averaging both orders is the
MT-bench style of swapping). An item with any order unjudged is unjudged as a whole, so no
single-order (position-biased) preference enters a win rate. Judges that score each answer
on its own (`order_free`) are asked once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from cpe_ray.chat import apply_chat_template
from cpe_ray.prompts import PromptTemplate, load_template

if TYPE_CHECKING:  # the engines import torch; judging over HTTP does not need it
    from cpe_ray.engines.base import GenerationEngine

VERDICT_A, VERDICT_B, VERDICT_TIE = "A", "B", "tie"
PAIRWISE_PLACEHOLDERS = frozenset({"persona", "question", "answer_a", "answer_b"})
_VERDICT = re.compile(r"\[\[\s*(A|B|TIE)\s*\]\]", re.IGNORECASE)
_LOOSE_VERDICT = re.compile(r"verdict\s*[:：]\s*\**\s*(A|B|TIE)\b", re.IGNORECASE)
MODEL_WINS, BASELINE_WINS, TIE = 1.0, 0.0, 0.5
ORDER_MODEL_FIRST, ORDER_MODEL_SECOND = "model_first", "model_second"
SEED_STRIDE = 7919  # a prime: retry seeds do not collide across batches


@dataclass(frozen=True)
class PairRequest:
    persona: str
    question: str
    answer_a: str
    answer_b: str


@dataclass(frozen=True)
class PairVerdict:
    """"A", "B", "tie", or None when the judge could not judge (`error` says why)."""

    verdict: str | None
    raw: str = ""
    error: str | None = None
    attempts: int = 1
    # (A, B) rewards of a judge that scores each answer alone (None: unparsed), so that
    # eval.score_answers reuses them instead of scoring every answer a second time
    rewards: tuple[float | None, float | None] | None = None


class PairwiseJudge(Protocol):
    order_free: bool  # True: the verdict cannot depend on which answer is shown first

    def compare(self, requests: Sequence[PairRequest]) -> list[PairVerdict]: ...

    def describe(self) -> str: ...


def parse_verdict(text: str) -> str | None:
    """The last `[[A]]` / `[[B]]` / `[[TIE]]` in the text (else a `Verdict: X` line), or None."""
    if not isinstance(text, str):
        return None
    found = _VERDICT.findall(text) or _LOOSE_VERDICT.findall(text)
    if not found:
        return None
    last = found[-1].upper()
    return VERDICT_TIE if last == "TIE" else last


def load_pairwise_template(name_or_path: str) -> PromptTemplate:
    return load_template(name_or_path, allowed=PAIRWISE_PLACEHOLDERS,
                         required=PAIRWISE_PLACEHOLDERS)


def build_pairwise_messages(template: PromptTemplate, request: PairRequest) -> list[dict[str, str]]:
    """One user turn holding the instructions, persona, question and both answers."""
    return [{"role": "user", "content": template.render(
        persona=request.persona, question=request.question,
        answer_a=request.answer_a, answer_b=request.answer_b)}]


Generate = Callable[[list[int], int], list[tuple[str | None, str | None]]]


def compare_with_retries(generate: Generate, count: int, max_parse_retries: int
                         ) -> list[PairVerdict]:
    """Ask `generate(indices, attempt)` for (text, transport error) per index; re-ask only the
    items whose text did not parse, up to `max_parse_retries` times. Transport errors are
    final (the endpoint already retried them with back-off)."""
    results: list[PairVerdict | None] = [None] * count
    pending = list(range(count))
    for attempt in range(1, max_parse_retries + 2):
        if not pending:
            break
        replies = generate(pending, attempt)
        if len(replies) != len(pending):
            raise ValueError(f"judge returned {len(replies)} replies for {len(pending)} requests")
        still = []
        for idx, (text, error) in zip(pending, replies, strict=True):
            if error is not None:
                results[idx] = PairVerdict(None, text or "", error, attempt)
                continue
            verdict = parse_verdict(text or "")
            reason = None if verdict else "no [[A]] / [[B]] / [[TIE]] verdict in the judge's reply"
            results[idx] = PairVerdict(verdict, text or "", reason, attempt)
            if verdict is None:
                still.append(idx)
        pending = still
    return [r for r in results if r is not None]


class EnginePairwiseJudge:
    """A local judge model on a `GenerationEngine` (eval.judge=hf), prompted pairwise."""

    order_free = False

    def __init__(self, engine: GenerationEngine, tokenizer: Any, template: PromptTemplate,
                 max_new_tokens: int, temperature: float, max_parse_retries: int,
                 max_prompt_tokens: int, seed: int = 0) -> None:
        self.engine, self.tokenizer, self.template = engine, tokenizer, template
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed
        self.max_prompt_tokens = max_prompt_tokens
        # A greedy judge would only repeat itself: re-ask only a sampled one.
        self.max_parse_retries = max_parse_retries if temperature > 0 else 0

    def describe(self) -> str:
        return f"local judge model {self.engine.info().model_path}"

    def compare(self, requests: Sequence[PairRequest]) -> list[PairVerdict]:
        prompts = [apply_chat_template(self.tokenizer, build_pairwise_messages(self.template, r))
                   [-self.max_prompt_tokens:] for r in requests]

        from cpe_ray.engines.base import SamplingParams

        def generate(indices: list[int], attempt: int) -> list[tuple[str | None, str | None]]:
            params = SamplingParams(n=1, temperature=self.temperature,
                                    max_new_tokens=self.max_new_tokens,
                                    seed=self.seed * SEED_STRIDE + attempt)
            completions = self.engine.generate([prompts[i] for i in indices], params)
            return [(c.text, None) for c in completions]

        return compare_with_retries(generate, len(requests), self.max_parse_retries)


class LengthPairwiseJudge:
    """Prefers the longer answer (characters); a tie when the lengths differ by at most
    `tolerance`. A labelled heuristic for tests and sanity checks, not a preference model."""

    order_free = True

    def __init__(self, tolerance: int = 0) -> None:
        self.tolerance = tolerance

    def describe(self) -> str:
        return "length heuristic (prefers the longer answer; not a preference model)"

    def compare(self, requests: Sequence[PairRequest]) -> list[PairVerdict]:
        out = []
        for r in requests:
            a, b = len(r.answer_a), len(r.answer_b)
            verdict = VERDICT_TIE if abs(a - b) <= self.tolerance else (
                VERDICT_A if a > b else VERDICT_B)
            out.append(PairVerdict(verdict, f"len(A)={a} len(B)={b}"))
        return out


@dataclass(frozen=True)
class Comparison:
    """One model answer against one baseline answer: P(model better) averaged over orders."""

    preference: float | None
    verdicts: dict[str, PairVerdict]  # by order: model_first (model is A), model_second
    reason: str | None = None  # why the item is unjudged

    @property
    def judged(self) -> bool:
        return self.preference is not None


def _model_preference(verdict: str, model_is_a: bool) -> float:
    if verdict == VERDICT_TIE:
        return TIE
    return MODEL_WINS if (verdict == VERDICT_A) == model_is_a else BASELINE_WINS


def judge_against_baseline(judge: PairwiseJudge, items: Sequence[tuple[str, str, str, str]],
                           both_orders: bool = True) -> list[Comparison]:
    """items: (persona, question, model answer, baseline answer). One `compare` call for all
    orders, so an endpoint judge runs them concurrently."""
    orders = [ORDER_MODEL_FIRST]
    if both_orders and not judge.order_free:
        orders.append(ORDER_MODEL_SECOND)
    requests = []
    for persona, question, model, baseline in items:
        requests.append(PairRequest(persona, question, model, baseline))
        if len(orders) == 2:
            requests.append(PairRequest(persona, question, baseline, model))
    verdicts = judge.compare(requests)
    if len(verdicts) != len(requests):
        raise ValueError(f"judge returned {len(verdicts)} verdicts for {len(requests)} requests")
    out = []
    for i in range(len(items)):
        mine = dict(zip(orders, verdicts[i * len(orders):(i + 1) * len(orders)], strict=True))
        failed = [(o, v) for o, v in mine.items() if v.verdict is None]
        if failed:
            reason = "; ".join(f"{o}: {v.error or 'no verdict'}" for o, v in failed)
            out.append(Comparison(None, mine, reason))
            continue
        prefs = [_model_preference(v.verdict or "", o == ORDER_MODEL_FIRST)
                 for o, v in mine.items()]
        out.append(Comparison(sum(prefs) / len(prefs), mine))
    return out


def position_stats(comparisons: Sequence[Comparison]) -> dict[str, float | int | None]:
    """How often the answer shown first won, and how often both orders agreed."""
    first_wins = decided = agree = pairs = 0
    for c in comparisons:
        for v in c.verdicts.values():
            if v.verdict in (VERDICT_A, VERDICT_B):
                decided += 1
                first_wins += v.verdict == VERDICT_A
        if c.judged and len(c.verdicts) == 2:
            pairs += 1
            a, b = (_model_preference(v.verdict or "", o == ORDER_MODEL_FIRST)
                    for o, v in c.verdicts.items())
            agree += a == b
    return {
        "first_position_win_rate": first_wins / decided if decided else None,
        "decided_verdicts": decided,
        "order_agreement": agree / pairs if pairs else None,
        "items_judged_both_orders": pairs,
    }
