"""`cpe-ray rate`'s server over real HTTP: next, submit, resume after a kill, hidden info only
after judging, the token rule, and one-line errors before it serves."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import pytest
from rate_fixtures import RateServer, run_rate, write_samples, write_winrate

from cpe_ray.errors import ConfigError
from cpe_ray.human.records import read_judgements
from cpe_ray.human.server import TOKEN_HEADER, access_token

pytestmark = pytest.mark.timeout(180)


def _call(url: str, body: dict | None = None, headers: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json",
                                                          **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if url.split("?")[0].find("/api/") > 0 else raw)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _sources(tmp_path):
    return ["--winrate", str(write_winrate(tmp_path, n=3)), "--samples",
            str(write_samples(tmp_path / "run" / "samples.jsonl", n=4)), "--size", "7",
            "--port", "0", "--out", str(tmp_path / "out")]


def _judge(task: dict) -> dict:
    if task["kind"] == "pair":
        return {"preference": {"overall": "B", "helpfulness": "tie"},
                "scores": {"A": {"naturalness": -2}}}
    return {"scores": {"A": {"helpfulness": 1, "personalization": 2, "naturalness": 3}}}


def test_rate_submit_resume_hidden(tmp_path):
    server = RateServer(*_sources(tmp_path))
    url = server.url
    try:
        assert _call(url + "/")[1].startswith(b"<!doctype html>")
        status, cfg = _call(url + "/api/config")
        assert cfg == {"dimensions": ["helpfulness", "personalization", "naturalness"],
                       "score_min": -5, "score_max": 5, "total": 7}
        assert _call(url + "/api/next?rater=")[0] == 400
        submitted, orders = [], {}
        for _ in range(3):
            nxt = _call(url + "/api/next?rater=alice")[1]
            task = nxt["task"]
            assert "label" not in json.dumps(task) and "hidden" not in task
            status, hidden = _call(f"{url}/api/hidden?rater=alice&task_id={task['task_id']}")
            assert status == 403 and "judge this task first" in hidden["error"]
            body = {"rater": "alice", "task_id": task["task_id"], "seconds": 2.5, **_judge(task)}
            status, out = _call(url + "/api/judgements", body)
            assert status == 200 and out["progress"] == {"done": len(submitted) + 1, "total": 7}
            status, hidden = _call(f"{url}/api/hidden?rater=alice&task_id={task['task_id']}")
            assert status == 200 and set(hidden["hidden"]) >= {"critique", "judge_preference"}
            orders[task["task_id"]] = hidden["sides"]
            submitted.append(task["task_id"])
        assert _call(f"{url}/api/hidden?rater=bob&task_id={submitted[0]}")[0] == 403
        first = _call(url + "/api/next?rater=bob")[1]
        assert first["task"]["task_id"] == "t0000" and first["progress"]["done"] == 0
        for bad, message in [
            ({"task_id": "nope"}, "unknown task_id"),
            ({"preference": {"overall": "C"}}, "expected A, B or tie"),
            ({"scores": {"A": {"helpfulness": 9}}}, "not an integer from -5 to 5"),
            ({"scores": {"A": {"wit": 1}}}, "unknown dimension 'wit'"),
            ({"edit": {"side": "Z", "text": "x"}}, "edit must be"),
        ]:
            body = {"rater": "alice", "task_id": "t0003", "preference": {"overall": "A"},
                    "scores": {"A": {"helpfulness": 1, "personalization": 1,
                                     "naturalness": 1}}, **bad}
            status, out = _call(url + "/api/judgements", body)
            assert status == 400 and message in out["error"], out
        server.kill()  # SIGKILL: nothing flushed at exit
        server = RateServer(*_sources(tmp_path))
        assert "reusing 7 tasks" in "".join(server.lines)
        nxt = _call(server.url + "/api/next?rater=alice")[1]
        assert nxt["progress"] == {"done": 3, "total": 7}
        assert nxt["task"]["task_id"] not in submitted
        for task_id, sides in orders.items():  # the same sides after a restart
            assert _call(f"{server.url}/api/hidden?rater=alice&task_id={task_id}")[1][
                "sides"] == sides
    finally:
        server.stop()
    back = read_judgements(tmp_path / "out" / "judgements.jsonl")
    assert [j.task_id for j in back] == submitted
    for j in back:
        sides = orders[j.task_id]
        assert list(j.shown_order) == list(sides.values())
        if "overall" in j.preference:
            assert j.preference["overall"] == sides["B"]
            assert j.scores == {sides["A"]: {"naturalness": -2}}
        else:
            assert j.scores == {sides["A"]: {"helpfulness": 1, "personalization": 2,
                                             "naturalness": 3}}
        assert j.seconds == 2.5


def test_token_required_when_set(tmp_path):
    server = RateServer(*_sources(tmp_path), "--token-env", "RATE_TEST_TOKEN",
                        env={"RATE_TEST_TOKEN": "s3cret-token"})
    try:
        assert "s3cret-token" not in "".join(server.lines)
        assert _call(server.url + "/")[0] == 401
        assert _call(server.url + "/?token=wrong")[0] == 401
        assert _call(server.url + "/?token=s3cret-token")[0] == 200
        assert _call(server.url + "/api/next?rater=a")[0] == 401
        assert _call(server.url + "/api/next?rater=a&token=s3cret-token")[0] == 401
        assert _call(server.url + "/api/next?rater=a", headers={
            TOKEN_HEADER: "s3cret-token"})[0] == 200
    finally:
        server.stop()


def test_access_token_rule(monkeypatch):
    monkeypatch.setenv("RATE_T", "abc")
    monkeypatch.delenv("RATE_UNSET", raising=False)
    assert access_token("127.0.0.1", None) is None
    assert access_token("::1", None) is None and access_token("localhost", None) is None
    assert access_token("127.0.0.1", "RATE_T") == "abc"
    assert access_token("0.0.0.0", "RATE_T") == "abc"
    with pytest.raises(ConfigError, match="is not loopback"):
        access_token("0.0.0.0", None)
    with pytest.raises(ConfigError, match=r"\$RATE_UNSET, which is not set"):
        access_token("10.1.2.3", "RATE_UNSET")


def test_cli_errors_before_serving(tmp_path):
    src = _sources(tmp_path)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = str(taken.getsockname()[1])
    try:
        for args, message in [
            (["--host", "0.0.0.0"], "is not loopback"),
            (["--host", "0.0.0.0", "--token-env", "RATE_UNSET_X"], "which is not set"),
            (["--size", "0"], "--size 0"),
            (["--samples", str(tmp_path / "none.jsonl")], "is not a file"),
            (["--port", port], f"cannot listen on 127.0.0.1:{port}"),
        ]:
            r = run_rate(*src, *args)
            assert r.returncode == 2, (args, r.stdout, r.stderr)
            assert r.stderr.startswith("cpe-ray: error: ") and r.stderr.count("\n") == 1
            assert message in r.stderr, r.stderr
    finally:
        taken.close()
