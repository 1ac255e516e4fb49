"""Config schema, loading, and every validation error's one line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cpe_ray.config import Config, config_to_yaml, flat_items, load_config, save_config
from cpe_ray.errors import ConfigError
from cpe_ray.paths import CONF_DIR

SECTIONS = {"run", "cluster", "policy", "rollout", "grm", "post_edit", "ppo", "learner", "data",
            "trainer", "logging", "eval", "sft", "distill", "rm", "serve",
            "monitor", "merge"}


def test_defaults_are_the_cpu_run_and_match_default_yaml() -> None:
    cfg = load_config()
    assert {f.name for f in dataclasses.fields(Config)} == SECTIONS
    assert cfg.policy.model_path == "tiny" and cfg.rollout.backend == "hf"
    assert not cfg.cluster.use_gpu and cfg.logging.wandb_mode == "offline"
    assert cfg.grm.weights == {"helpfulness": 0.35, "personalization": 0.40, "naturalness": 0.25}
    assert load_config(CONF_DIR / "default.yaml") == cfg


@pytest.mark.parametrize("name", ["qwen2.5-7b-cpe-release.yaml", "qwen2.5-7b-cpe.yaml",
                                  "qwen2.5-14b-cpe.yaml"])
def test_paper_settings(name: str) -> None:
    cfg = load_config(CONF_DIR / "experiment" / name)
    # method.md section 4: rollout batch 128, mini batch 64, n = 4, lengths 2048,
    # actor lr 1e-6, critic lr 1e-5, 2 epochs, no KL, vLLM TP at 0.6 memory, GAE with a critic.
    assert cfg.trainer.rollout_batch_size == 128 and cfg.ppo.mini_batch_size == 64
    assert cfg.rollout.n_samples_per_prompt == 4
    assert cfg.rollout.max_prompt_length == 2048 and cfg.rollout.max_new_tokens == 2048
    assert cfg.learner.actor_lr == 1e-6 and cfg.learner.critic_lr == 1e-5
    assert cfg.trainer.total_epochs == 2 and cfg.ppo.kl_coef == 0.0
    assert cfg.rollout.backend == "vllm" and cfg.rollout.gpu_memory_utilization == 0.6
    assert cfg.ppo.advantage_estimator == "gae"
    assert cfg.grm.critique_temperature == 0.9 and cfg.grm.score_temperature == 0.0
    assert cfg.post_edit.strategy == "random" and cfg.post_edit.ratio == 0.5
    # method.md 4, from the release's configs: T = 0.9 and top-p 0.9 for answers and rewrites,
    # AdamW (0.9, 0.999) with weight decay 0.01, mini-batches of 64 x n rows
    assert cfg.rollout.temperature == cfg.post_edit.temperature == 0.9
    assert cfg.rollout.top_p == 0.9
    assert cfg.learner.adam_betas == [0.9, 0.999] and cfg.learner.weight_decay == 0.01
    assert cfg.ppo.mini_batch_unit == "rows"


def test_release_recipe_and_the_papers_stated_clip() -> None:
    """The release's main CPE script runs the rewrite ratio unclipped; qwen2.5-7b-cpe.yaml is
    the same recipe with the paper's stated clip [0.8, 1.2], and nothing else."""
    from cpe_ray.learners.ds_config import train_config
    from cpe_ray.rl.compute import num_mini_batches

    release = load_config(CONF_DIR / "experiment" / "qwen2.5-7b-cpe-release.yaml")
    assert release.ppo.edit_clip_low is None and release.ppo.edit_clip_high is None
    assert release.post_edit.kept_multiple == 8 and release.ppo.edit_loss
    stated = load_config(CONF_DIR / "experiment" / "qwen2.5-7b-cpe.yaml")
    base, variant = flat_items(release), flat_items(stated)
    assert {k: v for k, v in variant.items() if v != base[k]} == {
        "run.name": "qwen2.5-7b-cpe", "ppo.edit_clip_low": 0.2, "ppo.edit_clip_high": 0.2}
    # kept rewrites add optimiser steps: 512 answers + 256 rewrites = 3 steps of 256 rows
    assert [num_mini_batches(release, rows) for rows in (512, 512 + 48, 512 + 256)] == [2, 3, 3]
    assert num_mini_batches(load_config(), 12) == 2  # default: 8 prompts / 4 a mini-batch
    optim = train_config(release.learner, 1e-6, "bfloat16", 8, True)["optimizer"]["params"]
    assert optim["betas"] == [0.9, 0.999] and optim["weight_decay"] == 0.01


