"""Load the project's datasets into typed records.

One job: turn JSONL files (persona prompt sets, PersonaFeedback as published, SFT
conversations, pairwise preferences, answers for a teacher to judge) into frozen
dataclasses, reporting every bad line as `file:line: what is wrong`. Personas are rendered
and prompts built by `cpe_ray.chat`.

The paper release's files load as they are (method.md 4): its verl-layout parquet prompt
files (`eval/data/RL_data/*.parquet`: one user turn that embeds the persona's JSON and the
question; `load_prompts` takes them out of it) and its PersonaFeedback layout
(`eval/data/rm_benchmark_all/` cases naming `eval/data/persona_all/<user_id>.json`;
`load_personafeedback` tells the layouts apart). Release personas keep the JSON text the
release shows its policy and GRM (indented by 2, non-ASCII kept), not our rendering.

Conventions shared by every loader:
- `on_bad="error"` raises `DataError("file:line: what is wrong; how to fix")` at the first
  bad line; `on_bad="skip"` drops bad lines and lists them in `LoadResult.problems`
  (`len(problems) == skipped` always).
- Blank lines are ignored. A missing file, or one with no valid records, is a `DataError`.
- A record over `max_record_bytes` (`data.max_record_bytes`; a JSONL line, a parquet row's
  user turn) is a bad record, before it is parsed.
- Text fields are kept verbatim (only checked to be non-blank); personas are rendered.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import numpy as np

from cpe_ray.chat import Message, load_policy_system_template, render_persona, system_prompt
from cpe_ray.config.schema import MAX_RECORD_BYTES
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

# The paper release's layouts (method.md 4).
PARQUET_MAGIC = b"PAR1"  # the first bytes of every parquet file
VERL_PROMPT_COLUMN = "prompt"  # verl's dataset layout: a list of {role, content} messages
VERL_EXTRA_COLUMN = "extra_info"  # ... and {"index": row id in the source split, ...}
# In the release's user turn the persona's JSON follows "当前用户配置：" ("current user
# configuration:") and the question follows "以下是用户问题：" ("below is the user's
# question:"), ended by a blank line and the closing instruction "生成1个..." ("generate
# one ..."). A full-width or ASCII colon is accepted.
RELEASE_PERSONA_MARK = re.compile(r"当前用户配置\s*[：:]")
RELEASE_QUESTION_MARK = re.compile(r"以下是用户问题\s*[：:]")
RELEASE_QUESTION_END = re.compile(r"\n[ \t]*\n[ \t]*生成1个")
RELEASE_PERSONA_INDENT = 2  # how the release writes a persona's JSON into its prompts
RELEASE_PF_CASES_DIR = "rm_benchmark_all"  # <kind>_<tier>.jsonl
RELEASE_PF_PERSONA_DIR = "persona_all"  # <user_id>.json, one persona object a file
RELEASE_PF_TIER_FILES: Mapping[str, str] = {"easy": "easy", "medium": "mid", "hard": "hard"}

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
    """One PersonaFeedback case; `chosen` is the human-preferred answer, `source` file:line.

    `user_id` is the persona's line number (published layout) or file name (the release's).
    """

    user_id: int | str
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

    def __init__(self, on_bad: BadRecordPolicy, max_bytes: int = MAX_RECORD_BYTES) -> None:
        if on_bad not in ("error", "skip"):
            raise DataError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
        self.on_bad, self.max_bytes = on_bad, max_bytes
        self.problems: list[str] = []

    def too_long(self, where: str, size: int) -> bool:
        """Whether a record of `size` bytes is over the limit (then reported as bad)."""
        if size <= self.max_bytes:
            return False
        self.bad(where, _Bad(f"the record is {size:,} bytes, over data.max_record_bytes "
                             f"({self.max_bytes:,})", "shorten it, or raise "
                             "data.max_record_bytes if such records are meant"))
        return True

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
        if col.too_long(f"{path}:{lineno}", len(raw)):
            continue
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
          parse: Callable[[dict[str, Any], int], T],
          max_bytes: int = MAX_RECORD_BYTES) -> LoadResult[T]:
    col = _Collector(on_bad, max_bytes)
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


def release_persona_text(persona: Mapping[str, Any]) -> str:
    """A persona object as the release writes it into its policy and GRM prompts."""
    return json.dumps(persona, ensure_ascii=False, indent=RELEASE_PERSONA_INDENT)


def _is_parquet(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(len(PARQUET_MAGIC)) == PARQUET_MAGIC


def load_prompts(path: str | Path, on_bad: BadRecordPolicy = "error",
                 max_record_bytes: int = MAX_RECORD_BYTES) -> LoadResult[PromptRecord]:
    """Prompts JSONL: `persona` (string or object), `question`, optional `id` (str or int).

    A missing id defaults to "<file stem>-<line>"; a repeated id is a bad record. A parquet
    file (known by its first bytes, whatever its name) is read as verl-layout prompts:
    `load_verl_prompts`.
    """
    p = _existing_file(path, "prompts")
    if _is_parquet(p):
        return load_verl_prompts(p, on_bad, max_record_bytes)
    if p.suffix == ".parquet":
        raise DataError(f"{p}: named .parquet but does not start with {PARQUET_MAGIC!r}, so "
                        "it is no parquet file (a Git LFS pointer?); fetch the real file")
    seen: dict[str, int] = {}

    def parse(obj: dict[str, Any], lineno: int) -> PromptRecord:
        rid = _record_id(obj, f"{p.stem}-{lineno}")
        record = PromptRecord(id=rid, persona=_persona_field(obj), question=_text(obj, "question"))
        if rid in seen:
            raise _Bad(f"duplicate id '{rid}' (first on line {seen[rid]})",
                       "give every record a unique id")
        seen[rid] = lineno
        return record

    return _load(p, "prompts", on_bad, parse, max_record_bytes)


def _release_user_turn(content: str) -> tuple[str, str]:
    """(persona text, question) out of a user turn in the release's RL_data layout."""
    expected = ("expected the release's RL_data layout: the persona's JSON after "
                "'当前用户配置：' and the question after '以下是用户问题：'")
    persona_at = RELEASE_PERSONA_MARK.search(content)
    if persona_at is None:
        raise _Bad("the user turn has no persona marker '当前用户配置：'", expected)
    start = len(content) - len(content[persona_at.end():].lstrip())
    try:
        persona, _ = json.JSONDecoder().raw_decode(content, start)
    except json.JSONDecodeError as e:
        raise _Bad(f"no persona JSON after '当前用户配置：' ({e.msg} at character {e.pos})",
                   expected) from None
    if not isinstance(persona, dict) or not persona:
        raise _Bad(f"the persona after '当前用户配置：' is {_type_name(persona)}, not a "
                   "non-empty object", expected)
    question_at = list(RELEASE_QUESTION_MARK.finditer(content))
    if not question_at:
        raise _Bad("the user turn has no question marker '以下是用户问题：'", expected)
    rest = content[question_at[-1].end():]
    end = RELEASE_QUESTION_END.search(rest)
    question = (rest[:end.start()] if end else rest).strip()
    if not question:
        raise _Bad("the question after '以下是用户问题：' is empty", expected)
    return release_persona_text(persona), question


