"""Policy prompts: persona rendering, the system template, and the tokenizer's chat template.

One job: turn (persona, question) into the messages and token ids the policy sees. The
same functions build the training prompts, the SFT system turns and the evaluation prompts,
so the policy always sees one prompt format.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cpe_ray.errors import DataError
from cpe_ray.prompts import PromptTemplate, load_template

POLICY_SYSTEM_TEMPLATE = "policy_system_en.txt"
# Stands where a question over rollout.max_prompt_length lost its middle.
QUESTION_CUT_MARK = " [...] "
# Re-tokenising cut text can move a token boundary, and the mark costs tokens: a shortened
# prompt is re-measured and the cut deepened by the overshoot, at most this many times.
FIT_ROUNDS = 4


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        """The {"role", "content"} form chat templates and engines take."""
        return {"role": self.role, "content": self.content}


def _inline(value: Any) -> str:
    """A value on one line: lists joined with ', ', objects as 'k: v; k: v', '' if empty."""
    if isinstance(value, Mapping):
        return "; ".join(f"{k}: {s}" for k, v in value.items() if (s := _inline(v)))
    if isinstance(value, (list, tuple)):
        return ", ".join(s for v in value if (s := _inline(v)))
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "" if value is None else " ".join(str(value).split())


def _render_block(obj: Mapping[str, Any], indent: str) -> list[str]:
    lines: list[str] = []
    for key, value in obj.items():
        if isinstance(value, Mapping):
            if inner := _render_block(value, indent + "  "):
                lines += [f"{indent}{key}:", *inner]
        elif text := _inline(value):
            lines.append(f"{indent}{key}: {text}")
    return lines


def render_persona(persona: str | Mapping[str, Any]) -> str:
    """Persona text for prompts: a string is stripped; an object becomes 'Key: value' lines.

    Fields keep the object's order; lists are joined with ', '; nested objects are indented
    by two spaces under a 'Key:' line; empty values (null, "", [], {}) are skipped.
    """
    if isinstance(persona, str):
        return persona.strip()
    if isinstance(persona, Mapping):
        return "\n".join(_render_block(persona, ""))
    raise DataError(f"a persona must be a string or an object, got {type(persona).__name__}")


def load_policy_system_template(name: str = POLICY_SYSTEM_TEMPLATE) -> PromptTemplate:
    """The policy's system prompt template; it must use {persona} and nothing else."""
    return load_template(name, allowed={"persona"}, required={"persona"})


def system_prompt(template: PromptTemplate, persona: str) -> str:
    # The template file's trailing newline is not part of the prompt.
    return template.render(persona=persona).rstrip()


def build_policy_messages(
    persona: str | Mapping[str, Any],
    question: str,
    system_template: PromptTemplate | None = None,
) -> list[dict[str, str]]:
    """[system (template with the rendered persona), user (question)] for the policy."""
    template = system_template or load_policy_system_template()
    return [
        {"role": "system", "content": system_prompt(template, render_persona(persona))},
        {"role": "user", "content": question},
    ]


def render_chat_template(
    tokenizer: Any,
    messages: Sequence[Mapping[str, str] | Message],
    add_generation_prompt: bool = True,
) -> str:
    """The prompt text the tokenizer's chat template makes of `messages`."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(f"tokenizer '{name}' has no chat template; use a chat/instruct model's "
                        "tokenizer or set tokenizer.chat_template (e.g. a ChatML template)")
    dicts = [m.as_dict() if isinstance(m, Message) else dict(m) for m in messages]
    try:
        return str(tokenizer.apply_chat_template(
            dicts, tokenize=False, add_generation_prompt=add_generation_prompt))
    except Exception as e:  # template errors, e.g. "system role not supported"
        raise DataError(f"the tokenizer's chat template failed on these messages: {e}") from e


def apply_chat_template(
    tokenizer: Any,
    messages: Sequence[Mapping[str, str] | Message],
    add_generation_prompt: bool = True,
) -> list[int]:
    """Token ids of the chat-templated prompt (the template adds any special tokens itself)."""
    text = render_chat_template(tokenizer, messages, add_generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class FittedPrompt:
    token_ids: list[int]
    shortened: bool  # the question lost its middle; the system turn and persona are whole
    cut_left: bool  # too long even so: the prompt's start was cut (the persona with it)


def fit_policy_prompt(tokenizer: Any, persona: str | Mapping[str, Any], question: str,
                      limit: int, system_template: PromptTemplate | None = None
                      ) -> FittedPrompt:
    """The policy's prompt within `limit` tokens. Over it, the question keeps its start and its
    end (where a request usually sits) and loses its middle, marked by QUESTION_CUT_MARK: the
    system turn and the persona stay whole. Only a prompt too long without its question has
    its start cut, as a last resort."""

    def encode(text: str) -> list[int]:
        return apply_chat_template(tokenizer,
                                   build_policy_messages(persona, text, system_template))

    ids = encode(question)
    if len(ids) <= limit:
        return FittedPrompt(ids, shortened=False, cut_left=False)
    q_ids = tokenizer.encode(question, add_special_tokens=False)
    budget = len(q_ids) - (len(ids) - limit)
    for _ in range(FIT_ROUNDS):
        if budget <= 0:
            break
        head, tail = q_ids[: (budget + 1) // 2], q_ids[len(q_ids) - budget // 2:]
        text = (tokenizer.decode(head) + QUESTION_CUT_MARK
                + (tokenizer.decode(tail) if budget // 2 else "")).strip()
        fitted = encode(text)
        if len(fitted) <= limit:
            return FittedPrompt(fitted, shortened=True, cut_left=False)
        budget -= len(fitted) - limit
    return FittedPrompt(ids[-limit:], shortened=False, cut_left=True)
