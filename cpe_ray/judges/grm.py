"""The Personalized Generative Reward Model's text side: rubric prompt, output parser, reward.

The GRM answers in tagged text (method.md section 2)::

    <critique> ... </critique>
    <scores>
    Helpfulness: N
    Personalization: N
    Naturalness: N
    </scores>

The paper release's GRM writes the same block with its own labels and a unit:
`Helpfulness: 3分` / `Personalization: 2分` / `Natural: 2分`. Each dimension is found under
its own name or one of its label aliases (`grm.label_aliases`: `Natural`, the Chinese
names), so release output parses under the default config; `Judgement.labels` says which
label matched (`cpe-ray grm-parse` prints it).

`parse_judgement` turns any string into a `Judgement` and never raises: real model output
has stray whitespace, odd case, full-width colons and digits, markdown bold, units after
the number ("4分", "4/5"), text around the tags and missing closing tags. A dimension that
cannot be found is `None` (not 0: the caller decides, through `weighted_reward`'s
`on_missing`, whether missing counts as 0 as in the paper's release). Out-of-range scores
are clamped and the clamp is recorded in `Judgement.warnings`.

Prompt templates take persona, question and answer; a template written for other code's
placeholder names (the release's `{persona_str}`, `{question_str}`, `{solution_str}`) is
renamed on load through `grm.template_placeholders`. The critique and the score call may
use different templates (`grm.critique_template`), as the release's do.
"""

from __future__ import annotations

import json
import logging
import math
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from cpe_ray.config import GRMConfig
from cpe_ray.config.choices import (
    DEFAULT_DIMENSIONS,
    DEFAULT_LABEL_ALIASES,
    DEFAULT_WEIGHTS,
    GRM_TEMPLATE_FIELDS,
    ON_MISSING_CHOICES,
    PERSONA_FORMATS,
    RELEASE_TEMPLATE_PLACEHOLDERS,
)
from cpe_ray.errors import TemplateError
from cpe_ray.prompts import PromptTemplate, load_template

log = logging.getLogger(__name__)

DEFAULT_SCORE_RANGE: tuple[float, float] = (-5.0, 5.0)
# Other labels a GRM may write for a dimension (the release's `Natural`, the Chinese names).
DEFAULT_ALIASES: Mapping[str, Sequence[str]] = DEFAULT_LABEL_ALIASES
GRM_PLACEHOLDERS = frozenset(GRM_TEMPLATE_FIELDS)
# A backslash and an "n" in a template file: a Python string's escape copied from source
# code by hand, which the model would see as two characters instead of a line break.
ESCAPED_NEWLINE = "\\n"

OnMissing = Literal["zero", "renormalize", "none"]

_TAG = r"[<＜]\s*{slash}\s*{name}\s*[>＞]"
# Dashes that models write as a minus sign and NFKC leaves alone.
_MINUS_SIGNS = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2014": "-"})


@dataclass(frozen=True)
class Judgement:
    """One GRM verdict on one answer."""

    scores: dict[str, float | None]
    critique: str
    raw: str
    parsed: bool
    warnings: tuple[str, ...] = field(default_factory=tuple)
    # the label each found dimension was written under ("Natural", "自然度", ...)
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def missing(self) -> tuple[str, ...]:
        return tuple(d for d, s in self.scores.items() if s is None)


def _tag(name: str, closing: bool) -> re.Pattern[str]:
    return re.compile(_TAG.format(slash="/" if closing else "", name=name), re.IGNORECASE)


_CRITIQUE_OPEN, _CRITIQUE_CLOSE = _tag("critique", False), _tag("critique", True)
_SCORES_OPEN, _SCORES_CLOSE = _tag("scores", False), _tag("scores", True)


def _block(text: str, opening: re.Pattern[str], closing: re.Pattern[str],
           stop: re.Pattern[str] | None) -> tuple[str, tuple[int, int]] | None:
    """Text between a tag and its closing tag; an unclosed tag runs to `stop` or the end."""
    start = opening.search(text)
    if start is None:
        return None
    end = closing.search(text, start.end())
    if end is not None:
        return text[start.end():end.start()], (start.start(), end.end())
    stop_match = stop.search(text, start.end()) if stop is not None else None
    stop_at = stop_match.start() if stop_match is not None else len(text)
    return text[start.end():stop_at], (start.start(), stop_at)


def _dimension_pattern(names: Sequence[str]) -> re.Pattern[str]:
    """A dimension's score line: one of its names (a second one may follow, as in
    "Helpfulness 帮助性: 3"), an optional parenthetical, ':' or '=', then the number."""
    alternatives = []
    # longest first, so that "Naturalness" is not read as "Natural" plus junk
    for name in sorted(names, key=len, reverse=True):
        words = re.split(r"[\s_\-]+", name.strip())
        alternatives.append(r"[\s_\-]*".join(re.escape(w) for w in words if w))
    either = "(?:" + "|".join(alternatives) + ")"
    return re.compile(
        r"(?<![A-Za-z0-9_])(?P<label>" + either + r"(?:[ \t]*" + either + r")?)"
        # a sign may stand one space or tab from its digits ("- 3"), never a line away
        r"[\s*_`]*(?:\([^)\n]*\))?[\s*_`]*[:=][\s*_`]*(?P<score>[+-]?[ \t]?\d+(?:\.\d+)?)",
        re.IGNORECASE,
    )