def _verl_user_turn(messages: Any) -> str:
    if not isinstance(messages, list) or not messages:
        raise _Bad(f"column '{VERL_PROMPT_COLUMN}' is {_type_name(messages)}, not a list of "
                   "chat messages", "use verl's layout: prompt = [{role, content}, ...]")
    users = [m for m in messages if isinstance(m, Mapping) and m.get("role") == "user"]
    if not users or not isinstance(users[-1].get("content"), str):
        raise _Bad(f"column '{VERL_PROMPT_COLUMN}' has no user message with text content",
                   "give the prompt a {role: user, content: ...} message")
    return users[-1]["content"]


def load_verl_prompts(path: str | Path, on_bad: BadRecordPolicy = "error",
                      max_record_bytes: int = MAX_RECORD_BYTES) -> LoadResult[PromptRecord]:
    """verl-layout parquet prompts as the release ships them (`eval/data/RL_data/*.parquet`).

    Column `prompt` holds the chat messages; the last user turn embeds the persona's JSON
    and the question (`_release_user_turn`), which become the record's persona (as the
    release's JSON text) and question; our own system template then builds the policy's
    prompt from them. `extra_info.index` names the record "<file stem>-<index>" (else the
    0-based row). Bad rows are reported as `file[row]` under the on_bad policy; the other
    columns (`data_source`, `ability`, `reward_model`) are not needed.
    """
    p = _existing_file(path, "prompts")
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{p} is a parquet file, which needs pyarrow; pip install pyarrow"
                        ) from None
    try:
        table = pq.read_table(p)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{p}: not a readable parquet file ({str(e).splitlines()[0]})"
                        ) from None
    if VERL_PROMPT_COLUMN not in table.column_names:
        raise DataError(f"{p}: no '{VERL_PROMPT_COLUMN}' column (has "
                        f"{', '.join(table.column_names) or 'none'}); expected verl's layout: "
                        "prompt = chat messages, optional extra_info = {index, split}")
    prompts = table.column(VERL_PROMPT_COLUMN).to_pylist()
    extras = (table.column(VERL_EXTRA_COLUMN).to_pylist()
              if VERL_EXTRA_COLUMN in table.column_names else [None] * len(prompts))
    col = _Collector(on_bad, max_record_bytes)
    records: list[PromptRecord] = []
    seen: dict[str, int] = {}
    for row, (messages, extra) in enumerate(zip(prompts, extras, strict=True)):
        index = extra.get("index") if isinstance(extra, Mapping) else None
        rid = f"{p.stem}-{index if isinstance(index, int) else row}"
        try:
            turn = _verl_user_turn(messages)
            if col.too_long(f"{p}[{row}]", len(turn.encode("utf-8"))):
                continue
            persona, question = _release_user_turn(turn)
            if rid in seen:
                raise _Bad(f"duplicate id '{rid}' (first in row {seen[rid]})",
                           "give every row a unique extra_info.index")
        except _Bad as e:
            col.bad(f"{p}[{row}]", e)
            continue
        seen[rid] = row
        records.append(PromptRecord(id=rid, persona=persona, question=question))
    return col.result(records, f"prompts in {p}")


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
    _check_pf_subsets(tiers, kinds)
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


