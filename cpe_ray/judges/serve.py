"""`cpe-ray serve-judge`: any configured judge behind an OpenAI-compatible chat endpoint.

Why: the paper served its GRM from vLLM through the OpenAI chat API, and two of our parts
speak that API (`grm.backend=openai`, and `cpe-ray grm collect` asking a teacher). Serving
our own judges (the rubric, a GRM checkpoint on an engine, a Bradley-Terry model, even
another endpoint) through it lets both run against a real server with no mocks, in tests
too, and lets one judge serve several runs.

Protocol (HTTP/1.1, JSON):
- `POST /v1/chat/completions` with `model` (`serve.model`), `messages` (the last one a user
  turn holding the GRM prompt), `temperature`, optional `seed`; `n` must be 1. The reply is
  OpenAI's `chat.completion` object whose message content is the judge's text (the GRM's
  tagged `<critique>` / `<scores>` text, which every GRM client parses), plus a
  `cpe_ray` object with the mode, the parse verdict and the reward;
- `GET /v1/models` (the served name) and `GET /health`.

How a request becomes a judgement: the user turn must be this server's GRM prompt
(`grm.template` for scores, `grm.critique_template` for critiques, with their placeholder
renames), which every client that builds it with `build_grm_messages` sends. The template
is matched with its placeholders as wildcards, which gives back persona, question and
answer exactly as they were substituted (the first split that reproduces the text: a
persona that itself contains the template's next line of text is split there). The mode is
the template that matched when the two differ; otherwise temperature 0 asks for a score
and a positive one for a critique (GRM clients score at grm.score_temperature, 0, and
critique at grm.critique_temperature, 0.9). The judge then samples at this server's own
grm.*_temperature: the served judge decides, as a served model would.

Batching: requests queue; one worker thread takes up to `serve.max_batch` of them (the
first waits `serve.batch_wait_s` for others to join) and judges each (mode, seed) group in
one call, so a GRM on an engine decodes concurrent requests together and no judge needs
to be thread-safe.

Errors: 400 (not the GRM prompt, a bad body, n > 1, a critique asked of a scalar model),
401 (wrong key), 404 (unknown model or route), 413 (body too large), 500 (the judge
failed), each with one line in OpenAI's error shape. `serve.host` is loopback by default;
another host needs `serve.api_key_env` (the variable holding the key clients must send).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cpe_ray.config import Config, ServeConfig
from cpe_ray.errors import ConfigError
from cpe_ray.judges.base import JUDGE_MODES, Judge, JudgeRequest, check_mode
from cpe_ray.judges.grm import JudgeOutcome, load_grm_templates, weighted_reward
from cpe_ray.prompts import PromptTemplate

log = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
HEALTH_PATH = "/health"
MAX_BODY_BYTES = 4 * 1024**2  # a GRM prompt is a few KB; anything this big is a mistake
CHAT_OBJECT, MODEL_OBJECT = "chat.completion", "model"
FINISH_STOP = "stop"
OWNER = "cpe-ray"
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class RequestError(Exception):
    """A request this server refuses: an HTTP status and one line for the client."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, " ".join(message.split()), kind


class TemplateMatcher:
    """Reads a rendered template back into its placeholder values (see the module docstring).

    Literal text must match exactly; each placeholder matches any text (the shortest that
    lets the rest match), a repeated placeholder the same text again. Surrounding
    whitespace is ignored, so a client that strips the prompt still matches."""

    def __init__(self, template: PromptTemplate) -> None:
        parts, seen, at = [], set(), 0
        text = template.text.strip()
        for match in _PLACEHOLDER.finditer(text):
            parts.append(re.escape(text[at:match.start()]))
            name = match.group(1)
            parts.append(f"(?P={name})" if name in seen else f"(?P<{name}>.*?)")
            seen.add(name)
            at = match.end()
        parts.append(re.escape(text[at:]))
        self.template, self.pattern = template, re.compile("".join(parts), re.DOTALL)

    def match(self, text: str) -> dict[str, str] | None:
        found = self.pattern.fullmatch(text.strip())
        return None if found is None else found.groupdict()


