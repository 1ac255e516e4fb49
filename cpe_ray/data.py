"""Load the project's datasets into typed records.

One job: turn JSONL files (persona prompt sets, PersonaFeedback as published, SFT
conversations, pairwise preferences, answers for a teacher to judge) into frozen
dataclasses, reporting every bad line as `file:line: what is wrong`. Personas are rendered
and prompts built by `cpe_ray.chat`.

Conventions shared by every loader:
- `on_bad="error"` raises `DataError("file:line: what is wrong; how to fix")` at the first
  bad line; `on_bad="skip"` drops bad lines and lists them in `LoadResult.problems`
  (`len(problems) == skipped` always).
- Blank lines are ignored. A missing file, or one with no valid records, is a `DataError`.
- Text fields are kept verbatim (only checked to be non-blank); personas are rendered.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import numpy as np

from cpe_ray.chat import Message, load_policy_system_template, render_persona, system_prompt
from cpe_ray.errors import DataError
from cpe_ray.paths import resolve_path
from cpe_ray.prompts import PromptTemplate

BadRecordPolicy = Literal["error", "skip"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")
PF_TIERS: tuple[str, ...] = ("easy", "medium", "hard")
PF_KINDS: tuple[str, ...] = ("specific", "general")
# Folders tried per kind; "spedific" is the published folder's spelling.
PF_KIND_DIRS: Mapping[str, tuple[str, ...]] = {
    "specific": ("spedific", "specific"),
    "general": ("general",),
}

T = TypeVar("T")


@dataclass(frozen=True)
class LoadResult(Generic[T]):
    """Records that loaded, and the lines that were skipped (only with on_bad="skip")."""

    records: list[T]
    skipped: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PromptRecord:
    """A training / evaluation prompt: rendered persona text and the user's question."""

    id: str
    persona: str
    question: str


@dataclass(frozen=True)
class PersonaFeedbackCase:
    """One PersonaFeedback case; `chosen` is the human-preferred answer, `source` file:line."""

    user_id: int
    persona: str
    question: str
    chosen: str
    reject: str
    tier: str
    kind: str
    source: str


@dataclass(frozen=True)
class SFTExample:
    """One conversation; a system message, if any, comes first."""

    messages: tuple[Message, ...]

    def as_dicts(self) -> list[dict[str, str]]:
        return [m.as_dict() for m in self.messages]


@dataclass(frozen=True)
class JudgeInput:
    """One answer for a judge (`grm collect`): rendered persona, question, answer."""

    id: str
    persona: str
    question: str
    answer: str


@dataclass(frozen=True)
class PairwiseExample:
    persona: str
    question: str
    chosen: str
    rejected: str


class _Bad(Exception):
    """A bad record: `what` is wrong and `fix` says how to fix it."""

    def __init__(self, what: str, fix: str) -> None:
        super().__init__(what)
        self.what, self.fix = what, fix


class _Collector:
    """Applies the on_bad policy: raise at the first bad line, or count and describe it."""

    def __init__(self, on_bad: BadRecordPolicy) -> None:
        if on_bad not in ("error", "skip"):
            raise DataError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
        self.on_bad = on_bad
        self.problems: list[str] = []

    def bad(self, where: str, err: _Bad) -> None:
        if self.on_bad == "error":
            raise DataError(f"{where}: {err.what}; {err.fix}")
        self.problems.append(f"{where}: {err.what}")

    def result(self, records: list[T], what: str) -> LoadResult[T]:
        if not records:
            first = f"; first problem: {self.problems[0]}" if self.problems else ""
            raise DataError(f"no valid {what} loaded ({len(self.problems)} bad line(s) "
                            f"skipped{first}); check the file's format")
        return LoadResult(records=records, skipped=len(self.problems), problems=self.problems)


def _existing_file(path: str | Path, what: str) -> Path:
    p = resolve_path(path)
    if not p.is_file():
        raise DataError(f"{what} file not found: {p}; check the path (relative paths are tried "
                        "against the working directory, then the repository root)")
    return p


