"""Critique-Post-Edit text and selection: the edit prompt and which rewrites join the batch.

method.md section 3: the policy rewrites each answer from a user turn holding the
question, its answer and the GRM's critique; a selection strategy then decides which
rewrites join the PPO batch (all originals always stay).

Counting rules (the paper states ratios, not rounding): batch-level strategies keep
floor(ratio x N) of the N rewrites; `reward` keeps ceil(ratio x n_q) per question, as
method.md states. Every strategy is deterministic for a seed; ranking strategies break
ties by a seeded random order rather than by position, so no prompt is favoured for
coming first in the batch.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from cpe_ray.config.choices import STRATEGIES
from cpe_ray.prompts import PromptTemplate, load_template

Strategy = Literal["random", "reward", "batch_reward", "improvement"]
EDIT_PLACEHOLDERS = frozenset({"persona", "question", "answer", "critique"})
EDIT_REQUIRED = frozenset({"question", "answer", "critique"})
# ratio x n in floating point can land a hair off an integer (0.29 x 100 = 28.999...96);
# counts are taken with this slack so the intended integer is kept.
_COUNT_SLACK = 1e-9


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


def needs_rewards(strategy: str) -> bool:
    """Whether the strategy ranks by reward, i.e. rewrites must be scored before selection."""
    _check_strategy(strategy)
    return strategy != "random"


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown selection strategy {strategy!r}; use one of {STRATEGIES}")


def _rewards(rewrites: Sequence[RewriteInfo], strategy: str) -> np.ndarray:
    values = []
    for i, r in enumerate(rewrites):
        value = r.reward
        if strategy == "improvement":
            if r.reward is None or r.original_reward is None:
                value = None
            else:
                value = r.reward - r.original_reward
        if value is None or not math.isfinite(value):
            need = "reward and original_reward" if strategy == "improvement" else "reward"
            raise ValueError(
                f"strategy {strategy!r} needs a finite {need} for every rewrite; rewrite {i} "
                f"(question {r.question_id!r}) has reward={r.reward}, "
                f"original_reward={r.original_reward}"
            )
        values.append(value)
    return np.asarray(values, dtype=np.float64)


def _floor_count(ratio: float, n: int) -> int:
    return math.floor(ratio * n + _COUNT_SLACK)


def _ceil_count(ratio: float, n: int) -> int:
    return math.ceil(ratio * n - _COUNT_SLACK)


def _top_k(scores: np.ndarray, k: int, tiebreak: np.ndarray) -> np.ndarray:
    # lexsort sorts by the last key first: descending score, then the seeded random order.
    order = np.lexsort((tiebreak, -scores))
    return order[:k]


def select_rewrites(
    strategy: Strategy | str,
    rewrites: Sequence[RewriteInfo],
    ratio: float,
    seed: int,
) -> list[int]:
    """Indices (ascending) of the rewrites to keep under `strategy` at `ratio`."""
    _check_strategy(strategy)
    if not 0.0 <= ratio <= 1.0 or math.isnan(ratio):
        raise ValueError(f"selection ratio {ratio} is outside [0, 1]")
    n = len(rewrites)
    if n == 0:
        return []
    rng = np.random.default_rng(seed)
    if strategy == "random":
        k = _floor_count(ratio, n)
        return sorted(int(i) for i in rng.choice(n, size=k, replace=False))

    scores = _rewards(rewrites, strategy)
    tiebreak = rng.permutation(n)
    if strategy in ("batch_reward", "improvement"):
        return sorted(int(i) for i in _top_k(scores, _floor_count(ratio, n), tiebreak))

    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rewrites):
        groups[r.question_id].append(i)
    kept: list[int] = []
    for members in groups.values():
        idx = np.asarray(members)
        k = _ceil_count(ratio, len(members))
        kept.extend(int(i) for i in idx[_top_k(scores[idx], k, tiebreak[idx])])
    return sorted(kept)
