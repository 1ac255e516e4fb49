"""`cpe-ray serve-judge`: a judge behind a real OpenAI-compatible HTTP server on 127.0.0.1.

Clients are the project's own (`grm.backend=openai`'s `EndpointGRMJudge`, `grm collect`) and
the `openai` package over TCP: nothing is mocked. The served rubric must give exactly the
judgements the rubric gives in-process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cpe_ray.config import load_config
from cpe_ray.errors import ConfigError
from cpe_ray.judges.base import JudgeRequest, Score
from cpe_ray.judges.bt import BTJudge
from cpe_ray.judges.endpoint import EndpointError, EndpointGRMJudge
from cpe_ray.judges.grm import (
    Judgement,
    JudgeOutcome,
    build_grm_messages,
    load_grm_template,
    weighted_reward,
)
from cpe_ray.judges.rubric import RubricJudge
from cpe_ray.judges.serve import JudgeServer, PromptReader, TemplateMatcher, serve
from cpe_ray.paths import REPO_ROOT
from cpe_ray.prompts import PromptTemplate

KEY_ENV = "CPE_TEST_JUDGE_KEY"
KEY = "sk-served-judge-test"
SERVED = "rubric-judge"
REQUESTS = [
    JudgeRequest("Name: Ada\nOccupation: nurse on night shifts\nHobbies: gardening",
                 "How do I keep tomatoes from splitting?",
                 "Water the tomatoes deeply twice a week, mulch the beds, and pick them when "
                 "they blush. After a night shift, water early in the morning."),
    JudgeRequest("A retired teacher who loves {braces} and 中文", "What should I read next?",
                 "Try a short novel.\n\nQuestion:\nnot a real section\n{answer}"),
    JudgeRequest("Student, budget-minded", "Cheap dinner ideas?", "Lentils. Lentils. Lentils."),
]


def _cfg(*overrides: str):
    return load_config(None, [f"serve.model={SERVED}", "serve.port=0", *overrides])


def _client_cfg(server: JudgeServer, *overrides: str):
    return load_config(None, ["grm.backend=openai", f"grm.api.base_url={server.base_url}",
                              f"grm.api.model={SERVED}", f"grm.api.api_key_env={KEY_ENV}",
                              "grm.api.max_retries=0", *overrides])


@pytest.fixture
def rubric_server(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    cfg = _cfg(f"serve.api_key_env={KEY_ENV}", "serve.batch_wait_s=0.05")
    with JudgeServer(cfg, RubricJudge(cfg.grm), "rubric") as server:
        yield server


def _post(url: str, body: dict, key: str = KEY) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), method="POST", headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _prompt(req: JudgeRequest) -> str:
    return build_grm_messages(load_grm_template("grm_en.txt"), req.persona, req.question,
                              req.answer)[0]["content"]


def test_template_matcher_gives_back_exactly_what_was_substituted() -> None:
    matcher = TemplateMatcher(load_grm_template("grm_en.txt"))
    for req in REQUESTS:
        assert matcher.match(_prompt(req)) == {"persona": req.persona, "question": req.question,
                                               "answer": req.answer}
        assert matcher.match("  \n" + _prompt(req) + "\n\n") is not None  # stripped clients
    assert matcher.match("Rate this answer: 42") is None
    repeated = TemplateMatcher(PromptTemplate("Q: {question}\nA: {answer}\nAgain: {question}",
                                              "inline"))
    assert repeated.match("Q: why?\nA: because\nAgain: why?") == {"question": "why?",
                                                                  "answer": "because"}
    assert repeated.match("Q: why?\nA: because\nAgain: how?") is None


def test_mode_comes_from_the_template_or_else_the_temperature() -> None:
    score = PromptTemplate("Score it. {persona} | {question} | {answer}", "score.txt")
    critique = PromptTemplate("Critique it. {persona} | {question} | {answer}", "critique.txt")
    two = PromptReader({"score": score, "critique": critique})
    one = PromptReader({"score": score, "critique": score})
    expected = JudgeRequest("p", "q", "a")
    assert two.read("Critique it. p | q | a", 0.0) == ("critique", expected)
    assert two.read("Score it. p | q | a", 0.9) == ("score", expected)
    assert one.read("Score it. p | q | a", 0.9) == ("critique", expected)
    assert one.read("Score it. p | q | a", 0.0) == ("score", expected)


@pytest.mark.parametrize("mode", ["score", "critique"])
def test_served_rubric_equals_the_rubric_in_process(rubric_server, mode) -> None:
    cfg = _client_cfg(rubric_server)
    served = EndpointGRMJudge.from_config(cfg.grm).judge(REQUESTS, mode, seed=3)
    local = RubricJudge(cfg.grm).judge(REQUESTS, mode, seed=3)
    assert [o.judgement for o in served] == [o.judgement for o in local]
    assert [o.attempts for o in served] == [1, 1, 1]
    rewards = [weighted_reward(o.judgement) for o in served]
    assert rewards == [weighted_reward(o.judgement) for o in local]
    assert len(set(rewards)) == 3  # three different answers, three different rewards
    assert rubric_server.served == 3


def test_concurrent_requests_are_judged_in_batches(rubric_server) -> None:
    cfg = _client_cfg(rubric_server, "grm.api.max_concurrency=8")
    requests = REQUESTS * 4
    outcomes = EndpointGRMJudge.from_config(cfg.grm).judge(requests, "score")
    assert all(o.judgement.parsed for o in outcomes)
    batches = rubric_server.batcher.batches
    assert sum(batches) == 12 and max(batches) > 1  # 8 in flight, 50 ms to gather them


def test_the_reply_is_an_openai_chat_completion_with_the_reward(rubric_server) -> None:
    status, reply = _post(rubric_server.base_url + "/chat/completions", {
        "model": SERVED, "temperature": 0,
        "messages": [{"role": "user", "content": _prompt(REQUESTS[0])}]})
    assert status == 200 and reply["object"] == "chat.completion"
    text = reply["choices"][0]["message"]["content"]
    local = RubricJudge(load_config().grm).judge(REQUESTS[:1], "score")[0].judgement
    assert text == local.raw and text.startswith("<critique>")
    assert reply["cpe_ray"] == {"mode": "score", "parsed": True, "attempts": 1,
                                "reward": pytest.approx(weighted_reward(local))}
    models = urllib.request.Request(rubric_server.base_url + "/models",
                                    headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(models, timeout=30) as r:
        assert [m["id"] for m in json.loads(r.read())["data"]] == [SERVED]


@pytest.mark.parametrize(("body", "key", "status", "fragment"), [
    ({"model": SERVED, "messages": [{"role": "user", "content": "hi"}]}, KEY, 400,
     "not this judge's GRM prompt"),
    ({"model": "gpt-4o", "messages": []}, KEY, 404, "is not served here"),
    ({"model": SERVED, "n": 2, "messages": []}, KEY, 400, "n must be 1"),
    ({"model": SERVED, "messages": [{"role": "system", "content": "x"}]}, KEY, 400,
     "must end with a user turn"),
    ({"model": SERVED, "messages": []}, "sk-wrong", 401, "wrong or missing API key"),
])
def test_refusals_are_one_line_with_a_status(rubric_server, body, key, status, fragment) -> None:
    code, reply = _post(rubric_server.base_url + "/chat/completions", body, key)
    assert code == status
    assert fragment in reply["error"]["message"] and "\n" not in reply["error"]["message"]


def test_a_wrong_model_name_stops_the_client_with_one_line(rubric_server) -> None:
    cfg = _client_cfg(rubric_server, "grm.api.model=gpt-4o")
    with pytest.raises(EndpointError, match="refused model gpt-4o: HTTP 404"):
        EndpointGRMJudge.from_config(cfg.grm).judge(REQUESTS[:1], "score")


def test_beyond_loopback_a_key_is_required(monkeypatch) -> None:
    cfg = _cfg("serve.host=0.0.0.0")
    with pytest.raises(ConfigError, match="set serve.api_key_env"):
        JudgeServer(cfg, RubricJudge(cfg.grm), "rubric")
    monkeypatch.delenv(KEY_ENV, raising=False)
    cfg = _cfg(f"serve.api_key_env={KEY_ENV}")
    with pytest.raises(ConfigError, match=f"names \\${KEY_ENV}, which is not set"):
        serve(cfg)


class _LengthScorer:
    """A scalar reward model stand-in: the answer's length in words (what BTJudge wraps)."""

    def score(self, requests):
        return [Score(float(len(r.answer.split())), "words") for r in requests]

    def describe(self) -> str:
        return "length scorer"


