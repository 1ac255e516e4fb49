"""The endpoint judge against a real OpenAI-compatible HTTP server on 127.0.0.1.

The servers (tests/evaluation_server.py) speak POST /v1/chat/completions in OpenAI's JSON
shape; the code under test reaches them through the real `openai` client. Covered: judging,
a server that fails and recovers (retried with back-off), one that never recovers (counted
as unjudged, never dropped), timeouts, a wrong key (one line, stops), and the key never
showing up in errors, logs or written files.
"""

from __future__ import annotations

import logging
import time

import pytest

from cpe_ray.config import ApiConfig, GRMConfig
from cpe_ray.errors import ConfigError
from cpe_ray.evaluation.endpoint import EndpointPairwiseJudge
from cpe_ray.evaluation.lc_winrate import lc_winrate
from cpe_ray.evaluation.pairwise import judge_against_baseline, load_pairwise_template
from cpe_ray.evaluation.report import write_jsonl
from cpe_ray.judges.base import JudgeRequest
from cpe_ray.judges.endpoint import EndpointClient, EndpointError, EndpointGRMJudge, EndpointSpec
from cpe_ray.judges.grm import weighted_reward
from tests.evaluation_server import ChatServer, first_position_policy, longer_answer_policy

KEY = "sk-test-8f3a9c2e1d7b"  # a made-up key; it must never leak
KEY_ENV = "CPE_RAY_TEST_EVAL_KEY"
PERSONA = "Name: Ada\nOccupation: nurse"
QUESTION = "How can I stay alert at night?"
ITEMS = [(PERSONA, QUESTION, "Walk the ward every hour and drink cold water.", "Walk."),
         (PERSONA, QUESTION, "Nap.", "Take a short nap at your break and keep the lights bright."),
         (PERSONA, QUESTION, "Same length!", "Equal length")]


@pytest.fixture(autouse=True)
def key_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


def client(server: ChatServer, **overrides) -> EndpointClient:
    settings = {"timeout_s": 5.0, "max_retries": 4, "backoff_initial_s": 0.01,
                "backoff_max_s": 0.05, "max_concurrency": 4, **overrides}
    api = ApiConfig(base_url=server.base_url, model="judge-model", api_key_env=KEY_ENV,
                    **settings)
    return EndpointClient(EndpointSpec.from_config(api, "eval.api"))


def pairwise(c: EndpointClient) -> EndpointPairwiseJudge:
    return EndpointPairwiseJudge(c, load_pairwise_template("pairwise_en.txt"), max_tokens=64,
                                 temperature=0.0, max_parse_retries=1)


def test_endpoint_judge_both_orders() -> None:
    with ChatServer(longer_answer_policy, KEY) as server:
        out = judge_against_baseline(pairwise(client(server)), ITEMS)
    assert [c.preference for c in out] == [1.0, 0.0, 0.5]
    assert server.requests == 6 and server.statuses == [200] * 6
    body = server.bodies[0]
    assert body["model"] == "judge-model" and body["temperature"] == 0.0
    assert body["messages"][0]["role"] == "user"


def test_position_biased_endpoint_judge_is_cancelled_by_both_orders() -> None:
    with ChatServer(first_position_policy, KEY) as server:
        out = judge_against_baseline(pairwise(client(server)), ITEMS)
    assert [c.preference for c in out] == [0.5, 0.5, 0.5]


