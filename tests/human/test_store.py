"""judgements.jsonl: whole lines from many threads, a crash's half line cut, resume."""

from __future__ import annotations

import json
import threading

import pytest

from cpe_ray.errors import DataError
from cpe_ray.human.records import Answer, HumanTask, Judgement, read_judgements
from cpe_ray.human.store import JudgementStore

TASKS = {f"t{i}": HumanTask(f"t{i}", "single", "samples", f"0:q:{i}", "p", "q",
                            (Answer("answer", "a"),)) for i in range(10)}


def _judgement(rater: str, i: int) -> Judgement:
    return Judgement(f"t{i}", rater, 1.0 + i, ("answer",), {"answer": {"helpfulness": i % 5}},
                     {}, "x" * 5000, None, float(i))  # long lines: a torn write would show


def test_concurrent_appends_never_interleave(tmp_path):
    store = JudgementStore(tmp_path, TASKS, print)
    raters = [f"r{k}" for k in range(8)]

    def rate(rater: str) -> None:
        for i in range(10):
            store.append(_judgement(rater, i))

    threads = [threading.Thread(target=rate, args=(r,)) for r in raters]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.close()
    back = read_judgements(tmp_path / "judgements.jsonl")
    assert len(back) == 80
    assert sorted((j.rater, j.task_id) for j in back) == sorted(
        (r, f"t{i}") for r in raters for i in range(10))
    assert all(store.judged(r) == frozenset(TASKS) for r in raters)


def test_resume_and_truncated_last_line(tmp_path):
    store = JudgementStore(tmp_path, TASKS, print)
    for i in range(3):
        store.append(_judgement("alice", i))
    store.append(_judgement("bob", 5))
    store.close()
    path = tmp_path / "judgements.jsonl"
    whole = path.read_bytes()
    path.write_bytes(whole + _judgement("alice", 3).to_line().encode()[:40])  # killed mid-write
    warnings = []
    again = JudgementStore(tmp_path, TASKS, warnings.append)
    assert len(warnings) == 1 and "judgements.jsonl:5: removed an unfinished last line" in (
        warnings[0])
    assert path.read_bytes() == whole
    assert again.judged("alice") == {"t0", "t1", "t2"} and again.judged("bob") == {"t5"}
    again.append(_judgement("alice", 3))
    again.close()
    assert [j.task_id for j in read_judgements(path)] == ["t0", "t1", "t2", "t5", "t3"]


def test_whole_last_line_without_newline_is_kept(tmp_path):
    path = tmp_path / "judgements.jsonl"
    path.write_text(_judgement("alice", 0).to_line())
    store = JudgementStore(tmp_path, TASKS, print)
    store.append(_judgement("alice", 1))
    store.close()
    assert [j.task_id for j in read_judgements(path)] == ["t0", "t1"]


def test_bad_middle_line_and_unknown_task(tmp_path):
    path = tmp_path / "judgements.jsonl"
    path.write_text("{oops\n" + _judgement("alice", 0).to_line() + "\n")
    with pytest.raises(DataError, match=r"judgements.jsonl:1: invalid JSON"):
        JudgementStore(tmp_path, TASKS, print)
    path.write_text(json.dumps({**_judgement("alice", 0).to_json(), "task_id": "zz"}) + "\n")
    with pytest.raises(DataError, match=r"judgements.jsonl:1: task 'zz' is not in tasks.jsonl"):
        JudgementStore(tmp_path, TASKS, print)
