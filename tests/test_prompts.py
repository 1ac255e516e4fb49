"""Prompt templates: lookup, placeholder checks, one-pass rendering."""

from __future__ import annotations

from pathlib import Path

import pytest

from cpe_ray.errors import TemplateError
from cpe_ray.paths import PROMPTS_DIR, REPO_ROOT, resolve_path
from cpe_ray.prompts import PromptTemplate, load_template


def test_lookup_by_name_and_by_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    by_name = load_template("policy_system_en.txt", allowed={"persona"}, required={"persona"})
    assert by_name.source == str(PROMPTS_DIR / "policy_system_en.txt")
    own = tmp_path / "mine.txt"
    own.write_text("Hi {persona}")
    assert load_template(str(own), allowed={"persona"}).render(persona="P") == "Hi P"
    monkeypatch.chdir(tmp_path)  # the repo root is still found from elsewhere
    assert resolve_path("conf/default.yaml") == REPO_ROOT / "conf" / "default.yaml"
    assert load_template("policy_system_en.txt", allowed={"persona"}).text == by_name.text


def test_render_is_one_pass_and_leaves_other_braces() -> None:
    tpl = PromptTemplate(text='{"json": 1} {a} then {b}', source="t")
    # A value that looks like a placeholder is not expanded again.
    assert tpl.render(a="{b}", b="B") == '{"json": 1} {b} then B'
    assert tpl.placeholders == {"a", "b"}
    with pytest.raises(TemplateError, match=r"template t: no value for \{b\}"):
        tpl.render(a="x")


def test_placeholder_checks_name_the_template() -> None:
    tpl = PromptTemplate(text="{a} {c}", source="x.txt")
    with pytest.raises(TemplateError, match=r"x.txt uses unknown placeholder\(s\) \{c\}"):
        tpl.check(allowed={"a", "b"}, required={"a"})
    with pytest.raises(TemplateError, match=r"x.txt lacks required placeholder\(s\) \{b\}"):
        tpl.check(allowed={"a", "b", "c"}, required={"a", "b"})
    with pytest.raises(TemplateError, match="shipped templates: edit_en.txt, grm_compact_en.txt, grm_en.txt"):
        load_template("nope.txt", allowed=set())