@pytest.mark.parametrize("status", [503, 500, 429])
def test_server_that_fails_then_recovers(status: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with ChatServer(longer_answer_policy, KEY, fail_first=3, fail_status=status) as server:
        c = client(server, max_concurrency=1)  # one at a time: the first request meets them all
        replies = c.chat_many([[{"role": "user", "content": "[Answer A]\nx\n[End of Answer A]"}]]
                              * 3, temperature=0.0, max_tokens=8)
    assert [r.error for r in replies] == [None, None, None]
    assert [r.attempts for r in replies] == [4, 1, 1]
    assert server.statuses == [status] * 3 + [200] * 3
    retries = [r for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) == 3 and f"HTTP {status}" in retries[0].getMessage()


def test_server_that_never_recovers_counts_every_item_unjudged(
        tmp_path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG)
    with ChatServer(longer_answer_policy, KEY, fail_first=None, fail_status=500,
                    echo_key_in_errors=True) as server:
        out = judge_against_baseline(pairwise(client(server, max_retries=2)), ITEMS)
    assert server.requests == 6 * 3  # every request tried 1 + max_retries times, no parse re-asks
    assert [c.preference for c in out] == [None, None, None]
    for c in out:
        assert all(v.attempts == 1 and v.error and v.error.startswith("HTTP 500")
                   for v in c.verdicts.values())
        assert "***" in (c.reason or "")  # the server echoed the key; we scrubbed it
    result = lc_winrate([c.preference for c in out], [len(i[2]) for i in ITEMS],
                        [len(i[3]) for i in ITEMS])
    assert (result.n_total, result.n_unjudged) == (0, 3)
    path = write_jsonl(tmp_path / "judgements.jsonl", [
        {"reason": c.reason, **{o: v.error for o, v in c.verdicts.items()}} for c in out])
    captured = capsys.readouterr()
    for text in (path.read_text(), caplog.text, captured.out, captured.err):
        assert KEY not in text


def test_timeouts_are_retried_then_reported() -> None:
    with ChatServer(longer_answer_policy, KEY, delay_s=1.0) as server:
        c = client(server, timeout_s=0.2, max_retries=1)
        (reply,) = c.chat_many([[{"role": "user", "content": "hi"}]], temperature=0.0,
                               max_tokens=4)
    assert reply.text is None and reply.attempts == 2
    assert reply.error is not None and "Timeout" in reply.error


def test_wrong_key_stops_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    with ChatServer(longer_answer_policy, "another-key") as server, pytest.raises(
            EndpointError) as err:
        judge_against_baseline(pairwise(client(server)), ITEMS[:1])
    message = str(err.value)
    assert "\n" not in message and "HTTP 401" in message and KEY_ENV in message
    assert KEY not in message


def test_missing_key_variable_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV)
    api = ApiConfig(base_url="http://127.0.0.1:9/v1", model="m", api_key_env=KEY_ENV)
    with pytest.raises(ConfigError, match=rf"\${KEY_ENV}, which is not set"):
        EndpointClient(EndpointSpec.from_config(api, "eval.api"))


def test_grm_on_an_endpoint() -> None:
    def grm_policy(messages):
        answer = messages[-1]["content"]
        score = 4 if "lights" in answer else -2
        return (f"<critique>Fine.</critique>\n<scores>\nHelpfulness: {score}\n"
                f"Personalization: {score}\nNaturalness: 3\n</scores>")

    with ChatServer(grm_policy, KEY) as server:
        cfg = GRMConfig(backend="openai", api=ApiConfig(base_url=server.base_url, model="grm",
                                                        api_key_env=KEY_ENV))
        judge = EndpointGRMJudge(EndpointClient(EndpointSpec.from_config(cfg.api, "grm.api")), cfg)
        outcomes = judge.judge([JudgeRequest(PERSONA, QUESTION, "Keep the lights bright."),
                                JudgeRequest(PERSONA, QUESTION, "Sleep.")], "score")
    rewards = [weighted_reward(o.judgement) for o in outcomes]
    assert rewards == pytest.approx([0.35 * 4 + 0.40 * 4 + 0.25 * 3,
                                     0.35 * -2 + 0.40 * -2 + 0.25 * 3])


