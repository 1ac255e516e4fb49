"""`cpe-ray eval human` and `cpe-ray rate-export`: what they print and write, and bad input as
one line with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cpe_ray.cli import main
from tests.human import handmade


def test_eval_human(tmp_path, capsys) -> None:
    folder = handmade.write(tmp_path / "ratings")
    assert main(["eval", "human", "--ratings", str(folder), "--out", str(tmp_path / "eval")]) == 0
    printed = capsys.readouterr().out
    assert "15 judgements of 5 tasks by 3 raters (1 replaced by a later one)" in printed
    assert "people's win rate, model vs baseline, overall: 66.7 ± 20.4 (4 tasks)" in printed
    results = json.loads((tmp_path / "eval" / "human" / "results.json").read_text())
    assert results["method"]["ci95"].endswith("seed 42")  # run.seed
    assert main(["eval", "human", "--ratings", str(folder), "--out", str(tmp_path / "e2"), "run.seed=7"]) == 0
    again = json.loads((tmp_path / "e2" / "human" / "results.json").read_text())
    assert again["method"]["ci95"].endswith("seed 7")
    (folder / "judgements.jsonl").write_text("")
    assert main(["eval", "human", "--ratings", str(folder), "--out", str(tmp_path / "e3")]) == 1
    assert "no judgements in" in capsys.readouterr().out


def test_rate_export(tmp_path, capsys) -> None:
    folder = handmade.write(tmp_path / "ratings")
    out = tmp_path / "data"
    assert main(["rate-export", "--ratings", str(folder), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "exported 3 GRM judgements, 2 SFT conversations, 2 preference pairs" in printed
    assert "left out     5  grm: no critique about this answer" in printed
    assert f"cpe-ray grm train distill.output_path={out / 'grm_distill.jsonl'}" in printed
    assert sorted(p.name for p in out.iterdir()) == ["grm_distill.jsonl", "pairwise.jsonl",
                                                     "sft.jsonl"]


def _bad_cases(tmp: Path) -> list[tuple[list[str], str]]:
    good = handmade.write(tmp / "good")
    stray = handmade.write(tmp / "stray")
    with (stray / "judgements.jsonl").open("a") as f:
        f.write(json.dumps({"task_id": "t99", "rater": "Z", "submitted_at": 1.0,
                            "shown_order": ["answer"]}) + "\n")
    broken = handmade.write(tmp / "broken")
    with (broken / "judgements.jsonl").open("a") as f:
        f.write('{"task_id": "t1", "rater": \n')
    return [
        (["eval", "human", "--ratings", str(tmp / "none")], "tasks.jsonl not found"),
        (["rate-export", "--ratings", str(tmp / "none"), "--out", str(tmp / "o")], "tasks.jsonl not found"),
        (["eval", "human", "--ratings", str(stray)], "names task 't99', which is not in tasks.jsonl"),
        (["rate-export", "--ratings", str(broken), "--out", str(tmp / "o")],
         f"{broken / 'judgements.jsonl'}:17: invalid JSON"),
        (["eval", "human", "--ratings", str(good), "grm.score_max=2"],
         "score model.helpfulness=3 is outside [-5, 2]"),
        (["eval", "human", "--ratings", str(good), "grm.dimensionz=[a]"], "unknown key 'grm.dimensionz'"),
    ]


@pytest.mark.parametrize("index", range(6))
def test_bad_input_is_one_line(index, tmp_path, capsys) -> None:
    args, expected = _bad_cases(tmp_path)[index]
    assert main([*args, f"eval.output_dir={tmp_path / 'eval'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cpe-ray: error: "), err
    assert expected in err[0], err[0]
    assert not (tmp_path / "eval").exists() and not (tmp_path / "o").exists()
