"""`cpe-ray eval ...` end to end: the tiny policy, a judge endpoint on loopback, real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cpe_ray.cli import main
from cpe_ray.paths import DATA_DIR, REPO_ROOT
from tests.evaluation_server import ChatServer, longer_answer_policy

KEY = "sk-cli-test-5e1f0a"
KEY_ENV = "CPE_RAY_TEST_CLI_KEY"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def key_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


def endpoint_overrides(server: ChatServer) -> list[str]:
    return ["eval.judge=openai", f"eval.api.base_url={server.base_url}", "eval.api.model=judge",
            f"eval.api.api_key_env={KEY_ENV}", "eval.api.backoff_initial_s=0.01",
            "eval.api.backoff_max_s=0.02", "eval.api.max_retries=1"]


def all_text(folder: Path) -> str:
    return "\n".join(p.read_bytes().decode("utf-8", "replace") for p in folder.rglob("*")
                     if p.is_file())


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert not captured.out  # nothing ran before the error
    return lines[0]


@pytest.mark.slow
def test_winrate_on_the_tiny_policy_with_an_endpoint_judge(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with ChatServer(longer_answer_policy, KEY, fail_first=2) as server:  # fails, then recovers
        # max_retries 3: under load one request's retry may meet the second failure too
        rc = main(["eval", "winrate", "--limit", "3", "--out", str(tmp_path),
                   "eval.max_new_tokens=8", *endpoint_overrides(server), "eval.api.max_retries=3"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert server.statuses.count(503) == 2 and server.statuses.count(200) == 6  # both orders
    out = tmp_path / "winrate"
    results = json.loads((out / "results.json").read_text())
    m = results["metrics"]
    # eight tokens of the tiny model are shorter than every baseline answer: all losses
    assert (m["n_total"], m["n_unjudged"], m["n_wins_base"], m["win_rate"]) == (3, 0, 3, 0.0)
    assert results["orders"] == 2 and results["judge"].startswith("endpoint judge judge at")
    assert "win rate 0.0" in captured.out
    model_outputs = json.loads((out / "model_outputs.json").read_text())
    assert [set(r) for r in model_outputs] == [{"instruction", "output", "generator", "dataset",
                                                "id"}] * 3
    assert model_outputs[0]["generator"] == "tiny"
    reference = json.loads((out / "reference_outputs.json").read_text())
    assert reference[0]["generator"] == "generic-baseline"
    assert reference[0]["instruction"] == model_outputs[0]["instruction"]
    for png in ("winrate.png", "preference_vs_length.png", "reward_vs_length.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    assert "![win rates](winrate.png)" in (out / "report.md").read_text()
    assert len((out / "judgements.jsonl").read_text().splitlines()) == 3
    for text in (all_text(tmp_path), captured.out, captured.err):
        assert KEY not in text


def test_winrate_of_given_answers_when_the_judge_never_answers(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    answers = tmp_path / "answers.jsonl"
    baseline = [json.loads(line) for line in (DATA_DIR / "demo" / "eval_baseline.jsonl").open()]
    answers.write_text("".join(json.dumps({"id": b["id"], "output": b["output"] + " More.",
                                           "generator": "wordy"}) + "\n" for b in baseline))
    with ChatServer(longer_answer_policy, KEY, fail_first=None) as server:
        rc = main(["eval", "winrate", "--limit", "2", "--answers", str(answers), "--out",
                   str(tmp_path / "out"), *endpoint_overrides(server)])
    captured = capsys.readouterr()
    assert rc == 1 and "nothing could be judged (2 unjudged)" in captured.out
    results = json.loads((tmp_path / "out" / "winrate" / "results.json").read_text())
    assert results["model"] == "wordy" and results["metrics"]["win_rate"] is None
    assert [u["id"] for u in results["unjudged"]] == ["eval-001", "eval-002"]
    assert all("HTTP 503" in u["reason"] for u in results["unjudged"])
    assert "**2 could not be judged**" in (tmp_path / "out" / "winrate" / "report.md").read_text()
    # the same answers under the length judge: all judged, all wins, nothing generated
    rc = main(["eval", "winrate", "--limit", "4", "--answers", str(answers), "--out",
               str(tmp_path / "len"), "eval.judge=length"])
    assert rc == 0 and "win rate 100.0" in capsys.readouterr().out


def test_personafeedback_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["eval", "personafeedback", "--limit", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and "on 6 cases" in out
    results = json.loads((tmp_path / "personafeedback" / "results.json").read_text())
    assert results["judge"].startswith("rubric judge") and results["n_cases"] == 6
    assert (tmp_path / "personafeedback" / "accuracy.png").read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "personafeedback" / "reward_vs_length.png").is_file()


@pytest.mark.slow
def test_personamem_command_on_the_tiny_policy(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["eval", "personamem", "--limit", "2", "--out", str(tmp_path),
               "eval.max_new_tokens=4"])
    out = capsys.readouterr().out
    assert rc == 0 and "on 2 questions" in out
    results = json.loads((tmp_path / "personamem" / "results.json").read_text())
    assert results["table"]["all"]["n"] == 2 and results["truncated_prompts"] == 0
    rows = (tmp_path / "personamem" / "answers.jsonl").read_text().splitlines()
    assert [json.loads(r)["question_id"] for r in rows] == ["q-hana-1", "q-hana-2"]


@pytest.mark.parametrize(("argv", "message"), [
    (["winrate", "--baseline", "/nonexistent/baseline.jsonl"],
     "cpe-ray: error: baseline file not found: /nonexistent/baseline.jsonl"),
    (["winrate", "eval.judge=openai"],
     "cpe-ray: error: eval.judge=openai needs eval.api.base_url and eval.api.model"),
    (["winrate", "eval.judge=openai", "eval.api.base_url=http://127.0.0.1:9/v1",
      "eval.api.model=m", "eval.api.api_key_env=CPE_RAY_TEST_UNSET_KEY"],
     "cpe-ray: error: eval.api.api_key_env names $CPE_RAY_TEST_UNSET_KEY, which is not set"),
    (["winrate", "--limit", "0"], "cpe-ray: error: eval.limit = 0 is outside [1, inf)"),
    (["winrate", "eval.judge=lenght"], "cpe-ray: error: eval.judge = 'lenght' is not one of"),
    (["personafeedback", "--root", "/nonexistent/pf"],
     "cpe-ray: error: PersonaFeedback root not found: /nonexistent/pf"),
    (["personamem", "--questions", "/nonexistent/q.csv"],
     "cpe-ray: error: PersonaMem questions CSV not found: /nonexistent/q.csv"),
])
def test_bad_input_is_one_line_and_exit_2(argv: list[str], message: str,
                                          capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CPE_RAY_TEST_UNSET_KEY", raising=False)
    assert main(["eval", *argv]) == 2
    assert error_line(capsys).startswith(message)


def test_baseline_missing_a_prompt_is_one_line(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    partial = tmp_path / "baseline.json"
    partial.write_text(json.dumps([{"id": "eval-001", "output": "Walk around."}]))
    assert main(["eval", "winrate", "--limit", "2", "--baseline", str(partial)]) == 2
    assert error_line(capsys) == (f"cpe-ray: error: {partial} has no baseline answer for prompt "
                                  "'eval-002' (matched by 'id', 'instruction', or 'question' and "
                                  "'persona'); every evaluated prompt needs one")


# --- the paper release's files: generate_data_300 answers, parquet prompts, eval/data ------------

def write_release_answers(path: Path, rows: list[tuple[str, dict, str]]) -> Path:
    """The release's generate_data_300 format: question, persona (a compact JSON string),
    response; one object a line."""
    path.write_text("".join(json.dumps({"question": q, "persona": json.dumps(p, ensure_ascii=False),
                                        "response": r}, ensure_ascii=False) + "\n"
                            for q, p, r in rows), encoding="utf-8")
    return path


def test_winrate_on_release_generate_data_files(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Before: "expected an object with a string 'output'". After: the release's baseline file
    is the prompt set and the baseline at once, a model's file in the same format gives the
    answers, a repeated (question, persona) is matched in file order, and parquet prompts
    (indented persona JSON) find the compact-JSON baseline."""
    ana, bo = {"Name": "Ana", "Age": 31}, {"Name": "Bo"}
    baseline = write_release_answers(tmp_path / "mix_gpt-4o.jsonl", [
        ("Q1？", ana, "b1"), ("Q2？", bo, "b2 b2"), ("Q1？", ana, "b1 again")])
    model = write_release_answers(tmp_path / "model.jsonl", [
        ("Q1？", ana, "a much longer first answer"), ("Q2？", bo, "a"),
        ("Q1？", ana, "a much longer third answer")])
    rc = main(["eval", "winrate", "--prompts", str(baseline), "--baseline", str(baseline),
               "--answers", str(model), "--out", str(tmp_path / "out"), "eval.judge=length"])
    assert rc == 0, capsys.readouterr().err
    out = tmp_path / "out" / "winrate"
    rows = [json.loads(line) for line in (out / "judgements.jsonl").read_text().splitlines()]
    assert [(r["baseline_answer"], r["model_answer"], r["preference"]) for r in rows] == [
        ("b1", "a much longer first answer", 1.0), ("b2 b2", "a", 0.0),
        ("b1 again", "a much longer third answer", 1.0)]
    results = json.loads((out / "results.json").read_text())
    assert (results["baseline"], results["model"]) == ("mix_gpt-4o", "model")

    from tests.test_data import release_user_turn, write_verl_parquet

    prompts = write_verl_parquet(tmp_path / "test.parquet", [release_user_turn(bo, "Q2？")])
    rc = main(["eval", "winrate", "--prompts", str(prompts), "--baseline", str(baseline),
               "--answers", str(model), "--out", str(tmp_path / "pq"), "eval.judge=length"])
    assert rc == 0 and "win rate 0.0" in capsys.readouterr().out


