"""`cpe-ray eval personamem`: multiple-choice accuracy on PersonaMem's published format.

Accepted format (bowen-upenn/PersonaMem, `questions_{32k,128k,1M}.csv` with
`shared_contexts_{...}.jsonl`; see data/demo/README.md):
- questions CSV with a header; required columns `question_id`, `user_question_or_message`,
  `all_options` (a Python or JSON list of option strings, usually "(a) ...", "(b) ..."),
  `correct_answer` ("(c)" or "c"), `shared_context_id`, `end_index_in_shared_context`;
  `persona_id`, `question_type` and `topic` are used when present; other columns are kept.
- shared contexts JSONL: one object per line with a single key, the shared_context_id,
  whose value is the conversation so far, a list of {"role", "content"} messages
  (system / user / assistant). A question sees messages[:end_index_in_shared_context].

The prompt and the scoring follow the benchmark's own evaluation script
(`inference_standalone_openai.py`): the visible history, then one user turn
`question + "\\n\\n" + instruction + "\\n\\n" + all_options` (the CSV's all_options text as is)
with the instruction below; the answer is read after the last `<final_answer>` (else from the
whole reply): the letters in parentheses, else bare letters; it is right when that set is
exactly the correct letter. A reply with no single letter is a parse failure (wrong, and
reported); a question the endpoint could not answer is unanswered (wrong, and reported).
"""

from __future__ import annotations

import ast
import csv
import json
import math
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpe_ray.config import Config
from cpe_ray.data import ROLES, BadRecordPolicy, LoadResult
from cpe_ray.errors import DataError
from cpe_ray.evaluation import report
from cpe_ray.paths import resolve_path

REQUIRED_COLUMNS = ("question_id", "user_question_or_message", "all_options", "correct_answer",
                    "shared_context_id", "end_index_in_shared_context")
FINAL_ANSWER = "<final_answer>"
FINAL_ANSWER_CLOSE = "</final_answer>"
MIN_OPTIONS = 2
UNKNOWN_TYPE = "unknown"
CORRECT, WRONG, PARSE_FAILURE, UNANSWERED = "correct", "wrong", "parse_failure", "unanswered"
OUTCOMES = (CORRECT, WRONG, PARSE_FAILURE, UNANSWERED)
ALL = "all"
_CONTEXT_KEY = re.compile(r'^\s*\{\s*"((?:[^"\\]|\\.)*)"\s*:')


def instruction(n_options: int) -> str:
    """The benchmark's instruction; for four options exactly its published wording."""
    letters = [f"({c})" for c in string.ascii_lowercase[:n_options]]
    listed = ", ".join(letters[:-1]) + f", or {letters[-1]}"
    return (f"Find the most appropriate model response and give your final answer {listed} "
            f"after the special token {FINAL_ANSWER}.")


@dataclass(frozen=True)
class PersonaMemQuestion:
    question_id: str
    question_type: str
    question: str
    options_text: str  # the CSV's all_options, verbatim: what the model sees
    options: tuple[str, ...]
    correct: str  # a letter
    history: tuple[dict[str, str], ...]
    source: str
    extra: dict[str, str] = field(default_factory=dict)

    def messages(self) -> list[dict[str, str]]:
        turn = (f"{self.question}\n\n{instruction(len(self.options))}\n\n"
                f"{self.options_text}")
        return [*map(dict, self.history), {"role": "user", "content": turn}]


def _options(text: str) -> tuple[str, ...]:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError("all_options is not a list of strings (e.g. \"['(a) ...', '(b) ...']\")")
    if not MIN_OPTIONS <= len(value) <= len(string.ascii_lowercase):
        raise ValueError(f"all_options has {len(value)} options; give {MIN_OPTIONS} to "
                         f"{len(string.ascii_lowercase)}")
    return tuple(value)


