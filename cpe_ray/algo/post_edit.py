"""Critique-Post-Edit text and selection: the edit prompt and which rewrites join the batch.

method.md section 3: the policy rewrites each answer from a user turn holding the
question, its answer and the GRM's critique; a selection strategy then decides which
rewrites join the PPO batch (all originals always stay).

Counting rules, the paper release's (method.md 4): every strategy keeps at most
K = floor(ratio x N) of the N rewrites, rounded down to a multiple of `multiple`
(`post_edit.kept_multiple`). `random` draws K uniformly; `batch_reward` takes the top K by
reward. The question-level strategies first take the top ceil(ratio x n_q) of each
question's n_q rewrites (by reward for `reward`, by reward gain over the original for
`improvement`), then cap those candidates at K: `improvement` keeps the K largest gains,
`reward` draws K of them uniformly, as the release does. Every strategy is deterministic for
a seed; ranking strategies break ties by a seeded random order rather than by position, so
no prompt is favoured for coming first in the batch.

An edit prompt longer than `rollout.max_prompt_length` loses the end of the answer and of
the critique and the middle of the question, the longest first (`fit_edit_prompt`), never the
system turn with the persona.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cpe_ray.chat import QUESTION_CUT_MARK, Cuttable, fit_prompt
from cpe_ray.config.choices import Table
from cpe_ray.prompts import PromptTemplate, load_template

EDIT_PLACEHOLDERS = frozenset({"persona", "question", "answer", "critique"})
EDIT_REQUIRED = frozenset({"question", "answer", "critique"})
# ratio x n in floating point can land a hair off an integer (0.29 x 100 = 28.999...96);
# counts are taken with this slack so the intended integer is kept.
_COUNT_SLACK = 1e-9
# Ends a shortened answer or critique in the edit prompt, so the policy sees that it was cut.
TRUNCATION_MARK = " [...]"


@dataclass(frozen=True)
class RewriteInfo:
    """What selection may look at for one rewrite.

    reward: the GRM's weighted reward of the rewrite (None before scoring);
    original_reward: the reward of the answer it rewrites (for `improvement`).
    """

    question_id: str
    pair_id: int
    reward: float | None = None
    original_reward: float | None = None


@dataclass(frozen=True)
class EditRequest:
    """One answer to rewrite: what the policy sees in the edit prompt."""

    persona: str
    question: str
    answer: str
    critique: str


def load_edit_template(name_or_path: str) -> PromptTemplate:
    """The edit template: must hold the question, the answer and the critique."""
    return load_template(name_or_path, allowed=EDIT_PLACEHOLDERS, required=EDIT_REQUIRED)


def build_edit_messages(
    template: PromptTemplate,
    question: str,
    answer: str,
    critique: str,
    system_prompt: str | None = None,
    persona: str = "",
) -> list[dict[str, str]]:
    """The edit prompt: the policy's own system prompt (if any) and one user turn."""
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    values = {"question": question, "answer": answer, "critique": critique}
    if "persona" in template.placeholders:
        values["persona"] = persona
    messages.append({"role": "user", "content": template.render(**values)})
    return messages


def _floor_count(ratio: float, n: int) -> int:
    return math.floor(ratio * n + _COUNT_SLACK)


def _ceil_count(ratio: float, n: int) -> int:
    return math.ceil(ratio * n - _COUNT_SLACK)


def _top_k(scores: np.ndarray, k: int, tiebreak: np.ndarray) -> np.ndarray:
    # lexsort sorts by the last key first: descending score, then the seeded random order.
    order = np.lexsort((tiebreak, -scores))
    return order[:k]


def _scores(rewrites: Sequence[RewriteInfo], strategy: str, gain: bool) -> np.ndarray:
    """Each rewrite's reward, or with `gain` its reward minus its original's."""
    values = []
    for i, r in enumerate(rewrites):
        value = r.reward
        if gain:
            if r.reward is None or r.original_reward is None:
                value = None
            else:
                value = r.reward - r.original_reward
        if value is None or not math.isfinite(value):
            need = "reward and original_reward" if gain else "reward"
            raise ValueError(
                f"strategy {strategy!r} needs a finite {need} for every rewrite; rewrite {i} "
                f"(question {r.question_id!r}) has reward={r.reward}, "
                f"original_reward={r.original_reward}"
            )
        values.append(value)
    return np.asarray(values, dtype=np.float64)