def _lines(path: Path, col: _Collector) -> Iterator[tuple[int, Any]]:
    """Yield (1-based line number, parsed JSON value) for each non-blank, valid JSON line."""
    n_values = 0
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            col.bad(f"{path}:{lineno}", _Bad(f"not valid UTF-8 ({e.reason})", "save as UTF-8"))
            continue
        if not text.strip():
            continue
        n_values += 1
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            col.bad(f"{path}:{lineno}", _Bad(f"invalid JSON ({e.msg} at column {e.colno})",
                                             "write one JSON object per line"))
            continue
        yield lineno, value
    if n_values == 0:
        raise DataError(f"{path} is empty (no records); expected one JSON object per line")


def _parse_lines(path: Path, col: _Collector,
                 parse: Callable[[dict[str, Any], int], T]) -> list[T]:
    """`parse(object, line number)` on every line of `path`; it raises _Bad for a bad record."""
    records: list[T] = []
    for lineno, value in _lines(path, col):
        try:
            records.append(parse(_object(value), lineno))
        except _Bad as e:
            col.bad(f"{path}:{lineno}", e)
    return records


def _load(path: Path, what: str, on_bad: BadRecordPolicy,
          parse: Callable[[dict[str, Any], int], T]) -> LoadResult[T]:
    col = _Collector(on_bad)
    return col.result(_parse_lines(path, col, parse), f"{what} in {path}")


_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean",
               type(None): "null", int: "number", float: "number"}