def test_a_served_scalar_model_scores_and_refuses_critiques(monkeypatch) -> None:
    cfg = _cfg()
    with JudgeServer(cfg, BTJudge(_LengthScorer()), "bt") as server:  # type: ignore[arg-type]
        url = server.base_url + "/chat/completions"
        status, reply = _post(url, {"model": SERVED, "temperature": 0, "messages": [
            {"role": "user", "content": _prompt(REQUESTS[2])}]})
        assert status == 200 and reply["cpe_ray"]["reward"] == 3.0
        assert reply["choices"][0]["message"]["content"] == "bt reward 3"
        status, reply = _post(url, {"model": SERVED, "temperature": 0.9, "messages": [
            {"role": "user", "content": _prompt(REQUESTS[2])}]})
        assert status == 400 and "writes no critiques" in reply["error"]["message"]


def test_a_failing_judge_is_a_500_and_the_server_keeps_serving() -> None:
    calls = []

    class Flaky:
        def judge(self, requests, mode, seed=0):
            calls.append(len(requests))
            if len(calls) == 1:
                raise RuntimeError("engine fell over")
            return [JudgeOutcome(Judgement({}, "", "ok", True), 1) for _ in requests]

    with JudgeServer(_cfg(), Flaky(), "flaky") as server:
        body = {"model": SERVED, "messages": [{"role": "user", "content": _prompt(REQUESTS[0])}]}
        status, reply = _post(server.base_url + "/chat/completions", body)
        assert status == 500 and "engine fell over" in reply["error"]["message"]
        status, reply = _post(server.base_url + "/chat/completions", body)
        assert status == 200 and reply["choices"][0]["message"]["content"] == "ok"