class PromptReader:
    """(mode, request) from a GRM prompt, by the templates of each judge mode."""

    def __init__(self, templates: Mapping[str, PromptTemplate]) -> None:
        self.matchers = {mode: TemplateMatcher(templates[mode]) for mode in JUDGE_MODES}
        self.same = templates["critique"].text == templates["score"].text
        self.sources = sorted({t.source for t in templates.values()})

    def read(self, text: str, temperature: float) -> tuple[str, JudgeRequest]:
        hits = {mode: values for mode, m in self.matchers.items()
                if (values := m.match(text)) is not None}
        if not hits:
            raise RequestError(400, "the last user turn is not this judge's GRM prompt ("
                               f"{', '.join(self.sources)}); build it with the same grm.template"
                               " and grm.critique_template as the server")
        if self.same or len(hits) > 1:
            mode = "critique" if temperature > 0 else "score"
        else:
            mode = next(iter(hits))
        values = hits.get(mode) or next(iter(hits.values()))
        return mode, JudgeRequest(values["persona"], values["question"], values["answer"])


@dataclass
class _Job:
    request: JudgeRequest
    mode: str
    seed: int
    future: Future[JudgeOutcome]


class JudgeBatcher:
    """One worker thread judges queued requests in batches (see the module docstring)."""

    def __init__(self, judge: Judge, max_batch: int, wait_s: float) -> None:
        self.judge, self.max_batch, self.wait_s = judge, max_batch, wait_s
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self.batches: list[int] = []  # sizes of the batches judged so far (for tests and logs)
        self._thread = threading.Thread(target=self._run, name="judge-batcher", daemon=True)
        self._thread.start()

    def submit(self, request: JudgeRequest, mode: str, seed: int) -> Future[JudgeOutcome]:
        check_mode(mode)
        future: Future[JudgeOutcome] = Future()
        self._queue.put(_Job(request, mode, seed, future))
        return future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _take(self) -> tuple[list[_Job], bool]:
        """The next batch, and whether close() was called."""
        first = self._queue.get()
        if first is None:
            return [], True
        jobs, deadline = [first], time.monotonic() + self.wait_s
        while len(jobs) < self.max_batch:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                self._judge(jobs)
                return [], True
            jobs.append(job)
        return jobs, False

    def _run(self) -> None:
        while True:
            jobs, closed = self._take()
            if closed:
                return
            self._judge(jobs)

    def _judge(self, jobs: list[_Job]) -> None:
        groups: dict[tuple[str, int], list[_Job]] = {}
        for job in jobs:
            groups.setdefault((job.mode, job.seed), []).append(job)
        self.batches.append(len(jobs))
        for (mode, seed), group in groups.items():
            try:
                outcomes = self.judge.judge([j.request for j in group], mode, seed)
            except Exception as exc:  # the client gets it as a 500; the server keeps going
                for job in group:
                    job.future.set_exception(exc)
                continue
            for job, outcome in zip(group, outcomes, strict=True):
                job.future.set_result(outcome)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_key(settings: ServeConfig) -> str | None:
    """The key clients must send, from the variable `serve.api_key_env` names; None accepts
    any key, which only a loopback server may do."""
    if settings.api_key_env is None:
        if not is_loopback(settings.host):
            raise ConfigError(f"serve.host={settings.host} is reachable from other machines; "
                              "set serve.api_key_env to a variable holding the key clients "
                              "must send, or serve on 127.0.0.1")
        return None
    key = os.environ.get(settings.api_key_env)
    if not key:
        raise ConfigError(f"serve.api_key_env names ${settings.api_key_env}, which is not set; "
                          "export the key clients must send in it")
    return key