def _per_question(rewrites: Sequence[RewriteInfo], scores: np.ndarray, tiebreak: np.ndarray,
                  ratio: float) -> list[int]:
    """The top ceil(ratio x n_q) of each question's n_q rewrites by score."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rewrites):
        groups[r.question_id].append(i)
    candidates: list[int] = []
    for members in groups.values():
        idx = np.asarray(members)
        k = _ceil_count(ratio, len(members))
        candidates.extend(int(i) for i in idx[_top_k(scores[idx], k, tiebreak[idx])])
    return candidates


@dataclass(frozen=True)
class Selection:
    """What a strategy sees: the rewrites, the ratio, how many to keep at most (`total`,
    floor(ratio x N) rounded down to the multiple), and the seeded generator."""

    rewrites: Sequence[RewriteInfo]
    ratio: float
    total: int
    rng: np.random.Generator


@dataclass(frozen=True)
class SelectionStrategy:
    """One `post_edit.strategy`: the indices of the rewrites it keeps, in any order."""

    select: Callable[[Selection], list[int]]
    needs_rewards: bool  # ranks by reward: rewrites are scored before selection


def _random(s: Selection) -> list[int]:
    return [int(i) for i in s.rng.choice(len(s.rewrites), size=s.total, replace=False)]


def _batch_reward(s: Selection) -> list[int]:
    scores = _scores(s.rewrites, "batch_reward", gain=False)
    tiebreak = s.rng.permutation(len(s.rewrites))
    return [int(i) for i in _top_k(scores, s.total, tiebreak)]


def _reward(s: Selection) -> list[int]:
    scores = _scores(s.rewrites, "reward", gain=False)
    tiebreak = s.rng.permutation(len(s.rewrites))
    candidates = _per_question(s.rewrites, scores, tiebreak, s.ratio)
    if len(candidates) > s.total:  # the release draws the survivors uniformly
        candidates = [int(i) for i in s.rng.choice(np.asarray(candidates), size=s.total,
                                                    replace=False)]
    return candidates


def _improvement(s: Selection) -> list[int]:
    scores = _scores(s.rewrites, "improvement", gain=True)
    tiebreak = s.rng.permutation(len(s.rewrites))
    candidates = _per_question(s.rewrites, scores, tiebreak, s.ratio)
    if len(candidates) > s.total:  # the largest gains over the whole batch
        pool = np.asarray(candidates)
        candidates = [int(i) for i in pool[_top_k(scores[pool], s.total, tiebreak[pool])]]
    return candidates


# The strategies `post_edit.strategy` names (the module docstring has each one's rule).
# Adding one: its name in `cpe_ray.config.choices.STRATEGIES`, one `register` call here, and
# its test in `tests/algo/test_post_edit.py`.
SELECTION_STRATEGIES: Table[SelectionStrategy] = Table("selection strategy")
SELECTION_STRATEGIES.register("random", SelectionStrategy(_random, needs_rewards=False))
SELECTION_STRATEGIES.register("reward", SelectionStrategy(_reward, needs_rewards=True))
SELECTION_STRATEGIES.register("batch_reward", SelectionStrategy(_batch_reward,
                                                                needs_rewards=True))
SELECTION_STRATEGIES.register("improvement", SelectionStrategy(_improvement,
                                                               needs_rewards=True))


def needs_rewards(strategy: str) -> bool:
    """Whether the strategy ranks by reward, i.e. rewrites must be scored before selection."""
    return SELECTION_STRATEGIES[strategy].needs_rewards


def select_rewrites(
    strategy: str,
    rewrites: Sequence[RewriteInfo],
    ratio: float,
    seed: int,
    multiple: int = 1,
) -> list[int]:
    """Indices (ascending) of the rewrites to keep under `strategy` at `ratio`.

    At most floor(ratio x N) rounded down to a multiple of `multiple` are kept (the module
    docstring has each strategy's rule)."""
    entry = SELECTION_STRATEGIES[strategy]
    if not 0.0 <= ratio <= 1.0 or math.isnan(ratio):
        raise ValueError(f"selection ratio {ratio} is outside [0, 1]")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    n = len(rewrites)
    if n == 0:
        return []
    total = _floor_count(ratio, n) // multiple * multiple
    return sorted(entry.select(Selection(rewrites, ratio, total, np.random.default_rng(seed))))


@dataclass(frozen=True)
class EditPrompt:
    """The edit prompt's token ids, and what had to go for it to fit the prompt limit."""

    token_ids: list[int]
    shortened: bool  # over the limit: its question, answer and/or critique were cut
    cut_left: bool  # still too long without them: its start (the system turn) was cut


def fit_edit_prompt(
    encode_prompt: Callable[[str, str, str], list[int]],
    tokenizer: Any,
    request: EditRequest,
    limit: int,
) -> EditPrompt:
    """The edit prompt within `limit` tokens, shortened where it can lose least.

    `encode_prompt(question, answer, critique)` gives the whole prompt's token ids (system
    turn, the template, chat markup). Over the limit, the longest of the three is cut first
    (`cpe_ray.chat.fit_prompt`): the answer and the critique lose their end (marked with
    TRUNCATION_MARK), the question its middle, as the answer prompt shortens it. The system
    turn with the persona stays, so the rewrite and its log pi_e are conditioned on the user;
    only a prompt too long without the three texts has its start cut, as a last resort.
    """
    parts = [Cuttable(request.question, QUESTION_CUT_MARK, middle=True),
             Cuttable(request.answer, TRUNCATION_MARK), Cuttable(request.critique, TRUNCATION_MARK)]
    fitted = fit_prompt(tokenizer, lambda texts: encode_prompt(*texts), parts, limit)
    return EditPrompt(fitted.token_ids, shortened=fitted.shortened or fitted.cut_left,
                      cut_left=fitted.cut_left)
