"""`cpe-ray serve-judge` under load and against clients that misbehave, on 127.0.0.1.

Each case failed on the standard library server this one replaced (issue #21): a crafted
320 KB prompt took 40 s in a backtracking regex and blocked `/health`; connections were
reset under load (a listen backlog of 5); idle connections held a thread each, forever; a
20 MB body got a reset instead of its 413. The misbehaving clients are raw sockets (asyncio
streams), so what the server does to a connection is seen as it is; the load comes from
urllib threads in another process, as in the issue's probe.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from cpe_ray.config import load_config
from cpe_ray.judges.asgi import DEFAULT_LIMITS, Limits
from cpe_ray.judges.base import JudgeRequest
from cpe_ray.judges.grm import build_grm_messages, load_grm_template
from cpe_ray.judges.rubric import RubricJudge
from cpe_ray.judges.serve import JudgeServer, TemplateMatcher

SERVED = "rubric-judge"
CLIENTS = 200  # concurrent requests in the load test (the issue saw 57 of 200 reset)
BATCH_S = 0.02  # what each batch costs the slowed judge: requests overlap, as on an engine
SHORT = Limits(head_timeout_s=0.3, body_timeout_s=0.3, idle_timeout_s=0.3)
REQUEST = JudgeRequest("Name: Ada\nOccupation: nurse", "How do I keep tomatoes from splitting?",
                       "Water deeply twice a week and mulch the beds.")


def _prompt(req: JudgeRequest) -> str:
    return build_grm_messages(load_grm_template("grm_en.txt"), req.persona, req.question,
                              req.answer)[0]["content"]


def _crafted() -> str:
    """The template up to {persona}, then one section heading 20,000 times, no answer."""
    text = load_grm_template("grm_en.txt").text
    return text[:text.index("{persona}")] + "\n\nQuestion:\nq" * 20_000


def _chat_body(content: str) -> bytes:
    return json.dumps({"model": SERVED, "temperature": 0,
                       "messages": [{"role": "user", "content": content}]}).encode()


class _SlowRubric(RubricJudge):
    def judge(self, requests, mode, seed=0):
        time.sleep(BATCH_S)
        return super().judge(requests, mode, seed)


def _server(limits: Limits = DEFAULT_LIMITS) -> JudgeServer:
    cfg = load_config(None, [f"serve.model={SERVED}", "serve.port=0"])
    return JudgeServer(cfg, _SlowRubric(cfg.grm), "rubric", limits=limits)


def _port(server: JudgeServer) -> int:
    return int(server.base_url.rsplit(":", 1)[1].split("/")[0])


def _raw(method: str, path: str, body: bytes = b"", *headers: str, close: bool = True) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *headers]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _read_reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                  if line.startswith(b"content-length:"))
    return status, await reader.readexactly(length)


async def _ask(port: int, raw: bytes, timeout_s: float = 20.0) -> tuple[int, bytes]:
    """One request on a new connection: the status and the body of its reply."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(_read_reply(reader), timeout_s)
    finally:
        writer.close()


class _HealthWatch:
    """Asks /health every 20 ms from a thread, each on a new connection, while in `with`."""

    def __init__(self, port: int) -> None:
        self.port, self.latencies, self.statuses = port, [], []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._done.is_set():
            start = time.monotonic()
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                connection.request("GET", "/health")
                self.statuses.append(connection.getresponse().status)
            finally:
                connection.close()
            self.latencies.append(time.monotonic() - start)
            self._done.wait(0.02)

    def __enter__(self) -> _HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        assert self.statuses and set(self.statuses) == {200}, self.statuses


# The load: CLIENTS threads in another process (so that their work does not slow this
# process's /health watch), each posting one request with urllib, as the probe did.
LOAD = """
import json, sys, urllib.request
from concurrent.futures import ThreadPoolExecutor
url, clients, body = sys.argv[1], int(sys.argv[2]), sys.stdin.buffer.read()
def post(_):
    request = urllib.request.Request(url, body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return [reply.status, json.loads(reply.read())["choices"][0]["message"]["content"]]
    except Exception as exc:
        return [0, repr(exc)]
with ThreadPoolExecutor(clients) as pool:
    print(json.dumps(list(pool.map(post, range(clients)))))
"""


def test_the_crafted_prompt_is_read_in_linear_time() -> None:
    matcher, crafted = TemplateMatcher(load_grm_template("grm_en.txt")), _crafted()
    assert len(_chat_body(crafted)) > 320_000  # the request body, as in issue #21
    rendered = _prompt(JudgeRequest("p" + crafted, "q" * 300_000, "\n\nQuestion:\n" * 20_000))
    start = time.monotonic()
    assert matcher.match(crafted) is None
    assert matcher.match(rendered)["answer"] == "\n\nQuestion:\n" * 20_000  # type: ignore[index]
    assert time.monotonic() - start < 0.2  # was 39.7 s for the first alone


