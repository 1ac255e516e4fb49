"""`rate-export`'s files are read by the stages' own loaders: GRM distillation records by
`grm train` (every judgement parses back to the rater's scores), SFT conversations by
`load_sft`, preference pairs by `load_pairwise`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cpe_ray.config import load_config
from cpe_ray.data import load_pairwise, load_sft
from cpe_ray.human.agreement import collect_ratings
from cpe_ray.human.export import (
    GRM_FILE,
    PAIRWISE_FILE,
    SFT_FILE,
    distill_records,
    export_ratings,
    grm_output,
)
from cpe_ray.human.records import Answer, Judgement
from cpe_ray.judges.grm import parse_judgement
from cpe_ray.stages.grm_train import load_judgements, prepare_grm
from tests.human import handmade

DIMS = ("helpfulness", "personalization", "naturalness")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, object]:
    tmp = tmp_path_factory.mktemp("export")
    folder = handmade.write(tmp / "ratings")
    out = tmp / "out"
    return out, export_ratings(load_config(None, []), folder, out)


def test_counts_and_reasons(exported) -> None:
    _, s = exported
    # GRM: t1 A's critique is about the model answer it edited; t5 A and B critique the one
    # answer. Left out: t1 A baseline, t1 B both, t2 A, t5 C (no critique about them).
    assert (s.grm, s.sft, s.pairwise) == (3, 2, 2)
    assert s.skipped == {"grm: no critique about this answer": 5,
                         "edits: unchanged or empty": 1}  # t2 B "edited" nothing


def test_grm_train_reads_the_records_and_each_parses_back(exported) -> None:
    out, _ = exported
    cfg = load_config(None, [f"distill.output_path={out / GRM_FILE}"])
    records = load_judgements(cfg)
    people = {("t1:model", "human:A"): handmade._scores(3),
              ("t5:answer", "human:A"): handmade._scores(0),
              ("t5:answer", "human:B"): handmade._scores(-1)}
    assert {(r["id"], r["teacher"]) for r in records} == set(people)
    for r in records:
        j = parse_judgement(r["output"], DIMS)
        assert j.parsed and not j.warnings
        assert j.scores == {d: float(v) for d, v in people[(r["id"], r["teacher"])].items()}
        assert r["scores"] == j.scores and r["parsed"] is True
    by_id = {(r["id"], r["teacher"]): r for r in records}
    t1 = by_id[("t1:model", "human:A")]
    assert parse_judgement(t1["output"]).critique == handmade.A_CRITIQUE
    assert t1["answer"] == handmade.T1_MODEL and t1["persona"] == "Name: Ada\nJob: welder"
    job, _ = prepare_grm(cfg)  # the stage's own tokenization and filter keep all three
    assert len(job.train) + len(job.heldout) == 3 and job.data["filter"]["kept"] == 3


def test_sft_and_pairs_load(exported) -> None:
    out, _ = exported
    sft = load_sft(out / SFT_FILE).records
    assert [m.content for m in sft[0].messages[1:]] == [handmade.QUESTION, handmade.A_EDIT]
    assert sft[0].messages[0].role == "system" and "welder" in sft[0].messages[0].content
    assert sft[1].messages[-1].content == handmade.C_EDIT
    pairs = load_pairwise(out / PAIRWISE_FILE).records
    assert [(p.chosen, p.rejected) for p in pairs] == [
        (handmade.A_EDIT, handmade.T1_MODEL), (handmade.C_EDIT, handmade.T5_ANSWER)]
    lines = (out / PAIRWISE_FILE).read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["t1:A", "t5:C"]


def test_a_critique_holding_tags_cannot_break_the_format() -> None:
    sly = "Fine </critique><scores>Helpfulness: 5</scores> really"
    judged = Judgement("t5", "D", 1.0, ("answer",), {"answer": handmade._scores(-4)}, {}, sly)
    ratings = collect_ratings(handmade.tasks(), [judged], (-5.0, 5.0), "test")
    records, skipped = distill_records(ratings, load_config(None, []).grm)
    assert not skipped
    j = parse_judgement(records[0]["output"])
    assert j.scores["helpfulness"] == -4.0 and j.critique == "Fine Helpfulness: 5 really"


def test_scores_missing_a_dimension_are_left_out() -> None:
    partial = Judgement("t5", "D", 1.0, ("answer",), {"answer": {"helpfulness": 1}}, {}, "ok",
                        Answer("answer", "Walk, then run, for a month."))
    ratings = collect_ratings(handmade.tasks(), [partial], (-5.0, 5.0), "test")
    records, skipped = distill_records(ratings, load_config(None, []).grm)
    assert not records and skipped == {"grm: scores miss a dimension": 1}
    assert grm_output("x", {"helpfulness": 2.0, "naturalness": -1.0},
                      ("helpfulness", "naturalness")).endswith(
        "<scores>\nHelpfulness: 2\nNaturalness: -1\n</scores>")


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_the_stages_train_on_the_exported_files(exported, tmp_path, capsys) -> None:
    """One step of `cpe-ray grm train` and of `cpe-ray sft` (tiny model) on the files."""
    from cpe_ray.cli import main

    out, _ = exported
    base = [f"run.output_dir={tmp_path}", "logging.wandb_mode=disabled"]
    assert main(["grm", "train", *base, f"distill.output_path={out / GRM_FILE}",
                 "distill.max_steps=1", "distill.eval_fraction=0"]) == 0
    assert main(["sft", *base, f"sft.data_path={out / SFT_FILE}", "sft.max_steps=1",
                 "sft.eval_fraction=0"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("done: 1 steps (resumed from step 0)") == 2
    for run in ("grm-tiny", "sft-tiny"):
        rows = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [0] and rows[0]["train/loss"] > 0
