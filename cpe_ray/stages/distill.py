"""`cpe-ray grm collect`: a teacher judges (persona, question, answer) triples in the GRM's format.

Each input becomes the GRM's own prompt (`grm.template`, one user turn) sent to the teacher at
`distill.api` (an OpenAI-compatible endpoint: timeouts, connection errors, 408/409/429 and
5xx retried with back-off by `EndpointClient`). Every answer is appended to
`distill.output_path` as one JSON line as soon as it arrives, with `parse_judgement`'s verdict
(`parsed`, `scores`, `warnings`): outputs that do not parse are kept and marked, not dropped.
A request that still fails after its retries goes to the failures file with the reason.

Resumable: each record has a stable `key` (a hash of persona, question, answer and teacher
model); a rerun skips the keys already in the output, so no record is written twice, and asks
again for those that failed. A crash mid-write leaves at most one truncated last line, which
the rerun cuts off (its triple is asked again). The key is read from the variable
`distill.api.api_key_env` names and never written anywhere.

At the end every record in the output is marked by `distill.filter` (rejection sampling:
`kept`, `reject_reason`, `critique_tokens`; cpe_ray/stages/distill_filter.py), the file
replaced in one rename; the raw outputs stay, kept or not.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpe_ray.config import Config
from cpe_ray.data import JudgeInput, load_judge_inputs
from cpe_ray.judges.grm import build_grm_messages, load_grm_template, parse_judgement
from cpe_ray.paths import resolve_path
from cpe_ray.stages.distill_filter import FilterReport, JudgementFilter, mark_file
from cpe_ray.stages.judgements import read_records

KEY_CHARS = 24  # hex digits of sha256 kept: collisions are out of reach at any data size
JSONL_SUFFIX = ".jsonl"


def record_key(persona: str, question: str, answer: str, teacher: str) -> str:
    text = json.dumps([persona, question, answer, teacher], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:KEY_CHARS]


def failures_path(cfg: Config) -> Path:
    d = cfg.distill
    if d.failures_path:
        return Path(d.failures_path).expanduser()
    out = Path(d.output_path).expanduser()
    return out.with_name(out.name.removesuffix(JSONL_SUFFIX) + ".failures" + JSONL_SUFFIX)


@dataclass
class CollectSummary:
    inputs: int  # distinct (persona, question, answer) triples in the input file
    already: int  # of those, already in the output before this run
    collected: int  # written by this run
    unparsed: int  # of those, outputs parse_judgement could not read
    failed: int  # requests that failed after their retries (in the failures file)
    output: str
    failures: str
    seconds: float
    filter: FilterReport  # over every record in the output, this run's and earlier ones


def _record(item: JudgeInput, key: str, teacher: str, text: str, attempts: int,
            cfg: Config) -> dict[str, Any]:
    g = cfg.grm
    judgement = parse_judgement(text, g.dimensions, (g.score_min, g.score_max), g.label_aliases)
    return {"key": key, "id": item.id, "persona": item.persona, "question": item.question,
            "answer": item.answer, "teacher": teacher, "output": text,
            "parsed": judgement.parsed, "scores": judgement.scores,
            "warnings": list(judgement.warnings), "attempts": attempts,
            "temperature": cfg.distill.temperature}


def _append(f: Any, record: dict[str, Any]) -> None:
    # One write per line, flushed: a crash can only cut the line being written.
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()


def collect(cfg: Config, say: Callable[[str], None] = print) -> CollectSummary:
    """Ask the teacher about every input not yet in the output (see the module docstring)."""
    from cpe_ray.judges.endpoint import EndpointClient, EndpointSpec

    d = cfg.distill
    start = time.perf_counter()
    spec = EndpointSpec.from_config(d.api, "distill.api")
    inputs = load_judge_inputs(resolve_path(d.input_path), cfg.data.on_bad_record).records
    template = load_grm_template(cfg.grm.template, cfg.grm.template_placeholders)
    jfilter = JudgementFilter(cfg)  # its reference and tokenizer load before anything is sent
    out, fail = Path(d.output_path).expanduser(), failures_path(cfg)
    done = {r["key"] for r in read_records(out)}
    read_records(fail)  # only to cut a truncated last line before appending
    todo: dict[str, JudgeInput] = {}
    for item in inputs:
        todo.setdefault(record_key(item.persona, item.question, item.answer, spec.model), item)
    distinct = len(todo)
    todo = {k: v for k, v in todo.items() if k not in done}
    client = EndpointClient(spec)  # checks the key variable before anything is sent
    say(f"grm collect: {distinct} inputs, {distinct - len(todo)} already in {out}, asking "
        f"{client.describe()} about {len(todo)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fail.parent.mkdir(parents=True, exist_ok=True)
    collected = unparsed = failed = 0
    pool = ThreadPoolExecutor(max_workers=max(1, min(d.api.max_concurrency, len(todo))))
    try:
        with out.open("a", encoding="utf-8") as fo, fail.open("a", encoding="utf-8") as ff:
            futures = {pool.submit(client.chat, build_grm_messages(
                template, item.persona, item.question, item.answer),
                temperature=d.temperature, max_tokens=d.max_tokens): key
                for key, item in todo.items()}
            for future in as_completed(futures):
                key = futures[future]
                item, reply = todo[key], future.result()  # EndpointError: stop the run
                if reply.text is None:
                    failed += 1
                    _append(ff, {"key": key, "id": item.id, "teacher": spec.model,
                                 "error": reply.error, "attempts": reply.attempts,
                                 "time": time.time()})
                    continue
                record = _record(item, key, spec.model, reply.text, reply.attempts, cfg)
                _append(fo, record)
                collected += 1
                unparsed += not record["parsed"]
            os.fsync(fo.fileno())
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)  # written lines stay; rerun resumes
        raise
    finally:
        client.close()
    pool.shutdown()
    marks = mark_file(out, jfilter)
    say(f"grm collect: {marks.line()}")
    return CollectSummary(distinct, distinct - len(todo), collected, unparsed, failed,
                          str(out), str(fail), time.perf_counter() - start, marks)