def _contexts(path: Path, wanted: set[str]) -> dict[str, list[dict[str, str]]]:
    """The wanted shared contexts; other lines are skipped unparsed (files can be huge)."""
    found: dict[str, list[dict[str, str]]] = {}
    with path.open(encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            key = _CONTEXT_KEY.match(line)
            if not line.strip() or (key and json.loads(f'"{key.group(1)}"') not in wanted):
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}); write one "
                                "{\"<shared_context_id>\": [messages]} object per line") from None
            if not isinstance(obj, dict) or len(obj) != 1:
                raise DataError(f"{path}:{lineno}: expected one key (the shared_context_id) "
                                "whose value is the list of messages")
            (cid, messages), = obj.items()
            if cid not in wanted:
                continue
            if not isinstance(messages, list) or not all(
                    isinstance(m, dict) and m.get("role") in ROLES
                    and isinstance(m.get("content"), str) for m in messages):
                raise DataError(f"{path}:{lineno}: context '{cid}' must be a list of "
                                f"{{\"role\": {'|'.join(ROLES)}, \"content\": text}} messages")
            found[cid] = [{"role": m["role"], "content": m["content"]} for m in messages]
    return found


def load_personamem(questions_csv: str | Path, contexts_jsonl: str | Path,
                    on_bad: BadRecordPolicy = "error", limit: int | None = None
                    ) -> LoadResult[PersonaMemQuestion]:
    """Questions with their visible history; bad rows raise (or are skipped) as `file:line`."""
    qp, cp = resolve_path(questions_csv), resolve_path(contexts_jsonl)
    for p, what in ((qp, "questions CSV"), (cp, "shared contexts JSONL")):
        if not p.is_file():
            raise DataError(f"PersonaMem {what} not found: {p}; see data/demo/README.md")
    with qp.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{qp}: missing column(s) {', '.join(missing)}; PersonaMem's "
                            f"questions CSV has {', '.join(REQUIRED_COLUMNS)}")
        rows = [(reader.line_num, row) for row in reader]
    rows = rows[:limit]
    contexts = _contexts(cp, {r["shared_context_id"] for _, r in rows})
    records, problems = [], []
    for lineno, row in rows:
        try:
            records.append(_question(row, contexts, f"{qp}:{lineno}"))
        except ValueError as e:
            if on_bad == "error":
                raise DataError(f"{qp}:{lineno}: {e}") from None
            problems.append(f"{qp}:{lineno}: {e}")
    if not records:
        raise DataError(f"no valid PersonaMem questions in {qp} ({len(problems)} bad rows)")
    return LoadResult(records, len(problems), problems)


def _question(row: dict[str, str], contexts: dict[str, list[dict[str, str]]], where: str
              ) -> PersonaMemQuestion:
    options = _options(row["all_options"])
    correct = row["correct_answer"].strip().lower().strip("() ")
    letters = string.ascii_lowercase[:len(options)]
    if len(correct) != 1 or correct not in letters:
        raise ValueError(f"correct_answer {row['correct_answer']!r} is not one of "
                         f"({'), ('.join(letters)})")
    cid = row["shared_context_id"]
    if cid not in contexts:
        raise ValueError(f"shared_context_id '{cid}' is not in the shared contexts file")
    try:
        end = int(row["end_index_in_shared_context"])
    except ValueError:
        raise ValueError("end_index_in_shared_context is not an integer") from None
    if not 0 <= end <= len(contexts[cid]):
        raise ValueError(f"end_index_in_shared_context {end} is outside 0..{len(contexts[cid])}")
    if not row["user_question_or_message"].strip():
        raise ValueError("user_question_or_message is empty")
    known = set(REQUIRED_COLUMNS) | {"question_type"}
    return PersonaMemQuestion(
        question_id=row["question_id"], question_type=row.get("question_type") or UNKNOWN_TYPE,
        question=row["user_question_or_message"], options_text=row["all_options"],
        options=options, correct=correct, history=tuple(contexts[cid][:end]), source=where,
        extra={k: v for k, v in row.items() if k not in known and k is not None})


def _letters(text: str, letters: str) -> set[str]:
    text = text.lower()
    in_parens = re.findall(rf"\(([{letters}])\)", text)
    return set(in_parens) if in_parens else set(re.findall(rf"\b([{letters}])\b", text))


def score_reply(reply: str, correct: str, n_options: int) -> tuple[str, str | None]:
    """(outcome, predicted letter) by the benchmark's rule (module docstring)."""
    letters = string.ascii_lowercase[:n_options]
    final = reply.strip()
    if FINAL_ANSWER in final:
        final = final.split(FINAL_ANSWER)[-1].strip()
    if final.endswith(FINAL_ANSWER_CLOSE):
        final = final[:-len(FINAL_ANSWER_CLOSE)].strip()
    picked, whole = _letters(final, letters), _letters(reply, letters)
    if correct and {correct} in (picked, whole):
        return CORRECT, correct
    single = next((s for s in (picked, whole) if len(s) == 1), None)
    return (WRONG, single.pop()) if single else (PARSE_FAILURE, None)


