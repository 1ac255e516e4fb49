"""`cpe-ray rate-export`: people's judgements as training data for the paper's first stages.

- `grm_distill.jsonl`: people's critiques and scores as GRM distillation records, in the
  format `cpe-ray grm collect` writes (`grm train` reads it as `distill.output_path`). The
  judgement is rendered in the GRM's output format (`<critique>` then a `<scores>` block, one
  `Dimension: N` line per grm.dimensions) and parsed back with `parse_judgement`: a record is
  written only if that gives the rater's scores and critique back. A record needs the
  rater's scores on every dimension and a critique about that answer: the task's one answer,
  or the answer the rater edited (a pair's critique without an edit may compare the two).
- `sft.jsonl` (`cpe-ray sft`): persona, the question and the rater's edit as the answer.
- `pairwise.jsonl` (`cpe-ray rm train`, the Bradley-Terry baseline): chosen = the edit,
  rejected = the answer it edits.
An edit equal to its answer (after trimming spaces) is no pair and no example; it is counted.
Every file is written atomically.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpe_ray.chat import render_persona
from cpe_ray.config import Config, GRMConfig
from cpe_ray.human.agreement import Ratings, load_ratings
from cpe_ray.human.records import HumanTask, Judgement
from cpe_ray.human.tasks import write_atomic
from cpe_ray.judges.grm import parse_judgement
from cpe_ray.stages.distill import record_key

GRM_FILE, SFT_FILE, PAIRWISE_FILE = "grm_distill.jsonl", "sft.jsonl", "pairwise.jsonl"
TEACHER_PREFIX = "human:"  # a record's teacher: human:<rater>
# A tag in a rater's critique would end the critique block early or start a scores block.
_TAG = re.compile(r"[<＜]\s*/?\s*(?:critique|scores)\s*[>＞]", re.IGNORECASE)


@dataclass(frozen=True)
class ExportSummary:
    grm: int  # distillation records written
    sft: int  # SFT conversations written
    pairwise: int  # preference pairs written
    skipped: dict[str, int]  # reason -> answers or edits left out
    files: dict[str, str]


def persona_text(persona: Any) -> str:
    """The persona as the data loaders render it (an object as 'Key: value' lines)."""
    if isinstance(persona, str | Mapping):
        return render_persona(persona)
    return json.dumps(persona, ensure_ascii=False)  # a list: kept as the data wrote it


def _number(value: float) -> str:
    return f"{value:g}"


def grm_output(critique: str, scores: Mapping[str, float], dimensions: Sequence[str]) -> str:
    """A judgement in the GRM's output format (conf/prompts/grm_en.txt's last lines)."""
    lines = ["<critique>", _TAG.sub("", critique).strip(), "</critique>", "<scores>"]
    lines += [f"{d[:1].upper()}{d[1:]}: {_number(scores[d])}" for d in dimensions]
    return "\n".join([*lines, "</scores>"])


def _critiqued(task: HumanTask, j: Judgement) -> str | None:
    """The label a judgement's critique is about, if it can be told."""
    if task.kind == "single":
        return task.labels[0]
    return j.edit.label if j.edit is not None else None


def distill_records(ratings: Ratings, g: GRMConfig) -> tuple[list[dict[str, Any]], Counter]:
    records: list[dict[str, Any]] = []
    skipped: Counter = Counter()
    for j in ratings.judgements:
        task = ratings.tasks[j.task_id]
        label = _critiqued(task, j)
        for answer in task.answers:
            scores = j.scores.get(answer.label, {})
            if not scores:
                continue
            if any(d not in scores for d in g.dimensions):
                skipped["grm: scores miss a dimension"] += 1
                continue
            if answer.label != label or not j.critique.strip():
                skipped["grm: no critique about this answer"] += 1
                continue
            output = grm_output(j.critique, scores, g.dimensions)
            parsed = parse_judgement(output, g.dimensions, (g.score_min, g.score_max),
                                     g.label_aliases)
            if not parsed.parsed or parsed.scores != {d: float(scores[d]) for d in
                                                      g.dimensions}:
                skipped["grm: does not parse back"] += 1
                continue
            persona, teacher = persona_text(task.persona), TEACHER_PREFIX + j.rater
            records.append({
                "key": record_key(persona, task.question, answer.text, teacher),
                "id": f"{task.task_id}:{answer.label}", "persona": persona,
                "question": task.question, "answer": answer.text, "teacher": teacher,
                "output": output, "parsed": True, "scores": parsed.scores,
                "warnings": list(parsed.warnings), "attempts": 1, "temperature": None})
    return records, skipped


def edit_records(ratings: Ratings) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                             Counter]:
    """(SFT conversations, preference pairs) from people's edits."""
    sft: list[dict[str, Any]] = []
    pairs: list[dict[str, Any]] = []
    skipped: Counter = Counter()
    for j in ratings.judgements:
        if j.edit is None:
            continue
        task = ratings.tasks[j.task_id]
        answer = next(a.text for a in task.answers if a.label == j.edit.label)
        if not j.edit.text.strip() or j.edit.text.strip() == answer.strip():
            skipped["edits: unchanged or empty"] += 1
            continue
        persona, rid = persona_text(task.persona), f"{task.task_id}:{j.rater}"
        sft.append({"id": rid, **({"persona": persona} if persona else {}), "messages": [
            {"role": "user", "content": task.question},
            {"role": "assistant", "content": j.edit.text}]})
        if not persona:
            skipped["pairwise: no persona"] += 1
            continue
        pairs.append({"id": rid, "persona": persona, "question": task.question,
                      "chosen": j.edit.text, "rejected": answer})
    return sft, pairs, skipped


def write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def export_ratings(cfg: Config, folder: str | Path, out: str | Path) -> ExportSummary:
    """Write the three files of the module docstring under `out`."""
    g = cfg.grm
    ratings = load_ratings(folder, (g.score_min, g.score_max))
    grm, skipped = distill_records(ratings, g)
    sft, pairs, skipped_edits = edit_records(ratings)
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    files = {"grm_distill": write_jsonl(out / GRM_FILE, grm),
             "sft": write_jsonl(out / SFT_FILE, sft),
             "pairwise": write_jsonl(out / PAIRWISE_FILE, pairs)}
    return ExportSummary(len(grm), len(sft), len(pairs), dict(skipped + skipped_edits),
                         {k: str(v) for k, v in files.items()})