def serve_http(host: str, port: int, handler: type[BaseHTTPRequestHandler],
               name: str) -> ThreadingHTTPServer:
    """A threading HTTP server bound to (host, port) (0: any free port), answering from a
    daemon thread named `name` once this returns; `stop_http` ends it."""
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
    return server


def stop_http(server: ThreadingHTTPServer) -> None:
    """Stop serving and close the socket (the handlers' threads are daemons)."""
    server.shutdown()
    server.server_close()


def _reward(outcome: JudgeOutcome, cfg: Config) -> float | None:
    if outcome.reward is not None:
        return outcome.reward
    g = cfg.grm
    return weighted_reward(outcome.judgement, g.weights, g.on_missing)  # type: ignore[arg-type]


class JudgeServer:
    """The HTTP server around one judge; `start()` returns once it accepts connections."""

    def __init__(self, cfg: Config, judge: Judge, label: str,
                 templates: Mapping[str, PromptTemplate] | None = None) -> None:
        self.cfg, self.settings, self.label = cfg, cfg.serve, label
        self.key = serve_key(cfg.serve)
        self.reader = PromptReader(templates or load_grm_templates(cfg.grm))
        self.batcher = JudgeBatcher(judge, cfg.serve.max_batch, cfg.serve.batch_wait_s)
        self.served = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None, "start() the server first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def completion(self, body: Any) -> dict[str, Any]:
        """The `chat.completion` reply to one request body (RequestError if refused)."""
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object")
        model = body.get("model")
        if model != self.settings.model:
            raise RequestError(404, f"model {model!r} is not served here; this server serves "
                               f"{self.settings.model!r}", "model_not_found")
        if body.get("n", 1) != 1:
            raise RequestError(400, "n must be 1: the judge gives one verdict per request")
        messages = body.get("messages")
        if not (isinstance(messages, list) and messages and isinstance(messages[-1], dict)
                and messages[-1].get("role") == "user"
                and isinstance(messages[-1].get("content"), str)):
            raise RequestError(400, "messages must end with a user turn whose content is the "
                               "GRM prompt (a string)")
        temperature = body.get("temperature", 1.0)  # OpenAI's default
        seed = body.get("seed", self.cfg.run.seed)
        if not isinstance(temperature, int | float) or not isinstance(seed, int):
            raise RequestError(400, "temperature must be a number and seed an integer")
        mode, request = self.reader.read(messages[-1]["content"], float(temperature))
        try:
            outcome = self.batcher.submit(request, mode, seed).result()
        except ValueError as exc:  # a judge that cannot do this mode (BT: no critiques)
            raise RequestError(400, str(exc)) from None
        except Exception as exc:
            raise RequestError(500, f"the judge failed: {type(exc).__name__}: {exc}",
                               "server_error") from None
        with self._lock:
            self.served += 1
            number = self.served
        j = outcome.judgement
        return {
            "id": f"chatcmpl-{number}", "object": CHAT_OBJECT, "created": int(time.time()),
            "model": self.settings.model,
            "choices": [{"index": 0, "finish_reason": FINISH_STOP,
                         "message": {"role": "assistant", "content": j.raw}}],
            "cpe_ray": {"mode": mode, "parsed": j.parsed, "reward": _reward(outcome, self.cfg),
                        "attempts": outcome.attempts},
        }

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.settings.model, "object": MODEL_OBJECT,
                                            "created": 0, "owned_by": OWNER}]}

    def _authorised(self, header: str | None) -> bool:
        return self.key is None or header == f"Bearer {self.key}"

    def start(self) -> JudgeServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                log.debug("%s - %s", self.address_string(), format % args)

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _error(self, exc: RequestError) -> None:
                self._send(exc.status, {"error": {"message": exc.message, "type": exc.kind,
                                                  "code": exc.status}})

            def _guard(self, handle: Callable[[], dict[str, Any]]) -> None:
                try:
                    if not owner._authorised(self.headers.get("Authorization")):
                        raise RequestError(401, "wrong or missing API key", "authentication_error")
                    self._send(200, handle())
                except RequestError as exc:
                    self._error(exc)

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                routes = {MODELS_PATH: owner.models, HEALTH_PATH: lambda: {"status": "ok"}}
                route = routes.get(self.path.rstrip("/"))
                if route is None:
                    self._error(RequestError(404, f"no route GET {self.path}"))
                    return
                self._guard(route)

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY_BYTES:
                    self.close_connection = True  # the unread body would poison the socket
                    self._error(RequestError(413, f"body of {length} bytes is over "
                                                  f"{MAX_BODY_BYTES}"))
                    return
                raw = self.rfile.read(length)
                if self.path.rstrip("/") != CHAT_PATH:
                    self._error(RequestError(404, f"no route POST {self.path}; use {CHAT_PATH}"))
                    return

                def handle() -> dict[str, Any]:
                    try:
                        body = json.loads(raw or b"null")
                    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                        raise RequestError(400, f"the body is not JSON ({exc})") from None
                    return owner.completion(body)

                self._guard(handle)

        self._server = serve_http(self.settings.host, self.settings.port, Handler, "judge-http")
        return self

    def stop(self) -> None:
        if self._server is not None:
            stop_http(self._server)
            self._server = None
        self.batcher.close()

    def __enter__(self) -> JudgeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def build_judge(cfg: Config) -> tuple[Judge, str]:
    """The judge `grm.backend` names, in this process, and a label for it."""
    from cpe_ray.judges.registry import LOCAL_JUDGES, check_backend

    g = cfg.grm
    check_backend(cfg)
    if g.backend in LOCAL_JUDGES:
        judge = LOCAL_JUDGES[g.backend](cfg)
        label = {"rubric": "the offline rubric judge", "openai": f"the endpoint {g.api.base_url}",
                 "bt": f"the Bradley-Terry model {g.model_path}"}.get(g.backend, g.backend)
        return judge, label
    from cpe_ray.engines.factory import make_engine
    from cpe_ray.judges.engine import EngineJudge
    from cpe_ray.models import load_tokenizer

    assert g.model_path is not None  # the config requires it for engine backends
    engine = make_engine(
        g.backend, g.model_path, dtype=cfg.policy.dtype, seed=cfg.run.seed,
        use_gpu=cfg.cluster.use_gpu, tensor_parallel_size=g.tensor_parallel_size,
        gpu_memory_utilization=g.gpu_memory_utilization,
        max_batch_rows=cfg.rollout.max_batch_rows, trust_remote_code=cfg.policy.trust_remote_code,
        kv_cache_memory_bytes=g.kv_cache_memory_bytes)
    tokenizer = load_tokenizer(engine.info().model_path, cfg.policy.trust_remote_code)
    return EngineJudge(engine, tokenizer, g), f"the GRM {g.model_path} ({g.backend} engine)"


def serve(cfg: Config, say: Callable[[str], None] = print,
          stop: threading.Event | None = None) -> int:
    """`cpe-ray serve-judge`: serve until `stop` is set (the CLI: until Ctrl-C / SIGTERM)."""
    serve_key(cfg.serve)  # one line before a model loads
    load_grm_templates(cfg.grm)
    judge, label = build_judge(cfg)
    stop = stop or threading.Event()
    with JudgeServer(cfg, judge, label) as server:
        say(f"serving {label} as model '{cfg.serve.model}' at {server.base_url}")
        key = (f"the key in ${cfg.serve.api_key_env}" if cfg.serve.api_key_env
               else "any non-empty value")
        say(f"  clients: grm.backend=openai grm.api.base_url={server.base_url} "
            f"grm.api.model={cfg.serve.model} (or distill.api.*), their api_key_env set to {key}")
        stop.wait()
        served = server.served
    say(f"stopped after {served} judgements")
    return 0

