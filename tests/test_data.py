"""Tests for cpe_ray.data: loaders on the shipped demo data and every error path."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from cpe_ray.chat import Message, render_persona
from cpe_ray.data import (
    LoadResult,
    PairwiseExample,
    PersonaFeedbackCase,
    PromptRecord,
    SFTExample,
    load_pairwise,
    load_personafeedback,
    load_prompts,
    load_sft,
)
from cpe_ray.errors import CpeError, DataError
from cpe_ray.paths import DATA_DIR
from cpe_ray.prompts import PromptTemplate

DEMO = DATA_DIR / "demo"
PF_ROOT = DEMO / "personafeedback"

AMARA = {
    "Name": "Amara Okafor",
    "Demographics": {
        "Age": 34,
        "Gender": "Female",
        "Nationality": "Nigerian",
        "Location": "Lagos, Nigeria",
        "Occupation": "Pediatric nurse on rotating night shifts",
        "Education": "BSc Nursing",
    },
    "Personality": {
        "Traits": ["caring", "practical", "often tired"],
        "Hobbies": ["singing in a gospel choir", "cooking for friends"],
    },
    "Preference": [
        "short step-by-step answers",
        "budget-friendly options",
        "ingredients she can find at a Lagos market",
    ],
    "Bias": "Skeptical of supplements and miracle products",
}
AMARA_TEXT = (
    "Name: Amara Okafor\n"
    "Demographics:\n"
    "  Age: 34\n"
    "  Gender: Female\n"
    "  Nationality: Nigerian\n"
    "  Location: Lagos, Nigeria\n"
    "  Occupation: Pediatric nurse on rotating night shifts\n"
    "  Education: BSc Nursing\n"
    "Personality:\n"
    "  Traits: caring, practical, often tired\n"
    "  Hobbies: singing in a gospel choir, cooking for friends\n"
    "Preference: short step-by-step answers, budget-friendly options, "
    "ingredients she can find at a Lagos market\n"
    "Bias: Skeptical of supplements and miracle products"
)
SYSTEM_INTRO = (
    "You are a helpful assistant. Answer the user's question in a way that fits who they are, "
    "as described in their profile below. Use the profile to choose content, depth, examples "
    "and tone; do not announce that you are personalizing, and do not call the user by name.\n"
    "\nUser profile:\n"
)


def write_jsonl(path: Path, rows: list[object]) -> Path:
    """Rows are dicts (dumped as JSON) or raw strings (written verbatim, e.g. broken JSON)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_pf(root: Path, personas: int = 3, cases: dict[str, list[object]] | None = None) -> Path:
    write_jsonl(root / "persona" / "all_personas.jsonl",
                [{"Name": f"P{i}", "Bias": "none"} for i in range(1, personas + 1)])
    for rel, rows in (cases or {}).items():
        write_jsonl(root / "data" / rel, rows)
    return root


def case(uid: object = 1, **kw: object) -> dict[str, object]:
    return {"user_id": uid, "question": "Q?", "chosen": "good", "reject": "bad", **kw}


# --- demo data ------------------------------------------------------------------------------

def test_demo_prompts_counts_and_ids() -> None:
    train, evals = load_prompts(DEMO / "train.jsonl"), load_prompts(DEMO / "eval.jsonl")
    assert isinstance(train, LoadResult) and isinstance(train.records[0], PromptRecord)
    assert (len(train.records), train.skipped, train.problems) == (128, 0, [])
    assert len(evals.records) == 32
    ids = [r.id for r in train.records + evals.records]
    assert len(set(ids)) == 160 and ids[0] == "train-001"
    assert Counter(r.persona for r in train.records).most_common()[-1][1] == 4
    assert not {r.question for r in train.records} & {r.question for r in evals.records}
    assert train.records[0].persona == AMARA_TEXT


