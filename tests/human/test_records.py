"""Task and judgement records: JSON round trips and one-line errors naming file:line."""

from __future__ import annotations

import json

import pytest

from cpe_ray.errors import DataError
from cpe_ray.human.records import (
    HIDDEN_KEYS,
    Answer,
    HumanTask,
    Judgement,
    read_judgements,
    read_tasks,
)

TASK = HumanTask("t0001", "pair", "winrate", "p1", {"name": "Ann"}, "why?",
                 (Answer("model", "m"), Answer("baseline", "b")),
                 {**dict.fromkeys(HIDDEN_KEYS), "judge_preference": 0.5})
JUDGEMENT = Judgement("t0001", "alice", 1765040000.12, ("baseline", "model"),
                      {"model": {"helpfulness": 3}}, {"overall": "model", "helpfulness": "tie"},
                      "fine", Answer("model", "edited"), 12.5)


def test_round_trip(tmp_path):
    assert HumanTask.from_json(json.loads(json.dumps(TASK.to_json())), "x") == TASK
    assert Judgement.from_json(json.loads(JUDGEMENT.to_line()), "x") == JUDGEMENT
    (tmp_path / "t.jsonl").write_text(json.dumps(TASK.to_json()) + "\n\n")
    (tmp_path / "j.jsonl").write_text(JUDGEMENT.to_line() + "\n")
    assert read_tasks(tmp_path / "t.jsonl") == [TASK]
    assert read_judgements(tmp_path / "j.jsonl") == [JUDGEMENT]


@pytest.mark.parametrize(("change", "message"), [
    ({"kind": "triple"}, "'kind' is 'triple'; expected one of pair, single"),
    ({"answers": [{"label": "model", "text": "m"}]}, "a pair task needs 2 answer(s), got 1"),
    ({"answers": [{"label": "model", "text": "m"}, {"label": "model", "text": "n"}]},
     "the answers' labels must differ"),
    ({"hidden": {"judge_preference": 1.5}}, "hidden.judge_preference is 1.5"),
    ({"hidden": {"secret": 1}}, "'hidden' has unknown keys ['secret']"),
    ({"task_id": ""}, "'task_id' must be a non-empty string"),
])
def test_task_errors(tmp_path, change, message):
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps(TASK.to_json()) + "\n" + json.dumps({**TASK.to_json(),
                                                                     **change}) + "\n")
    with pytest.raises(DataError, match="tasks.jsonl:2: ") as e:
        read_tasks(path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_duplicate_task_ids(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text(2 * (json.dumps(TASK.to_json()) + "\n"))
    with pytest.raises(DataError, match="'t0001' occurs twice"):
        read_tasks(path)


@pytest.mark.parametrize(("change", "message"), [
    ({"scores": {"model": {"helpfulness": 2.5}}}, "scores.model.helpfulness must be an integer"),
    ({"scores": {"other": {"helpfulness": 1}}}, "scores name label 'other'"),
    ({"preference": {"overall": "left"}}, "preference.overall is 'left'"),
    ({"shown_order": []}, "'shown_order' must be a non-empty list"),
    ({"edit": {"label": "rewrite", "text": "x"}}, "edit.label 'rewrite' is not among"),
    ({"seconds": -1}, "'seconds' is -1.0"),
    ({"rater": " "}, "'rater' must be a non-empty string"),
    ({"submitted_at": "now"}, "'submitted_at' must be a finite number"),
])
def test_judgement_errors(tmp_path, change, message):
    path = tmp_path / "judgements.jsonl"
    path.write_text(json.dumps({**JUDGEMENT.to_json(), **change}) + "\n")
    with pytest.raises(DataError, match="judgements.jsonl:1: ") as e:
        read_judgements(path)
    assert message in str(e.value)


def test_invalid_json_names_line(tmp_path):
    path = tmp_path / "judgements.jsonl"
    path.write_text(JUDGEMENT.to_line() + "\n{oops\n")
    with pytest.raises(DataError, match=r"judgements.jsonl:2: invalid JSON"):
        read_judgements(path)
