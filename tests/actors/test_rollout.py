"""The rollout actor's answer prompts: a question over rollout.max_prompt_length is shortened
in its middle, the system turn and persona kept, and the batch counts it."""

from __future__ import annotations

import pytest

from cpe_ray.config import load_config

pytestmark = [pytest.mark.usefixtures("local_ray"), pytest.mark.slow]

LIMIT = 200


def test_long_question_is_shortened_keeping_the_persona_and_counted() -> None:
    import ray

    from actors.rollout import PolicyRollout
    from cpe_ray.models import load_tokenizer, resolve_model_path

    cfg = load_config(None, [f"rollout.max_prompt_length={LIMIT}", "rollout.max_new_tokens=4",
                             "rollout.n_samples_per_prompt=1"])
    engine = PolicyRollout.options(num_cpus=1).remote(cfg)
    try:
        persona, long_q = "Name: Ada\nOccupation: welder", "Hi. " + "very long " * 20_000 + "Why?"
        batch = ray.get(engine.answer.remote([(persona, long_q), (persona, "Why?")], 3),
                        timeout=120)
        assert batch.questions_shortened == 1 and batch.cut_left == 0
        assert len(batch.prompt_ids[0]) <= LIMIT < 20_000
        text = load_tokenizer(resolve_model_path("tiny")).decode(batch.prompt_ids[0])
        assert "Name: Ada\nOccupation: welder" in text  # the system turn with the persona
        assert "Hi. very long" in text and "very long Why?" in text and "[...]" in text
        assert len(batch.completions) == 2
    finally:
        ray.kill(engine)
