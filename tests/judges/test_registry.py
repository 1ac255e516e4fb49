"""The judge table: its names are the config's, one constructor, checks before start-up."""

from __future__ import annotations

import pytest

from cpe_ray.config import load_config
from cpe_ray.config.choices import GRM_BACKENDS
from cpe_ray.errors import ConfigError
from cpe_ray.judges.base import JudgeRequest
from cpe_ray.judges.registry import (
    JUDGES,
    JudgeBuilder,
    build_judge,
    check_backend,
    describe_judge,
)
from cpe_ray.judges.rubric import RubricJudge

ENDPOINT = ["grm.backend=openai", "grm.api.base_url=http://127.0.0.1:9/v1", "grm.api.model=m",
            "grm.api.api_key_env=CPE_TEST_REGISTRY_KEY"]


def test_judge_table_matches_the_config_choices() -> None:
    assert tuple(JUDGES) == tuple(GRM_BACKENDS)
    # a scalar model is its own pointwise scorer; every other judge is read by its reward
    assert [n for n in JUDGES if JUDGES[n].scorer is not None] == [
        n for n, b in GRM_BACKENDS.items() if not b.writes_critiques]


def test_judge_table_refuses_a_second_entry_and_lists_known_names() -> None:
    with pytest.raises(ValueError, match="grm.backend 'rubric' is registered already"):
        JUDGES.register("rubric", JudgeBuilder(JUDGES["bt"].build, JUDGES["bt"].describe))
    assert JUDGES["rubric"].scorer is None  # the first entry stays
    with pytest.raises(ValueError, match="unknown grm.backend 'gpt'; use one of "
                                         "rubric, hf, vllm, openai, bt"):
        JUDGES["gpt"]


def test_build_judge_builds_in_process_judges_and_wants_an_engine_for_engine_ones() -> None:
    cfg = load_config(None, [])
    judge = build_judge(cfg)
    assert isinstance(judge, RubricJudge) and describe_judge(cfg).startswith("rubric judge")
    [outcome] = judge.judge([JudgeRequest("a hiker", "Plan a trip.", "Go to the lake.")],
                            "score", 0)
    assert outcome.judgement.parsed
    with pytest.raises(ValueError, match="grm.backend=rubric judges on no generation engine"):
        build_judge(cfg, engine=object())  # type: ignore[arg-type]
    hf = load_config(None, ["grm.backend=hf", "grm.model_path=tiny"])
    with pytest.raises(ValueError, match="grm.backend=hf needs the generation engine"):
        build_judge(hf)
    assert describe_judge(hf) == "GRM tiny (hf)"


def test_the_endpoints_own_check_runs_before_start_up(monkeypatch) -> None:
    cfg = load_config(None, ENDPOINT)
    monkeypatch.delenv("CPE_TEST_REGISTRY_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"\$CPE_TEST_REGISTRY_KEY, which is not set"):
        check_backend(cfg)
    monkeypatch.setenv("CPE_TEST_REGISTRY_KEY", "k")
    check_backend(cfg)
    assert describe_judge(cfg) == "GRM endpoint m at http://127.0.0.1:9/v1"
