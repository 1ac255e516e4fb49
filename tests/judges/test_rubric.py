"""The offline rubric judge: scores from visible features, critiques naming what to change."""

from __future__ import annotations

import pytest

from cpe_ray.config import load_config
from cpe_ray.judges.base import JudgeRequest
from cpe_ray.judges.grm import weighted_reward
from cpe_ray.judges.rubric import RubricJudge, content_words

PERSONA = "A vegetarian nurse who works night shifts and loves spicy food."
QUESTION = "What quick dinner can I cook after work?"


def _judge(**overrides: str) -> RubricJudge:
    cfg = load_config(None, [f"grm.{k}={v}" for k, v in overrides.items()])
    return RubricJudge(cfg.grm)


def _scores(answer: str, **overrides: str) -> dict[str, float]:
    out = _judge(**overrides).judge([JudgeRequest(PERSONA, QUESTION, answer)], "critique")[0]
    assert out.judgement.parsed and out.attempts == 1
    return out.judgement.scores


def test_content_words_drop_stopwords_and_short_words() -> None:
    assert content_words("What quick dinner can I cook after work?") == [
        "quick", "dinner", "cook", "after", "work"]


def test_generic_answer_scores_low_and_critique_names_terms() -> None:
    judge = _judge()
    out = judge.judge([JudgeRequest(PERSONA, QUESTION, "Eat something good tonight.")],
                      "critique")[0]
    s = out.judgement.scores
    # no persona term: 0; no question term: 0, minus ceil((24 - 4) / 3) = 7 for its 4 words
    # (clamped); 4 distinct plain words: fully fluent
    assert s == {"helpfulness": -5.0, "personalization": 0.0, "naturalness": 5.0}
    assert "vegetarian, nurse, works" in out.judgement.critique
    assert "quick, dinner, cook" in out.judgement.critique
    assert "too short" in out.judgement.critique


def test_generic_noise_sits_at_zero_not_at_the_floor() -> None:
    """What lets a policy that starts from noise climb: length and fluency still count."""
    noise = "xq zv, 7# bl kr ww9 pt"
    longer = "xq zv bl kr pt mn dd qq rr ss tt uu vv ww yy zz hh gg jj ll oo aa bb cc ee"
    s, t = _scores(noise), _scores(longer)
    assert s["personalization"] == t["personalization"] == 0.0
    # 6 words, 18 short of 24: -6, clamped to -5; 25 words: 0
    assert (s["helpfulness"], t["helpfulness"]) == (-5.0, 0.0)
    # 5 of 7 chunks are words: -5 + 10 x 5 / 7 = 2.1 -> 2; all 25 distinct words: 5
    assert (s["naturalness"], t["naturalness"]) == (2.0, 5.0)


def test_personal_relevant_answer_scores_high() -> None:
    answer = ("As a vegetarian nurse coming home from night shifts, cook a quick spicy "
              "chickpea dinner after work: fry onions, add chickpeas, chili and spinach.")
    s = _scores(answer)
    # persona terms used: vegetarian, nurse, night, shifts, spicy -> 0 + 2 x 5, capped at 5
    assert s["personalization"] == 5.0
    # question terms used: quick, dinner, cook, after, work -> 5; 22 words < 24 -> 1 off
    assert s["helpfulness"] == 4.0
    assert s["naturalness"] == 5.0  # 22 words, all distinct, every chunk a word


def test_announcing_background_and_repetition_cost_points() -> None:
    base = "cook a quick vegetarian dinner after work"
    announced = _scores("Considering your background, " + base)
    plain = _scores(base)
    assert plain["personalization"] - announced["personalization"] == 2.0
    repeated = _scores(base + " " + base)
    # 6 distinct of 12 words ("a" is too short): -5 + 10 x 0.5 = 0, minus 5 repeated
    # bigrams -> -5
    assert repeated["naturalness"] == -5.0
    noisy = _scores("%% " + base + " ##")
    # 7 of 9 chunks are words: -5 + 10 x 7 / 9 = 2.78, rounded to 3
    assert noisy["naturalness"] == 3.0 and plain["naturalness"] == 5.0


def test_length_rule_deducts_per_block_of_extra_words() -> None:
    words = " ".join("z" + a + b for a in "abcdefg" for b in "abcdefg")[: 45 * 4 - 1]
    s = _scores("cook a quick vegetarian dinner " + words)
    # 49 words ("a" is too short to count), 9 over 40 -> ceil(9 / 3) = 3 points off
    assert s["naturalness"] == 2.0
    long_judge = _scores("cook a quick vegetarian dinner " + words, rubric_max_words="100")
    assert long_judge["naturalness"] == 5.0 and long_judge["helpfulness"] - s["helpfulness"] == 3


def test_reward_orders_answers_and_bad_mode_is_rejected() -> None:
    judge = _judge()
    reqs = [JudgeRequest(PERSONA, QUESTION, a) for a in (
        "Eat something good tonight.",
        "Cook a quick spicy vegetarian dinner after work: chickpeas with chili and rice.")]
    rewards = [weighted_reward(o.judgement) for o in judge.judge(reqs, "score")]
    assert rewards[1] > rewards[0]
    with pytest.raises(ValueError, match="judge mode"):
        judge.judge(reqs, "rank")


def test_a_structured_persona_counts_its_values_and_not_the_name_or_labels() -> None:
    """A 'Key: value' persona (as `render_persona` writes it): labels say nothing about the
    user, and the rubric deducts a point for calling the user by name (method.md 2)."""
    from cpe_ray.chat import render_persona
    from cpe_ray.judges.rubric import persona_terms

    persona = render_persona({"Name": "Lukas Becker",
                              "Demographics": {"Age": 27, "Occupation": "Backend engineer"},
                              "Personality": {"Hobbies": ["bouldering", "keyboards"]}})
    terms, name = persona_terms(persona)
    assert terms == ["backend", "engineer", "bouldering", "keyboards"] and name == {
        "lukas", "becker"}
    judge = _judge()
    plain, named = judge.judge([
        JudgeRequest(persona, QUESTION, "Cook a quick dinner after bouldering."),
        JudgeRequest(persona, QUESTION, "Lukas, cook a quick dinner after bouldering.")],
        "critique")
    # one persona term (bouldering): 0 + 2; by name: 1 point off
    assert plain.judgement.scores["personalization"] == 2.0
    assert named.judgement.scores["personalization"] == 1.0
    assert "Do not call the user by name." in named.judgement.critique
    assert "draw on backend, engineer, keyboards." in plain.judgement.critique
    assert "name" not in plain.judgement.critique.lower()
