"""The step's pure computations (`cpe_ray.rl.compute`), without Ray: the batch, the staleness
correction, rewards and groups, metrics and sample records, on hand-made samples."""

from __future__ import annotations

import math

import pytest
import torch

from cpe_ray.algo.experience import Experience
from cpe_ray.algo.losses import POLICY_LOSSES, PolicyLossInput
from cpe_ray.config import load_config
from cpe_ray.data import PromptRecord
from cpe_ray.engines.base import Completion
from cpe_ray.judges.grm import Judgement, JudgeOutcome
from cpe_ray.rl import compute
from cpe_ray.rl.sampling import Answer, Answers, Chunk, PromptFits, Rewrites, Samples


def _judged(prompt: int, tokens: list[int], reward: float, helpful: float, parsed: bool = True,
            attempts: int = 1) -> Answer:
    outcome = JudgeOutcome(Judgement({"helpfulness": helpful, "personalization": None,
                                      "naturalness": 1.0}, "crit", "", parsed), attempts)
    completion = Completion(0, 0, tokens, [-0.5] * len(tokens), "t" * len(tokens), "stop")
    return Answer(prompt, completion, outcome, reward)


def _samples() -> Samples:
    answers = [_judged(0, [5, 6], 1.0, 2.0), _judged(0, [7], -1.0, 0.0, parsed=False),
               _judged(1, [8, 9, 10], 0.5, 1.0, attempts=3), _judged(1, [11], 0.0, -1.0)]
    rewrites = {1: _judged(0, [12, 13], 2.0, 4.0), 3: _judged(1, [14], 3.0, 3.0)}
    crit = {k: a.judgement for k, a in rewrites.items()}
    return Samples(Answers([[1, 2], [3]], answers, [Chunk(0, [0, 1], [0, 1, 2, 3])],
                           PromptFits(questions_shortened=1)),
                   crit, Rewrites(rewrites, PromptFits(edit_shortened=2, cut_left=1)), [3],
                   {"generate": 0.5})


def test_the_batch_is_originals_then_kept_rewrites_on_their_original_prompts() -> None:
    cfg = load_config(None, ["post_edit.temperature=0.7"])
    s = _samples()
    exp = compute.experience(cfg, s.answers.prompt_ids, s.answers.items, s.kept_rewrites(), 0)
    assert exp.is_edited.tolist() == [False] * 4 + [True]
    assert exp.temperature.tolist() == pytest.approx([1.0] * 4 + [0.7])
    assert exp.sequences[-1, exp.prompt_width - 1].item() == 3  # on prompt 1, [3]
    scores, groups = compute.rewards_and_groups(s)
    assert scores.tolist() == [1.0, -1.0, 0.5, 0.0, 3.0] and groups.tolist() == [0, 0, 1, 1, 1]


def test_metrics_of_a_step() -> None:
    cfg = load_config(None, [])
    s = _samples()
    m = compute.reward_metrics(cfg, s)
    assert m["reward/original/weighted"] == pytest.approx(0.125)
    assert m["reward/original/helpfulness"] == pytest.approx(0.5)
    assert "reward/original/personalization" not in m  # no answer had it
    assert m["reward/rewrite/weighted"] == 3.0 and m["length/rewrite"] == 1.0
    assert m["length/original"] == pytest.approx(7 / 4)
    assert m["post_edit/kept_fraction"] == 0.25 and m["post_edit/rewritten_fraction"] == 0.5
    assert m["grm/parse_failures"] == 1.0 and m["grm/retries"] == 2.0
    fits = compute.prompt_fit_metrics(cfg, s)
    assert fits == {"rollout/prompts_cut_left": 1.0, "rollout/questions_shortened": 1.0,
                    "post_edit/truncated_prompts": 2.0}
    batch = [PromptRecord("a", "p0", "q0"), PromptRecord("b", "p1", "q1")]
    rows = compute.sample_records(7, batch, s)
    assert [r["kept"] for r in rows] == [False, False, False, True]
    assert rows[1]["rewrite_reward"] == 2.0 and rows[0]["rewrite"] is None
    assert rows[3]["prompt_id"] == "b" and rows[3]["step"] == 7


def test_logprob_diff_is_the_mean_absolute_gap_over_answer_tokens() -> None:
    s = _samples()
    learner = torch.full((4, 3), -0.5)
    learner[0, 1] = -0.7  # one token 0.2 off, of 7 tokens
    assert compute.logprob_diff(s.answers.items, learner) == pytest.approx(0.2 / 7)


