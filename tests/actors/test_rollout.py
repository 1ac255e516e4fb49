"""The rollout actor's prompts over rollout.max_prompt_length: an answer prompt's question
loses its middle, an edit prompt's question, answer and critique are cut, the system turn and
persona are kept, and the batch counts them."""

from __future__ import annotations

import pytest

from cpe_ray.config import load_config

pytestmark = [pytest.mark.usefixtures("local_ray"), pytest.mark.slow]

LIMIT = 400  # the edit prompt's system turn and template alone take 285
PERSONA = "Name: Ada\nOccupation: welder"
LONG_Q = "Hi. " + "very long " * 20_000 + "Why?"


@pytest.fixture(scope="module")
def engine(local_ray):
    from actors.rollout import PolicyRollout

    cfg = load_config(None, [f"rollout.max_prompt_length={LIMIT}", "rollout.max_new_tokens=4",
                             "post_edit.max_new_tokens=4", "rollout.n_samples_per_prompt=1"])
    actor = PolicyRollout.options(num_cpus=1).remote(cfg)
    yield actor
    local_ray.kill(actor)


@pytest.fixture(scope="module")
def decode():
    from cpe_ray.models import load_tokenizer, resolve_model_path

    return load_tokenizer(resolve_model_path("tiny")).decode


def test_long_question_is_shortened_keeping_the_persona_and_counted(engine, decode) -> None:
    import ray

    # the first call also waits for the actor to start and load its model: on a loaded
    # 2-core machine that alone has taken over 120 s; pytest-timeout (300 s) is the bound
    batch = ray.get(engine.answer.remote([(PERSONA, LONG_Q), (PERSONA, "Why?")], 3),
                    timeout=280)
    assert batch.questions_shortened == 1 and batch.cut_left == 0
    assert len(batch.prompt_ids[0]) <= LIMIT < 20_000
    text = decode(batch.prompt_ids[0])
    assert PERSONA in text  # the system turn with the persona
    assert "Hi. very long" in text and "very long Why?" in text and "[...]" in text
    assert len(batch.completions) == 2


def test_edit_prompt_of_a_long_question_keeps_the_persona(engine, decode) -> None:
    """The edit prompt once took the whole question and, over the limit, cut its start."""
    import ray

    from cpe_ray.algo.post_edit import EditRequest

    requests = [EditRequest(PERSONA, LONG_Q, "Weld it. " * 50, "Too curt. " * 50),
                EditRequest(PERSONA, "Why?", "Because.", "Say why.")]
    batch = ray.get(engine.post_edit.remote(requests, 3), timeout=280)
    assert batch.shortened == 1 and batch.cut_left == 0 and len(batch.completions) == 2
    text = decode(batch.prompt_ids[0])
    assert len(batch.prompt_ids[0]) <= LIMIT and text.startswith("<|im_start|>system")
    assert PERSONA in text and "Hi. very long" in text and "very long Why?" in text
    assert "Weld it." in text and "Too curt." in text
