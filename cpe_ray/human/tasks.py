"""Tasks for human raters, built once from what the project writes and then reused.

Sources:
- `cpe-ray eval winrate`'s `<eval.output_dir>/winrate/judgements.jsonl`: one pair task per
  prompt, the policy's answer ("model") against the baseline's, with the judge's averaged
  preference, the GRM rewards (eval.score_answers) and the LC GLM's P(model better) at
  equal length from `results.json` hidden until the rater has judged;
- a training run's `samples.jsonl`: a pair task (original against its post-edit rewrite)
  where a rewrite exists, else a single task; the GRM's critique and rewards hidden.

`--size` tasks are drawn from all candidates with `random.Random(seed)` and written to
`<out>/tasks.jsonl` (atomically) with `<out>/tasks_source.json` saying how; a rerun with the
same sources, size and seed reuses the file, with others refuses, so raters who already
started never see their tasks change under them.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from cpe_ray.errors import CpeError, DataError
from cpe_ray.human.records import HIDDEN_KEYS, Answer, HumanTask, read_jsonl, read_tasks

TASKS_FILE = "tasks.jsonl"
SOURCE_FILE = "tasks_source.json"
WINRATE_FILE = "judgements.jsonl"
RESULTS_FILE = "results.json"
ID_WIDTH = 4


@dataclass(frozen=True)
class TaskSpec:
    """Where tasks come from and how many to draw; recorded beside tasks.jsonl."""

    winrate: str | None  # the `winrate/` folder of `cpe-ray eval winrate` (absolute)
    samples: str | None  # a run's samples.jsonl (absolute)
    size: int
    seed: int


def _object(obj: Any, where: str) -> tuple[str, dict[str, Any]]:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object per line")
    return where, obj


def _rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """A source's JSON objects with their `file:line`."""
    return read_jsonl(path, _object)


def _need(obj: dict[str, Any], where: str, keys: tuple[str, ...], what: str) -> None:
    for key in keys:
        if not isinstance(obj.get(key), str):
            raise DataError(f"{where}: '{key}' must be a string in {what}")


