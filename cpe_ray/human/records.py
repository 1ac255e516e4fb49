"""The records of human judging: tasks (`<out>/tasks.jsonl`) and judgements
(`<out>/judgements.jsonl`), one JSON object per line, as docs/human.md describes.

`from_json(obj, where)` checks every field and raises `DataError` naming `where` (file:line)
and the field, so a hand-edited or truncated file is one clear line, not a KeyError.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cpe_ray.errors import DataError

KINDS = ("pair", "single")
SOURCES = ("winrate", "samples")
LABELS = ("model", "baseline", "original", "rewrite", "answer")
TIE = "tie"
OVERALL = "overall"
HIDDEN_KEYS = ("critique", "grm_scores", "grm_reward", "judge_preference", "lc_preference")


def _fail(where: str, message: str) -> DataError:
    return DataError(f"{where}: {message}")


def _obj(value: Any, where: str, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(where, f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _str(obj: Mapping[str, Any], key: str, where: str, *, empty: bool = True) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or (not empty and not value.strip()):
        raise _fail(where, f"'{key}' must be a {'' if empty else 'non-empty '}string, "
                           f"got {value!r:.60}")
    return value


def _number(value: Any, where: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(where, f"{what} must be a finite number, got {value!r:.60}")
    return float(value)


def _choice(value: Any, choices: tuple[str, ...], where: str, what: str) -> str:
    if value not in choices:
        raise _fail(where, f"{what} is {value!r:.60}; expected one of {', '.join(choices)}")
    return value


@dataclass(frozen=True)
class Answer:
    """One answer shown to the rater; `label` says what it is (never shown before judging)."""

    label: str
    text: str

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "text": self.text}

    @classmethod
    def from_json(cls, obj: Any, where: str) -> Answer:
        o = _obj(obj, where, "an answer")
        return cls(_choice(o.get("label"), LABELS, where, "answer 'label'"),
                   _str(o, "text", where))


@dataclass(frozen=True)
class HumanTask:
    """One item to judge: a pair (model vs baseline, original vs rewrite) or a single answer,
    with what the machine judges said about it in `hidden` (shown only after judging)."""

    task_id: str
    kind: str  # "pair" | "single"
    source: str  # "winrate" | "samples"
    source_id: str  # the eval prompt's id, or "<step>:<prompt_id>:<k>" in samples.jsonl
    persona: Any  # a string or an object, as in the data
    question: str
    answers: tuple[Answer, ...]
    hidden: dict[str, Any] = field(default_factory=lambda: dict.fromkeys(HIDDEN_KEYS))

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(a.label for a in self.answers)

    def to_json(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "kind": self.kind, "source": self.source,
                "source_id": self.source_id, "persona": self.persona,
                "question": self.question, "answers": [a.to_json() for a in self.answers],
                "hidden": {k: self.hidden.get(k) for k in HIDDEN_KEYS}}

    @classmethod
    def from_json(cls, obj: Any, where: str) -> HumanTask:
        o = _obj(obj, where, "a task")
        kind = _choice(o.get("kind"), KINDS, where, "'kind'")
        if not isinstance(o.get("answers"), list):
            raise _fail(where, "'answers' must be a list of {label, text} objects")
        answers = tuple(Answer.from_json(a, where) for a in o["answers"])
        want = 2 if kind == "pair" else 1
        if len(answers) != want:
            raise _fail(where, f"a {kind} task needs {want} answer(s), got {len(answers)}")
        if len({a.label for a in answers}) != len(answers):
            raise _fail(where, "the answers' labels must differ")
        persona = o.get("persona")
        if not isinstance(persona, str | dict | list):
            raise _fail(where, "'persona' must be a string or a JSON object")
        hidden = _obj(o.get("hidden", {}), where, "'hidden'")
        unknown = set(hidden) - set(HIDDEN_KEYS)
        if unknown:
            raise _fail(where, f"'hidden' has unknown keys {sorted(unknown)}; known: "
                               f"{', '.join(HIDDEN_KEYS)}")
        for key in ("judge_preference", "lc_preference"):
            if hidden.get(key) is not None:
                p = _number(hidden[key], where, f"hidden.{key}")
                if not 0.0 <= p <= 1.0:
                    raise _fail(where, f"hidden.{key} is {p}; a probability is in [0, 1]")
        return cls(_str(o, "task_id", where, empty=False),
                   kind, _choice(o.get("source"), SOURCES, where, "'source'"),
                   _str(o, "source_id", where), persona, _str(o, "question", where), answers,
                   {k: hidden.get(k) for k in HIDDEN_KEYS})


@dataclass(frozen=True)
class Judgement:
    """One rater's judgement of one task. `preference` names labels, not sides; `shown_order`
    says which label was on the left. A later judgement of the same task by the same rater
    replaces this one in analysis (the file is append-only)."""

    task_id: str
    rater: str
    submitted_at: float
    shown_order: tuple[str, ...]
    scores: dict[str, dict[str, int]]  # label -> dimension -> integer on the GRM scale
    preference: dict[str, str]  # dimension or "overall" -> a label or "tie" (pair tasks)
    critique: str = ""
    edit: Answer | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "rater": self.rater,
                "submitted_at": self.submitted_at, "shown_order": list(self.shown_order),
                "scores": self.scores, "preference": self.preference,
                "critique": self.critique,
                "edit": self.edit.to_json() if self.edit is not None else None,
                "seconds": self.seconds}

    def to_line(self) -> str:
        return json.dumps(self.to_json(), ensure_ascii=False)

    @classmethod
    def from_json(cls, obj: Any, where: str) -> Judgement:
        o = _obj(obj, where, "a judgement")
        order = o.get("shown_order")
        if not isinstance(order, list) or not order or not all(isinstance(x, str)
                                                                for x in order):
            raise _fail(where, "'shown_order' must be a non-empty list of answer labels")
        if len(set(order)) != len(order):
            raise _fail(where, f"'shown_order' {order} names a label twice")
        scores = _obj(o.get("scores", {}), where, "'scores'")
        clean: dict[str, dict[str, int]] = {}
        for label, dims in scores.items():
            if label not in order:
                raise _fail(where, f"scores name label '{label}', not among the shown "
                                   f"{order}")
            for dim, value in _obj(dims, where, f"scores.{label}").items():
                if isinstance(value, bool) or not isinstance(value, int):
                    raise _fail(where, f"scores.{label}.{dim} must be an integer, got "
                                       f"{value!r:.60}")
            clean[label] = dict(dims)
        preference = _obj(o.get("preference", {}), where, "'preference'")
        for dim, value in preference.items():
            _choice(value, (*order, TIE), where, f"preference.{dim}")
        edit = Answer.from_json(o["edit"], where) if o.get("edit") is not None else None
        if edit is not None and edit.label not in order:
            raise _fail(where, f"edit.label '{edit.label}' is not among the shown {order}")
        critique = o.get("critique", "")
        if not isinstance(critique, str):
            raise _fail(where, "'critique' must be a string")
        seconds = _number(o.get("seconds", 0.0), where, "'seconds'")
        if seconds < 0:
            raise _fail(where, f"'seconds' is {seconds}; it cannot be negative")
        return cls(_str(o, "task_id", where, empty=False), _str(o, "rater", where, empty=False),
                   _number(o.get("submitted_at"), where, "'submitted_at'"), tuple(order),
                   clean, dict(preference), critique,
                   edit, seconds)


def read_jsonl(path: Any, parse: Any) -> list[Any]:
    """Every record of a JSONL file through `parse(obj, "file:line")`; blank lines skipped."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg})") from None
            out.append(parse(obj, where))
    return out


def read_tasks(path: Any) -> list[HumanTask]:
    """`tasks.jsonl`; task ids must be unique."""
    tasks = read_jsonl(path, HumanTask.from_json)
    seen: set[str] = set()
    for t in tasks:
        if t.task_id in seen:
            raise DataError(f"{path}: task_id '{t.task_id}' occurs twice; ids must be unique")
        seen.add(t.task_id)
    return tasks


def read_judgements(path: Any) -> list[Judgement]:
    """`judgements.jsonl`, every line (analysis keeps the last per rater and task)."""
    return read_jsonl(path, Judgement.from_json)