def test_release_grm_on_an_endpoint_retries_by_sampling(tmp_path) -> None:
    """A GRM queried with release-style prompts (score and critique apart) that answers in the
    release's format; its first score of one answer is cut off. The retry samples at
    grm.retry_temperature, not at the greedy 0 that would repeat the cut-off text."""
    (tmp_path / "score.txt").write_text(
        "SCORE RUBRIC\n{persona_str}\n{question_str}\n<answer>{solution_str}</answer>",
        encoding="utf-8")
    (tmp_path / "critique.txt").write_text(
        "CRITIQUE RUBRIC\n{persona_str}\n{question_str}\n<answer>{solution_str}</answer>",
        encoding="utf-8")
    seen: dict[str, int] = {}

    def release_grm(messages):
        answer = messages[-1]["content"].split("<answer>")[1].split("</answer>")[0]
        seen[answer] = seen.get(answer, 0) + 1
        if answer == "Sleep." and seen[answer] == 1:
            return "<critique>Too short.</critique>\n<scores>\nHelpfulness: -2分\n"  # cut off
        return ("<critique>\nToo short.\n</critique>\n\n<scores>\nHelpfulness: 3分\n"
                "Personalization: 2分\nNatural: 1分\n</scores>")

    with ChatServer(release_grm, KEY) as server:
        cfg = GRMConfig(backend="openai", template=str(tmp_path / "score.txt"),
                        critique_template=str(tmp_path / "critique.txt"),
                        api=ApiConfig(base_url=server.base_url, model="grm", api_key_env=KEY_ENV))
        judge = EndpointGRMJudge(EndpointClient(EndpointSpec.from_config(cfg.api, "grm.api")), cfg)
        requests = [JudgeRequest(PERSONA, QUESTION, "Keep the lights bright."),
                    JudgeRequest(PERSONA, QUESTION, "Sleep.")]
        scored = judge.judge(requests, "score")
        score_bodies = list(server.bodies)
        critiqued = judge.judge(requests[:1], "critique")
        critique_bodies = server.bodies[len(score_bodies):]
    assert [o.attempts for o in scored] == [1, 2] and all(o.judgement.parsed for o in scored)
    assert [weighted_reward(o.judgement) for o in scored] == pytest.approx([2.1, 2.1])
    assert sorted(b["temperature"] for b in score_bodies) == [0.0, 0.0, 0.7]
    assert all(b["messages"][0]["content"].startswith("SCORE RUBRIC\n" + PERSONA)
               for b in score_bodies)
    assert [b["temperature"] for b in critique_bodies] == [0.9]
    assert critique_bodies[0]["messages"][0]["content"].startswith("CRITIQUE RUBRIC\n")
    assert critiqued[0].judgement.critique == "Too short."


def test_a_grm_endpoint_that_cannot_answer_is_a_judge_error_not_a_zero() -> None:
    """A server that fails every request: after grm.api.max_retries the judge raises, naming
    the endpoint, instead of scoring empty text (0, unparsed) as before."""
    from cpe_ray.judges.base import JudgeError

    with ChatServer(lambda m: "unused", KEY, fail_first=None, fail_status=503) as server:
        cfg = GRMConfig(backend="openai", api=ApiConfig(
            base_url=server.base_url, model="grm", api_key_env=KEY_ENV, max_retries=1,
            backoff_initial_s=0.01, backoff_max_s=0.02))
        judge = EndpointGRMJudge(EndpointClient(EndpointSpec.from_config(cfg.api, "grm.api")), cfg)
        with pytest.raises(JudgeError, match=r"could not score 2 of 2 answers after 2 attempt"):
            judge.judge([JudgeRequest(PERSONA, QUESTION, "a"), JudgeRequest(PERSONA, QUESTION,
                                                                             "b")], "score")
        assert len(server.bodies) == 4  # 2 requests x (1 + 1 retry), no regenerations


def test_an_endpoint_request_stops_retrying_at_max_wait_s() -> None:
    with ChatServer(lambda m: "unused", KEY, fail_first=None, fail_status=503) as server:
        spec = EndpointSpec(server.base_url, "m", KEY_ENV, 5.0, 1000, 1, 0.05, 0.05, 0.5)
        start = time.monotonic()
        reply = EndpointClient(spec).chat([{"role": "user", "content": "x"}], temperature=0,
                                          max_tokens=4)
        waited = time.monotonic() - start
    assert reply.error is not None and "503" in reply.error
    # 1000 retries allowed, but the 0.5 s budget ends them after ~10 (0.05-0.1 s apart)
    assert 2 <= reply.attempts < 100 and waited < 30