def test_demo_personas_render_and_match_prompt_files() -> None:
    personas = [json.loads(line) for line in (DEMO / "personas.jsonl").read_text().splitlines()]
    assert len(personas) == 32 and personas[0] == AMARA
    assert all(set(p) == {"Name", "Demographics", "Personality", "Preference", "Bias"}
               for p in personas)
    assert render_persona(personas[0]) == AMARA_TEXT
    rendered = {render_persona(p) for p in personas}
    assert {r.persona for r in load_prompts(DEMO / "train.jsonl").records} == rendered
    pf_personas = (PF_ROOT / "persona" / "all_personas.jsonl").read_text()
    assert pf_personas == (DEMO / "personas.jsonl").read_text()


def test_demo_personafeedback() -> None:
    res = load_personafeedback(PF_ROOT)
    assert len(res.records) == 36 and res.skipped == 0
    assert isinstance(res.records[0], PersonaFeedbackCase)
    counts = Counter((c.kind, c.tier) for c in res.records)
    assert counts == {(k, t): 6 for k in ("specific", "general") for t in ("easy", "medium", "hard")}
    first = res.records[0]
    assert (first.kind, first.tier, first.user_id) == ("specific", "easy", 1)
    assert first.persona == AMARA_TEXT
    assert first.source.endswith("spedific/easy.jsonl:1")
    assert all(c.chosen != c.reject for c in res.records)
    hard = load_personafeedback(PF_ROOT, tiers=("hard",), kinds=("general",))
    assert len(hard.records) == 6 and {c.tier for c in hard.records} == {"hard"}


def test_demo_sft_and_pairwise() -> None:
    sft = load_sft(DEMO / "sft.jsonl")
    assert len(sft.records) == 32 and isinstance(sft.records[0], SFTExample)
    first = sft.records[0]
    assert first.messages[0] == Message("system", SYSTEM_INTRO + AMARA_TEXT)
    assert [m.role for m in first.messages] == ["system", "user", "assistant"]
    assert sum(len(r.messages) == 5 for r in sft.records) == 3
    assert first.as_dicts()[1] == {"role": "user", "content": first.messages[1].content}
    pairs = load_pairwise(DEMO / "pairwise.jsonl")
    assert len(pairs.records) == 32 and isinstance(pairs.records[0], PairwiseExample)
    assert pairs.records[0].persona == AMARA_TEXT
    assert pairs.records[0].chosen == first.messages[2].content


def test_demo_answer_lengths() -> None:
    texts = [m.content for r in load_sft(DEMO / "sft.jsonl").records for m in r.messages
             if m.role == "assistant"]
    texts += [p.rejected for p in load_pairwise(DEMO / "pairwise.jsonl").records]
    texts += [t for c in load_personafeedback(PF_ROOT).records for t in (c.chosen, c.reject)]
    assert all(40 <= len(t.split()) <= 150 for t in texts)


# --- errors: every message names the file and line ------------------------------------------

GOOD = {"id": "a", "persona": "p", "question": "q?"}


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ('{"persona": "p", "question": ', "invalid JSON"),
        ('["a list"]', "expected a JSON object, got array"),
        ({"id": "b", "persona": "p"}, "missing required field 'question'"),
        ({"id": "b", "persona": "p", "question": "  "}, "field 'question' is empty"),
        ({"id": "b", "persona": "p", "question": 3}, "field 'question' must be a string, got number"),
        ({"id": "b", "persona": 7, "question": "q"}, "field 'persona' must be a string or an object"),
        ({"id": "b", "persona": {}, "question": "q"}, "field 'persona' is empty"),
        ({"id": True, "persona": "p", "question": "q"}, "field 'id' must be a string or an integer"),
        ({"id": "a", "persona": "p", "question": "q"}, "duplicate id 'a' (first on line 1)"),
    ],
)
def test_prompt_errors_name_file_and_line(tmp_path: Path, bad_line: object, expected: str) -> None:
    path = write_jsonl(tmp_path / "prompts.jsonl", [GOOD, "", bad_line])
    with pytest.raises(DataError) as err:
        load_prompts(path)
    msg = str(err.value)
    assert f"prompts.jsonl:3: {expected}" in msg and ";" in msg and "\n" not in msg


