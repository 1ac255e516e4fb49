"""Edit prompt and rewrite selection strategies."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpe_ray.algo.post_edit import (
    SELECTION_STRATEGIES,
    TRUNCATION_MARK,
    EditRequest,
    RewriteInfo,
    SelectionStrategy,
    build_edit_messages,
    fit_edit_prompt,
    load_edit_template,
    needs_rewards,
    select_rewrites,
)
from cpe_ray.config.choices import STRATEGIES
from cpe_ray.errors import TemplateError


def batch(rewards: list[float], originals: list[float] | None = None, per_q: int = 4):
    originals = originals or [0.0] * len(rewards)
    return [RewriteInfo(question_id=f"q{i // per_q}", pair_id=i, reward=r, original_reward=o)
            for i, (r, o) in enumerate(zip(rewards, originals, strict=True))]


def test_edit_prompt_holds_question_answer_critique() -> None:
    tpl = load_edit_template("edit_en.txt")
    msgs = build_edit_messages(tpl, "How do I start running?", "Just run.", "Too short; add a plan.",
                               system_prompt="SYSTEM")
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[0]["content"] == "SYSTEM"
    user = msgs[1]["content"]
    for part in ("How do I start running?", "Just run.", "Too short; add a plan."):
        assert part in user
    assert user.index("How do I start") < user.index("Just run.") < user.index("Too short")
    assert build_edit_messages(tpl, "q", "a", "c")[0]["role"] == "user"


def test_edit_template_with_persona_and_errors(tmp_path) -> None:
    f = tmp_path / "edit.txt"
    f.write_text("P={persona} Q={question} A={answer} C={critique}")
    msgs = build_edit_messages(load_edit_template(str(f)), "q", "a", "c", persona="p")
    assert msgs[0]["content"] == "P=p Q=q A=a C=c"
    f.write_text("Q={question} A={answer}")
    with pytest.raises(TemplateError, match=r"\{critique\}"):
        load_edit_template(str(f))


def test_random_keeps_floor_ratio_without_rewards() -> None:
    rewrites = [RewriteInfo(question_id=f"q{i // 4}", pair_id=i) for i in range(16)]
    kept = select_rewrites("random", rewrites, ratio=0.5, seed=3)
    assert len(kept) == 8 and kept == sorted(set(kept))
    assert kept == select_rewrites("random", rewrites, ratio=0.5, seed=3)  # deterministic
    assert kept != select_rewrites("random", rewrites, ratio=0.5, seed=4)
    assert len(select_rewrites("random", rewrites, ratio=0.1, seed=0)) == 1  # floor(1.6)
    assert select_rewrites("random", rewrites, ratio=0.0, seed=0) == []
    assert select_rewrites("random", rewrites, ratio=1.0, seed=0) == list(range(16))
    assert not needs_rewards("random") and needs_rewards("reward")


def test_random_counts_survive_float_error() -> None:
    rewrites = [RewriteInfo(question_id="q", pair_id=i) for i in range(100)]
    # 0.29 * 100 == 28.999999999999996 in floating point; the intended count is 29.
    assert len(select_rewrites("random", rewrites, ratio=0.29, seed=0)) == 29


def test_reward_keeps_ceil_top_per_question() -> None:
    # q0: rewards 1, 5, 3, 2 -> ceil(4 * 0.25) = 1 kept: index 1
    # q1: rewards 0, -1, 4, 4.5 -> index 7
    rw = batch([1, 5, 3, 2, 0, -1, 4, 4.5])
    assert select_rewrites("reward", rw, ratio=0.25, seed=0) == [1, 7]
    # ratio 0.5 -> ceil(2) = 2 per question: q0 -> 1, 2; q1 -> 6, 7 (floor(4) in all)
    assert select_rewrites("reward", rw, ratio=0.5, seed=0) == [1, 2, 6, 7]
    # ratio 0.3 -> the same 4 candidates, but floor(8 x 0.3) = 2 in all, drawn uniformly
    picks = {tuple(select_rewrites("reward", rw, ratio=0.3, seed=s)) for s in range(20)}
    assert all(len(p) == 2 and set(p) <= {1, 2, 6, 7} for p in picks) and len(picks) > 1


def test_reward_caps_the_total_like_the_release() -> None:
    """128 prompts x 4 rewrites at ratio 0.1: ceil(0.4) = 1 candidate per question (128), but
    the release keeps int(0.1 x 512) = 51, rounded down to its GPU count: 48."""
    rw = batch([float(i % 7) for i in range(512)])
    kept = select_rewrites("reward", rw, ratio=0.1, seed=0)
    assert len(kept) == 51
    assert len(select_rewrites("reward", rw, ratio=0.1, seed=0, multiple=8)) == 48
    best = {i // 4: max(range(i // 4 * 4, i // 4 * 4 + 4), key=lambda j: (j % 7, -j))
            for i in range(512)}
    assert all(rw[k].reward == rw[best[k // 4]].reward for k in kept)  # each its question's best
    assert len(select_rewrites("random", rw, ratio=0.1, seed=0, multiple=8)) == 48
    assert len(select_rewrites("batch_reward", rw, ratio=0.1, seed=0, multiple=8)) == 48


def test_batch_reward_is_global_top_k() -> None:
    rw = batch([1, 5, 3, 2, 0, -1, 4, 4.5])
    # floor(8 * 0.5) = 4 best over the batch: 5 (1), 4.5 (7), 4 (6), 3 (2)
    assert select_rewrites("batch_reward", rw, ratio=0.5, seed=0) == [1, 2, 6, 7]


def test_improvement_ranks_by_gain_over_original() -> None:
    rewards = [1, 5, 3, 2]
    originals = [-3, 5, 0, 2.5]  # gains: 4, 0, 3, -0.5
    rw = batch(rewards, originals)
    assert select_rewrites("improvement", rw, ratio=0.5, seed=0) == [0, 2]


def test_improvement_caps_each_question_then_takes_the_top_gains() -> None:
    """The release's group_rank_by_improvement: ceil(n x ratio) per question first. With
    gains q0 = 5, 4, 3, 2 and q1 = -1, -2, -3, -4 at 0.5, a global top 4 would keep all of
    q0; the cap keeps q0's best 2 and q1's best 2."""
    rw = batch([5, 4, 3, 2, -1, -2, -3, -4])
    assert select_rewrites("improvement", rw, ratio=0.5, seed=0) == [0, 1, 4, 5]
    # ratio 0.25: 1 candidate per question (gains 5 and -1), floor(8 x 0.25) = 2: both
    assert select_rewrites("improvement", rw, ratio=0.25, seed=0) == [0, 4]
    # three questions at 0.25 over 12: candidates 5, -1, 9; floor(3) = 3 ... and with a cap
    # of a multiple of 2, the two largest gains (9 and 5) survive
    rw = batch([5, 4, 3, 2, -1, -2, -3, -4, 9, 0, 0, 0])
    assert select_rewrites("improvement", rw, ratio=0.25, seed=0) == [0, 4, 8]
    assert select_rewrites("improvement", rw, ratio=0.25, seed=0, multiple=2) == [0, 8]


def test_ties_broken_by_seed_not_position() -> None:
    rw = batch([1.0] * 20, per_q=20)
    picks = {tuple(select_rewrites("batch_reward", rw, ratio=0.1, seed=s)) for s in range(20)}
    assert len(picks) > 1  # not always the first two
    assert all(len(p) == 2 for p in picks)


def test_reward_strategies_need_rewards() -> None:
    rw = [RewriteInfo(question_id="q", pair_id=0, reward=None)]
    with pytest.raises(ValueError, match="needs a finite reward"):
        select_rewrites("reward", rw, ratio=0.5, seed=0)
    rw = [RewriteInfo(question_id="q", pair_id=0, reward=1.0, original_reward=None)]
    with pytest.raises(ValueError, match="reward and original_reward"):
        select_rewrites("improvement", rw, ratio=0.5, seed=0)
    rw = [RewriteInfo(question_id="q", pair_id=0, reward=float("nan"))]
    with pytest.raises(ValueError, match="finite"):
        select_rewrites("batch_reward", rw, ratio=0.5, seed=0)


def test_bad_strategy_and_ratio() -> None:
    with pytest.raises(ValueError, match="unknown selection strategy 'best'"):
        select_rewrites("best", [], ratio=0.5, seed=0)
    with pytest.raises(ValueError, match="outside"):
        select_rewrites("random", [], ratio=1.5, seed=0)
    assert select_rewrites("reward", [], ratio=0.5, seed=0) == []


def test_strategy_table_matches_the_config_choices_and_refuses_duplicates() -> None:
    assert tuple(SELECTION_STRATEGIES) == STRATEGIES
    assert [s for s in STRATEGIES if not needs_rewards(s)] == ["random"]
    with pytest.raises(ValueError, match="selection strategy 'reward' is registered already"):
        SELECTION_STRATEGIES.register("reward", SelectionStrategy(lambda s: [], False))
    assert needs_rewards("reward")  # the first entry stays
    with pytest.raises(ValueError, match="unknown selection strategy 'best'; use one of "
                                         "random, reward, batch_reward, improvement"):
        needs_rewards("best")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=1, max_size=40), st.floats(0, 1),
       st.sampled_from(["random", "reward", "batch_reward", "improvement"]),
       st.integers(0, 2**31))
def test_selection_properties(rewards: list[float], ratio: float, strategy: str, seed: int):
    rw = batch(rewards, [0.0] * len(rewards), per_q=3)
    kept = select_rewrites(strategy, rw, ratio=ratio, seed=seed)
    assert kept == sorted(set(kept)) and all(0 <= i < len(rw) for i in kept)
    assert kept == select_rewrites(strategy, rw, ratio=ratio, seed=seed)
    assert len(kept) <= int(ratio * len(rw) + 1e-9)  # never more than floor(ratio x N)
    if strategy == "batch_reward" and kept:
        worst_kept = min(rewards[i] for i in kept)
        assert all(rewards[i] <= worst_kept for i in range(len(rw)) if i not in kept)


# ----------------------------------------------------------------------------- prompt limit
PERSONA = "a retired teacher who hikes every weekend"
QUESTION = "Plan a weekend trip for me near the mountains."


WORDS = ("the", "trail", "lake", "picnic", "morning", "map", "boots", "water", "view", "rest",
         "town", "river", "camp", "sun")


def _words(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def edit_encoder():
    """The rollout actor's edit prompt on the tiny model's tokenizer: system turn (persona),
    then the edit template with question, answer and critique."""
    from cpe_ray.chat import apply_chat_template, load_policy_system_template, system_prompt
    from cpe_ray.models import load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path("tiny"))
    system = system_prompt(load_policy_system_template(), PERSONA)
    template = load_edit_template("edit_en.txt")

    def encode(question: str, answer: str, critique: str) -> list[int]:
        msgs = build_edit_messages(template, question, answer, critique, system_prompt=system,
                                   persona=PERSONA)
        return apply_chat_template(tok, msgs)

    def fit(answer: str, critique: str, limit: int, question: str = QUESTION):
        return fit_edit_prompt(encode, tok, EditRequest(PERSONA, question, answer, critique),
                               limit)

    return tok, encode, fit


def test_long_edit_prompt_loses_answer_and_critique_not_persona_or_question(edit_encoder):
    """The 7B recipe's shape: an answer of ~2,000 tokens and a critique of ~1,000 under a
    2,048-token prompt limit. Cut from the left, the prompt loses the persona and the question."""
    tok, encode, fit = edit_encoder
    answer, critique, limit = _words(900, 1), _words(450, 2), 2048
    full = encode(QUESTION, answer, critique)
    assert len(full) > limit
    left_cut = tok.decode(full[-limit:])
    assert PERSONA not in left_cut and QUESTION not in left_cut  # what the left cut did
    fitted = fit(answer, critique, limit)
    text = tok.decode(fitted.token_ids)
    assert fitted.shortened and not fitted.cut_left
    assert limit - 16 <= len(fitted.token_ids) <= limit  # little of the budget left unused
    assert PERSONA in text and QUESTION in text
    # both keep their beginnings; the longer answer lost more than the critique
    assert answer[:200] in text and critique[:200] in text and text.count(TRUNCATION_MARK) == 2
    kept_answer = text[text.index(answer[:50]):].split(TRUNCATION_MARK)[0]
    assert len(kept_answer) < len(answer)


def test_short_edit_prompt_is_untouched_and_hopeless_one_is_cut_left(edit_encoder):
    tok, encode, fit = edit_encoder
    fitted = fit("Go hiking.", "Too short.", 2048)
    assert fitted.token_ids == encode(QUESTION, "Go hiking.", "Too short.")
    assert not fitted.shortened and not fitted.cut_left
    # a short critique stays whole while the long answer takes the whole cut
    answer, critique = _words(900, 3), "Name one trail and a picnic spot."
    fitted = fit(answer, critique, 1024)
    text = tok.decode(fitted.token_ids)
    assert critique in text and text.count(TRUNCATION_MARK) == 1 and len(fitted.token_ids) <= 1024
    # a limit the system turn and the template alone exceed: only then is the start cut
    fitted = fit(answer, critique, 64)
    assert fitted.cut_left and fitted.shortened
    assert fitted.token_ids == encode(QUESTION, answer, critique)[-64:]


def test_a_question_the_answer_prompt_shortens_loses_its_middle_not_the_persona(edit_encoder):
    """The edit prompt shortens a long question as the answer prompt does (its middle), with
    the answer and the critique; cut from the left, it lost the system turn every time."""
    from cpe_ray.chat import QUESTION_CUT_MARK

    tok, encode, fit = edit_encoder
    question = "START of my question. " + _words(3000, 4) + " What should I pack? END"
    answer, critique, limit = _words(300, 5), _words(150, 6), 512
    fitted = fit(answer, critique, limit, question=question)
    text = tok.decode(fitted.token_ids)
    assert fitted.shortened and not fitted.cut_left and limit - 16 <= len(fitted.token_ids) <= limit
    assert PERSONA in text and text.startswith("<|im_start|>system")
    assert "START of my question." in text and "What should I pack? END" in text
    assert QUESTION_CUT_MARK.strip() in text and text.count(TRUNCATION_MARK) >= 2
    assert answer[:100] in text and critique[:100] in text  # each kept its beginning


MIXED = ("the", "trail", "lake", "picnic", "徒步", "湖边", "野餐", "日出", "山里", "周末")


def _mixed(n: int, seed: int) -> str:
    """English and Chinese words run together: token boundaries fall inside characters."""
    rng = random.Random(seed)
    return "".join(rng.choice(MIXED) for _ in range(n))


def test_a_one_token_overshoot_shortens_more_rather_than_cutting_the_start(edit_encoder):
    """With this text the old fitting loop measured 769 tokens for 768 four times running
    and cut the prompt's start, <|im_start|> and the persona with it."""
    tok, _, fit = edit_encoder
    fitted = fit(_mixed(700, 2), _mixed(300, 1002), 768)
    text = tok.decode(fitted.token_ids)
    assert fitted.shortened and not fitted.cut_left and 768 - 8 <= len(fitted.token_ids) <= 768
    assert text.startswith("<|im_start|>system") and PERSONA in text and QUESTION in text


@pytest.mark.parametrize("seed", [2, 12, 61])
def test_every_limit_fits_without_the_start_or_a_broken_character(edit_encoder, seed: int):
    """A cut inside a multi-byte character once left U+FFFD before the mark (half the limits
    here); every limit the system turn and the template leave room in must fit too."""
    tok, _, fit = edit_encoder
    answer, critique = _mixed(700, seed), _mixed(300, seed + 1000)
    for limit in range(600, 780, 9):
        fitted = fit(answer, critique, limit)
        text = tok.decode(fitted.token_ids)
        assert not fitted.cut_left and len(fitted.token_ids) <= limit, limit
        assert "\ufffd" not in text and PERSONA in text, limit
