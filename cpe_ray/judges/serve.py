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
persona that itself contains the template's next line of text is split there). Each piece
of the template's own text is looked for once, with `str.find`, so reading a prompt is
linear in its length (a backtracking regex took 40 s on a crafted 320 KB prompt). The mode is
the template that matched when the two differ; otherwise temperature 0 asks for a score
and a positive one for a critique (GRM clients score at grm.score_temperature, 0, and
critique at grm.critique_temperature, 0.9). The judge then samples at this server's own
grm.*_temperature: the served judge decides, as a served model would.

Batching: requests queue; one worker thread takes up to `serve.max_batch` of them (the
first waits `serve.batch_wait_s` for others to join) and judges each (mode, seed) group in
one call, so a GRM on an engine decodes concurrent requests together and no judge needs
to be thread-safe. The HTTP side (`cpe_ray/judges/asgi.py`: uvicorn, with timeouts, a
connection limit and a body limit) only awaits the worker, so `/health` answers while a
batch is being judged.

Errors: 400 (not the GRM prompt, a bad body, n > 1, a critique asked of a scalar model),
401 (wrong key), 404 (unknown model or route), 408 (the body came too slowly), 413 (body
too large), 500 (the judge failed), 503 (too many connections), each but the last with one
line in OpenAI's error shape. `serve.host` is loopback by default; another host needs
`serve.api_key_env` (the variable holding the key clients must send).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from cpe_ray.config import Config, ServeConfig
from cpe_ray.config.choices import GRM_BACKENDS
from cpe_ray.errors import ConfigError
from cpe_ray.judges.asgi import DEFAULT_LIMITS, JSONApp, Limits, Request, RequestError, ServerThread
from cpe_ray.judges.base import JUDGE_MODES, Judge, JudgeRequest, check_mode
from cpe_ray.judges.grm import JudgeOutcome, load_grm_templates, weighted_reward
from cpe_ray.prompts import PromptTemplate

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
HEALTH_PATH = "/health"
CHAT_OBJECT, MODEL_OBJECT = "chat.completion", "model"
FINISH_STOP = "stop"
OWNER = "cpe-ray"
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class TemplateMatcher:
    """Reads a rendered template back into its placeholder values (see the module docstring).

    Literal text must match exactly; each placeholder takes the text up to the first place
    the template's next literal text is found (the shortest that lets the rest match), the
    last one all the text up to the template's closing text, and a repeated placeholder
    must be the same text again. Each piece is found once, from where the last one ended:
    no backtracking, so the work is linear in the prompt (a repeated placeholder is not
    tried at a later split). Surrounding whitespace is ignored, so a client that strips the
    prompt still matches."""

    def __init__(self, template: PromptTemplate) -> None:
        text = template.text.strip()
        self.template = template
        self.names: list[str] = []  # the placeholders in order, repeats included
        self.literals: list[str] = []  # the text before each placeholder, then the closing text
        at = 0
        for match in _PLACEHOLDER.finditer(text):
            self.literals.append(text[at:match.start()])
            self.names.append(match.group(1))
            at = match.end()
        self.literals.append(text[at:])

    def match(self, text: str) -> dict[str, str] | None:
        text = text.strip()
        head, tail = self.literals[0], self.literals[-1]
        if not self.names:
            return {} if text == head else None
        end = len(text) - len(tail)  # where the closing text starts
        if not (text.startswith(head) and text.endswith(tail) and end >= len(head)):
            return None
        values: dict[str, str] = {}
        # `fixed`: the text known to follow the open placeholder (whose end is not yet found)
        at, open_name, fixed = len(head), self.names[0], ""
        for name, after in zip(self.names[1:], self.literals[1:-1], strict=True):
            fixed += after
            if name in values:
                fixed += values[name]
                continue
            at = _place(text, fixed, at, end, open_name, values)
            if at < 0:
                return None
            # a placeholder repeated right after its first use is fixed text already
            open_name, fixed = (None, values[name]) if name == open_name else (name, "")
        start = end - len(fixed)  # the last fixed text ends where the closing text starts
        if start < at or not text.startswith(fixed, start):
            return None
        if open_name is not None:
            values[open_name] = text[at:start]
        return values if open_name is not None or start == at else None


def _place(text: str, fixed: str, at: int, end: int, open_name: str | None,
           values: dict[str, str]) -> int:
    """Where `fixed` ends: its first place from `at` (closing the open placeholder there),
    or exactly `at` with none open; -1 if it is not found before `end`."""
    if open_name is None:
        return at + len(fixed) if text.startswith(fixed, at, end) else -1
    found = text.find(fixed, at, end)
    if found >= 0:
        values[open_name] = text[at:found]
        return found + len(fixed)
    return -1


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


