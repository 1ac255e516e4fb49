"""Edit prompt and rewrite selection strategies."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpe_ray.errors import TemplateError
from cpe_ray.rl.post_edit import (
    RewriteInfo,
    build_edit_messages,
    load_edit_template,
    needs_rewards,
    select_rewrites,
)


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
    # ratio 0.3 -> ceil(1.2) = 2 per question: q0 -> 1, 2; q1 -> 6, 7
    assert select_rewrites("reward", rw, ratio=0.3, seed=0) == [1, 2, 6, 7]


def test_batch_reward_is_global_top_k() -> None:
    rw = batch([1, 5, 3, 2, 0, -1, 4, 4.5])
    # floor(8 * 0.5) = 4 best over the batch: 5 (1), 4.5 (7), 4 (6), 3 (2)
    assert select_rewrites("batch_reward", rw, ratio=0.5, seed=0) == [1, 2, 6, 7]


def test_improvement_ranks_by_gain_over_original() -> None:
    rewards = [1, 5, 3, 2]
    originals = [-3, 5, 0, 2.5]  # gains: 4, 0, 3, -0.5
    rw = batch(rewards, originals)
    assert select_rewrites("improvement", rw, ratio=0.5, seed=0) == [0, 2]


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


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=1, max_size=40), st.floats(0, 1),
       st.sampled_from(["random", "reward", "batch_reward", "improvement"]),
       st.integers(0, 2**31))
def test_selection_properties(rewards: list[float], ratio: float, strategy: str, seed: int):
    rw = batch(rewards, [0.0] * len(rewards), per_q=3)
    kept = select_rewrites(strategy, rw, ratio=ratio, seed=seed)
    assert kept == sorted(set(kept)) and all(0 <= i < len(rw) for i in kept)
    assert kept == select_rewrites(strategy, rw, ratio=ratio, seed=seed)
    if strategy == "batch_reward" and kept:
        worst_kept = min(rewards[i] for i in kept)
        assert all(rewards[i] <= worst_kept for i in range(len(rw)) if i not in kept)