def test_stale_originals_loss_is_behaviour_weighted_rewrites_are_not() -> None:
    """The one-step off-policy loss on hand-computed numbers, through the trainer's staleness
    correction and the learner's loss: an original's token advantage times
    w = min(pi_prox / pi_behav, cap) inside PPO's clip; a rewrite keeps its ratio against
    log pi_e and no w."""
    cfg = load_config(None, ["trainer.off_policy_steps=1", "trainer.behaviour_weight_cap=2.0"])
    behaviour = [-1.0, -2.0, -3.0]  # the engine's log-probs when it sampled the answer
    answer = Answer(0, Completion(0, 0, [5, 6, 7], behaviour, "abc", "stop"))
    exp = Experience.from_tokens([[1, 2], [1, 2]], [[5, 6, 7], [8]], 0,
                                 is_edited=[False, True], edit_logprobs=[[], [-1.0]])
    proximal = torch.tensor([[-0.5, -2.5, -1.0], [-1.2, 0.0, 0.0]])  # the learner's, now
    exp = exp.with_fields(old_logprobs=proximal,
                          advantages=torch.tensor([[1.0, 1.0, -1.0], [2.0, 0.0, 0.0]]))
    fixed, metrics = compute.correct_staleness(cfg, exp, [answer], staleness=1)
    w = [math.exp(0.5), math.exp(-0.5), 2.0]  # exp(2.0) = 7.39 is cut to the cap
    torch.testing.assert_close(fixed.advantages, torch.tensor([[w[0], w[1], -w[2]],
                                                               [2.0, 0.0, 0.0]]))
    assert metrics["off_policy/staleness"] == 1.0
    assert metrics["off_policy/weight_mean"] == pytest.approx(
        (math.exp(0.5) + math.exp(-0.5) + math.exp(2.0)) / 3)
    assert metrics["off_policy/weight_clipped_frac"] == pytest.approx(1 / 3)

    logp = torch.tensor([[-0.2, -2.5, -1.5], [-0.9, 0.0, 0.0]])  # the policy being trained
    loss, _ = POLICY_LOSSES["cpe"](PolicyLossInput(
        logp, fixed.old_logprobs, fixed.advantages, fixed.response_mask, fixed.is_edited,
        fixed.edit_logprobs, 0.2, 0.2, 0.2, 0.2))
    # original: r = exp(0.3) = 1.35 -> clipped 1.2; r = 1; r = exp(-0.5) = 0.61 with A < 0:
    # min(0.61 * -2, 0.8 * -2) = -1.6. Rewrite: exp(-0.9) / (exp(-1.0) + 1e-6) = 1.105.
    rewrite_ratio = math.exp(-0.9) / (math.exp(-1.0) + 1e-6)
    terms = [1.2 * w[0], 1.0 * w[1], 0.8 * -w[2], rewrite_ratio * 2.0]
    assert float(loss) == pytest.approx(-sum(terms) / 4, abs=1e-6)



@pytest.mark.parametrize(("on_missing", "expected"), [
    ("zero", [[2, 0, 1], [0, 0, 1], [1, 4, 1], [-1, 0, 1], [3, 0, 1]]),
    # personalization: prompt 1's present mean (4); prompt 0 has none, so 0
    ("renormalize", [[2, 0, 1], [0, 0, 1], [1, 4, 1], [-1, 4, 1], [3, 4, 1]]),
    # a row missing any dimension has no scalar reward (0): every dimension 0
    ("none", [[0, 0, 0], [0, 0, 0], [1, 4, 1], [0, 0, 0], [0, 0, 0]]),
])
def test_dimension_scores_count_a_missing_score_as_on_missing_says(
        on_missing: str, expected: list[list[float]]) -> None:
    s = _samples()
    s.answers.items[2].judgement.judgement.scores["personalization"] = 4.0
    assert compute.dimension_scores(load_config(None, []), s) is None  # weighted_sum
    cfg = load_config(None, ["ppo.reward_aggregation=per_dimension", f"grm.on_missing={on_missing}",
                             "ppo.advantage_estimator=grpo", "rollout.n_samples_per_prompt=2"])
    dims = compute.dimension_scores(cfg, s)
    assert dims is not None and dims.names == ("helpfulness", "personalization", "naturalness")
    # rows: the 4 answers, then the kept rewrite (on prompt 1), as rewards_and_groups
    assert dims.scores.tolist() == expected
    assert dims.weights.tolist() == pytest.approx([0.35, 0.40, 0.25])
