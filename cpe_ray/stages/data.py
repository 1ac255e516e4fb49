"""Token data for the supervised stages: conversations with assistant-only labels, BT pairs.

SFT and GRM distillation train on conversations: the ids come from the tokenizer's chat
template (the one the policy and the GRM are prompted with) and the labels mark exactly the
assistant turns, each through its end-of-turn token (the EOS that stops generation; the
template's whitespace after it is never generated, so it is not learnt). Assistant spans are
found by rendering the conversation up to each assistant turn; a template that renders a
prefix differently inside the whole conversation, or a tokenizer that merges tokens across a
turn boundary, is a one-line `DataError`, never silently wrong labels.

The Bradley-Terry reward model trains on pairs tokenized through
`cpe_ray.evaluation.scorers.reward_model_text`, the text `BTScorer` scores.

Held-out splits are a pure function of each record's key and the seed, so they are the same
on every run and rank and survive appending records.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from cpe_ray.chat import Message, render_chat_template
from cpe_ray.errors import DataError
from cpe_ray.learners.supervised import PairTokens, SFTTokens
from cpe_ray.prompts import PromptTemplate


def _encode(tokenizer: Any, text: str) -> list[int]:
    # The chat template writes any special tokens itself.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prefix_length(tokenizer: Any, prefix: str, full: str, full_ids: Sequence[int],
                   where: str) -> int:
    """How many of `full_ids` are the tokens of `prefix`, checking that they are."""
    if not full.startswith(prefix):
        raise DataError(f"{where}: the chat template renders the conversation up to this turn "
                        "differently from the same turn inside the whole conversation, so "
                        "assistant tokens cannot be located; use a prefix-consistent template "
                        "(ChatML / Qwen2.5 are)")
    ids = _encode(tokenizer, prefix)
    if list(full_ids[: len(ids)]) != ids:
        raise DataError(f"{where}: the tokenizer merges tokens across a turn boundary of the "
                        "chat template, so assistant tokens cannot be located; end turns with "
                        "a special token (as ChatML's <|im_end|> does)")
    return len(ids)


def _trim_after_eos(span: list[int], eos: int | None) -> list[int]:
    """The span through its last EOS (the end-of-turn token generation stops at)."""
    if eos is None or eos not in span:
        return span
    return span[: len(span) - span[::-1].index(eos)]


def tokenize_conversation(tokenizer: Any, messages: Sequence[Message | Mapping[str, str]],
                          max_length: int, where: str = "conversation") -> SFTTokens | None:
    """Ids of the whole templated conversation with its assistant tokens labelled.

    Sequences longer than `max_length` lose their end; None if nothing labelled is left.
    """
    msgs = [m if isinstance(m, Message) else Message(m["role"], m["content"]) for m in messages]
    full = render_chat_template(tokenizer, msgs, add_generation_prompt=False)
    ids = _encode(tokenizer, full)
    labels = [0] * len(ids)
    eos = tokenizer.eos_token_id
    for i, message in enumerate(msgs):
        if message.role != "assistant":
            continue
        turn = f"{where}, messages[{i}]"
        before = render_chat_template(tokenizer, msgs[:i], add_generation_prompt=True) if i else ""
        through = render_chat_template(tokenizer, msgs[: i + 1], add_generation_prompt=False)
        start = _prefix_length(tokenizer, before, full, ids, turn)
        end = _prefix_length(tokenizer, through, full, ids, turn)
        kept = _trim_after_eos(ids[start:end], eos)
        for pos in range(start, start + len(kept)):
            labels[pos] = 1
    example = SFTTokens(tuple(ids[:max_length]), tuple(labels[:max_length]))
    return example if example.num_targets else None


def tokenize_pair(tokenizer: Any, template: PromptTemplate, persona: str, question: str,
                  chosen: str, rejected: str, max_length: int) -> PairTokens:
    """Both answers as `BTScorer` reads them; longer chats keep their end, as it does."""
    from cpe_ray.judges.bt import reward_model_text

    def ids(answer: str) -> tuple[int, ...]:
        text = reward_model_text(tokenizer, template, persona, question, answer)
        return tuple(_encode(tokenizer, text)[-max_length:])

    return PairTokens(ids(chosen), ids(rejected))


def heldout_split(keys: Sequence[str], fraction: float, seed: int
                  ) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices), both ascending.

    round(fraction x n) records are held out, at least 1 and at most n - 1 when fraction > 0
    and n >= 2: those whose seeded hash of their key is smallest.
    """
    n = len(keys)
    if fraction <= 0 or n < 2:
        return list(range(n)), []
    k = min(n - 1, max(1, round(fraction * n)))

    def rank(i: int) -> tuple[str, int]:
        return hashlib.sha256(f"{seed}:{keys[i]}".encode()).hexdigest(), i

    held = sorted(sorted(range(n), key=rank)[:k])
    chosen = set(held)
    return [i for i in range(n) if i not in chosen], held