def test_the_crafted_prompt_is_refused_in_under_a_second_while_health_answers() -> None:
    with _server() as server, _HealthWatch(_port(server)) as health:
        time.sleep(0.1)
        request = urllib.request.Request(server.base_url + "/chat/completions",
                                         _chat_body(_crafted()), method="POST")
        start = time.monotonic()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert time.monotonic() - start < 1.0
        time.sleep(0.1)
    assert refused.value.code == 400
    assert "not this judge's GRM prompt" in json.loads(refused.value.read())["error"]["message"]
    assert max(health.latencies) < 1.0, health.latencies


def test_hundreds_of_concurrent_requests_are_all_answered_and_health_stays_fast() -> None:
    """No reset, every answer right, /health under a second throughout. That last bound is
    wall-clock time on a shared machine (each burst costs the server ~0.2 s of CPU), so a
    starved first run gets a second one; a server that blocks /health fails both."""
    expected = RubricJudge(load_config().grm).render(REQUEST)
    worst: list[float] = []
    with _server() as server:
        for _ in range(2):
            with _HealthWatch(_port(server)) as health:
                start = time.monotonic()
                load = subprocess.run([sys.executable, "-c", LOAD, server.base_url +
                                       "/chat/completions", str(CLIENTS)], timeout=120, check=True,
                                      input=_chat_body(_prompt(REQUEST)), capture_output=True)
                assert time.monotonic() - start < 30
            replies = json.loads(load.stdout)
            failures = [text for status, text in replies if status != 200]
            assert not failures, f"{len(failures)} of {CLIENTS} failed, e.g. {failures[0]}"
            assert {text for _, text in replies} == {expected}
            worst.append(max(health.latencies))
            if worst[-1] < 1.0:
                break
        batches = server.batcher.batches
    assert sum(batches) == CLIENTS * len(worst) and max(batches) > 1
    assert min(worst) < 1.0, f"/health took up to {worst} s under load"


def test_a_body_over_the_limit_gets_its_413_not_a_reset() -> None:
    with _server() as server:
        request = urllib.request.Request(server.base_url + "/chat/completions",
                                         b"x" * (20 * 1024**2), method="POST",
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=30)
        assert caught.value.code == 413
        assert "over the limit of 4194304 bytes" in json.loads(caught.value.read())["error"][
            "message"]
        port = _port(server)
        waiting = _raw("POST", "/v1/chat/completions", b"", "Expect: 100-continue",
                       "Content-Length: 20971520")  # sends no body until told to continue
        chunk = b"x" * (4 * 1024**2 + 1)
        chunked = _raw("POST", "/v1/chat/completions", b"", "Transfer-Encoding: chunked") + (
            f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n0\r\n\r\n")
        assert asyncio.run(_ask(port, waiting, timeout_s=5))[0] == 413
        assert asyncio.run(_ask(port, chunked, timeout_s=5))[0] == 413
        assert asyncio.run(_ask(port, _raw("GET", "/health")))[0] == 200


async def _closed_after(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        dribble: bytes = b"") -> float:
    """Seconds until the server closes the connection, sending `dribble` a byte per 50 ms."""
    start = time.monotonic()
    for byte in dribble:
        if reader.at_eof():
            break
        try:
            writer.write(bytes([byte]))
            await writer.drain()
        except ConnectionError:
            break
        await asyncio.sleep(0.05)
    try:
        rest = await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:  # our kernel's answer to a byte written after the close
        rest = b""
    assert rest == b""
    writer.close()
    return time.monotonic() - start


def test_silent_dribbling_slow_and_idle_connections_are_closed() -> None:
    async def main(port: int) -> None:
        silent = await asyncio.open_connection("127.0.0.1", port)
        assert await _closed_after(*silent) < 2
        dribbling = await asyncio.open_connection("127.0.0.1", port)
        assert await _closed_after(*dribbling, dribble=b"GET /health HTTP/1.1\r\n" * 4) < 2
        slow_body = _raw("POST", "/v1/chat/completions", b"", "Content-Length: 100") + b"{"
        status, body = await _ask(port, slow_body, timeout_s=5)
        assert status == 408 and b"within 0.3 s" in body
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_raw("GET", "/health", close=False))
        assert (await _read_reply(reader))[0] == 200  # kept alive, then idle
        assert await _closed_after(reader, writer) < 2

    with _server(SHORT) as server:
        asyncio.run(main(_port(server)))


def test_idle_connections_hold_no_threads_and_past_the_limit_get_503() -> None:
    limits = Limits(max_connections=16, head_timeout_s=0.5)

    async def main(port: int, threads: int) -> None:
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(64)]
        await asyncio.sleep(0.1)
        assert threading.active_count() <= threads + 1
        assert (await _ask(port, _raw("GET", "/health")))[0] == 503
        await asyncio.gather(*(_closed_after(*pair) for pair in idle))
        assert (await _ask(port, _raw("GET", "/health")))[0] == 200

    with _server(limits) as server:
        asyncio.run(main(_port(server), threading.active_count()))
