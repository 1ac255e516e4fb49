"""PersonaMem: the published question format, the benchmark's prompt and scoring, accuracy."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from cpe_ray.config import ApiConfig, Config, EvalConfig
from cpe_ray.errors import DataError
from cpe_ray.evaluation.personamem import (
    accuracy_by_type,
    instruction,
    load_personamem,
    run_personamem,
    score_reply,
)
from cpe_ray.paths import DATA_DIR
from tests.evaluation_server import ChatServer

DEMO = DATA_DIR / "demo" / "personamem"
QUESTIONS, CONTEXTS = DEMO / "questions.csv", DEMO / "shared_contexts.jsonl"
# The benchmark's own instruction (inference_standalone_openai.py), verbatim.
PUBLISHED = ("Find the most appropriate model response and give your final answer (a), (b), "
             "(c), or (d) after the special token <final_answer>.")


def test_demo_set_loads_with_visible_history_only() -> None:
    result = load_personamem(QUESTIONS, CONTEXTS)
    qs = result.records
    assert len(qs) == 6 and result.skipped == 0
    assert [q.correct for q in qs] == ["b", "c", "a", "d", "b", "c"]
    first = qs[0]
    assert first.question_type == "recall_user_shared_facts" and len(first.options) == 4
    assert len(first.history) == 9 and first.history[0]["role"] == "system"
    assert len(qs[3].history) == 5  # end_index_in_shared_context = 5: the later turns stay hidden
    assert first.extra["topic"] == "cooking" and first.extra["persona_id"] == "hana"


def test_prompt_is_the_benchmarks() -> None:
    assert instruction(4) == PUBLISHED
    assert instruction(2) == ("Find the most appropriate model response and give your final "
                              "answer (a), or (b) after the special token <final_answer>.")
    q = load_personamem(QUESTIONS, CONTEXTS).records[0]
    messages = q.messages()
    assert messages[:-1] == list(map(dict, q.history))
    assert messages[-1] == {"role": "user", "content": f"{q.question}\n\n{PUBLISHED}\n\n"
                                                       f"{q.options_text}"}
    assert q.options_text.startswith("['(a) Monday'")  # the CSV's text as is


@pytest.mark.parametrize(("reply", "outcome", "predicted"), [
    ("<final_answer>(b)", "correct", "b"),
    ("Maybe (a)... no. <final_answer> (b) </final_answer>", "correct", "b"),
    ("<final_answer>b", "correct", "b"),
    ("The answer is (d).", "wrong", "d"),
    ("(a) or (c), hard to say", "parse_failure", None),
    ("I do not know.", "parse_failure", None),
    ("<final_answer>(c) because (a) is wrong", "parse_failure", None),  # two letters
    ("I liked (a) at first. <final_answer>(c)", "wrong", "c"),  # the final answer counts
])
def test_scoring_follows_the_benchmark(reply: str, outcome: str, predicted: str | None) -> None:
    got = score_reply(reply, "b", 4)
    assert got[0] == outcome
    if predicted is not None:
        assert got[1] == predicted


def write_questions(path: Path, rows: list[dict[str, str]]) -> Path:
    fields = ["question_id", "question_type", "user_question_or_message", "all_options",
              "correct_answer", "shared_context_id", "end_index_in_shared_context"]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def row(**changes: str) -> dict[str, str]:
    base = {"question_id": "q1", "question_type": "recall", "user_question_or_message": "Which?",
            "all_options": "['(a) x', '(b) y']", "correct_answer": "(a)",
            "shared_context_id": "c1", "end_index_in_shared_context": "1"}
    return {**base, **changes}


@pytest.mark.parametrize(("changes", "message"), [
    ({"all_options": "not a list"}, "all_options is not a list of strings"),
    ({"all_options": "['(a) only']"}, "all_options has 1 options"),
    ({"correct_answer": "(e)"}, r"correct_answer '\(e\)' is not one of \(a\), \(b\)"),
    ({"shared_context_id": "nope"}, "shared_context_id 'nope' is not in the shared contexts"),
    ({"end_index_in_shared_context": "9"}, "end_index_in_shared_context 9 is outside 0..2"),
])
def test_bad_rows_name_file_and_line(tmp_path: Path, changes: dict, message: str) -> None:
    contexts = tmp_path / "ctx.jsonl"
    contexts.write_text(json.dumps({"c1": [{"role": "user", "content": "hi"},
                                           {"role": "assistant", "content": "hello"}]}) + "\n"
                        + '{"unused": [this line is broken and never parsed\n')
    questions = write_questions(tmp_path / "q.csv", [row(), row(question_id="q2", **changes)])
    with pytest.raises(DataError, match=rf"q.csv:3: {message}"):
        load_personamem(questions, contexts)
    skipped = load_personamem(questions, contexts, on_bad="skip")
    assert len(skipped.records) == 1 and skipped.skipped == 1


def test_missing_columns_and_files(tmp_path: Path) -> None:
    (tmp_path / "q.csv").write_text("question_id,all_options\nq1,[]\n")
    with pytest.raises(DataError, match="missing column.s. user_question_or_message, "
                                        "correct_answer, shared_context_id"):
        load_personamem(tmp_path / "q.csv", CONTEXTS)
    with pytest.raises(DataError, match="PersonaMem shared contexts JSONL not found"):
        load_personamem(QUESTIONS, tmp_path / "none.jsonl")


def test_accuracy_with_an_endpoint_answerer(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # An answerer that always says (b): right on the two questions whose answer is (b).
    monkeypatch.setenv("CPE_RAY_TEST_PM_KEY", "pm-key")
    with ChatServer(lambda messages: "Thinking... <final_answer>(b)", "pm-key") as server:
        api = ApiConfig(base_url=server.base_url, model="answerer",
                        api_key_env="CPE_RAY_TEST_PM_KEY")
        cfg = Config(eval=EvalConfig(personamem_answerer="openai", output_dir=str(tmp_path),
                                     api=api))
        summary = run_personamem(cfg, say=lambda _: None)
    assert server.requests == 6
    (asked,) = [b for b in server.bodies  # requests run concurrently: find the first question
                if b["messages"][-1]["content"].startswith("Which evening")]
    assert asked["messages"][-1]["content"].endswith(
        "['(a) Monday', '(b) Tuesday', '(c) Thursday', '(d) Saturday']")
    assert len(asked["messages"]) == 10  # nine visible history messages and the question
    total = summary["table"]["all"]
    assert (total["n"], total["correct"], total["wrong"]) == (6, 2, 4)
    assert total["accuracy"] == pytest.approx(2 / 6)
    assert summary["table"]["recall_user_shared_facts"]["correct"] == 1
    out = tmp_path / "personamem"
    for name in ("results.json", "answers.jsonl", "report.md", "accuracy.png"):
        assert (out / name).is_file()


def test_unanswered_questions_are_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CPE_RAY_TEST_PM_KEY", "pm-key")
    with ChatServer(lambda m: "<final_answer>(b)", "pm-key", fail_first=None) as server:
        api = ApiConfig(base_url=server.base_url, model="answerer",
                        api_key_env="CPE_RAY_TEST_PM_KEY", max_retries=1,
                        backoff_initial_s=0.01, backoff_max_s=0.01)
        cfg = Config(eval=EvalConfig(personamem_answerer="openai", output_dir=str(tmp_path),
                                     limit=2, api=api))
        summary = run_personamem(cfg, say=lambda _: None)
    assert summary["table"]["all"]["unanswered"] == 2 and summary["table"]["all"]["n"] == 2
    rows = [json.loads(line) for line in (tmp_path / "personamem" / "answers.jsonl").open()]
    assert all(r["error"].startswith("HTTP 503") for r in rows)


def test_accuracy_by_type_totals() -> None:
    rows = [{"question_type": t, "outcome": o} for t, o in
            [("x", "correct"), ("x", "wrong"), ("y", "parse_failure"), ("y", "correct")]]
    table = accuracy_by_type(rows)
    assert table["x"]["accuracy"] == 0.5 and table["y"]["parse_failure"] == 1
    assert table["all"]["n"] == 4 and table["all"]["accuracy"] == 0.5