def test_prompt_ids_default_and_int(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "set.jsonl", [{"persona": "p", "question": "q"},
                                               {"id": 7, "persona": "p", "question": "q"}])
    assert [r.id for r in load_prompts(path).records] == ["set-1", "7"]
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"id": "dup-2", "persona": "p", "question": "q"},
                                              {"persona": "p", "question": "q"}])
    with pytest.raises(DataError, match=r"dup.jsonl:2: duplicate id 'dup-2'"):
        load_prompts(dup)


def test_relative_paths_resolve_from_any_cwd(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert len(load_prompts("data/demo/eval.jsonl").records) == 32
    assert len(load_personafeedback("data/demo/personafeedback").records) == 36


def test_missing_empty_and_blank_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"prompts file not found: .*nope\.jsonl"):
        load_prompts(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl is empty"):
        load_sft(tmp_path / "empty.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n  \n\t\n")
    with pytest.raises(DataError, match=r"blank\.jsonl is empty"):
        load_pairwise(tmp_path / "blank.jsonl")


def test_blank_lines_and_bom_ignored(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    row = json.dumps({"persona": "p", "question": "q"})
    path.write_bytes(("\ufeff" + row + "\n\n   \n" + row + "\n\n").encode())
    res = load_prompts(path)
    assert [r.id for r in res.records] == ["p-1", "p-4"] and res.skipped == 0


def test_skip_policy_reports_problems(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [
        GOOD, "{oops", {"id": "a", "persona": "p", "question": "q"}, "",
        {"id": "c", "persona": "p", "question": "q"}, {"persona": "p"},
    ])
    res = load_prompts(path, on_bad="skip")
    assert [r.id for r in res.records] == ["a", "c"]
    assert res.skipped == 3
    assert res.problems == [
        f"{path}:2: invalid JSON (Expecting property name enclosed in double quotes at column 2)",
        f"{path}:3: duplicate id 'a' (first on line 1)",
        f"{path}:6: missing required field 'question'",
    ]


def test_skip_with_nothing_left_is_an_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", ["nope", "[]"])
    pattern = r"no valid prompts in .*p\.jsonl loaded \(2 bad line\(s\) skipped; first problem: "
    with pytest.raises(DataError, match=pattern + r".*p\.jsonl:1: "):
        load_prompts(path, on_bad="skip")
    with pytest.raises(DataError, match="on_bad"):
        load_prompts(path, on_bad="ignore")  # type: ignore[arg-type]


def test_invalid_utf8_is_a_bad_record(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"persona": "p", "question": "q"}\n{"persona": "\xff"}\n')
    with pytest.raises(DataError, match=r"p\.jsonl:2: not valid UTF-8"):
        load_prompts(path)
    assert load_prompts(path, on_bad="skip").skipped == 1


# --- PersonaFeedback --------------------------------------------------------------------------

def test_pf_user_id_out_of_range_names_both_files(tmp_path: Path) -> None:
    root = make_pf(tmp_path / "pf", cases={"general/easy.jsonl": [case(1), case(4)]})
    with pytest.raises(DataError) as err:
        load_personafeedback(root)
    msg = str(err.value)
    assert "general/easy.jsonl:2: user_id 4 has no persona" in msg
    assert "all_personas.jsonl has 3 persona(s) on lines 1-3" in msg


@pytest.mark.parametrize(
    ("uid", "expected"),
    [("seven", "an integer, got 'seven'"), (2.0, "an integer, got 2.0"), (True, "an integer, got True"),
     (None, "an integer, got None"), (0, ">= 1, got 0")],
)
def test_pf_bad_user_id(tmp_path: Path, uid: object, expected: str) -> None:
    root = make_pf(tmp_path / "pf", cases={"spedific/hard.jsonl": [case(1), case(uid)]})
    with pytest.raises(DataError, match="spedific/hard.jsonl:2: field 'user_id' must be " + expected):
        load_personafeedback(root)


def test_pf_numeric_string_ids_and_missing_tiers(tmp_path: Path) -> None:
    root = make_pf(tmp_path / "pf", cases={"general/medium.jsonl": [case("2"), case(" 3 ")]})
    res = load_personafeedback(root)
    assert [(c.user_id, c.persona, c.kind, c.tier) for c in res.records] == [
        (2, "Name: P2\nBias: none", "general", "medium"),
        (3, "Name: P3\nBias: none", "general", "medium"),
    ]
    assert res.records[0].source == f"{root / 'data/general/medium.jsonl'}:1"


def test_pf_case_field_errors(tmp_path: Path) -> None:
    root = make_pf(tmp_path / "pf", cases={"general/easy.jsonl": [
        case(1), {"user_id": 1, "question": "q", "chosen": "c"}]})
    with pytest.raises(DataError, match="general/easy.jsonl:2: missing required field 'reject'"):
        load_personafeedback(root)


def test_pf_no_case_files_lists_paths(tmp_path: Path) -> None:
    root = make_pf(tmp_path / "pf")
    with pytest.raises(DataError) as err:
        load_personafeedback(root)
    msg = str(err.value)
    assert "no PersonaFeedback case files" in msg
    for rel in ("data/spedific/easy.jsonl", "data/specific/hard.jsonl", "data/general/medium.jsonl"):
        assert str(root / rel) in msg
    with pytest.raises(DataError, match="root not found"):
        load_personafeedback(tmp_path / "missing")


def test_pf_missing_persona_file(tmp_path: Path) -> None:
    root = tmp_path / "pf"
    write_jsonl(root / "data" / "general" / "easy.jsonl", [case(1)])
    with pytest.raises(DataError, match=r"persona file not found: .*all_personas\.jsonl"):
        load_personafeedback(root)


def test_pf_correct_spelling_and_ambiguity(tmp_path: Path) -> None:
    root = make_pf(tmp_path / "pf", cases={"specific/easy.jsonl": [case(1)]})
    assert [c.kind for c in load_personafeedback(root).records] == ["specific"]
    write_jsonl(root / "data" / "spedific" / "easy.jsonl", [case(2)])
    with pytest.raises(DataError, match="keep only one"):
        load_personafeedback(root)
    with pytest.raises(DataError, match="tiers must be"):
        load_personafeedback(root, tiers=("expert",))


def test_pf_bad_persona_line(tmp_path: Path) -> None:
    root = make_pf(tmp_path / "pf", cases={"general/easy.jsonl": [case(1), case(2), case(3)]})
    write_jsonl(root / "persona" / "all_personas.jsonl", [{"Name": "A"}, "[1]", {"Name": "C"}])
    with pytest.raises(DataError, match=r"all_personas\.jsonl:2: expected a JSON object"):
        load_personafeedback(root)
    res = load_personafeedback(root, on_bad="skip")
    assert [c.user_id for c in res.records] == [1, 3]
    assert res.skipped == 2 and len(res.problems) == 2
    assert "general/easy.jsonl:2: user_id 2 refers to the bad line " in res.problems[1]


# --- SFT and pairwise -------------------------------------------------------------------------

def _conv(*roles: str) -> list[dict[str, str]]:
    return [{"role": r, "content": f"{r} text"} for r in roles]


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"messages": _conv("user", "bot")}, "messages[1] has role 'bot'"),
        ({"messages": _conv("user")}, "no assistant message"),
        ({"messages": []}, "field 'messages' must be a non-empty array"),
        ({"messages": ["hi"]}, "messages[0] must be an object"),
        ({"messages": _conv("user", "system", "assistant")}, "messages[1] is a system message after the first"),
        ({"messages": [{"role": "user"}]}, "messages[0]: missing required field 'content'"),
        ({"persona": "p", "messages": _conv("system", "user", "assistant")},
         "has both 'persona' and a system message"),
    ],
)
def test_sft_errors(tmp_path: Path, record: dict[str, object], expected: str) -> None:
    path = write_jsonl(tmp_path / "sft.jsonl", [{"messages": _conv("user", "assistant")}, record])
    with pytest.raises(DataError, match=r"sft\.jsonl:2: " + expected.replace("[", r"\[")):
        load_sft(path)


