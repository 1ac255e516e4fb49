"""eval.judge=grm with eval.score_answers: the rewards are the judge's own scores, once."""

from __future__ import annotations

import json
from pathlib import Path

from cpe_ray.config import load_config
from cpe_ray.evaluation.judges import make_answer_scorer
from cpe_ray.evaluation.winrate import run_winrate
from cpe_ray.judges.base import JudgeRequest
from cpe_ray.paths import DATA_DIR


def test_grm_judge_rewards_equal_a_separate_scoring_pass(tmp_path: Path) -> None:
    answers = tmp_path / "answers.jsonl"
    baseline = [json.loads(line) for line in (DATA_DIR / "demo" / "eval_baseline.jsonl").open()]
    answers.write_text("".join(json.dumps({"id": b["id"], "output": b["output"][::-1]}) + "\n"
                               for b in baseline))
    cfg = load_config(None, [f"eval.answers_path={answers}", f"eval.output_dir={tmp_path}",
                             "eval.limit=8"])  # the default judge: grm, the rubric offline
    run_winrate(cfg, lambda line: None)
    rows = [json.loads(line) for line in (tmp_path / "winrate" / "judgements.jsonl").open()]
    scorer = make_answer_scorer(cfg)
    for key, answer in (("model_reward", "model_answer"), ("baseline_reward", "baseline_answer")):
        alone = scorer.score([JudgeRequest(r["persona"], r["question"], r[answer]) for r in rows])
        assert [r[key] for r in rows] == [s.reward for s in alone]