def accuracy_by_type(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    types = sorted({r["question_type"] for r in rows})
    table = {}
    for t in (*types, ALL):
        mine = [r for r in rows if t in (ALL, r["question_type"])]
        n = len(mine)
        counts = {o: sum(r["outcome"] == o for r in mine) for o in OUTCOMES}
        acc = counts[CORRECT] / n if n else None
        table[t] = {"n": n, **counts, "accuracy": acc,
                    "standard_error": math.sqrt(acc * (1 - acc) / n) if acc is not None else None}
    return table


def run_personamem(cfg: Config, say: Callable[[str], None] = print) -> dict[str, Any]:
    e = cfg.eval
    loaded = load_personamem(e.personamem_questions_path, e.personamem_contexts_path,
                             cfg.data.on_bad_record, e.limit)
    questions = loaded.records
    conversations = [q.messages() for q in questions]
    truncated = 0
    if e.personamem_answerer == "openai":
        from cpe_ray.judges.endpoint import EndpointClient, EndpointSpec

        client = EndpointClient(EndpointSpec.from_config(e.api, "eval.api"))
        name = f"endpoint {client.describe()}"
        say(f"asking {name} {len(questions)} PersonaMem questions")
        replies = client.chat_many(conversations, temperature=e.temperature,
                                   max_tokens=e.max_new_tokens)
        answers = [(r.text, r.error) for r in replies]
    else:
        from cpe_ray.evaluation.generate import PolicyAnswerer

        answerer = PolicyAnswerer(cfg)
        name = answerer.describe()
        say(f"answering {len(questions)} PersonaMem questions with {name}")
        answers = [(t, None) for t in answerer.chat(conversations)]
        truncated = answerer.truncated
    rows = []
    for q, (text, error) in zip(questions, answers, strict=True):
        outcome, predicted = (UNANSWERED, None) if text is None else score_reply(
            text, q.correct, len(q.options))
        rows.append({"question_id": q.question_id, "question_type": q.question_type,
                     "source": q.source, "correct_answer": q.correct, "predicted": predicted,
                     "outcome": outcome, "reply": text, "error": error})
    table = accuracy_by_type(rows)
    out = Path(e.output_dir) / "personamem"
    files = {"answers": report.write_jsonl(out / "answers.jsonl", rows)}
    labels = list(table)
    files["accuracy_plot"] = report.plot_bars(
        out / "accuracy.png", labels, [report.percent(table[t]["accuracy"]) for t in labels],
        [report.percent(table[t]["standard_error"]) for t in labels],
        "accuracy, percent (+-1 s.e.)", f"PersonaMem: {name}"[:report.TITLE_CHARS],
        reference=report.PERCENT / max(len(q.options) for q in questions))  # chance
    files["report"] = out / "report.md"
    summary = {"command": "personamem", "answerer": name,
               "questions_path": str(e.personamem_questions_path),
               "contexts_path": str(e.personamem_contexts_path), "n_questions": len(rows),
               "skipped_records": loaded.skipped, "truncated_prompts": truncated,
               "table": table, "files": {k: str(v) for k, v in files.items()}}
    total = table[ALL]
    lines = [f"# PersonaMem accuracy: {name}", "",
             f"Questions: {summary['questions_path']} ({len(rows)}); parse failures "
             f"{total[PARSE_FAILURE]}, unanswered {total[UNANSWERED]} (both count as wrong); "
             f"prompts cut to eval.max_prompt_tokens: {truncated}.", ""]
    lines += report.markdown_table(
        ["question type", "n", "correct", "accuracy", "s.e.", "parse failures", "unanswered"],
        [[t, c["n"], c[CORRECT], report.fmt(report.percent(c["accuracy"])),
          report.fmt(report.percent(c["standard_error"])), c[PARSE_FAILURE], c[UNANSWERED]]
         for t, c in table.items()])
    lines += ["", f"![accuracy]({files['accuracy_plot'].name})"]
    report.write_markdown(out / "report.md", lines)
    report.write_json(out / "results.json", summary)
    return summary

