"""Tests for cpe_ray.chat: persona rendering and chat-template prompts on the tiny model."""

from __future__ import annotations

import copy

import pytest
from transformers import AutoTokenizer

from cpe_ray.chat import (
    apply_chat_template,
    build_policy_messages,
    load_policy_system_template,
    render_chat_template,
    render_persona,
)
from cpe_ray.data import load_sft
from cpe_ray.errors import DataError
from cpe_ray.paths import DATA_DIR
from cpe_ray.tiny import build_tiny_model

DEMO = DATA_DIR / "demo"
AMARA = {"Name": "Amara Okafor", "Demographics": {"Age": 34, "Location": "Lagos, Nigeria"},
         "Preference": ["short answers", "budget-friendly options"]}
AMARA_TEXT = ("Name: Amara Okafor\nDemographics:\n  Age: 34\n  Location: Lagos, Nigeria\n"
              "Preference: short answers, budget-friendly options")
SYSTEM_INTRO = (
    "You are a helpful assistant. Answer the user's question in a way that fits who they are, "
    "as described in their profile below. Use the profile to choose content, depth, examples "
    "and tone; do not announce that you are personalizing, and do not call the user by name.\n"
    "\nUser profile:\n"
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return AutoTokenizer.from_pretrained(build_tiny_model(tmp_path_factory.mktemp("m") / "tiny"))


def test_render_persona_rules() -> None:
    assert render_persona("  likes tea \n") == "likes tea"
    persona = {
        "Name": "Zoë",
        "Empty": "",
        "None": None,
        "NoList": [],
        "Info": {"Age": 0, "Langs": ["fr", "", "de"], "Deep": {"Pet": "cat"}, "Gone": {}},
        "Married": False,
        "Mixed": [{"a": 1, "b": ""}, ["x", "y"]],
        "Notes": "two\n  lines",
    }
    assert render_persona(persona) == (
        "Name: Zoë\nInfo:\n  Age: 0\n  Langs: fr, de\n  Deep:\n    Pet: cat\n"
        "Married: no\nMixed: a: 1, x, y\nNotes: two lines"
    )
    assert render_persona({}) == ""
    with pytest.raises(DataError, match="string or an object"):
        render_persona(["not", "a", "persona"])  # type: ignore[arg-type]




def test_build_policy_messages_and_chat_template(tokenizer) -> None:
    tpl = load_policy_system_template()
    assert tpl.placeholders == {"persona"}
    question = "What should I cook on Sunday?"
    messages = build_policy_messages(AMARA_TEXT, question, tpl)
    assert messages == [{"role": "system", "content": SYSTEM_INTRO + AMARA_TEXT},
                        {"role": "user", "content": question}]
    assert build_policy_messages(AMARA, question) == messages
    expected = (f"<|im_start|>system\n{SYSTEM_INTRO}{AMARA_TEXT}<|im_end|>\n"
                f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat_template(tokenizer, messages) == expected
    ids = apply_chat_template(tokenizer, messages)
    assert all(isinstance(i, int) for i in ids)
    assert tokenizer.decode(ids) == expected
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3
    no_gen = apply_chat_template(tokenizer, messages, add_generation_prompt=False)
    assert tokenizer.decode(no_gen) == expected.removesuffix("<|im_start|>assistant\n")
    sft = load_sft(DEMO / "sft.jsonl").records[0]
    rendered = render_chat_template(tokenizer, sft.messages, add_generation_prompt=False)
    assert rendered.startswith(f"<|im_start|>system\n{SYSTEM_INTRO}Name: ")


def test_no_chat_template_is_a_clear_error(tokenizer) -> None:
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(DataError, match="has no chat template"):
        apply_chat_template(bare, [{"role": "user", "content": "hi"}])
    broken = copy.deepcopy(tokenizer)
    broken.chat_template = "{{ raise_exception('system role not supported') }}"
    with pytest.raises(DataError, match="chat template failed.*system role not supported"):
        render_chat_template(broken, [{"role": "user", "content": "hi"}])


def test_a_long_question_loses_its_middle_never_the_persona(tokenizer) -> None:
    from cpe_ray.chat import QUESTION_CUT_MARK, fit_policy_prompt

    question = "START of my question. " + "filler words here " * 3000 + "What should I cook? END"
    whole = apply_chat_template(tokenizer, build_policy_messages(AMARA, question))
    fitted = fit_policy_prompt(tokenizer, AMARA, question, 256)
    assert len(whole) > 256 * 40 and len(fitted.token_ids) <= 256
    assert fitted.shortened and not fitted.cut_left
    text = tokenizer.decode(fitted.token_ids)
    assert SYSTEM_INTRO + AMARA_TEXT in text  # the system turn and the persona, whole
    assert "START of my question." in text and "What should I cook? END" in text
    assert QUESTION_CUT_MARK.strip() in text
    short = fit_policy_prompt(tokenizer, AMARA, "Hi?", 256)
    assert short.token_ids == apply_chat_template(
        tokenizer, build_policy_messages(AMARA, "Hi?")) and not short.shortened
    # a limit the system turn alone exceeds: the last resort keeps the prompt's end
    tiny = fit_policy_prompt(tokenizer, AMARA, question, 16)
    assert tiny.cut_left and tiny.token_ids == whole[-16:]


def test_a_shortened_question_always_fits_and_never_splits_a_character(tokenizer) -> None:
    """English and Chinese run together put token boundaries inside characters: the old
    fitting loop left U+FFFD at the cut (20 of these 30 limits) and twice gave up and cut the
    start, though a shorter question fitted."""
    import random

    from cpe_ray.chat import fit_policy_prompt

    rng = random.Random(7)
    words = ("the", "trail", "lake", "picnic", "徒步", "湖边", "野餐", "日出", "山里", "周末")
    question = "".join(rng.choice(words) for _ in range(2000))
    for limit in range(206, 386, 6):  # the system turn and the mark alone take 201
        fitted = fit_policy_prompt(tokenizer, AMARA, question, limit)
        text = tokenizer.decode(fitted.token_ids)
        assert fitted.shortened and not fitted.cut_left and len(fitted.token_ids) <= limit
        assert "\ufffd" not in text and AMARA_TEXT in text, limit
