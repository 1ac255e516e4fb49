"""A real HTTP server on 127.0.0.1 that speaks OpenAI's chat completions API, for eval tests.

`ChatServer(policy)` answers POST /v1/chat/completions with `policy(messages)` in OpenAI's
JSON shape, after checking the bearer key. It can fail the first `fail_first` requests with
`fail_status` (then recover), or fail forever (`fail_first=None`), fail the requests
`fail_if(messages)` gives a status for, answer slowly (`delay_s`), or echo the key in its
error messages; it records what it saw. `grm_policy` is a teacher that answers the GRM's
rubric prompt in the GRM's format. Nothing here is a mock: the code under test talks to it
through the real `openai` client over TCP.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Policy = Callable[[list[dict[str, str]]], str]
_ANSWER = re.compile(r"\[Answer ([AB])\]\n(.*?)\n\[End of Answer \1\]", re.DOTALL)


def longer_answer_policy(messages: list[dict[str, str]]) -> str:
    """A judge that reads the pairwise prompt and prefers the longer answer (ties: [[TIE]])."""
    answers = dict(_ANSWER.findall(messages[-1]["content"]))
    a, b = len(answers.get("A", "")), len(answers.get("B", ""))
    verdict = "TIE" if a == b else ("A" if a > b else "B")
    return f"Answer {verdict} is more detailed, so it helps more.\n[[{verdict}]]"


def first_position_policy(messages: list[dict[str, str]]) -> str:
    """A maximally position-biased judge: whatever is shown first wins."""
    return "The first answer is better.\n[[A]]"


_GRM_ANSWER = re.compile(r"Candidate answer:\n(.*?)\n\nScore three dimensions", re.DOTALL)
GRM_WORDS_PER_POINT = 20  # grm_policy's helpfulness: one point per this many words, up to 5


def grm_answer(messages: list[dict[str, str]]) -> str:
    """The candidate answer inside a GRM rubric prompt (conf/prompts/grm_en.txt)."""
    match = _GRM_ANSWER.search(messages[-1]["content"])
    return match.group(1) if match else ""


def grm_policy(messages: list[dict[str, str]]) -> str:
    """A teacher GRM: a critique and three scores that follow from the answer's length."""
    words = len(grm_answer(messages).split())
    helpful = min(5, words // GRM_WORDS_PER_POINT)
    return (f"<critique>\nThe answer has {words} words; make it more specific to the user.\n"
            f"</critique>\n<scores>\nHelpfulness: {helpful}\nPersonalization: 1\n"
            "Naturalness: 2\n</scores>")


def serve_http(host: str, port: int, handler: type[BaseHTTPRequestHandler],
               name: str) -> ThreadingHTTPServer:
    """A threading HTTP server bound to (host, port) (0: any free port), answering from a
    daemon thread named `name` once this returns; `stop_http` ends it. Enough for a test
    server (`cpe-ray serve-judge` runs on uvicorn, with limits: cpe_ray/judges/asgi.py)."""
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
    return server


def stop_http(server: ThreadingHTTPServer) -> None:
    """Stop serving and close the socket (the handlers' threads are daemons)."""
    server.shutdown()
    server.server_close()


class ChatServer:
    def __init__(self, policy: Policy, key: str, fail_first: int | None = 0,
                 fail_status: int = 503, delay_s: float = 0.0,
                 echo_key_in_errors: bool = False,
                 fail_if: Callable[[list[dict[str, str]]], int | None] | None = None) -> None:
        self.policy, self.key = policy, key
        self.fail_first, self.fail_status = fail_first, fail_status
        self.fail_if = fail_if
        self.delay_s, self.echo_key_in_errors = delay_s, echo_key_in_errors
        self.lock = threading.Lock()
        self.requests = 0
        self.statuses: list[int] = []
        self.bodies: list[dict] = []
        self._server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def _respond(self, messages: list[dict[str, str]]) -> tuple[int, dict]:
        with self.lock:
            self.requests += 1
            n = self.requests
            chosen = self.fail_if(messages) if self.fail_if is not None else None
        if self.delay_s:
            time.sleep(self.delay_s)
        if chosen is not None:
            return chosen, {"error": {"message": "chosen to fail", "type": "server_error",
                                      "code": None}}
        failing = self.fail_first is None or n <= self.fail_first
        if failing:
            message = "temporarily unavailable"
            if self.echo_key_in_errors:  # a careless server that repeats the credentials
                message += f" (request had Authorization: Bearer {self.key})"
            return self.fail_status, {"error": {"message": message, "type": "server_error",
                                                "code": None}}
        return 200, {}

    def start(self) -> ChatServer:
        server_self = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # keep test output clean
                return

            def _send(self, status: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                length = int(self.headers.get("Content-Length", "0"))
                request = json.loads(self.rfile.read(length) or b"{}")
                if self.path != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                if self.headers.get("Authorization") != f"Bearer {server_self.key}":
                    with server_self.lock:
                        server_self.statuses.append(401)
                    self._send(401, {"error": {"message": "bad key", "type": "auth"}})
                    return
                status, payload = server_self._respond(request.get("messages", []))
                with server_self.lock:
                    server_self.statuses.append(status)
                    server_self.bodies.append(request)
                if status != 200:
                    self._send(status, payload)
                    return
                text = server_self.policy(request["messages"])
                self._send(200, {
                    "id": f"chatcmpl-{len(server_self.bodies)}", "object": "chat.completion",
                    "created": int(time.time()), "model": request.get("model", ""),
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                })

        self._server = serve_http("127.0.0.1", 0, Handler, "chat-server")
        return self

    def stop(self) -> None:
        if self._server is not None:
            stop_http(self._server)

    def __enter__(self) -> ChatServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