def test_sft_persona_with_custom_template(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"persona": {"Name": "Ann", "Job": ""}, "messages": _conv("user", "assistant")},
        {"messages": _conv("system", "user", "assistant", "user", "assistant")},
    ])
    tpl = PromptTemplate(text="Profile: {persona}\n", source="test")
    res = load_sft(path, system_template=tpl)
    assert res.records[0].messages[0] == Message("system", "Profile: Name: Ann")
    assert len(res.records[1].messages) == 5


def test_pairwise(tmp_path: Path) -> None:
    base = {"persona": "p", "question": "q", "chosen": "A"}
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {**base, "rejected": "B"}, {**base, "reject": "C"}, {**base, "rejected": " A "},
        {**base, "rejected": "B", "reject": "C"}, base,
    ])
    with pytest.raises(DataError, match=r"pairs\.jsonl:3: 'chosen' and 'rejected' are the same"):
        load_pairwise(path)
    res = load_pairwise(path, on_bad="skip")
    assert [p.rejected for p in res.records] == ["B", "C"]
    assert [p.split(": ", 1)[1] for p in res.problems] == [
        "'chosen' and 'rejected' are the same answer",
        "has both 'rejected' and 'reject'",
        "missing required field 'rejected'",
    ]


def test_errors_are_cpe_errors_on_one_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", ['{"a":\n'])
    with pytest.raises(CpeError) as err:
        load_pairwise(path)
    assert "\n" not in str(err.value) and "x.jsonl:1" in str(err.value)