def _probability(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _hidden(**values: Any) -> dict[str, Any]:
    return {k: values.get(k) for k in HIDDEN_KEYS}


def lc_preference(results_path: Path) -> float | None:
    """The LC GLM's P(model better) at equal length, sigmoid(theta), from results.json; None
    when missing or not identified. The GLM ("length_controlled_minimal") has no per-prompt
    term, so this is the same for every pair of one evaluation: the LC win rate / 100."""
    if not results_path.is_file():
        return None
    try:
        m = json.loads(results_path.read_text(encoding="utf-8")).get("metrics", {})
    except (json.JSONDecodeError, AttributeError):
        raise DataError(f"{results_path}: not the JSON object `cpe-ray eval winrate` "
                        "writes") from None
    theta = _probability(m.get("theta"))
    if theta is None or not m.get("n_total") or not m.get("lc_identified", False):
        return None
    return 1.0 / (1.0 + math.exp(-theta))


def winrate_tasks(folder: Path) -> list[HumanTask]:
    """Pair tasks (model, baseline) from `cpe-ray eval winrate`'s judgements.jsonl."""
    path = folder / WINRATE_FILE
    if not path.is_file():
        raise DataError(f"{path} not found; give the winrate/ folder that `cpe-ray eval "
                        "winrate` wrote (it holds judgements.jsonl and results.json)")
    lc = lc_preference(folder / RESULTS_FILE)
    out = []
    for where, row in _rows(path):
        _need(row, where, ("question", "model_answer", "baseline_answer"),
              "eval winrate's judgements.jsonl")
        rewards = ({"model": row["model_reward"], "baseline": row["baseline_reward"]}
                   if "model_reward" in row else None)
        out.append(HumanTask(
            "", "pair", "winrate", str(row.get("id", where)), row.get("persona", ""),
            row["question"], (Answer("model", row["model_answer"]),
                              Answer("baseline", row["baseline_answer"])),
            _hidden(grm_reward=rewards, judge_preference=_probability(row.get("preference")),
                    lc_preference=lc)))
    return out


def samples_tasks(path: Path) -> list[HumanTask]:
    """Pair tasks (original, rewrite) or single tasks from a run's samples.jsonl."""
    if not path.is_file():
        raise DataError(f"{path} not found; give a run's samples.jsonl (`cpe-ray train` "
                        "writes it in the run folder)")
    out = []
    per_step: dict[Any, int] = {}
    for where, row in _rows(path):
        _need(row, where, ("question", "answer"), "samples.jsonl")
        step = row.get("step")
        k = per_step.get(step, 0)  # the answer's index in its step, as sample_records counts
        per_step[step] = k + 1
        source_id = f"{step}:{row.get('prompt_id')}:{k}"
        critique = row.get("critique") if isinstance(row.get("critique"), str) else None
        if isinstance(row.get("rewrite"), str):
            answers = (Answer("original", row["answer"]), Answer("rewrite", row["rewrite"]))
            rewards = {"original": row.get("answer_reward"),
                       "rewrite": row.get("rewrite_reward")}
        else:
            answers, rewards = (Answer("answer", row["answer"]),), {
                "answer": row.get("answer_reward")}
        out.append(HumanTask("", "pair" if len(answers) == 2 else "single", "samples",
                             source_id, row.get("persona", ""), row["question"], answers,
                             _hidden(critique=critique, grm_reward=rewards)))
    return out


def draw(candidates: list[HumanTask], size: int, seed: int) -> list[HumanTask]:
    """`size` candidates (all if fewer) in a seeded random order, numbered t0000, t0001..."""
    picked = random.Random(seed).sample(range(len(candidates)), min(size, len(candidates)))
    return [replace(candidates[j], task_id=f"t{i:0{ID_WIDTH}d}") for i, j in enumerate(picked)]


def write_atomic(path: Path, text: str) -> None:
    """`text` to `path` via a temporary file in the same folder: a crash leaves the old file
    or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_tasks(out: Path, spec: TaskSpec, say: Callable[[str], None]) -> list[HumanTask]:
    """`<out>/tasks.jsonl`: read back if there, else drawn from the sources and written."""
    tasks_path, source_path = out / TASKS_FILE, out / SOURCE_FILE
    if tasks_path.is_file():
        if spec.winrate or spec.samples:
            recorded = (json.loads(source_path.read_text(encoding="utf-8"))
                        if source_path.is_file() else None)
            if recorded != asdict(spec):
                raise CpeError(f"{tasks_path} was built from {recorded or 'unknown sources'}, "
                               f"not {asdict(spec)}; give the same sources, --size and "
                               "--seed, none of them (to reuse it), or another --out")
        tasks = read_tasks(tasks_path)
        if not tasks:
            raise DataError(f"{tasks_path} holds no tasks; remove it and build it again")
        say(f"reusing {len(tasks)} tasks from {tasks_path}")
        return tasks
    if not (spec.winrate or spec.samples):
        raise CpeError(f"{tasks_path} does not exist; give --winrate DIR and/or --samples "
                       "FILE to build it")
    candidates = []
    if spec.winrate:
        candidates += winrate_tasks(Path(spec.winrate))
    if spec.samples:
        candidates += samples_tasks(Path(spec.samples))
    if not candidates:
        raise DataError("the sources hold no answers to rate; check --winrate / --samples")
    tasks = draw(candidates, spec.size, spec.seed)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(source_path, json.dumps(asdict(spec), indent=2) + "\n")
    write_atomic(tasks_path, "".join(json.dumps(t.to_json(), ensure_ascii=False) + "\n"
                                     for t in tasks))
    say(f"wrote {len(tasks)} tasks (of {len(candidates)} candidates, seed {spec.seed}) to "
        f"{tasks_path}")
    return tasks
