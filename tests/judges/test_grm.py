"""GRM parser, weighted reward, rubric template and retrying judge."""

from __future__ import annotations

import itertools
import logging
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpe_ray.config import GRMConfig
from cpe_ray.config.schema import GRM_RETRY_TEMPERATURE
from cpe_ray.errors import TemplateError
from cpe_ray.judges.grm import (
    DEFAULT_DIMENSIONS,
    DEFAULT_WEIGHTS,
    Judgement,
    attempt_temperature,
    build_grm_messages,
    judge_with_retries,
    load_grm_template,
    load_grm_templates,
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


# --- the paper release's GRM format (method.md 2) ----------------------------------------------
# Outputs written here in the two release prompt versions' output formats (our own words):
# P0815 asks for the raw score, then the deductions, then the final score in the critique;
# P0805 asks for a length estimate first. Both end with the same <scores> block, labels
# `Helpfulness` / `Personalization` / `Natural` and the unit 分 after each number.

def release_p0815_output(h: int, p: int, n: int) -> str:
    return ("<critique>\n长度约 520 token，超出建议长度，应删去第二段。\n"
            "Helpfulness：原始 4分，长度扣 1分。Natural: 5分 的表达被冗长拖累。\n"
            "建议：1. 删去重复的总结；2. 把推荐放在开头。\n</critique>\n\n"
            f"<scores>\nHelpfulness: {h}分\nPersonalization: {p}分\nNatural: {n}分\n</scores>")


def release_p0805_output(h: int, p: int, n: int) -> str:
    return ("<critique>\n先估计长度：约 380 字，合理。本应 3分，扣去 1分后为 2分。\n"
            "Personalization: 4 分的依据不足，个性化元素略显生硬。\n"
            "改进：去掉结尾的总结句。\n</critique>\n\n"
            f"<scores>\nHelpfulness: {h}分\nPersonalization: {p}分\nNatural: {n}分\n</scores>\n")


RELEASE_FORMATS = {"P0815": release_p0815_output, "P0805": release_p0805_output}
RELEASE_WEIGHTS = (0.35, 0.40, 0.25)  # the release's reward: 0.35 H + 0.40 P + 0.25 N
SCORE_VALUES = range(-5, 6)


@pytest.mark.parametrize("version", sorted(RELEASE_FORMATS))
def test_every_release_score_triple_parses_under_the_default_config(version: str) -> None:
    """All 11^3 triples in each version's format: parsed, exact, with the release's reward.

    Before `Natural` was an alias every one of them was unparsed (naturalness None), was
    regenerated up to grm.max_retries times and lost its 0.25 x naturalness term."""
    g = GRMConfig()
    write = RELEASE_FORMATS[version]
    for h, p, n in itertools.product(SCORE_VALUES, repeat=3):
        j = parse_judgement(write(h, p, n), g.dimensions, (g.score_min, g.score_max),
                            g.label_aliases)
        assert j.parsed and j.scores == {H: h, P: p, N: n}, (h, p, n, j.warnings)
        assert j.labels == {H: "Helpfulness", P: "Personalization", N: "Natural"}
        expected = sum(w * s for w, s in zip(RELEASE_WEIGHTS, (h, p, n), strict=True))
        assert weighted_reward(j, g.weights, g.on_missing) == pytest.approx(expected)


@pytest.mark.parametrize(("triple", "logged"), [((3, 2, 1), 2.1), ((2, 3, 2), 2.4),
                                                ((3, 3, 2), 2.75)])
def test_rewards_of_the_release_training_log(triple: tuple[int, int, int], logged: float) -> None:
    """Rewards the release's log shows need a non-zero Natural score: 2.75 = 0.35*3 + 0.40*3
    + 0.25*2, where reading Natural as missing gives 2.25."""
    j = parse_judgement(release_p0815_output(*triple))
    assert weighted_reward(j) == pytest.approx(logged)
    assert weighted_reward(j) - 0.25 * triple[2] != pytest.approx(logged)


def test_release_critique_numbers_do_not_count() -> None:
    # the P0815 critique writes "Natural: 5分" and the P0805 one "Personalization: 4 分"
    assert parse_judgement(release_p0815_output(1, 1, -2)).scores[N] == -2
    assert parse_judgement(release_p0805_output(1, -3, 1)).scores[P] == -3


@pytest.mark.parametrize(("block", "scores", "labels"), [
    # the release rubric's Chinese names, with the unit and full-width colons
    ("帮助性：3分\n个性化：-2分\n自然度：1分", (3, -2, 1), ("帮助性", "个性化", "自然度")),
    # both names of a dimension, as the rubric's headings write them
    ("Helpfulness 帮助性: 2分\nPersonalization 个性化: 1分\nNatural 自然度: 0分", (2, 1, 0),
     ("Helpfulness 帮助性", "Personalization 个性化", "Natural 自然度")),
    # our own labels still win over the shorter alias
    ("Helpfulness: 1\nPersonalization: 2\nNaturalness: 3", (1, 2, 3),
     ("Helpfulness", "Personalization", "Naturalness")),
])
def test_labels_matched_are_reported(block: str, scores: tuple, labels: tuple) -> None:
    j = parse_judgement(f"<critique>c</critique><scores>\n{block}\n</scores>")
    assert tuple(j.scores[d] for d in DEFAULT_DIMENSIONS) == scores
    assert tuple(j.labels[d] for d in DEFAULT_DIMENSIONS) == labels


def test_out_of_range_release_scores_are_clamped_into_the_box() -> None:
    j = parse_judgement(release_p0815_output(7, -9, 5))
    assert (j.scores[H], j.scores[P], j.scores[N]) == (5, -5, 5)
    assert "helpfulness 7 out of [-5, 5], clamped to 5" in j.warnings


def test_judge_with_retries_uses_the_given_aliases() -> None:
    text = "<critique>c</critique><scores>H: 1\nPersonalization: 2\nNaturalness: 3</scores>"
    plain = judge_with_retries(lambda idx: [text for _ in idx], count=1, max_retries=0)
    assert not plain[0].judgement.parsed
    aliased = judge_with_retries(lambda idx: [text for _ in idx], count=1, max_retries=0,
                                 aliases={H: ["H"]})
    assert aliased[0].judgement.parsed and aliased[0].judgement.labels[H] == "H"


# --- prompts taken out of the release ----------------------------------------------------------
# A template of the release's structure, written here: one user turn, its rubric first, the
# persona, question and answer last, filled through str.format names.
RELEASE_STYLE_SCORE = ("你是评判员。按三个维度打分，每个维度-5到5分。\n<critique>\n依据\n</critique>\n"
                       "<scores>\nHelpfulness: X分\nPersonalization: X分\nNatural: X分\n</scores>\n"
                       "用户画像：\n{persona_str}\n\n问题：\n{question_str}\n\n"
                       "待评回答：\n{solution_str}\n")
RELEASE_STYLE_CRITIQUE = ("你是评判员，先写出改进建议。\n{persona_str}\n\n问题：{question_str}\n\n"
                          "回答：{solution_str}")


def test_a_release_style_template_loads_and_renders_with_our_fields(tmp_path) -> None:
    path = tmp_path / "grm_release_p0815.txt"
    path.write_text(RELEASE_STYLE_SCORE, encoding="utf-8")
    tpl = load_grm_template(str(path))
    assert tpl.placeholders == {"persona", "question", "answer"}
    content = build_grm_messages(tpl, persona='{"Name": "Ana"}', question="Q{x}?",
                                 answer="A.")[0]["content"]
    assert content.endswith('用户画像：\n{"Name": "Ana"}\n\n问题：\nQ{x}?\n\n待评回答：\nA.\n')
    # a mapping of other names; ours may be mixed in
    path.write_text("{profile}\n{question}\n{reply}", encoding="utf-8")
    tpl = load_grm_template(str(path), {"profile": "persona", "reply": "answer"})
    assert build_grm_messages(tpl, "P", "Q", "A")[0]["content"] == "P\nQ\nA"
    with pytest.raises(TemplateError, match=r"lacks required placeholder\(s\) \{persona\}.*"
                                            r"grm.template_placeholders: \{persona_str\}"):
        path.write_text("{question_str} {solution_str}", encoding="utf-8")
        load_grm_template(str(path))


def test_critique_and_score_calls_may_use_different_templates(tmp_path) -> None:
    (tmp_path / "score.txt").write_text(RELEASE_STYLE_SCORE, encoding="utf-8")
    (tmp_path / "critique.txt").write_text(RELEASE_STYLE_CRITIQUE, encoding="utf-8")
    same = load_grm_templates(GRMConfig(template=str(tmp_path / "score.txt")))
    assert same["critique"] is same["score"]
    both = load_grm_templates(GRMConfig(template=str(tmp_path / "score.txt"),
                                        critique_template=str(tmp_path / "critique.txt")))
    assert both["critique"].text.startswith("你是评判员，先写出改进建议。\n{persona}")
    assert both["score"].text.startswith("你是评判员。按三个维度打分")


def test_an_escaped_newline_copied_from_python_source_is_flagged(tmp_path, caplog) -> None:
    path = tmp_path / "copied.txt"
    path.write_text("rubric\n{persona_str}\\n\\n{question_str}\n{solution_str}", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="cpe_ray.judges.grm"):
        load_grm_template(str(path))
    assert f"{path}:2: holds a backslash-n" in caplog.text


@pytest.mark.parametrize(("temperature", "attempt", "expected"), [
    (0.0, 0, 0.0),  # the greedy score call itself
    (0.0, 1, GRM_RETRY_TEMPERATURE),  # its retries sample: a greedy repeat is the same text
    (0.0, 5, GRM_RETRY_TEMPERATURE),
    (0.9, 2, 0.9),  # a sampled (critique) call keeps its temperature
])
def test_retry_temperature(temperature: float, attempt: int, expected: float) -> None:
    assert attempt_temperature(temperature, attempt, GRM_RETRY_TEMPERATURE) == expected
    assert GRMConfig().retry_temperature == GRM_RETRY_TEMPERATURE > 0