def test_paper_stage_settings() -> None:
    cfg = load_config(CONF_DIR / "experiment" / "qwen2.5-stages.yaml")
    # method.md 4: the policy is Qwen2.5-7B, the GRM Qwen2.5-14B distilled from gpt-4o-mini
    assert cfg.policy.model_path == "Qwen/Qwen2.5-7B-Instruct"
    assert cfg.distill.model_path == "Qwen/Qwen2.5-14B-Instruct"
    assert cfg.distill.api.model == "gpt-4o-mini" and cfg.distill.eval_backend == "vllm"
    assert cfg.cluster.use_gpu and cfg.learner.zero_stage == 3 and cfg.policy.dtype == "bfloat16"
    assert {cfg.sft.name, cfg.distill.name, cfg.rm.name} == {
        "sft-qwen2.5-7b", "grm-qwen2.5-14b", "rm-qwen2.5-7b"}


def test_file_then_overrides_then_types(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("ppo:\n  kl_coef: 0.05\nlearner:\n  use_reference: true\nrun:\n  name: x\n")
    cfg = load_config(f, ["run.name=y", "rollout.temperature=0.7", "run.output_dir=${run.name}/o"])
    assert cfg.ppo.kl_coef == 0.05 and cfg.learner.use_reference
    assert cfg.run.name == "y" and cfg.rollout.temperature == 0.7
    assert cfg.run.output_dir == "y/o"  # interpolation resolved
    assert isinstance(cfg.rollout.temperature, float)


def test_mapping_replaced_by_file_merged_by_dotted_override(tmp_path: Path) -> None:
    f = tmp_path / "w.yaml"
    f.write_text("grm:\n  weights:\n    helpfulness: 1.0\n")
    assert load_config(f).grm.weights == {"helpfulness": 1.0}
    cfg = load_config(overrides=["grm.weights.naturalness=0.5"])
    assert cfg.grm.weights == {"helpfulness": 0.35, "personalization": 0.40, "naturalness": 0.5}
    assert load_config(overrides=["grm.weights={personalization: 2}"]).grm.weights == {
        "personalization": 2.0}


def test_save_round_trip(tmp_path: Path) -> None:
    cfg = load_config(overrides=["ppo.epochs=3", "grm.dimensions=[a,b]", "grm.weights={a: 1}"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(tmp_path / "run" / "config.yaml") == cfg
    assert not list((tmp_path / "run").glob("*.tmp"))
    assert "epochs: 3" in config_to_yaml(cfg)


ERRORS = [
    (["ppo.kl_coeff=1"], "unknown key 'ppo.kl_coeff' in the command line; did you mean 'ppo.kl_coef'?"),
    (["kl_coef=0.1"], "unknown key 'kl_coef' in the command line; did you mean 'ppo.kl_coef'?"),
    (["pppo.epochs=1"], "unknown key 'pppo' in the command line; did you mean 'ppo'?"),
    (["ppo.zzz=1"], "unknown key 'ppo.zzz' in the command line; valid keys here: advantage_estimator"),
    (["ppo=3"], "ppo in the command line is a section; give it as a mapping of: advantage_estimator"),
    (["noequals"], "override 'noequals' is not key=value (e.g. ppo.kl_coef=0.01)"),
    (["ppo.epochs=abc"], "ppo.epochs: Value 'abc' of type 'str' could not be converted to Integer"),
    (["post_edit.ratio=1.5"], "post_edit.ratio = 1.5 is outside [0, 1]; set it inside that range"),
    (["post_edit.ratio=-0.1"], "post_edit.ratio = -0.1 is outside [0, 1]"),
    (["rollout.top_p=0"], "rollout.top_p = 0.0 is outside (0, 1]"),
    (["rollout.n_samples_per_prompt=0"], "rollout.n_samples_per_prompt = 0 is outside [1, inf)"),
    (["ppo.dual_clip=1.0"], "ppo.dual_clip = 1.0 is outside (1, inf)"),
    (["rollout.temperature=nan"], "rollout.temperature = nan is not a finite number"),
    (["post_edit.strategy=randon"], "post_edit.strategy = 'randon' is not one of: random, reward, "
                                    "batch_reward, improvement; did you mean 'random'?"),
    (["learner.zero_stage=4"], "learner.zero_stage = 4 is not one of: 0, 1, 2, 3"),
    (["grm.weights={}"], "grm.weights is empty; give a weight per dimension"),
    (["grm.dimensions=[]"], "grm.dimensions is empty"),
    (["grm.dimensions=[a,a]", "grm.weights={a: 1}"], "grm.dimensions ['a', 'a'] has duplicates"),
    (["grm.weights.style=0.1"], "grm.weights.style names no dimension in grm.dimensions"),
    (["grm.weights.helpfulness=-1"], "grm.weights.helpfulness = -1.0 must be a finite number >= 0"),
    (["grm.weights={helpfulness: 0}"], "grm.weights sum to 0"),
    (["grm.score_min=5"], "grm.score_min (5) must be below grm.score_max (5)"),
    (["grm.critique_template=' '"], "grm.critique_template is empty; name a template file"),
    (["grm.template_placeholders.persona_str=user"],
     "grm.template_placeholders.persona_str = 'user' is not one of: persona, question, answer"),
    (["grm.template_placeholders.answer=question"],
     "grm.template_placeholders.answer = 'question' renames one of our own placeholders"),
    (["grm.template_placeholders={'a b': persona}"],
     "grm.template_placeholders: 'a b' is not a placeholder name"),
    (["grm.label_aliases.naturalness=['']"], "grm.label_aliases.naturalness holds an empty label"),
    (["grm.retry_temperature=0"], "grm.retry_temperature = 0.0 is outside (0, inf)"),
    (["grm.backend=hf"], "grm.backend=hf needs grm.model_path"),
    (["grm.backend=openai"], "grm.backend=openai needs grm.api.base_url and grm.api.model"),
    (["grm.api.api_key_env=MY-KEY"], "grm.api.api_key_env = 'MY-KEY' is not an environment variable"),
    (["grm.backend=bt", "grm.model_path=/m"], "post_edit.enabled needs critiques, which grm.backend=bt"),
    (["rollout.backend=vllm", "rollout.enable_sleep=true"], "rollout.enable_sleep: vLLM's sleep mode is CUDA-only"),
    (["rollout.kv_cache_memory_bytes=0"], "rollout.kv_cache_memory_bytes = 0 is outside [1, inf)"),
    (["ppo.advantage_estimator=grpo", "rollout.n_samples_per_prompt=1",
      "learner.micro_batch_size=1"], "ppo.advantage_estimator=grpo compares samples of a prompt"),
    (["ppo.kl_coef=0.1"], "ppo.kl_coef > 0 needs a reference model; set learner.use_reference=true"),
    (["trainer.rollout_batch_size=6"], "trainer.rollout_batch_size (6) is not a multiple of "
                                       "ppo.mini_batch_size (4)"),
    (["learner.adam_betas=[0.9]"], "learner.adam_betas = [0.9] must be two numbers in [0, 1)"),
    (["learner.adam_betas=[0.9,1.0]"], "learner.adam_betas = [0.9, 1.0] must be two numbers"),
    (["ppo.mini_batch_unit=tokens"], "ppo.mini_batch_unit = 'tokens' is not one of: prompts, rows"),
    (["post_edit.kept_multiple=0"], "post_edit.kept_multiple = 0 is outside [1, inf)"),
    (["ppo.edit_clip_low=1.5"], "ppo.edit_clip_low = 1.5 is outside [0, 1]"),
    (["cluster.use_gpu=true", "cluster.colocate_learner_rollout=true", "learner.num_ranks=2"],
     "cluster.colocate_learner_rollout puts each rollout engine GPU beside one learner rank"),
    (["trainer.resume=' '"], "trainer.resume is empty"),
    (["sft.resume=' '"], "sft.resume is empty; use never, auto or a checkpoint path"),
    (["sft.eval_fraction=0.9"], "sft.eval_fraction = 0.9 is outside [0, 0.5]"),
    (["rm.batch_size=0"], "rm.batch_size = 0 is outside [1, inf)"),
    (["distill.api.api_key_env=MY-KEY"], "distill.api.api_key_env = 'MY-KEY' is not an environment variable"),
    (["distill.api.backoff_initial_s=5", "distill.api.backoff_max_s=1"],
     "distill.api.backoff_initial_s (5) must not exceed distill.api.backoff_max_s (1)"),
]


@pytest.mark.parametrize(("overrides", "message"), ERRORS)
def test_each_error_is_one_clear_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(message), text


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file .*missing.yaml not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("ppo:\n  epochs: 1\n  clip_low: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)
    bad.write_text("ppo:\n  kl_coeff: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'ppo.kl_coeff' in .*bad.yaml; did you mean"):
        load_config(bad)


def test_rows_unit_needs_no_divisible_batch_and_clips_may_be_open() -> None:
    cfg = load_config(overrides=["trainer.rollout_batch_size=6", "ppo.mini_batch_unit=rows",
                                 "ppo.edit_clip_low=null", "ppo.edit_clip_high=null"])
    assert cfg.ppo.edit_clip_low is None and cfg.ppo.edit_clip_high is None


ABLATIONS = sorted((CONF_DIR / "experiment").glob("ablation-*.yaml"))


def test_the_ablation_arms_are_all_there() -> None:
    assert [p.stem for p in ABLATIONS] == [
        "ablation-cpe-batch_reward-0.5", "ablation-cpe-improvement-0.5",
        "ablation-cpe-random-0.1", "ablation-cpe-random-0.25", "ablation-cpe-random-0.5",
        "ablation-cpe-random-0.75", "ablation-cpe-random-1.0", "ablation-cpe-reward-0.5",
        "ablation-ppo-bt", "ablation-ppo-grm"]


@pytest.mark.parametrize("path", ABLATIONS, ids=lambda p: p.stem)
def test_ablation_arms_differ_from_the_recipe_only_where_intended(path: Path) -> None:
    """load_config takes one file (no includes), so each arm is the release's 7B recipe
    written out in full: it may differ from it only in the arm's own keys."""
    base = flat_items(load_config(CONF_DIR / "experiment" / "qwen2.5-7b-cpe-release.yaml"))
    arm = flat_items(load_config(path))
    diff = {k: v for k, v in arm.items() if v != base[k]}
    expected: dict = {"run.name": path.stem}
    if path.stem.startswith("ablation-ppo-"):
        # the paper compares arms at equal trained samples: 6 answers = 4 answers + 2 rewrites
        expected |= {"post_edit.enabled": False, "rollout.n_samples_per_prompt": 6}
        expected["ppo.dual_clip"] = 3.0  # verl's PPO loss (clip_ratio_c), as the release's
        if path.stem == "ablation-ppo-bt":
            expected |= {"grm.backend": "bt", "grm.model_path": diff.get("grm.model_path")}
            assert diff["grm.model_path"].startswith("/mnt/cpe-ray/")
    else:
        _, _, strategy, ratio = path.stem.split("-")
        if strategy != "random":
            expected["post_edit.strategy"] = strategy
        if float(ratio) != 0.5:
            expected["post_edit.ratio"] = float(ratio)
    assert diff == expected