def parse_judgement(
    text: str,
    dimensions: Sequence[str] = DEFAULT_DIMENSIONS,
    score_range: tuple[float, float] = DEFAULT_SCORE_RANGE,
    aliases: Mapping[str, Sequence[str]] = DEFAULT_ALIASES,
) -> Judgement:
    """Parse GRM output into a `Judgement`; never raises on any string."""
    warnings: list[str] = []
    if not isinstance(text, str):
        warnings.append(f"output is {type(text).__name__}, not text")
        text = ""
    raw = text

    critique_block = _block(raw, _CRITIQUE_OPEN, _CRITIQUE_CLOSE, _SCORES_OPEN)
    if critique_block is None:
        critique, critique_span = "", None
        warnings.append("no <critique> tag")
    else:
        critique, critique_span = critique_block[0].strip(), critique_block[1]
        if _CRITIQUE_CLOSE.search(raw, critique_span[0]) is None:
            warnings.append("unclosed <critique> tag")

    scores_block = _block(raw, _SCORES_OPEN, _SCORES_CLOSE, None)
    if scores_block is not None:
        region = scores_block[0]
    else:
        warnings.append("no <scores> tag")
        # Without a scores block, a score mentioned inside the critique must not count.
        region = raw if critique_span is None else raw[:critique_span[0]] + raw[critique_span[1]:]
    region = unicodedata.normalize("NFKC", region).translate(_MINUS_SIGNS)

    low, high = score_range
    scores: dict[str, float | None] = {}
    labels: dict[str, str] = {}
    for dim in dimensions:
        match = _dimension_pattern([dim, *aliases.get(dim.lower(), ())]).search(region)
        if match is None:
            scores[dim] = None
            continue
        labels[dim] = match.group("label")
        value = float("".join(match.group("score").split()))
        if value < low or value > high:
            clamped = min(max(value, low), high)
            warnings.append(f"{dim} {value:g} out of [{low:g}, {high:g}], clamped to {clamped:g}")
            value = clamped
        scores[dim] = value
    missing = [d for d, s in scores.items() if s is None]
    if missing:
        warnings.append(f"missing dimension(s): {', '.join(missing)}")
    return Judgement(scores=scores, critique=critique, raw=raw, parsed=not missing,
                     warnings=tuple(warnings), labels=labels)


def weighted_reward(
    judgement: Judgement,
    weights: Mapping[str, float] = DEFAULT_WEIGHTS,
    on_missing: OnMissing = "zero",
) -> float | None:
    """Scalar reward: sum of weight x score over the weighted dimensions.

    on_missing: "zero" counts a missing dimension as 0 (the paper's release, where an answer
    that never parses scores 0); "renormalize" spreads the missing dimensions' weight over
    the present ones (None if none is present); "none" returns None if any is missing.
    """
    if not weights:
        raise ValueError("weighted_reward: weights are empty; give at least one dimension")
    if on_missing not in ON_MISSING_CHOICES:
        raise ValueError(
            f"weighted_reward: on_missing={on_missing!r}; use one of {ON_MISSING_CHOICES}")
    present = {d: judgement.scores.get(d) for d in weights}
    if on_missing == "zero":
        return float(sum(w * (present[d] or 0.0) for d, w in weights.items()))
    if on_missing == "none" and any(s is None for s in present.values()):
        return None
    have = {d: s for d, s in present.items() if s is not None}
    have_weight = sum(weights[d] for d in have)
    if not have or math.isclose(have_weight, 0.0):
        return None
    scale = sum(weights.values()) / have_weight
    return float(sum(weights[d] * s * scale for d, s in have.items()))


def load_grm_template(
    name_or_path: str,
    placeholders: Mapping[str, str] = RELEASE_TEMPLATE_PLACEHOLDERS,
) -> PromptTemplate:
    """The rubric template, which must take the persona, the question and the answer.

    It may name them ours (`{persona}`, `{question}`, `{answer}`) or by the names in
    `placeholders` (`grm.template_placeholders`, by default the release's `{persona_str}`,
    `{question_str}`, `{solution_str}`); those are renamed to ours here, so a GRM distilled
    on the release's prompt is queried with exactly that prompt.
    """
    allowed = GRM_PLACEHOLDERS | set(placeholders)
    template = load_template(name_or_path, allowed=allowed)
    given = {placeholders.get(name, name) for name in template.placeholders}
    missing = GRM_PLACEHOLDERS - given
    if missing:
        mapped = ", ".join(f"{{{k}}}->{{{v}}}" for k, v in placeholders.items())
        raise TemplateError(
            f"template {template.source} lacks required placeholder(s) "
            f"{', '.join('{' + m + '}' for m in sorted(missing))}; add them to the template "
            f"(names mapped by grm.template_placeholders: {mapped or 'none'})")
    if ESCAPED_NEWLINE in template.text:
        log.warning("%s:%d: holds a backslash-n, which the GRM reads as two characters; if it "
                    "was copied out of Python source, write real line breaks instead",
                    template.source, template.line_of(ESCAPED_NEWLINE))
    return template.renamed(placeholders)