def _check_pf_subsets(tiers: Sequence[str], kinds: Sequence[str]) -> None:
    for name, given, valid in (("tier", tiers, PF_TIERS), ("kind", kinds, PF_KINDS)):
        if not given or any(g not in valid for g in given):
            raise DataError(f"PersonaFeedback {name}s must be a non-empty subset of "
                            f"{', '.join(valid)}; got {', '.join(map(str, given)) or 'none'}")


def _release_user_id(obj: Mapping[str, Any]) -> str:
    """The release's `user_id`: a persona's file name in persona_all/, never a path."""
    fix = f"use the file name (without .json) of a persona in {RELEASE_PF_PERSONA_DIR}/"
    if "user_id" not in obj:
        raise _Bad("missing required field 'user_id'", fix)
    uid = obj["user_id"]
    if (not isinstance(uid, str) or not uid.strip() or uid != uid.strip()
            or Path(uid).name != uid or uid in (".", "..")):
        raise _Bad(f"field 'user_id' must name a persona file, got {uid!r}", fix)
    return uid


def _load_release_personafeedback(base: Path, col: _Collector, tiers: Sequence[str],
                                  kinds: Sequence[str]) -> list[PersonaFeedbackCase]:
    """The release's eval/data: `rm_benchmark_all/<kind>_<tier>.jsonl` (tier `mid` is
    medium) whose `user_id` names `persona_all/<user_id>.json`, one persona object a file."""
    cases_dir, persona_dir = base / RELEASE_PF_CASES_DIR, base / RELEASE_PF_PERSONA_DIR
    looked = [(k, t, cases_dir / f"{k}_{RELEASE_PF_TIER_FILES[t]}.jsonl")
              for k in kinds for t in tiers]
    case_files = [(k, t, path) for k, t, path in looked if path.is_file()]
    if not case_files:
        raise DataError(f"no PersonaFeedback case files under {base} (the release's layout); "
                        f"looked for {', '.join(str(path) for _, _, path in looked)}")
    if not persona_dir.is_dir():
        raise DataError(f"PersonaFeedback persona folder not found: {persona_dir}; the "
                        "release keeps one <user_id>.json per persona there")
    personas: dict[str, str | _Bad] = {}

    def persona(uid: str) -> str:
        if uid not in personas:
            path = persona_dir / f"{uid}.json"
            try:
                obj = json.loads(path.read_text(encoding="utf-8-sig"))
                if not isinstance(obj, dict) or not obj:
                    raise ValueError(f"holds {_type_name(obj)}, not a non-empty object")
                personas[uid] = release_persona_text(obj)
            except FileNotFoundError:
                personas[uid] = _Bad(f"user_id '{uid}' has no persona: {path} not found",
                                     f"use the name of a file in {persona_dir}")
            except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
                personas[uid] = _Bad(f"persona file {path} is unusable ({e})",
                                     "write one JSON object in it")
        found = personas[uid]
        if isinstance(found, _Bad):
            raise found
        return found

    def case(obj: dict[str, Any], lineno: int, kind: str, tier: str, path: Path
             ) -> PersonaFeedbackCase:
        uid = _release_user_id(obj)
        question, chosen, reject = (_text(obj, k) for k in ("question", "chosen", "reject"))
        return PersonaFeedbackCase(uid, persona(uid), question, chosen, reject, tier, kind,
                                   f"{path}:{lineno}")

    records: list[PersonaFeedbackCase] = []
    for kind, tier, path in case_files:
        records += _parse_lines(path, col, lambda o, n, k=kind, t=tier, p=path: case(o, n, k, t, p))
    return records