# --- the paper release's data (method.md 4) ------------------------------------------------------
# Samples written here in the release's layouts; the release's own files stay out of the repo.

ANA = {"Name": "Ana", "Demographics": {"Age": 31, "Career_Information": "护士，夜班"},
       "Preference": {"Local_Life": {"Food_Drinks": "喜欢清淡的粥"}}}


def release_user_turn(persona: dict, question: str, closing: str = "生成1个个性化回答：") -> str:
    """A user turn of the release's RL_data structure, in our own words: instructions, the
    persona's JSON after 当前用户配置：, an example, the question after 以下是用户问题：."""
    return ("\n请以助手的身份回答这位用户的问题，回答要贴合用户。\n\n当前用户配置：\n"
            + json.dumps(persona, ensure_ascii=False, indent=2)
            + "\n\n请结合配置中的多个字段回答。\n\n示例：如果问题是\"周末去哪\"，可以回答\"去公园\"。\n\n"
            f"以下是用户问题：{question}\n\n{closing}\n")


def write_verl_parquet(path: Path, turns: list[object], index: list[int] | None = None) -> Path:
    """verl's dataset layout: data_source, prompt (chat messages), ability, reward_model,
    extra_info {index, split}; a turn that is not a string is written as the prompt itself."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"data_source": "persona",
             "prompt": [{"content": t, "role": "user"}] if isinstance(t, str) else t,
             "ability": "alignment",
             "reward_model": {"ground_truth": "参考回答", "style": "model"},
             "extra_info": {"index": (index or list(range(len(turns))))[i], "split": "test"}}
            for i, t in enumerate(turns)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_verl_parquet_prompts_take_persona_and_question_out_of_the_user_turn(
        tmp_path: Path) -> None:
    """Before: "test.parquet:1: not valid UTF-8". After: the release's own persona text and
    question, whichever closing instruction ends the turn and however long the question."""
    path = write_verl_parquet(tmp_path / "test.parquet", [
        release_user_turn(ANA, "夜班后怎么吃得健康？"),
        release_user_turn({"Name": "Bo"}, "第一行\n\n第二行？", closing="生成1个完全个性化回答："),
    ], index=[7, 9])
    res = load_prompts(path)
    assert (len(res.records), res.skipped) == (2, 0)
    first, second = res.records
    assert first.id == "test-7" and second.id == "test-9"
    assert first.persona == json.dumps(ANA, ensure_ascii=False, indent=2)
    assert first.persona.startswith('{\n  "Name": "Ana",\n  "Demographics": {\n    "Age": 31')
    assert first.question == "夜班后怎么吃得健康？"
    assert second.question == "第一行\n\n第二行？"
    # the format is recognised by content, not by name
    renamed = tmp_path / "prompts.jsonl"
    renamed.write_bytes(path.read_bytes())
    again = load_prompts(renamed).records
    assert [(r.id, r.persona, r.question) for r in again] == [
        ("prompts-7", first.persona, first.question), ("prompts-9", second.persona, second.question)]


@pytest.mark.parametrize(("turn", "expected"), [
    ("请回答：以下是用户问题：怎么办？\n\n生成1个个性化回答：", "has no persona marker '当前用户配置：'"),
    ("当前用户配置：\n名字是 Ana\n\n以下是用户问题：怎么办？", "no persona JSON after '当前用户配置：'"),
    ("当前用户配置：\n[1, 2]\n\n以下是用户问题：怎么办？", "the persona after '当前用户配置：' is array"),
    ("当前用户配置：\n{\"Name\": \"Ana\"}\n\n请回答。", "has no question marker '以下是用户问题：'"),
    ("当前用户配置：\n{\"Name\": \"Ana\"}\n以下是用户问题：\n\n生成1个个性化回答：", "the question after"),
    ([{"role": "system", "content": "s"}], "has no user message with text content"),
])
def test_verl_parquet_bad_rows_name_file_and_row(tmp_path: Path, turn: object,
                                                 expected: str) -> None:
    path = write_verl_parquet(tmp_path / "t.parquet", [release_user_turn(ANA, "好？"), turn])
    with pytest.raises(DataError) as err:
        load_prompts(path)
    message = str(err.value)
    assert message.startswith(f"{path}[1]: ") and expected in message and "\n" not in message
    assert "expected the release's RL_data layout" in message or "role: user" in message
    res = load_prompts(path, on_bad="skip")
    assert (len(res.records), res.skipped) == (1, 1)


def test_verl_parquet_file_level_errors(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pointer = tmp_path / "train.parquet"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\n")
    with pytest.raises(DataError, match=r"train\.parquet: named \.parquet but does not start "
                                        r"with b'PAR1'.*Git LFS pointer"):
        load_prompts(pointer)
    flat = tmp_path / "flat.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "q", "persona": "p"}]), flat)
    with pytest.raises(DataError, match=r"no 'prompt' column \(has question, persona\); "
                                        "expected verl's layout"):
        load_prompts(flat)
    twice = write_verl_parquet(tmp_path / "twice.parquet", [release_user_turn(ANA, "a？")] * 2,
                               index=[3, 3])
    with pytest.raises(DataError, match=r"twice\.parquet\[1\]: duplicate id 'twice-3'"):
        load_prompts(twice)


def make_release_pf(data: Path, cases: dict[str, list[object]],
                    personas: dict[str, object] | None = None) -> Path:
    """The release's eval/data: rm_benchmark_all/<kind>_<tier>.jsonl, persona_all/<id>.json."""
    for name, persona in (personas or {"Ana_x1Q": ANA, "Bo_7zK": {"Name": "Bo"}}).items():
        (data / "persona_all").mkdir(parents=True, exist_ok=True)
        text = persona if isinstance(persona, str) else json.dumps(persona, ensure_ascii=False,
                                                                   indent=2)
        (data / "persona_all" / f"{name}.json").write_text(text, encoding="utf-8")
    for name, rows in cases.items():
        write_jsonl(data / "rm_benchmark_all" / name, rows)
    return data


