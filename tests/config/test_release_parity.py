"""The release's choices where ours differ by a setting: the recipe files carry them."""

from __future__ import annotations

from pathlib import Path

import pytest

from cpe_ray.config import load_config

EXPERIMENTS = Path(__file__).resolve().parents[2] / "conf" / "experiment"


def test_defaults_keep_todays_behaviour() -> None:
    cfg = load_config()
    assert cfg.rollout.logprobs_mode == "processed"
    assert cfg.ppo.micro_batch_weighting == "tokens"
    assert cfg.grm.critique_persona_format == "text" and cfg.grm.max_retries == 5


@pytest.mark.parametrize("name", ["qwen2.5-7b-cpe-release", "qwen2.5-7b-cpe",
                                  "ablation-cpe-random-0.5", "ablation-ppo-grm"])
def test_the_release_recipe_keeps_the_grms_first_reply_and_its_persona_dict(name: str) -> None:
    grm = load_config(EXPERIMENTS / f"{name}.yaml").grm
    assert grm.max_retries == 0 and grm.on_missing == "zero"  # an unparsed dimension scores 0
    assert grm.critique_persona_format == "python_dict"


@pytest.mark.parametrize("name", ["ablation-ppo-grm", "ablation-ppo-bt"])
def test_plain_ppo_arms_use_verls_dual_clip(name: str) -> None:
    cfg = load_config(EXPERIMENTS / f"{name}.yaml")
    assert cfg.ppo.dual_clip == 3.0 and not cfg.post_edit.enabled


def test_the_options_load_from_overrides() -> None:
    cfg = load_config(None, ["ppo.micro_batch_weighting=rows", "rollout.logprobs_mode=raw",
                             "grm.critique_persona_format=python_dict"])
    assert (cfg.ppo.micro_batch_weighting, cfg.rollout.logprobs_mode,
            cfg.grm.critique_persona_format) == ("rows", "raw", "python_dict")
    with pytest.raises(Exception, match="micro_batch_weighting"):
        load_config(None, ["ppo.micro_batch_weighting=verl"])