def load_personafeedback(
    root: str | Path,
    on_bad: BadRecordPolicy = "error",
    tiers: Sequence[str] = PF_TIERS,
    kinds: Sequence[str] = PF_KINDS,
) -> LoadResult[PersonaFeedbackCase]:
    """PersonaFeedback cases in kind, tier, line order, from either layout under `root`.

    Published (method.md section 5): `root/persona/all_personas.jsonl` holds one persona
    object a line; a case's `user_id` is that 1-based line number. Cases come from
    `root/data/{spedific,general}/<tier>.jsonl` (a correctly spelled `specific/` folder is
    accepted too). The paper release's `eval/data` (`rm_benchmark_all/` beside
    `persona_all/`): `_load_release_personafeedback`. Missing tier files are skipped; a root
    holding both layouts is refused, since either could be meant.
    """
    col = _Collector(on_bad)
    base = resolve_path(root)
    if not base.is_dir():
        raise DataError(f"PersonaFeedback root not found: {base}; point it at the folder that "
                        "holds persona/ and data/ (or the release's eval/data)")
    _check_pf_subsets(tiers, kinds)
    release = (base / RELEASE_PF_CASES_DIR).is_dir()
    if release and ((base / "data").is_dir() or (base / "persona").is_dir()):
        raise DataError(f"{base} holds both PersonaFeedback's published layout (persona/, "
                        f"data/) and the release's ({RELEASE_PF_CASES_DIR}/, "
                        f"{RELEASE_PF_PERSONA_DIR}/); point the root at a folder with one")
    if release:
        return col.result(_load_release_personafeedback(base, col, tiers, kinds),
                          f"PersonaFeedback cases under {base}")
    case_files, looked = _pf_case_files(base, tiers, kinds)
    if not case_files:
        raise DataError(f"no PersonaFeedback case files under {base}; looked for "
                        f"{', '.join(map(str, looked))} (or, for the release's eval/data, "
                        f"{RELEASE_PF_CASES_DIR}/<kind>_<easy|mid|hard>.jsonl)")
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