def _type_name(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Bad(f"expected a JSON object, got {_type_name(value)}",
                   "write one JSON object per line")
    return value


def _text(obj: Mapping[str, Any], key: str) -> str:
    if key not in obj:
        raise _Bad(f"missing required field '{key}'", f"add a non-empty string '{key}'")
    value = obj[key]
    if not isinstance(value, str):
        raise _Bad(f"field '{key}' must be a string, got {_type_name(value)}",
                   f"make '{key}' a JSON string")
    if not value.strip():
        raise _Bad(f"field '{key}' is empty", f"give '{key}' some text")
    return value


def _persona_field(obj: Mapping[str, Any]) -> str:
    if "persona" not in obj:
        raise _Bad("missing required field 'persona'",
                   "add 'persona' as a string or an object of profile fields")
    value = obj["persona"]
    if not isinstance(value, (str, Mapping)):
        raise _Bad(f"field 'persona' must be a string or an object, got {_type_name(value)}",
                   "make 'persona' a string or an object")
    if not (text := render_persona(value)):
        raise _Bad("field 'persona' is empty", "give 'persona' some content")
    return text


def _record_id(obj: Mapping[str, Any], default: str) -> str:
    value = obj.get("id")
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise _Bad(f"field 'id' must be a string or an integer, got {value!r}",
                   "give 'id' a non-empty string or an integer, or drop it")
    return str(value).strip()


def load_prompts(path: str | Path, on_bad: BadRecordPolicy = "error") -> LoadResult[PromptRecord]:
    """Prompts JSONL: `persona` (string or object), `question`, optional `id` (str or int).

    A missing id defaults to "<file stem>-<line>"; a repeated id is a bad record.
    """
    p = _existing_file(path, "prompts")
    seen: dict[str, int] = {}

    def parse(obj: dict[str, Any], lineno: int) -> PromptRecord:
        rid = _record_id(obj, f"{p.stem}-{lineno}")
        record = PromptRecord(id=rid, persona=_persona_field(obj), question=_text(obj, "question"))
        if rid in seen:
            raise _Bad(f"duplicate id '{rid}' (first on line {seen[rid]})",
                       "give every record a unique id")
        seen[rid] = lineno
        return record

    return _load(p, "prompts", on_bad, parse)


def _user_id(obj: Mapping[str, Any]) -> int:
    if "user_id" not in obj:
        raise _Bad("missing required field 'user_id'",
                   "add 'user_id', the 1-based line number of the persona")
    value = obj["user_id"]
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad(f"field 'user_id' must be an integer, got {value!r}",
                   "use the persona's 1-based line number, e.g. 12 or \"12\"")
    if value < 1:
        raise _Bad(f"field 'user_id' must be >= 1, got {value}",
                   "use the persona's 1-based line number")
    return value


def _pf_personas(path: Path, col: _Collector) -> dict[int, str | None]:
    """Persona text by (physical) line number; None marks a bad line that was skipped."""
    personas: dict[int, str | None] = {}
    for lineno, value in _lines(path, col):
        try:
            if not (text := render_persona(_object(value))):
                raise _Bad("persona object is empty", "write the persona's fields")
        except _Bad as e:
            text = None
            col.bad(f"{path}:{lineno}", e)
        personas[lineno] = text
    return personas


def _pf_case_files(root: Path, tiers: Sequence[str], kinds: Sequence[str]
                   ) -> tuple[list[tuple[str, str, Path]], list[Path]]:
    """(kind, tier, path) of the case files that exist, and every path looked at."""
    for name, given, valid in (("tier", tiers, PF_TIERS), ("kind", kinds, PF_KINDS)):
        if not given or any(g not in valid for g in given):
            raise DataError(f"PersonaFeedback {name}s must be a non-empty subset of "
                            f"{', '.join(valid)}; got {', '.join(map(str, given)) or 'none'}")
    found: list[tuple[str, str, Path]] = []
    looked: list[Path] = []
    for kind in kinds:
        for tier in tiers:
            candidates = [root / "data" / d / f"{tier}.jsonl" for d in PF_KIND_DIRS[kind]]
            looked += candidates
            present = [c for c in candidates if c.is_file()]
            if len(present) > 1:
                raise DataError(f"both {present[0]} and {present[1]} exist for PersonaFeedback "
                                f"{kind}/{tier}; keep only one of them")
            found += [(kind, tier, c) for c in present]
    return found, looked


def load_personafeedback(
    root: str | Path,
    on_bad: BadRecordPolicy = "error",
    tiers: Sequence[str] = PF_TIERS,
    kinds: Sequence[str] = PF_KINDS,
) -> LoadResult[PersonaFeedbackCase]:
    """PersonaFeedback as published (method.md section 5), cases in kind, tier, line order.

    `root/persona/all_personas.jsonl` holds one persona object a line; a case's `user_id` is
    that 1-based line number. Cases come from `root/data/{spedific,general}/<tier>.jsonl` (a
    correctly spelled `specific/` folder is accepted too); missing tier files are skipped.
    """
    col = _Collector(on_bad)
    base = resolve_path(root)
    if not base.is_dir():
        raise DataError(f"PersonaFeedback root not found: {base}; point it at the folder that "
                        "holds persona/ and data/")
    case_files, looked = _pf_case_files(base, tiers, kinds)
    if not case_files:
        raise DataError(f"no PersonaFeedback case files under {base}; looked for "
                        f"{', '.join(map(str, looked))}")
    persona_path = _existing_file(base / "persona" / "all_personas.jsonl",
                                  "PersonaFeedback persona")
    personas = _pf_personas(persona_path, col)
    n_ok = sum(v is not None for v in personas.values())
    span = f"{min(personas)}-{max(personas)}" if personas else "none"

    def case(obj: dict[str, Any], lineno: int, kind: str, tier: str, path: Path
             ) -> PersonaFeedbackCase:
        uid = _user_id(obj)
        question, chosen, reject = (_text(obj, k) for k in ("question", "chosen", "reject"))
        if uid not in personas:
            raise _Bad(f"user_id {uid} has no persona: {persona_path} has {n_ok} persona(s) "
                       f"on lines {span}", "use a line number of the persona file as user_id")
        if (persona := personas[uid]) is None:
            raise _Bad(f"user_id {uid} refers to the bad line {persona_path}:{uid}",
                       "fix that persona line")
        return PersonaFeedbackCase(uid, persona, question, chosen, reject, tier, kind,
                                   f"{path}:{lineno}")

    records: list[PersonaFeedbackCase] = []
    for kind, tier, path in case_files:
        records += _parse_lines(path, col, lambda o, n, k=kind, t=tier, p=path: case(o, n, k, t, p))
    return col.result(records, f"PersonaFeedback cases under {base}")


def _messages(obj: Mapping[str, Any]) -> list[Message]:
    raw = obj.get("messages")
    if not isinstance(raw, list) or not raw:
        raise _Bad("field 'messages' must be a non-empty array",
                   "add 'messages': [{\"role\": ..., \"content\": ...}, ...]")
    out: list[Message] = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise _Bad(f"messages[{i}] must be an object, got {_type_name(item)}",
                       "write each message as {\"role\": ..., \"content\": ...}")
        role = item.get("role")
        if role not in ROLES:
            raise _Bad(f"messages[{i}] has role {role!r}", f"use one of {', '.join(ROLES)}")
        if role == "system" and i != 0:
            raise _Bad(f"messages[{i}] is a system message after the first message",
                       "put the system message first, or make it a user message")
        try:
            out.append(Message(role=role, content=_text(item, "content")))
        except _Bad as e:
            raise _Bad(f"messages[{i}]: {e.what}", e.fix) from None
    if not any(m.role == "assistant" for m in out):
        raise _Bad("no assistant message", "add at least one assistant message to learn from")
    return out


def load_sft(
    path: str | Path,
    on_bad: BadRecordPolicy = "error",
    system_template: PromptTemplate | None = None,
) -> LoadResult[SFTExample]:
    """SFT JSONL: `messages` [{role, content}], roles system/user/assistant, >= 1 assistant.

    An optional top-level `persona` becomes the first (system) message, rendered through the
    policy system template; a record with both `persona` and a system message is bad.
    """
    p = _existing_file(path, "SFT")
    template = [system_template]  # the default is loaded on first use only

    def parse(obj: dict[str, Any], lineno: int) -> SFTExample:
        messages = _messages(obj)
        if "persona" in obj:
            persona = _persona_field(obj)
            if messages[0].role == "system":
                raise _Bad("has both 'persona' and a system message", "drop one of them")
            template[0] = template[0] or load_policy_system_template()
            messages.insert(0, Message("system", system_prompt(template[0], persona)))
        return SFTExample(messages=tuple(messages))

    return _load(p, "SFT conversations", on_bad, parse)


def load_pairwise(path: str | Path, on_bad: BadRecordPolicy = "error"
                  ) -> LoadResult[PairwiseExample]:
    """Pairwise JSONL: persona, question, chosen, rejected (or PersonaFeedback's `reject`)."""

    def parse(obj: dict[str, Any], lineno: int) -> PairwiseExample:
        persona, question = _persona_field(obj), _text(obj, "question")
        chosen = _text(obj, "chosen")
        if "rejected" in obj and "reject" in obj:
            raise _Bad("has both 'rejected' and 'reject'", "keep only one of them")
        rejected = _text(obj, "reject" if "reject" in obj else "rejected")
        if chosen.strip() == rejected.strip():
            raise _Bad("'chosen' and 'rejected' are the same answer",
                       "give two different answers, or drop the pair")
        return PairwiseExample(persona, question, chosen, rejected)

    return _load(_existing_file(path, "pairwise"), "pairwise examples", on_bad, parse)


def load_judge_inputs(path: str | Path, on_bad: BadRecordPolicy = "error"
                      ) -> LoadResult[JudgeInput]:
    """(persona, question, answer) JSONL for a teacher to judge, optional `id` (str or int)."""
    p = _existing_file(path, "judge inputs")

    def parse(obj: dict[str, Any], lineno: int) -> JudgeInput:
        return JudgeInput(_record_id(obj, f"{p.stem}-{lineno}"), _persona_field(obj),
                          _text(obj, "question"), _text(obj, "answer"))

    return _load(p, "judge inputs", on_bad, parse)


def batch_order(num_records: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The order in which an epoch visits the records: seeded by (seed, epoch), so a resumed
    run replays exactly the batches an uninterrupted run would draw."""
    if not shuffle:
        return list(range(num_records))
    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(num_records)]
