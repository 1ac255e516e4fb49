"""PersonaFeedback accuracy tables on the demo cases, with real judges of every kind."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest

from cpe_ray.config import ApiConfig, Config, EvalConfig, GRMConfig
from cpe_ray.data import load_personafeedback
from cpe_ray.evaluation.endpoint import EndpointPairwiseJudge
from cpe_ray.evaluation.pairwise import LengthPairwiseJudge, load_pairwise_template
from cpe_ray.evaluation.personafeedback import (
    accuracy_table,
    evaluate_pairwise,
    evaluate_scorer,
    run_personafeedback,
    table_markdown,
)
from cpe_ray.evaluation.scorers import GRMScorer
from cpe_ray.judges.base import JudgeRequest, Score
from cpe_ray.judges.endpoint import EndpointClient, EndpointSpec
from cpe_ray.judges.grm import weighted_reward
from cpe_ray.judges.rubric import RubricJudge
from cpe_ray.paths import DATA_DIR
from tests.evaluation_server import ChatServer, longer_answer_policy

ROOT = DATA_DIR / "demo" / "personafeedback"
# By hand from the demo files: in how many cases of each cell is `chosen` the longer answer
# (no two answers have the same length).
LONGER_CHOSEN = {"easy/specific": 3, "medium/specific": 4, "hard/specific": 3,
                 "easy/general": 4, "medium/general": 1, "hard/general": 4}


@pytest.fixture(scope="module")
def cases():
    return load_personafeedback(ROOT).records


class LengthScorer:
    """Reward = length in characters; answers mentioning `unparsable` fail to parse."""

    def __init__(self, unparsable: str | None = None) -> None:
        self.unparsable = unparsable

    def describe(self) -> str:
        return "length scorer"

    def score(self, requests: Sequence[JudgeRequest]) -> list[Score]:
        return [Score(None, "unparsed") if self.unparsable and self.unparsable in r.answer
                else Score(float(len(r.answer)), "chars") for r in requests]


def test_length_judges_give_the_hand_counted_table(cases) -> None:
    assert len(cases) == 36
    for results in (evaluate_pairwise(cases, LengthPairwiseJudge()),
                    evaluate_scorer(cases, LengthScorer())):
        table = accuracy_table(results)
        for cell, correct in LONGER_CHOSEN.items():
            c = table[cell]
            assert (c["n"], c["correct"], c["wrong"], c["tie"], c["parse_failure"]) == (
                6, correct, 6 - correct, 0, 0), cell
            assert c["accuracy"] == pytest.approx(correct / 6)
        total = table["all/all"]
        assert (total["n"], total["correct"]) == (36, 19)
        assert total["accuracy"] == pytest.approx(19 / 36)
        assert total["standard_error"] == pytest.approx((19 / 36 * 17 / 36 / 36) ** 0.5)
        assert table["all/specific"]["correct"] == 10 and table["easy/all"]["correct"] == 7


def test_ties_count_half_and_parse_failures_count_wrong(cases) -> None:
    results = evaluate_scorer(cases, LengthScorer(unparsable="budget"))
    failures = sum(r.outcome == "parse_failure" for r in results)
    expected = sum("budget" in c.chosen or "budget" in c.reject for c in cases)
    assert failures == expected > 0
    total = accuracy_table(results)["all/all"]
    assert total["parse_failure"] == failures
    assert total["correct"] + total["wrong"] + total["tie"] + failures == 36
    assert total["accuracy"] == pytest.approx((total["correct"] + 0.5 * total["tie"]) / 36)
    assert total["accuracy_judged"] == pytest.approx(
        (total["correct"] + 0.5 * total["tie"]) / (36 - failures))
    tied = evaluate_scorer(cases[:3], type("Flat", (), {
        "describe": lambda self: "flat", "score": lambda self, rs: [Score(1.0)] * len(rs)})())
    assert [r.outcome for r in tied] == ["tie"] * 3
    assert accuracy_table(tied)["all/all"]["accuracy"] == 0.5


def test_rubric_judge_table_matches_its_own_rewards(cases) -> None:
    cfg = GRMConfig()
    judge = RubricJudge(cfg)
    results = evaluate_scorer(cases, GRMScorer(judge, cfg, "rubric"))
    expected = {"correct": 0, "wrong": 0, "tie": 0}
    for c in cases:
        a, b = (weighted_reward(o.judgement) for o in judge.judge(
            [JudgeRequest(c.persona, c.question, c.chosen),
             JudgeRequest(c.persona, c.question, c.reject)], "score"))
        expected["correct" if a > b else "wrong" if a < b else "tie"] += 1
    total = accuracy_table(results)["all/all"]
    assert {k: total[k] for k in expected} == expected and total["parse_failure"] == 0
    lines = table_markdown(accuracy_table(results))
    assert lines[0] == "| tier | specific | general | all |"
    assert any(line.startswith("| all/all | 36 |") for line in lines)


def test_endpoint_judge_on_personafeedback(cases, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CPE_RAY_TEST_PF_KEY", "k-123")
    with ChatServer(longer_answer_policy, "k-123") as server:
        api = ApiConfig(base_url=server.base_url, model="judge",
                            api_key_env="CPE_RAY_TEST_PF_KEY", max_concurrency=4)
        judge = EndpointPairwiseJudge(EndpointClient(EndpointSpec.from_config(api, "eval.api")),
                                      load_pairwise_template("pairwise_en.txt"), 32, 0.0, 0)
        results = evaluate_pairwise(cases, judge, both_orders=True)
    assert server.requests == 72  # both orders of 36 cases
    assert accuracy_table(results)["all/all"]["correct"] == 19


@pytest.mark.slow
def test_bradley_terry_model(cases, tmp_path) -> None:
    # A real sequence-classification checkpoint (the tiny model with a fresh scalar head).
    from transformers import AutoModelForSequenceClassification

    from cpe_ray.judges.bt import BTScorer
    from cpe_ray.models import load_tokenizer, resolve_model_path

    tiny = resolve_model_path("tiny")
    model = AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=1)
    model.save_pretrained(tmp_path / "bt")
    load_tokenizer(tiny).save_pretrained(tmp_path / "bt")
    scorer = BTScorer(str(tmp_path / "bt"), device="cpu", batch_size=5)
    first = evaluate_scorer(cases[:6], scorer)
    assert [r.outcome for r in first] == [r.outcome for r in evaluate_scorer(cases[:6], scorer)]
    assert all(r.chosen_reward is not None and r.outcome != "parse_failure" for r in first)
    one_by_one = BTScorer(str(tmp_path / "bt"), device="cpu", batch_size=1)
    singles = one_by_one.score([JudgeRequest(cases[0].persona, cases[0].question,
                                             cases[0].chosen)])
    assert singles[0].reward == pytest.approx(first[0].chosen_reward, abs=1e-4)  # padding-safe


def test_run_writes_report(tmp_path) -> None:
    cfg = Config(eval=EvalConfig(output_dir=str(tmp_path), personafeedback_judge="pairwise",
                                 judge="length", limit=2))  # two cases per tier x kind cell
    summary = run_personafeedback(cfg, say=lambda _: None)
    out = tmp_path / "personafeedback"
    assert summary["n_cases"] == 12 and summary["table"]["all/all"]["n"] == 12
    for name in ("results.json", "cases.jsonl", "report.md", "accuracy.png",
                 "preference_vs_length.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    assert saved["table"]["easy/specific"]["n"] == 2
    assert "| tier | specific | general | all |" in (out / "report.md").read_text()
    assert len((out / "cases.jsonl").read_text().splitlines()) == 12


@pytest.mark.slow
def test_grm_on_an_engine_reports_parse_failures(tmp_path) -> None:
    # The tiny model as an LLM GRM (grm.backend=hf): it never writes parseable scores, so
    # every case is a parse failure, counted as wrong and reported, none dropped.
    cfg = Config(grm=GRMConfig(backend="hf", model_path="tiny", max_new_tokens=4, max_retries=0),
                 eval=EvalConfig(output_dir=str(tmp_path), limit=1))
    summary = run_personafeedback(cfg, say=lambda _: None)
    total = summary["table"]["all/all"]
    assert (total["n"], total["parse_failure"], total["accuracy"]) == (6, 6, 0.0)
    assert total["accuracy_judged"] is None
    assert summary["judge"] == "GRM tiny (hf)"
    rows = [json.loads(line) for line in (tmp_path / "personafeedback" / "cases.jsonl").open()]
    assert all(r["outcome"] == "parse_failure" and "unparsed" in r["detail"] for r in rows)
