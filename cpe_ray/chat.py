"""Policy prompts: persona rendering, the system template, and the tokenizer's chat template.

One job: turn (persona, question) into the messages and token ids the policy sees. The
same functions build the training prompts, the SFT system turns and the evaluation prompts,
so the policy always sees one prompt format.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cpe_ray.errors import DataError
from cpe_ray.prompts import PromptTemplate, load_template

POLICY_SYSTEM_TEMPLATE = "policy_system_en.txt"
# Stands where a question over rollout.max_prompt_length lost its middle.
QUESTION_CUT_MARK = " [...] "
# What decoding a token cut inside a multi-byte character leaves at the cut.
_REPLACEMENT = "\ufffd"


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
    shortened: bool  # part of its texts was cut; the system turn and persona are whole
    cut_left: bool  # too long even so: the prompt's start was cut (the persona with it)


@dataclass(frozen=True)
class Cuttable:
    """A text a prompt may shorten to fit its limit. A `middle` text (a question) keeps its
    start and its end; the others (an answer, a critique) keep their start. `mark` stands
    where text went, so the policy sees that it was cut."""

    text: str
    mark: str
    middle: bool = False


def _head(tokenizer: Any, ids: list[int], keep: int) -> str:
    """The first `keep` tokens' text, fewer where the cut falls inside a character."""
    while keep > 0:
        text = tokenizer.decode(ids[:keep])
        if not text.endswith(_REPLACEMENT):
            return text
        keep -= 1
    return ""


def _tail(tokenizer: Any, ids: list[int], keep: int) -> str:
    """The last `keep` tokens' text, fewer where the cut falls inside a character."""
    while keep > 0:
        text = tokenizer.decode(ids[len(ids) - keep:])
        if not text.startswith(_REPLACEMENT):
            return text
        keep -= 1
    return ""


def _cut(tokenizer: Any, part: Cuttable, ids: list[int], keep: int) -> str:
    if keep >= len(ids):
        return part.text
    if not part.middle:
        return _head(tokenizer, ids, keep) + part.mark
    head, tail = _head(tokenizer, ids, (keep + 1) // 2), _tail(tokenizer, ids, keep // 2)
    return (head + part.mark + tail).strip()


def _water_level(lengths: list[int], budget: int) -> int:
    """The largest level L with sum(min(n, L)) <= budget: the longest texts are cut first,
    down to the next one's length, then together."""
    level, rest, ordered = 0, max(budget, 0), sorted(lengths)
    for i, n in enumerate(ordered):
        longer = len(ordered) - i
        if (n - level) * longer > rest:
            return level + rest // longer
        rest -= (n - level) * longer
        level = n
    return level


def _largest_fitting(fits: Callable[[int], bool], guess: int, top: int) -> int | None:
    """The largest level below `top` (which does not fit) that fits; None if not even 0.

    Steps from `guess` by doubling strides, then bisects: it ends after O(log top) trials
    whatever re-tokenising does to the lengths, so a one-token overshoot costs a token, not
    the prompt's start."""
    lo, hi = -1, top  # fits(lo) (-1: none known yet), not fits(hi)
    guess, step = min(max(guess, 0), top - 1), 1
    if fits(guess):
        lo = guess
        while lo + step < hi and fits(lo + step):
            lo, step = lo + step, 2 * step
        hi = min(hi, lo + step)
    else:
        hi = guess
        while hi - step >= 0 and not fits(hi - step):
            hi, step = hi - step, 2 * step
        lo = max(hi - step, -1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo if lo >= 0 else None


def fit_prompt(tokenizer: Any, encode: Callable[[list[str]], list[int]],
               parts: Sequence[Cuttable], limit: int) -> FittedPrompt:
    """`encode(texts)` within `limit` tokens, its `parts` shortened where it is over.

    Every part keeps at most L of its tokens, L the largest level that fits (the longest part
    is cut first), cut on character boundaries and marked. Only a prompt too long with every
    part cut away has its start cut, as a last resort (the whole prompt's end is kept)."""
    ids = encode([p.text for p in parts])
    if len(ids) <= limit:
        return FittedPrompt(ids, shortened=False, cut_left=False)
    tokens = [tokenizer.encode(p.text, add_special_tokens=False) for p in parts]
    lengths = [len(t) for t in tokens]
    renders: dict[int, list[int]] = {}

    def fits(level: int) -> bool:
        if level not in renders:
            renders[level] = encode([_cut(tokenizer, p, t, min(len(t), level))
                                     for p, t in zip(parts, tokens, strict=True)])
        return len(renders[level]) <= limit

    guess, top = _water_level(lengths, sum(lengths) - (len(ids) - limit)), max(lengths, default=0)
    level = _largest_fitting(fits, guess, top) if top else None
    if level is None:
        return FittedPrompt(ids[-limit:], shortened=False, cut_left=True)
    return FittedPrompt(renders[level], shortened=True, cut_left=False)


def fit_policy_prompt(tokenizer: Any, persona: str | Mapping[str, Any], question: str,
                      limit: int, system_template: PromptTemplate | None = None
                      ) -> FittedPrompt:
    """The policy's prompt within `limit` tokens. Over it, the question keeps its start and its
    end (where a request usually sits) and loses its middle, marked by QUESTION_CUT_MARK: the
    system turn and the persona stay whole (`fit_prompt`)."""

    def encode(texts: list[str]) -> list[int]:
        return apply_chat_template(tokenizer,
                                   build_policy_messages(persona, texts[0], system_template))

    return fit_prompt(tokenizer, encode, [Cuttable(question, QUESTION_CUT_MARK, middle=True)],
                      limit)
