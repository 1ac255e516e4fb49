"""GRM distillation: `grm collect` against a loopback teacher (failures, unparsed outputs,
resume after a kill), and `grm train` with the held-out parse share."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cpe_ray.config import load_config
from cpe_ray.data import load_judge_inputs
from cpe_ray.errors import DataError
from cpe_ray.judges.grm import parse_judgement
from cpe_ray.paths import DATA_DIR, REPO_ROOT
from cpe_ray.stages.distill import collect, failures_path, read_records, record_key
from tests.evaluation_server import ChatServer, grm_answer, grm_policy

KEY_ENV = "CPE_RAY_TEST_TEACHER_KEY"
KEY = "teacher-key-123"
FAST_RETRIES = ["distill.api.max_retries=2", "distill.api.backoff_initial_s=0.01",
                "distill.api.backoff_max_s=0.02"]
UNPARSABLE = "UNPARSABLE"  # answers holding this make the teacher forget the format
PERMANENT = "PERMANENT"  # answers holding this always fail (HTTP 500)
TRANSIENT = "TRANSIENT"  # answers holding this fail once (HTTP 503), then succeed


def teacher(messages):
    if UNPARSABLE in grm_answer(messages):
        return "This answer is fine, I suppose."
    return grm_policy(messages)


def _inputs(path: Path) -> Path:
    answers = ["Plain answer one.", f"{UNPARSABLE} answer.", f"{PERMANENT} answer a.",
               f"{PERMANENT} answer b.", f"{TRANSIENT} answer.", "A longer answer " * 30,
               "Plain answer one."]  # the last repeats the first: one key, one request
    with path.open("w") as f:
        for i, answer in enumerate(answers):
            f.write(json.dumps({"id": i, "persona": {"Name": "Ada", "Job": "welder"},
                                "question": "How do I start?", "answer": answer}) + "\n")
    return path


def _config(tmp_path: Path, server: ChatServer, inputs: Path, *extra: str):
    return load_config(None, [
        f"distill.input_path={inputs}", f"distill.output_path={tmp_path / 'out.jsonl'}",
        f"distill.api.base_url={server.base_url}", "distill.api.model=teacher",
        f"distill.api.api_key_env={KEY_ENV}", "distill.api.max_concurrency=3",
        *FAST_RETRIES, *extra])


def test_record_key_and_truncated_last_line(tmp_path: Path) -> None:
    key = record_key("p", "q", "a", "gpt")
    assert key == record_key("p", "q", "a", "gpt") and len(key) == 24
    assert len({key, record_key("p", "q", "a", "other"), record_key("p", "q", "b", "gpt")}) == 3
    path = tmp_path / "out.jsonl"
    path.write_text('{"key": "a"}\n{"key": "b"}\n{"key": "c", "outp')
    assert [r["key"] for r in read_records(path, repair=False)] == ["a", "b"]
    assert path.read_text().endswith('"outp')  # no repair asked: untouched
    assert [r["key"] for r in read_records(path)] == ["a", "b"]
    assert path.read_text() == '{"key": "a"}\n{"key": "b"}\n'  # cut for appending
    path.write_text('{"key": "a"}\nnot json\n{"key": "c"}\n')
    with pytest.raises(DataError, match=r"out.jsonl:2: not a JSON line"):
        read_records(path)
    assert read_records(tmp_path / "missing.jsonl") == []


def test_collect_keeps_failures_and_unparsed_then_resumes(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    seen: set[str] = set()

    def fail_if(messages):
        answer = grm_answer(messages)
        if PERMANENT in answer:
            return 500
        if TRANSIENT in answer and answer not in seen:
            seen.add(answer)
            return 503
        return None

    inputs = _inputs(tmp_path / "in.jsonl")
    with ChatServer(teacher, KEY, fail_if=fail_if) as server:
        cfg = _config(tmp_path, server, inputs)
        first = collect(cfg, say=lambda _: None)
        # 6 distinct triples: 2 fail for good (3 attempts each), 4 are written
        assert (first.inputs, first.already, first.collected, first.failed) == (6, 0, 4, 2)
        assert first.unparsed == 1
        assert server.requests == 4 + 1 + 2 * 3  # the transient one was retried once
    records = read_records(Path(first.output))
    assert len(records) == 4
    for r in records:  # each record carries the parser's own verdict on the teacher output
        assert r["parsed"] == parse_judgement(r["output"]).parsed
        assert r["key"] == record_key(r["persona"], r["question"], r["answer"], "teacher")
    assert [r["parsed"] for r in records].count(False) == 1
    failures = read_records(failures_path(cfg))
    assert len(failures) == 2 and all("HTTP 500" in f["error"] and f["attempts"] == 3
                                      for f in failures)
    with ChatServer(teacher, KEY) as server:  # the teacher recovered: only the failures
        again = collect(_config(tmp_path, server, inputs), say=lambda _: None)
        assert (again.already, again.collected, again.failed) == (4, 2, 0)
        assert server.requests == 2
    keys = [r["key"] for r in read_records(Path(first.output))]
    assert len(keys) == len(set(keys)) == 6


def test_collect_checks_input_and_key_before_any_request(tmp_path: Path, monkeypatch) -> None:
    from cpe_ray.errors import ConfigError

    monkeypatch.delenv(KEY_ENV, raising=False)
    with ChatServer(teacher, KEY) as server:
        cfg = _config(tmp_path, server, _inputs(tmp_path / "in.jsonl"))
        with pytest.raises(ConfigError, match=rf"distill.api.api_key_env names \${KEY_ENV}"):
            collect(cfg, say=lambda _: None)
        assert server.requests == 0
    with pytest.raises(ConfigError, match="distill.api.base_url and distill.api.model"):
        collect(load_config(None, []), say=lambda _: None)


def _keys(path: Path) -> list[str]:
    return [json.loads(line)["key"] for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_killed_collection_resumes_without_duplicates(tmp_path: Path) -> None:
    """SIGKILL mid-collection plus a torn last line: the rerun covers every input once."""
    demo = DATA_DIR / "demo" / "grm_inputs.jsonl"
    out = tmp_path / "judgements.jsonl"
    env = {**os.environ, KEY_ENV: KEY}
    with ChatServer(grm_policy, KEY, delay_s=0.1) as server:
        args = [sys.executable, "-m", "cpe_ray", "grm", "collect",
                f"distill.input_path={demo}", f"distill.output_path={out}",
                f"distill.api.base_url={server.base_url}", "distill.api.model=teacher",
                f"distill.api.api_key_env={KEY_ENV}", "distill.api.max_concurrency=2",
                *FAST_RETRIES]
        proc = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while (not out.exists() or len(_keys(out)) < 10) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        written = _keys(out)
        assert 10 <= len(written) < 64
        with out.open("a") as f:  # the kill as it tears a line
            f.write('{"key": "torn", "outp')
        done = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"{len(written)} already there" in done.stdout
    keys = _keys(out)
    expected = {record_key(i.persona, i.question, i.answer, "teacher")
                for i in load_judge_inputs(demo).records}
    assert len(keys) == len(set(keys)) == 64 and set(keys) == expected
    assert keys[: len(written)] == written  # the first run's lines are kept as they were


@pytest.mark.slow
def test_grm_train_reports_the_parse_share_of_its_outputs(tmp_path: Path, monkeypatch,
                                                         capsys) -> None:
    from cpe_ray.cli import main
    from cpe_ray.stages.grm_train import PARSE_SHARE

    monkeypatch.setenv(KEY_ENV, KEY)
    with ChatServer(grm_policy, KEY) as server:
        overrides = [
            f"distill.output_path={tmp_path / 'j.jsonl'}", f"run.output_dir={tmp_path}",
            f"distill.api.base_url={server.base_url}", "distill.api.model=teacher",
            f"distill.api.api_key_env={KEY_ENV}", "distill.max_steps=3",
            "grm.max_new_tokens=24", "logging.wandb_mode=disabled"]
        assert main(["grm", "collect", *overrides]) == 0
    assert "done: 64 judgements collected (0 did not parse)" in capsys.readouterr().out
    assert main(["grm", "train", *overrides]) == 0
    printed = capsys.readouterr().out
    run_dir = tmp_path / "grm-tiny"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["model"].endswith("checkpoints/step-3/grm")
    assert summary["evaluation"]["eval/loss"] > 0  # held-out teacher outputs, 8 of 64
    assert f"parse share   {summary['parse_share']:.3f} of 8 held-out prompts" in printed
    report = json.loads((run_dir / PARSE_SHARE).read_text())
    samples = report["samples"]
    assert report["parse_share_n"] == len(samples) == 8
    # the share is what parse_judgement says of the very outputs the trained GRM wrote
    parsed = [parse_judgement(s["output"]).parsed for s in samples]
    assert [s["parsed"] for s in samples] == parsed
    assert report["parse_share"] == pytest.approx(sum(parsed) / 8)
    assert summary["parse_share"] == report["parse_share"]
    assert summary["data"]["judgements"] == 64 and summary["train_examples"] == 56
    assert (Path(summary["model"]) / "config.json").is_file()
