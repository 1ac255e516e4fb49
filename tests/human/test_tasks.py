"""Tasks from eval winrate's judgements.jsonl and a run's samples.jsonl: sizes, seeds, reuse."""

from __future__ import annotations

import json
import math

import pytest
from rate_fixtures import write_samples, write_winrate

from cpe_ray.errors import CpeError, DataError
from cpe_ray.human.records import read_tasks
from cpe_ray.human.tasks import TaskSpec, build_tasks, samples_tasks, winrate_tasks


def _spec(tmp_path, size=100, seed=0, winrate=True, samples=True):
    return TaskSpec(str(write_winrate(tmp_path)) if winrate else None,
                    str(write_samples(tmp_path / "run" / "samples.jsonl")) if samples else None,
                    size, seed)


def test_winrate_pairs(tmp_path):
    tasks = winrate_tasks(write_winrate(tmp_path, n=4, theta=0.4))
    assert [t.source_id for t in tasks] == ["p0", "p1", "p2", "p3"]
    t = tasks[0]
    assert (t.kind, t.source, t.labels) == ("pair", "winrate", ("model", "baseline"))
    assert [x.hidden["judge_preference"] for x in tasks] == [1.0, 0.5, 0.0, None]
    assert t.hidden["grm_reward"] == {"model": 1.5, "baseline": -0.5}
    assert t.hidden["lc_preference"] == pytest.approx(1 / (1 + math.exp(-0.4)))
    assert t.hidden["critique"] is None
    assert winrate_tasks(write_winrate(tmp_path / "u", theta=None))[0].hidden[
        "lc_preference"] is None


def test_samples_pairs_and_singles(tmp_path):
    tasks = samples_tasks(write_samples(tmp_path / "samples.jsonl", n=6))
    assert [t.kind for t in tasks] == ["pair", "single"] * 3
    assert [t.source_id for t in tasks] == ["0:q0:0", "0:q1:1", "0:q2:2", "1:q3:0", "1:q4:1",
                                            "1:q5:2"]
    assert tasks[0].labels == ("original", "rewrite") and tasks[1].labels == ("answer",)
    assert tasks[0].hidden["critique"] == "critique 0"  # kept out of the page until judged
    assert tasks[1].hidden["grm_reward"] == {"answer": 0.1}


def test_size_seed_and_reuse(tmp_path):
    said = []
    spec = _spec(tmp_path, size=5, seed=3)
    tasks = build_tasks(tmp_path / "a", spec, said.append)
    assert [t.task_id for t in tasks] == ["t0000", "t0001", "t0002", "t0003", "t0004"]
    assert read_tasks(tmp_path / "a" / "tasks.jsonl") == tasks
    again = build_tasks(tmp_path / "b", spec, said.append)  # same seed: same draw
    assert again == tasks
    other = build_tasks(tmp_path / "c", TaskSpec(spec.winrate, spec.samples, 5, 4), said.append)
    assert [t.source_id for t in other] != [t.source_id for t in tasks]
    assert build_tasks(tmp_path / "a", spec, said.append) == tasks
    assert build_tasks(tmp_path / "a", TaskSpec(None, None, 5, 0), said.append) == tasks
    assert said[-1].startswith("reusing 5 tasks")
    everything = build_tasks(tmp_path / "d", _spec(tmp_path, size=100), said.append)
    assert len(everything) == 12 and len({t.source_id for t in everything}) == 12


def test_rerun_with_other_sources_refuses(tmp_path):
    spec = _spec(tmp_path, size=4)
    build_tasks(tmp_path / "out", spec, print)
    before = (tmp_path / "out" / "tasks.jsonl").read_bytes()
    with pytest.raises(CpeError, match="was built from .* give the same sources") as e:
        build_tasks(tmp_path / "out", TaskSpec(spec.winrate, spec.samples, 5, 0), print)
    assert "\n" not in str(e.value)
    assert (tmp_path / "out" / "tasks.jsonl").read_bytes() == before


def test_bad_sources(tmp_path):
    with pytest.raises(CpeError, match="give --winrate DIR and/or --samples FILE"):
        build_tasks(tmp_path / "out", TaskSpec(None, None, 4, 0), print)
    with pytest.raises(DataError, match="judgements.jsonl not found"):
        winrate_tasks(tmp_path)
    bad = tmp_path / "samples.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n" + json.dumps(
        {"question": "q"}) + "\n")
    with pytest.raises(DataError, match=r"samples.jsonl:2: 'answer' must be a string"):
        samples_tasks(bad)
    assert not (tmp_path / "out").exists()
