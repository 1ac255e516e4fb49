"""GRM parser, weighted reward, rubric template and retrying judge."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpe_ray.errors import TemplateError
from cpe_ray.judges.grm import (
    DEFAULT_DIMENSIONS,
    DEFAULT_WEIGHTS,
    Judgement,
    build_grm_messages,
    judge_with_retries,
    load_grm_template,
    parse_judgement,
    weighted_reward,
)

CLEAN = """<critique>
Good structure, but it ignores the user's budget.
</critique>
<scores>
Helpfulness: 3
Personalization: -2
Naturalness: 4
</scores>"""

H, P, N = DEFAULT_DIMENSIONS

# (output text, expected (helpfulness, personalization, naturalness), expected critique)
TABLE = [
    (CLEAN, (3, -2, 4), "Good structure, but it ignores the user's budget."),
    # case, extra whitespace, text around the tags
    ("Sure! Here is my review.\n<CRITIQUE>  ok  </Critique>\n< scores >\n"
     "  helpfulness :   2\nPERSONALIZATION:1\n naturalness:0 \n</scores>\nThanks!", (2, 1, 0), "ok"),
    # full-width colons and digits, a unit after the number
    ("<critique>好</critique><scores>Helpfulness：４分\nPersonalization： 3分\nNaturalness：-1分</scores>",
     (4, 3, -1), "好"),
    # markdown bold and "N/5"
    ("<critique>c</critique><scores>\n**Helpfulness**: 5/5\n- **Personalization:** 2\n"
     "* Naturalness = -3\n</scores>", (5, 2, -3), "c"),
    # missing closing tags: critique runs to <scores>, scores to the end
    ("<critique>needs examples\n<scores>\nHelpfulness: 1\nPersonalization: 1\nNaturalness: 1",
     (1, 1, 1), "needs examples"),
    # unicode minus and en dash as minus signs, a plus sign
    ("<critique>x</critique><scores>Helpfulness: \u22124\nPersonalization: \u20132\n"
     "Naturalness: +2</scores>", (-4, -2, 2), "x"),
    # no <scores> tag: lines outside the critique count, the critique's own numbers do not
    ("<critique>Helpfulness: 5 would need more detail</critique>\nHelpfulness: -1\n"
     "Personalization: 0\nNaturalness: 2", (-1, 0, 2), "Helpfulness: 5 would need more detail"),
    # a dimension missing: None, not 0
    ("<critique>c</critique><scores>Helpfulness: 2\nNaturalness: 1</scores>", (2, None, 1), "c"),
    # out of range: clamped
    ("<critique>c</critique><scores>Helpfulness: 9\nPersonalization: -12\nNaturalness: 5"
     "</scores>", (5, -5, 5), "c"),
    # Chinese dimension names (the Chinese template's model may write them)
    ("<critique>很好</critique><scores>有用性：3\n个性化：2\n自然度：1</scores>", (3, 2, 1), "很好"),
    # decimal score, a parenthetical after the name
    ("<critique>c</critique><scores>Helpfulness (overall): 2.5\nPersonalization: 1\n"
     "Naturalness: 0</scores>", (2.5, 1, 0), "c"),
    # nothing at all
    ("", (None, None, None), ""),
    ("I cannot judge this.", (None, None, None), ""),
    # a word that merely contains a dimension name must not match
    ("<critique>c</critique><scores>Unhelpfulness: 4\nPersonalization: 1\nNaturalness: 1"
     "</scores>", (None, 1, 1), "c"),
]


@pytest.mark.parametrize(("text", "expected", "critique"), TABLE)
def test_parse_table(text: str, expected: tuple, critique: str) -> None:
    j = parse_judgement(text)
    assert tuple(j.scores[d] for d in DEFAULT_DIMENSIONS) == expected
    assert j.critique == critique
    assert j.raw == text
    assert j.parsed == all(v is not None for v in expected)


def test_clamp_and_missing_are_reported() -> None:
    j = parse_judgement(TABLE[8][0])
    assert j.parsed
    assert "helpfulness 9 out of [-5, 5], clamped to 5" in j.warnings
    assert "personalization -12 out of [-5, 5], clamped to -5" in j.warnings
    j = parse_judgement(TABLE[7][0])
    assert j.missing == ("personalization",)
    assert "missing dimension(s): personalization" in j.warnings


def test_custom_dimensions_and_range() -> None:
    j = parse_judgement("<scores>Safety: 8\nTone_Match: 3</scores>", ["safety", "tone match"],
                        score_range=(0, 10))
    assert j.scores == {"safety": 8.0, "tone match": 3.0}
    assert j.parsed


def test_first_occurrence_in_scores_block_wins() -> None:
    j = parse_judgement("<scores>Helpfulness: 1\nHelpfulness: 4\nPersonalization: 0\n"
                        "Naturalness: 0</scores>")
    assert j.scores[H] == 1


def test_non_string_input_does_not_raise() -> None:
    j = parse_judgement(None)  # type: ignore[arg-type]
    assert not j.parsed and j.raw == "" and "output is NoneType, not text" in j.warnings


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parser_never_raises_on_any_string(text: str) -> None:
    j = parse_judgement(text)
    assert isinstance(j, Judgement)
    for value in j.scores.values():
        assert value is None or -5 <= value <= 5


TAGGY = st.lists(st.sampled_from(["<critique>", "</critique>", "<scores>", "</scores>",
                                  "Helpfulness:", "Personalization：", "naturalness =", "-", "５",
                                  "3", "\n", " ", "**", "分", "x", "12", "(", ")"]), max_size=40)


@settings(max_examples=300, deadline=None)
@given(TAGGY)
def test_parser_never_raises_on_tag_soup(parts: list[str]) -> None:
    j = parse_judgement("".join(parts))
    assert all(v is None or -5 <= v <= 5 for v in j.scores.values())


def test_sign_a_line_away_from_its_digits_is_no_score() -> None:
    """Found by the tag-soup property: "-", a newline, a full-width 5 once raised."""
    j = parse_judgement("<scores>Helpfulness: -\n５\nPersonalization: -\t2\nNaturalness: - 3")
    assert j.scores == {H: None, P: -2.0, N: -3.0} and not j.parsed


def _j(h: float | None, p: float | None, n: float | None) -> Judgement:
    scores = {H: h, P: p, N: n}
    return Judgement(scores=scores, critique="", raw="", parsed=None not in scores.values())


def test_weighted_reward_paper_weights() -> None:
    # 0.35*3 + 0.40*(-2) + 0.25*4 = 1.05 - 0.8 + 1.0 = 1.25
    assert weighted_reward(_j(3, -2, 4)) == pytest.approx(1.25)
    assert DEFAULT_WEIGHTS == {H: 0.35, P: 0.40, N: 0.25}


def test_weighted_reward_on_missing() -> None:
    j = _j(4, None, 2)
    # zero: 0.35*4 + 0 + 0.25*2 = 1.9
    assert weighted_reward(j, on_missing="zero") == pytest.approx(1.9)
    # renormalize: (0.35*4 + 0.25*2) * (1.0 / 0.6) = 1.9 / 0.6
    assert weighted_reward(j, on_missing="renormalize") == pytest.approx(1.9 / 0.6)
    assert weighted_reward(j, on_missing="none") is None
    assert weighted_reward(_j(None, None, None), on_missing="zero") == 0.0
    assert weighted_reward(_j(None, None, None), on_missing="renormalize") is None


def test_weighted_reward_custom_weights_and_errors() -> None:
    assert weighted_reward(_j(1, 2, 3), {P: 1.0}) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="weights are empty"):
        weighted_reward(_j(1, 2, 3), {})
    with pytest.raises(ValueError, match="on_missing"):
        weighted_reward(_j(1, 2, 3), on_missing="drop")  # type: ignore[arg-type]


def test_reward_of_a_parsed_output_end_to_end() -> None:
    # 0.35*2 + 0.40*1 + 0.25*0 = 1.1
    assert weighted_reward(parse_judgement(TABLE[1][0])) == pytest.approx(1.1)


@pytest.mark.parametrize("name", ["grm_en.txt", "grm_zh.txt"])
def test_shipped_templates_render_and_name_every_dimension(name: str) -> None:
    tpl = load_grm_template(name)
    msgs = build_grm_messages(tpl, persona="Name: Ana", question="Q? {not a slot}", answer="A.")
    assert len(msgs) == 1 and msgs[0]["role"] == "user"
    content = msgs[0]["content"]
    assert "Name: Ana" in content and "Q? {not a slot}" in content
    for dim in DEFAULT_DIMENSIONS:
        assert f"{dim.capitalize()}: N" in content
    # The template's own format example must parse once N is filled in.
    example = content[content.index("<critique>"):].replace("N\n", "1\n")
    assert parse_judgement(example).parsed


def test_template_placeholder_errors(tmp_path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("{persona} {question} {answr}")
    with pytest.raises(TemplateError, match=r"unknown placeholder\(s\) \{answr\}"):
        load_grm_template(str(bad))
    bad.write_text("{persona} {question}")
    with pytest.raises(TemplateError, match=r"lacks required placeholder\(s\) \{answer\}"):
        load_grm_template(str(bad))
    with pytest.raises(TemplateError, match="not found"):
        load_grm_template("no_such_template.txt")


def test_judge_with_retries_regenerates_only_unparsed() -> None:
    calls: list[list[int]] = []
    script = {0: [CLEAN], 1: ["garbage", "still garbage", CLEAN], 2: ["nope"] * 10}

    def generate(indices: list[int]) -> list[str]:
        calls.append(list(indices))
        return [script[i].pop(0) for i in indices]

    out = judge_with_retries(generate, count=3, max_retries=2)
    assert calls == [[0, 1, 2], [1, 2], [1, 2]]
    assert [o.attempts for o in out] == [1, 3, 3]
    assert [o.judgement.parsed for o in out] == [True, True, False]
    assert weighted_reward(out[2].judgement) == 0.0  # never parsed -> 0, as in the release


def test_judge_with_retries_requires_critique() -> None:
    no_critique = "<scores>Helpfulness: 1\nPersonalization: 1\nNaturalness: 1</scores>"
    outputs = iter([no_critique, CLEAN])
    out = judge_with_retries(lambda idx: [next(outputs) for _ in idx], count=1, max_retries=3,
                             require_critique=True)
    assert out[0].attempts == 2 and out[0].judgement.critique


def test_judge_with_retries_checks_arguments() -> None:
    with pytest.raises(ValueError, match="max_retries"):
        judge_with_retries(lambda idx: [], count=1, max_retries=-1)
    with pytest.raises(ValueError, match="0 outputs for 1 prompts"):
        judge_with_retries(lambda idx: [], count=1, max_retries=0)
    assert math.isclose(len(judge_with_retries(lambda idx: [], count=0, max_retries=1)), 0)
