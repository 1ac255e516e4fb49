"""The Bradley-Terry reward model: `rm train`, its held-out accuracy, and its two uses
(the judge of PersonaFeedback accuracy, PPO's reward with grm.backend=bt)."""

from __future__ import annotations

import json

import pytest

from cpe_ray.config import load_config
from cpe_ray.judges.base import JudgeRequest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]

PPO_SMALL = [
    "trainer.rollout_batch_size=2", "ppo.mini_batch_size=1", "rollout.n_samples_per_prompt=2",
    "rollout.max_new_tokens=8", "learner.micro_batch_size=2", "logging.wandb_mode=disabled",
]


@pytest.fixture(scope="module")
def trained(local_ray, tmp_path_factory):
    from cpe_ray.stages.rm import run_rm

    out = tmp_path_factory.mktemp("rm")
    cfg = load_config(None, [f"run.output_dir={out}", "rm.epochs=3",
                             "logging.wandb_mode=disabled"])
    return cfg, run_rm(cfg, progress=False)


def _bt_overrides(model) -> list[str]:
    return ["grm.backend=bt", f"grm.model_path={model}", "post_edit.enabled=false"]


def test_rm_train_reports_the_heldout_accuracy_btscorer_measures(trained) -> None:
    from cpe_ray.judges.bt import BTScorer
    from cpe_ray.stages.rm import load_pairs, split_pairs

    cfg, result = trained
    assert result.steps == 9 and result.model_path.name == "reward_model"  # ceil(24 / 8) x 3
    _, held = split_pairs(cfg, load_pairs(cfg).records)
    assert len(held) == 8  # 0.25 of the 32 demo pairs
    scorer = BTScorer(str(result.model_path), device="cpu", max_prompt_tokens=cfg.rm.max_length)
    scores = scorer.score([JudgeRequest(p.persona, p.question, a) for p in held
                           for a in (p.chosen, p.rejected)])
    right = sum(scores[2 * i].reward > scores[2 * i + 1].reward for i in range(len(held)))
    assert result.evaluation["eval/accuracy"] == pytest.approx(right / len(held))
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["evaluation"]["eval/accuracy"] == result.evaluation["eval/accuracy"]
    assert summary["data"]["pairs"] == 32 and summary["train_examples"] == 24
    assert summary["last_train_loss"] < summary["first_train_loss"]


def test_personafeedback_accuracy_with_the_trained_model(trained, tmp_path, capsys) -> None:
    from cpe_ray.cli import main

    _, result = trained
    code = main(["eval", "personafeedback", *_bt_overrides(result.model_path),
                 f"eval.output_dir={tmp_path}"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "personafeedback" / "results.json").read_text())
    total = report["table"]["all/all"]
    assert total["n"] == 36 and total["parse_failure"] == 0
    assert report["judge"] == f"Bradley-Terry reward model {result.model_path}"


def test_ppo_step_rewarded_by_the_bt_model(trained, tmp_path) -> None:
    from cpe_ray.judges.bt import BTScorer
    from cpe_ray.run import train

    cfg, result = trained
    run = train(load_config(None, [*PPO_SMALL, *_bt_overrides(result.model_path),
                                   f"run.output_dir={tmp_path}", "trainer.max_steps=1"]),
                progress=False)
    last = run["last"]
    assert last["grm/parse_failures"] == 0 and "post_edit/kept_fraction" not in last
    samples = [json.loads(line) for line in
               (tmp_path / "cpe-tiny" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4
    # each answer's reward is the model's logit on that answer (as BTScorer computes it)
    scorer = BTScorer(str(result.model_path), device="cpu")
    expected = scorer.score([JudgeRequest(s["persona"], s["question"], s["answer"])
                             for s in samples])
    for s, e in zip(samples, expected, strict=True):
        assert s["answer_reward"] == pytest.approx(e.reward, abs=1e-4)
    assert last["reward/original/weighted"] == pytest.approx(
        sum(e.reward for e in expected) / 4, abs=1e-4)


def test_bt_judge_in_a_ray_actor_matches_the_driver(trained) -> None:
    from actors.grm import GRMJudge
    from cpe_ray.judges.bt import make_bt_judge
    from cpe_ray.runtime.remote import RemoteError, wait_all

    _, result = trained
    cfg = load_config(None, _bt_overrides(result.model_path))
    requests = [JudgeRequest("a welder", "How do I start?", "Buy gloves first."),
                JudgeRequest("a welder", "How do I start?", "I do not know.")]
    local = make_bt_judge(cfg).judge(requests, "score")
    actor = GRMJudge.remote(cfg)
    remote = wait_all([actor.judge.remote(requests, "score")], ["bt actor"], 120, "judge")[0]
    assert [o.reward for o in remote] == pytest.approx([o.reward for o in local], abs=1e-5)
    assert all(o.judgement.parsed and o.reward is not None for o in remote)
    with pytest.raises(RemoteError, match="writes no critiques"):
        wait_all([actor.judge.remote(requests, "critique")], ["bt actor"], 120, "judge")


def test_rm_train_on_a_personafeedback_root(tmp_path) -> None:
    from cpe_ray.stages.rm import run_rm

    cfg = load_config(None, [f"run.output_dir={tmp_path}", "rm.max_steps=1",
                             "rm.data_path=data/demo/personafeedback",
                             "logging.wandb_mode=disabled"])
    result = run_rm(cfg, progress=False)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["data"]["pairs"] == 36 and summary["heldout_examples"] == 9
    assert 0 <= result.evaluation["eval/accuracy"] <= 1