def load_grm_templates(cfg: GRMConfig) -> dict[str, PromptTemplate]:
    """The template of each judge mode: `grm.template` scores, `grm.critique_template`
    (default: the same) critiques; the release prompts its two calls differently."""
    score = load_grm_template(cfg.template, cfg.template_placeholders)
    critique = score if cfg.critique_template is None else load_grm_template(
        cfg.critique_template, cfg.template_placeholders)
    return {"critique": critique, "score": score}


def attempt_temperature(temperature: float, attempt: int, retry_temperature: float) -> float:
    """The sampling temperature of a judgement's `attempt`-th generation (0: the first).

    A retry regenerates an output that did not parse; from a greedy call (temperature 0)
    it would write the same text again, so retries of a greedy call sample at
    `retry_temperature` (`grm.retry_temperature`); a sampled call keeps its temperature.
    """
    if attempt == 0 or temperature > 0:
        return temperature
    return retry_temperature


def format_persona(persona: str, persona_format: str) -> str:
    """The persona as a GRM prompt writes it: as given (text), or, for a persona that is a
    JSON object, Python's str() of the dict (python_dict: the release's critique call formats
    the dict it parsed out of the policy's prompt, single quotes and all)."""
    if persona_format not in PERSONA_FORMATS:
        raise ValueError(f"persona format {persona_format!r} is not one of {PERSONA_FORMATS}")
    if persona_format == "text":
        return persona
    try:
        parsed = json.loads(persona)
    except json.JSONDecodeError:
        return persona  # free text has no dict to write
    return str(parsed) if isinstance(parsed, dict) else persona


def mode_persona_format(cfg: GRMConfig, mode: str) -> str:
    """The persona format of a judge mode's prompt: grm.critique_persona_format for the
    critique call, text for the score call (the release's score call sends the persona as
    its data holds it)."""
    return cfg.critique_persona_format if mode == "critique" else "text"


def build_grm_messages(template: PromptTemplate, persona: str, question: str,
                       answer: str, persona_format: str = "text") -> list[dict[str, str]]:
    """The GRM sees one user turn holding the rubric, persona, question and answer."""
    return [{"role": "user", "content": template.render(
        persona=format_persona(persona, persona_format), question=question, answer=answer)}]


@dataclass(frozen=True)
class JudgeOutcome:
    """A judgement with how many generations it took.

    `reward` is set by scalar judges (a Bradley-Terry reward model), whose number is the
    reward itself; None means the reward is `weighted_reward` of the judgement's scores.
    """

    judgement: Judgement
    attempts: int
    reward: float | None = None


def judge_with_retries(
    generate: Callable[[list[int]], list[str]],
    count: int,
    max_retries: int,
    dimensions: Sequence[str] = DEFAULT_DIMENSIONS,
    score_range: tuple[float, float] = DEFAULT_SCORE_RANGE,
    require_critique: bool = False,
    aliases: Mapping[str, Sequence[str]] = DEFAULT_ALIASES,
) -> list[JudgeOutcome]:
    """Judge `count` items, regenerating only the unparsed ones up to `max_retries` times.

    `generate(indices)` returns one GRM output per index (a batch call to an engine or an
    endpoint). An item counts as done when all dimensions parsed and, if
    `require_critique`, its critique is non-empty. Items still unparsed after the retries
    keep their last judgement (with parsed=False); the reward then follows `on_missing`.
    `JudgeOutcome.attempts - 1` is the item's retries (the trainer logs their sum).
    """
    if max_retries < 0:
        raise ValueError(f"max_retries={max_retries}; use 0 or more")
    results: list[JudgeOutcome | None] = [None] * count
    pending = list(range(count))
    for attempt in range(1, max_retries + 2):
        if not pending:
            break
        outputs = generate(pending)
        if len(outputs) != len(pending):
            raise ValueError(f"generate returned {len(outputs)} outputs for {len(pending)} prompts")
        still = []
        for idx, out in zip(pending, outputs, strict=True):
            judgement = parse_judgement(out, dimensions, score_range, aliases)
            results[idx] = JudgeOutcome(judgement, attempt)
            if not judgement.parsed or (require_critique and not judgement.critique):
                still.append(idx)
        pending = still
    return [r for r in results if r is not None]
