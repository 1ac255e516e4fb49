"""`distill.filter`: rejection sampling of collected judgements (cpe_ray/stages/distill_filter.py).

Hand-made records with numbers; default weights 0.35 / 0.40 / 0.25, so scores (3, 2, 1) give
a weighted reward of 1.05 + 0.80 + 0.25 = 2.10.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cpe_ray.config import load_config
from cpe_ray.judges.grm import parse_judgement
from cpe_ray.models import load_tokenizer, resolve_model_path
from cpe_ray.stages.distill import collect, read_records, record_key
from cpe_ray.stages.distill_filter import JudgementFilter, report
from tests.evaluation_server import ChatServer, grm_policy

PERSONA, QUESTION = "Ada, a welder", "How do I start?"
CRITIQUE = "Name the first welding class near her and drop the generic advice."


def output(h: float, p: float, n: float, critique: str = CRITIQUE) -> str:
    return (f"<critique>{critique}</critique>\n<scores>\nHelpfulness: {h:g}\n"
            f"Personalization: {p:g}\nNaturalness: {n:g}\n</scores>")


def record(answer: str, text: str, teacher: str = "assistant") -> dict:
    j = parse_judgement(text)
    return {"key": record_key(PERSONA, QUESTION, answer, teacher), "id": answer,
            "persona": PERSONA, "question": QUESTION, "answer": answer, "teacher": teacher,
            "output": text, "parsed": j.parsed, "scores": j.scores}


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def own_records() -> list[dict]:
    return [record("a1", output(3, 2, 1)),  # 2.10 vs the reference's 2.35
            record("a2", output(-2, -1, 0)),  # -1.10 vs 1.10
            record("a3", "Fine, I suppose."),  # no tags, no scores
            record("a4", output(1, 1, 1)),  # the reference never judged a4
            record("a5", output(3, 2, 1, "very " * 60 + "long."))]  # agrees, but long


def reference(tmp_path: Path) -> Path:
    return write(tmp_path / "teacher.jsonl", [
        record("a1", output(3, 2, 2), "teacher"),  # 2.35
        record("a1", "unparsed", "teacher"),  # left out of the mean
        record("a2", output(2, 1, 0), "teacher"),  # 1.10
        record("a5", output(2, 2, 1), "teacher"),  # 1.75
        record("a5", output(4, 2, 1), "teacher")])  # 2.45; mean (3, 2, 1): 2.10


def cfg_with(*overrides: str):
    return load_config(None, list(overrides))


def reasons(cfg, records, tokenizer=None) -> list[str | None]:
    return [v.reject_reason for v in JudgementFilter(cfg, tokenizer).verdicts(records)]


def test_defaults_keep_every_parsed_judgement() -> None:
    verdicts = JudgementFilter(cfg_with()).verdicts(own_records())
    assert [v.reject_reason for v in verdicts] == [None, None, "unparsed", None, None]
    assert all(v.agrees and v.within_length and v.critique_tokens is None for v in verdicts)
    assert reasons(cfg_with("distill.train_unparsed=true"), own_records()) == [None] * 5


def test_each_reason_against_a_judge_reference(tmp_path: Path) -> None:
    tok = load_tokenizer(resolve_model_path("tiny"))
    short = len(tok(CRITIQUE, add_special_tokens=False)["input_ids"])
    ref = reference(tmp_path)
    common = (f"distill.filter.reference_path={ref}", "distill.filter.max_score_diff=1.0")
    cfg = cfg_with(*common, f"distill.filter.max_critique_tokens={short}")
    verdicts = JudgementFilter(cfg, tok).verdicts(own_records())
    assert [v.reject_reason for v in verdicts] == [None, "disagrees", "unparsed",
                                                  "no_reference", "too_long"]
    assert verdicts[0].critique_tokens == short and verdicts[4].critique_tokens > short
    r = report(verdicts)
    # each test on its own: parsed 4 of 5; agrees: a1 and a5 (a3 has no scores, a4 no
    # reference); within length: all but a5 (a3, with no <critique>, counts its whole output)
    assert (r.judgements, r.parsed, r.agrees, r.within_length, r.kept) == (5, 4, 2, 4, 1)
    assert r.rejected == {"unparsed": 1, "no_reference": 1, "disagrees": 1, "too_long": 1}
    assert r.as_dict()["shares"] == {"parsed": 0.8, "agrees": 0.4, "within_length": 0.8,
                                     "kept": 0.2}
    # the bound is inclusive: one token less rejects a1 too
    tighter = cfg_with(*common, f"distill.filter.max_critique_tokens={short - 1}")
    assert reasons(tighter, own_records(), tok)[0] == "too_long"
    # a tolerance below |2.10 - 2.35| = 0.25 rejects a1; a5's mean reference agrees exactly
    assert reasons(cfg_with(f"distill.filter.reference_path={ref}",
                            "distill.filter.max_score_diff=0.2"), own_records()) == [
        "disagrees", "disagrees", "unparsed", "no_reference", None]


def test_per_dimension_agreement(tmp_path: Path) -> None:
    ref = reference(tmp_path)
    # a1 differs from (3, 2, 2) by 1 in naturalness only: within 1, not within 0.5
    loose = cfg_with(f"distill.filter.reference_path={ref}", "distill.filter.score_diff_on="
                     "dimensions", "distill.filter.max_score_diff=1")
    strict = cfg_with(f"distill.filter.reference_path={ref}", "distill.filter.score_diff_on="
                      "dimensions", "distill.filter.max_score_diff=0.5")
    assert reasons(loose, own_records())[0] is None
    assert reasons(strict, own_records())[0] == "disagrees"
    assert reasons(strict, own_records())[4] is None  # the mean (3, 2, 1) matches exactly


def test_preference_reference(tmp_path: Path) -> None:
    pairs = write(tmp_path / "pairs.jsonl", [
        {"persona": PERSONA, "question": QUESTION, "chosen": "c1", "rejected": "r1"},
        {"persona": PERSONA, "question": QUESTION, "chosen": "c2", "reject": "r2"},
        {"persona": PERSONA, "question": QUESTION, "chosen": "c3", "rejected": "r3"},
        {"persona": PERSONA, "question": QUESTION, "chosen": "c4", "rejected": "r4"}])
    records = [record("c1", output(3, 2, 1)), record("r1", output(-1, 0, 0)),  # 2.10 > -0.35
               record("c2", output(0, 0, 0)), record("r2", output(1, 1, 1)),  # 0 < 1: wrong
               record("c3", output(2, 2, 2)),  # r3 never judged
               record("c4", output(1, 1, 1)), record("r4", output(1, 1, 1))]  # a tie
    cfg = cfg_with(f"distill.filter.reference_path={pairs}",
                   "distill.filter.reference_kind=preference")
    assert reasons(cfg, records) == [None, None, "disagrees", "disagrees", "no_reference",
                                     "disagrees", "disagrees"]


def test_grm_train_trains_on_kept_records_only(tmp_path: Path) -> None:
    from cpe_ray.stages.grm_train import prepare_grm

    out = write(tmp_path / "judgements.jsonl", own_records())
    base = (f"distill.output_path={out}", "distill.eval_fraction=0")
    job, _ = prepare_grm(cfg_with(*base))
    assert len(job.train) == 4 and job.data["filter"]["kept"] == 4  # all parsed ones
    job, _ = prepare_grm(cfg_with(*base, f"distill.filter.reference_path={reference(tmp_path)}"))
    assert len(job.train) == 2  # a1 and a5
    assert job.data["filter"]["rejected"] == {"unparsed": 1, "no_reference": 1, "disagrees": 1}
    assert job.data["judgements"] == 5 and job.data["dropped_too_long"] == 0


def test_collect_marks_every_record_and_keeps_them(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CPE_RAY_TEST_TEACHER_KEY", "k")
    inputs = write(tmp_path / "in.jsonl", [
        {"persona": PERSONA, "question": QUESTION, "answer": " ".join(["word"] * n)}
        for n in (3, 30, 60)])
    out = tmp_path / "out.jsonl"
    overrides = [f"distill.input_path={inputs}", f"distill.output_path={out}",
                 "distill.api.model=teacher", "distill.api.api_key_env=CPE_RAY_TEST_TEACHER_KEY"]
    with ChatServer(grm_policy, "k") as server:
        cfg = cfg_with(*overrides, f"distill.api.base_url={server.base_url}",
                       "distill.filter.max_critique_tokens=1")
        summary = collect(cfg, say=lambda _: None)
    records = read_records(out)
    assert len(records) == 3 and summary.filter.kept == 0
    assert {r["reject_reason"] for r in records} == {"too_long"}
    assert all(r["kept"] is False and r["critique_tokens"] > 1 and "<critique>" in r["output"]
               for r in records)
    with ChatServer(grm_policy, "k") as server:  # a rerun asks nothing and marks again
        cfg = cfg_with(*overrides, f"distill.api.base_url={server.base_url}")
        again = collect(cfg, say=lambda _: None)
        assert server.requests == 0
    assert again.filter.kept == 3 and again.filter.as_dict()["shares"]["kept"] == 1.0
    assert [r["key"] for r in read_records(out)] == [r["key"] for r in records]
    assert all(r["kept"] and r["reject_reason"] is None for r in read_records(out))


def test_a_missing_reference_is_an_error(tmp_path: Path) -> None:
    from cpe_ray.errors import DataError

    with pytest.raises(DataError, match="reference_path"):
        JudgementFilter(cfg_with(f"distill.filter.reference_path={tmp_path / 'no.jsonl'}"))