@pytest.mark.parametrize(("record", "message"), [
    ({"output": "o", "response": "r", "question": "q", "persona": "p"},
     "[0]: has both 'output' (alpaca_eval) and 'response' (the release's generate_data_300); "
     "keep one of them"),
    ({"response": "r", "question": "q"},
     "[0]: a 'response' record needs a string 'response' and 'question' and a 'persona' "
     "(string or object), as the release's generate_data_300 files have"),
    ({"answer": "r", "question": "q"},
     "[0]: expected an object with a string 'output' and 'id' or 'instruction' (alpaca_eval), "
     "or with a string 'response', 'question' and 'persona' (the release's generate_data_300)"),
])
def test_ambiguous_answer_records_are_one_line(tmp_path: Path, record: dict, message: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "baseline.json"
    bad.write_text(json.dumps([record]))
    assert main(["eval", "winrate", "--limit", "1", "--baseline", str(bad)]) == 2
    assert error_line(capsys) == f"cpe-ray: error: {bad}{message}"


def test_personafeedback_on_the_release_eval_data(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from tests.test_data import case, make_release_pf

    data = make_release_pf(tmp_path / "eval" / "data", {
        "specific_easy.jsonl": [case("Ana_x1Q")], "general_mid.jsonl": [case("Bo_7zK")],
        "general_hard.jsonl": [case("Bo_7zK"), case("Ana_x1Q")]})
    rc = main(["eval", "personafeedback", "--root", str(data), "--out", str(tmp_path / "out")])
    assert rc == 0 and "on 4 cases" in capsys.readouterr().out
    results = json.loads((tmp_path / "out" / "personafeedback" / "results.json").read_text())
    table = results["table"]
    assert (table["easy/specific"]["n"], table["medium/general"]["n"],
            table["hard/general"]["n"], table["all/all"]["n"]) == (1, 1, 2, 4)


@pytest.mark.slow
def test_launch_entrypoint(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "launch.evaluate", "personafeedback", "--limit", "1", "--out",
         str(tmp_path), "eval.personafeedback_judge=pairwise", "eval.judge=length"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "accuracy" in proc.stdout
    assert (tmp_path / "personafeedback" / "report.md").is_file()


def test_checkpoint_folder_resolves_to_its_policy(tmp_path: Path) -> None:
    from cpe_ray.config import Config, EvalConfig
    from cpe_ray.evaluation.generate import eval_model_path, model_label

    policy = tmp_path / "run" / "checkpoints" / "step-16" / "policy"
    policy.mkdir(parents=True)
    (policy / "config.json").write_text("{}")
    cfg = Config(eval=EvalConfig(model_path=str(policy.parent)))
    assert eval_model_path(cfg) == str(policy)
    assert model_label(cfg) == "run-step-16"  # run name and step
    named = Config(eval=EvalConfig(model_path=str(policy.parent), model_name="cpe-step-16"))
    assert model_label(named) == "cpe-step-16"
    assert eval_model_path(Config()) == "tiny"  # eval.model_path null: policy.model_path