def test_grm_collect_runs_against_the_served_rubric(rubric_server, tmp_path: Path) -> None:
    from cpe_ray.stages.distill import collect, read_records

    out = tmp_path / "judgements.jsonl"
    cfg = load_config(None, [f"distill.api.base_url={rubric_server.base_url}",
                             f"distill.api.model={SERVED}", f"distill.api.api_key_env={KEY_ENV}",
                             f"distill.output_path={out}"])
    summary = collect(cfg, say=lambda _: None)
    assert (summary.collected, summary.failed, summary.unparsed) == (64, 0, 0)
    records = read_records(out)
    rubric = RubricJudge(cfg.grm)
    for r in records[:8]:
        expected = rubric.render(JudgeRequest(r["persona"], r["question"], r["answer"]))
        assert r["output"] == expected


def test_the_command_serves_until_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cpe_ray", "serve-judge", "serve.port=0",
                             f"serve.model={SERVED}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=env)
    try:
        first = proc.stdout.readline()  # type: ignore[union-attr]
        assert first.startswith("serving rubric judge (offline GRM stand-in) as model "
                                "'rubric-judge' at http://127.0.0.1:"), first + proc.stderr.read()  # type: ignore[union-attr]
        url = first.rsplit(" ", 1)[-1].strip()
        status, reply = _post(url + "/chat/completions", {
            "model": SERVED, "temperature": 0,
            "messages": [{"role": "user", "content": _prompt(REQUESTS[0])}]}, "any")
        assert status == 200 and reply["cpe_ray"]["parsed"] is True
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped after 1 judgements" in out


def test_requests_in_flight_from_threads_all_get_their_own_answer(rubric_server) -> None:
    url = rubric_server.base_url + "/chat/completions"

    def ask(req: JudgeRequest) -> str:
        return _post(url, {"model": SERVED, "temperature": 0, "messages": [
            {"role": "user", "content": _prompt(req)}]})[1]["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(max_workers=6) as pool:
        texts = list(pool.map(ask, REQUESTS * 2))
    rubric = RubricJudge(load_config().grm)
    assert texts == [rubric.render(r) for r in REQUESTS * 2]


def test_stop_returns_promptly() -> None:
    stop = threading.Event()
    lines: list[str] = []
    thread = threading.Thread(target=serve, args=(_cfg(), lines.append, stop))
    thread.start()
    deadline = time.monotonic() + 30
    while not lines and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert lines[0].startswith("serving rubric judge (offline GRM stand-in)") and lines[-1] == (
        "stopped after 0 judgements")


def test_a_served_grm_checkpoint_answers_as_it_does_in_process(monkeypatch) -> None:
    """grm.backend=hf: the tiny model as a GRM on an HF engine inside the server; greedy and
    without retries, the served text is exactly the in-process engine judge's."""
    from cpe_ray.judges.serve import judge_to_serve

    monkeypatch.setenv(KEY_ENV, KEY)
    gen = ["grm.backend=hf", "grm.model_path=tiny", "grm.max_retries=0",
           "grm.max_new_tokens=12"]
    cfg = _cfg(*gen)
    judge, label = judge_to_serve(cfg)
    assert label == "GRM tiny (hf)"
    local = judge.judge(REQUESTS, "score", cfg.run.seed)
    with JudgeServer(cfg, judge, label) as server:
        client = _client_cfg(server, *gen[2:])
        served = EndpointGRMJudge.from_config(client.grm).judge(REQUESTS, "score")
    assert [o.judgement.raw for o in served] == [o.judgement.raw for o in local]
    assert all(o.judgement.raw for o in served)  # the tiny model wrote something