def test_release_personafeedback_layout(tmp_path: Path) -> None:
    """Before: "no PersonaFeedback case files under .../eval/data". After: every tier, mid as
    medium, personas from their files as the release shows them to the policy."""
    data = make_release_pf(tmp_path / "eval" / "data", {
        "specific_easy.jsonl": [case("Ana_x1Q")],
        "general_mid.jsonl": [case("Bo_7zK"), case("Ana_x1Q", question="Q2?")],
        "general_hard.jsonl": [case("Bo_7zK")],
    })
    write_jsonl(data / "rm_benchmark_all" / "rm_benchmark_all" / "general_easy.jsonl",
                [case("Nobody")])  # the release's nested copy is not read
    res = load_personafeedback(data)
    assert [(c.kind, c.tier, c.user_id) for c in res.records] == [
        ("specific", "easy", "Ana_x1Q"), ("general", "medium", "Bo_7zK"),
        ("general", "medium", "Ana_x1Q"), ("general", "hard", "Bo_7zK")]
    assert res.records[0].persona == json.dumps(ANA, ensure_ascii=False, indent=2)
    assert res.records[1].source == f"{data / 'rm_benchmark_all' / 'general_mid.jsonl'}:1"
    assert [c.tier for c in load_personafeedback(data, tiers=("medium",)).records] == [
        "medium", "medium"]


