"""The human report's files: results.json (the same figures as `analyse`), report.md and the
PNGs, written atomically under <eval.output_dir>/human/."""

from __future__ import annotations

import json

import pytest

from cpe_ray.config import load_config
from cpe_ray.human.report import run_human_report
from tests.human import handmade

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_report_files(tmp_path) -> None:
    folder = handmade.write(tmp_path / "ratings")
    cfg = load_config(None, [f"eval.output_dir={tmp_path / 'eval'}", "run.seed=0"])
    said: list[str] = []
    results = run_human_report(cfg, folder, said.append)
    out = tmp_path / "eval" / "human"
    assert said == ["analysing 15 judgements of 5 tasks"]
    assert sorted(p.name for p in out.iterdir()) == ["judges.png", "report.md", "results.json",
                                                     "winrate.png"]  # no temporary left
    for name in ("judges.png", "winrate.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["files"]["winrate_plot"] == str(out / "winrate.png")
    w = saved["win_rates"]["model vs baseline"]["helpfulness"]
    assert w["value"] == pytest.approx(100 * 7 / 12, abs=1e-9) and w["n"] == 4
    assert saved["judges"]["pairwise"]["overall"]["accuracy"]["n"] == 3
    assert saved["agreement"]["preference"]["overall"]["fleiss_kappa"]["value"] is None
    md = (out / "report.md").read_text()
    assert "15 judgements by 3 raters (1 replaced by a later one" in md
    assert "| model vs baseline | helpfulness | 58.3 | 22.0 |" in md
    assert "| preference | helpfulness | Fleiss' kappa | 0.318 | 4 | 12 |" in md
    assert "| preference | overall | Fleiss' kappa | — (raters per task differ (2 to 3)) |" in md
    assert "| score | helpfulness | alpha (interval) | 0.842 | 3 | 7 |" in md
    assert "| pairwise | overall | 0.667 | 3 | 1 / 0 / 0 | 0.738 | 0.262 | 4 |" in md
    assert "![win rate](winrate.png)" in md and "![judges](judges.png)" in md
    assert "NaN" not in (out / "results.json").read_text()


def test_no_judgements_yet(tmp_path) -> None:
    folder = handmade.write(tmp_path / "ratings")
    (folder / "judgements.jsonl").write_text("")
    cfg = load_config(None, [f"eval.output_dir={tmp_path / 'eval'}"])
    results = run_human_report(cfg, folder, lambda _: None)
    assert results["counts"]["judgements"] == 0 and results["win_rates"] == {}
    assert set(results["files"]) == {"results", "report"}  # nothing to plot
    assert "0 judgements by 0 raters" in (tmp_path / "eval" / "human" / "report.md").read_text()
