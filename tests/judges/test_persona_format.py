"""grm.critique_persona_format: the release's critique call writes the persona as a dict."""

from __future__ import annotations

import pytest

from cpe_ray.config import load_config
from cpe_ray.data import release_persona_text
from cpe_ray.judges.grm import build_grm_messages, format_persona, mode_persona_format
from cpe_ray.prompts import PromptTemplate

PERSONA = {"name": "Ana", "age": 30, "likes": ["tea", "跑步"], "pets": None}


def test_python_dict_is_strs_rendering_of_the_persona_object() -> None:
    text = release_persona_text(PERSONA)  # the JSON the data holds
    assert format_persona(text, "text") == text
    assert format_persona(text, "python_dict") == (
        "{'name': 'Ana', 'age': 30, 'likes': ['tea', '跑步'], 'pets': None}")
    # free text, or JSON that is no object, has no dict to write
    assert format_persona("a retired teacher", "python_dict") == "a retired teacher"
    assert format_persona("[1, 2]", "python_dict") == "[1, 2]"
    with pytest.raises(ValueError, match="persona format"):
        format_persona(text, "yaml")


def test_only_the_critique_call_takes_the_setting() -> None:
    grm = load_config(None, ["grm.critique_persona_format=python_dict"]).grm
    assert mode_persona_format(grm, "critique") == "python_dict"
    assert mode_persona_format(grm, "score") == "text"
    assert mode_persona_format(load_config().grm, "critique") == "text"
    template = PromptTemplate("P: {persona}\nQ: {question}\nA: {answer}", "test")
    msgs = build_grm_messages(template, release_persona_text({"a": 1}), "q", "x", "python_dict")
    assert msgs == [{"role": "user", "content": "P: {'a': 1}\nQ: q\nA: x"}]