@pytest.mark.parametrize(("uid", "expected"), [
    ("Cy_000", "general_easy.jsonl:2: user_id 'Cy_000' has no persona: "),
    ("../Ana_x1Q", "general_easy.jsonl:2: field 'user_id' must name a persona file, got "
                   "'../Ana_x1Q'"),
    (3, "general_easy.jsonl:2: field 'user_id' must name a persona file, got 3"),
    ("Bad_json", "general_easy.jsonl:2: persona file "),
])
def test_release_personafeedback_bad_cases(tmp_path: Path, uid: object, expected: str) -> None:
    data = make_release_pf(tmp_path / "data", {"general_easy.jsonl": [case("Bo_7zK"), case(uid)]},
                           {"Bo_7zK": {"Name": "Bo"}, "Bad_json": "{not json"})
    with pytest.raises(DataError) as err:
        load_personafeedback(data)
    assert expected in str(err.value) and "\n" not in str(err.value)
    res = load_personafeedback(data, on_bad="skip")
    assert (len(res.records), res.skipped) == (1, 1)


def test_release_personafeedback_layout_errors(tmp_path: Path) -> None:
    data = make_release_pf(tmp_path / "data", {})
    (data / "rm_benchmark_all").mkdir()
    with pytest.raises(DataError, match=r"no PersonaFeedback case files under .* \(the release's "
                                        r"layout\); looked for .*specific_easy\.jsonl"):
        load_personafeedback(data)
    write_jsonl(data / "rm_benchmark_all" / "general_easy.jsonl", [case("Bo_7zK")])
    make_pf(data)  # the published layout beside it: either could be meant
    with pytest.raises(DataError, match="holds both PersonaFeedback's published layout"):
        load_personafeedback(data)
    lone = tmp_path / "lone"
    write_jsonl(lone / "rm_benchmark_all" / "general_easy.jsonl", [case("Bo_7zK")])
    with pytest.raises(DataError, match=r"persona folder not found: .*persona_all"):
        load_personafeedback(lone)


def test_a_50_mb_record_is_refused_in_one_line(tmp_path: Path) -> None:
    from cpe_ray.data import load_prompts

    good = json.dumps({"persona": "a cook", "question": "hi"})
    huge = json.dumps({"persona": "a cook", "question": "q" * 50 * 1024**2})
    path = tmp_path / "p.jsonl"
    path.write_text(f"{good}\n{huge}\n{good.replace('hi', 'ho')}\n")
    with pytest.raises(DataError) as err:
        load_prompts(path)
    assert str(err.value) == (f"{path}:2: the record is {len(huge):,} bytes, over "
                              "data.max_record_bytes (1,048,576); shorten it, or raise "
                              "data.max_record_bytes if such records are meant")
    skipped = load_prompts(path, "skip")
    assert len(skipped.records) == 2 and skipped.problems[0].startswith(f"{path}:2: the record")
    assert len(load_prompts(path, "error", 60 * 1024**2).records) == 3  # a limit of one's own