def _reward(outcome: JudgeOutcome, cfg: Config) -> float | None:
    if outcome.reward is not None:
        return outcome.reward
    g = cfg.grm
    return weighted_reward(outcome.judgement, g.weights, g.on_missing)  # type: ignore[arg-type]


class JudgeServer:
    """The HTTP server around one judge; `start()` returns once it accepts connections."""

    def __init__(self, cfg: Config, judge: Judge, label: str,
                 templates: Mapping[str, PromptTemplate] | None = None,
                 limits: Limits = DEFAULT_LIMITS) -> None:
        self.cfg, self.settings, self.label, self.limits = cfg, cfg.serve, label, limits
        self.key = serve_key(cfg.serve)
        self.reader = PromptReader(templates or load_grm_templates(cfg.grm))
        self.batcher = JudgeBatcher(judge, cfg.serve.max_batch, cfg.serve.batch_wait_s)
        self.served = 0  # only the event loop's thread counts
        self._http: ServerThread | None = None

    @property
    def base_url(self) -> str:
        assert self._http is not None, "start() the server first"
        host, port = self._http.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"

    def read(self, body: Any) -> tuple[str, JudgeRequest, int]:
        """(mode, request, seed) from a request body (RequestError if refused)."""
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
        return mode, request, seed

    async def completion(self, body: Any) -> dict[str, Any]:
        """The `chat.completion` reply to one request body (RequestError if refused); the
        judging happens on the batcher's thread while this waits."""
        mode, request, seed = self.read(body)
        try:
            outcome = await asyncio.wrap_future(self.batcher.submit(request, mode, seed))
        except ValueError as exc:  # a judge that cannot do this mode (BT: no critiques)
            raise RequestError(400, str(exc)) from None
        except Exception as exc:
            raise RequestError(500, f"the judge failed: {type(exc).__name__}: {exc}",
                               "server_error") from None
        self.served += 1
        j = outcome.judgement
        return {
            "id": f"chatcmpl-{self.served}", "object": CHAT_OBJECT, "created": int(time.time()),
            "model": self.settings.model,
            "choices": [{"index": 0, "finish_reason": FINISH_STOP,
                         "message": {"role": "assistant", "content": j.raw}}],
            "cpe_ray": {"mode": mode, "parsed": j.parsed, "reward": _reward(outcome, self.cfg),
                        "attempts": outcome.attempts},
        }

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.settings.model, "object": MODEL_OBJECT,
                                            "created": 0, "owned_by": OWNER}]}

    async def handle(self, request: Request) -> dict[str, Any]:
        """The reply to one HTTP request whose body has been read (RequestError if refused)."""
        route = (request.method, request.path.rstrip("/"))
        if route not in {("GET", MODELS_PATH), ("GET", HEALTH_PATH), ("POST", CHAT_PATH)}:
            hint = f"; use {CHAT_PATH}" if request.method == "POST" else ""
            raise RequestError(404, f"no route {request.method} {request.path}{hint}")
        if self.key is not None and request.headers.get("authorization") != f"Bearer {self.key}":
            raise RequestError(401, "wrong or missing API key", "authentication_error")
        if route[1] == MODELS_PATH:
            return self.models()
        if route[1] == HEALTH_PATH:
            return {"status": "ok"}
        try:
            body = json.loads(request.body or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(400, f"the body is not JSON ({exc})") from None
        return await self.completion(body)

    def start(self) -> JudgeServer:
        app = JSONApp(self.handle, self.limits)
        self._http = ServerThread(app, self.settings.host, self.settings.port, "judge-http")
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.stop()
            self._http = None
        self.batcher.close()

    def __enter__(self) -> JudgeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def judge_to_serve(cfg: Config) -> tuple[Judge, str]:
    """The judge `grm.backend` names, in this process (an engine GRM on its own engine), and
    a label for it."""
    from cpe_ray.judges.registry import build_judge, check_backend, describe_judge

    check_backend(cfg)
    if not GRM_BACKENDS[cfg.grm.backend].engine:
        return build_judge(cfg), describe_judge(cfg)
    from cpe_ray.engines.factory import make_engine
    from cpe_ray.engines.spec import EngineSpec

    engine = make_engine(EngineSpec.for_grm(cfg))
    return build_judge(cfg, engine), describe_judge(cfg)


def serve(cfg: Config, say: Callable[[str], None] = print,
          stop: threading.Event | None = None) -> int:
    """`cpe-ray serve-judge`: serve until `stop` is set (the CLI: until Ctrl-C / SIGTERM)."""
    serve_key(cfg.serve)  # one line before a model loads
    load_grm_templates(cfg.grm)
    judge, label = judge_to_serve(cfg)
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

