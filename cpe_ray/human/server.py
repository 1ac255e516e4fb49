"""The HTTP side of `cpe-ray rate`: the page and a small JSON API, served by uvicorn.

The page never sees which answer is which: it gets sides (A on the left, B on the right)
in an order drawn per rater and task from `random.Random(f"{seed}:{rater}:{task_id}")`
(the same order on every reload and after a restart), sends sides back, and the server
records labels. What the machine judges said (`hidden`) is served only to a rater who has
judged the task. Off loopback every request needs the token from `--token-env`: `?token=`
for the page, the `X-Rate-Token` header for the API (the page copies it over).

API (JSON): GET /api/config; GET /api/next?rater=R (the rater's first unjudged task and
progress); POST /api/judgements; GET /api/hidden?rater=R&task_id=T. Bad input: 400 with
{"error": "<one line>"}.
"""

from __future__ import annotations

import hmac
import math
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from cpe_ray.errors import ConfigError
from cpe_ray.human.records import OVERALL, TIE, Answer, HumanTask, Judgement
from cpe_ray.human.store import JudgementStore
from cpe_ray.judges.serve import is_loopback

TOKEN_HEADER = "X-Rate-Token"
SIDES = ("A", "B")
MAX_RATER_CHARS = 80
MAX_TEXT_CHARS = 100_000
MAX_SECONDS = 7 * 24 * 3600.0


@dataclass(frozen=True)
class Scale:
    """The GRM's dimensions and integer score range (grm.dimensions, score_min..score_max)."""

    dimensions: tuple[str, ...]
    score_min: int
    score_max: int

    @classmethod
    def from_grm(cls, dimensions: list[str], score_min: float, score_max: float) -> Scale:
        return cls(tuple(dimensions), math.ceil(score_min), math.floor(score_max))


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def access_token(host: str, token_env: str | None) -> str | None:
    """The token every request must carry; None (no token) only on a loopback address."""
    if is_loopback(host):
        return os.environ.get(token_env) or None if token_env else None
    if not token_env:
        raise ConfigError(f"--host {host} is not loopback: other machines could rate; give "
                          "--token-env NAME, a variable holding a token raters add to the URL")
    token = os.environ.get(token_env, "")
    if not token.strip():
        raise ConfigError(f"--token-env names ${token_env}, which is not set or empty; set it "
                          "to a long random token")
    return token


def shown_order(seed: int, rater: str, task: HumanTask) -> tuple[str, ...]:
    labels = list(task.labels)
    random.Random(f"{seed}:{rater}:{task.task_id}").shuffle(labels)
    return tuple(labels)


def side_labels(order: tuple[str, ...]) -> dict[str, str]:
    """Side (A left, B right; a single answer is A) -> label."""
    return dict(zip(SIDES, order, strict=False))


class Rating:
    """Tasks, judgements and the rules of a submission; the HTTP layer only translates."""

    def __init__(self, tasks: list[HumanTask], store: JudgementStore, scale: Scale,
                 seed: int) -> None:
        self.tasks = tasks
        self.by_id = {t.task_id: t for t in tasks}
        self.store, self.scale, self.seed = store, scale, seed

    def _rater(self, rater: Any) -> str:
        if not isinstance(rater, str) or not rater.strip():
            raise BadRequest(400, "give your name (rater) before rating")
        if len(rater.strip()) > MAX_RATER_CHARS:
            raise BadRequest(400, f"the rater name is over {MAX_RATER_CHARS} characters")
        return rater.strip()

    def _task(self, task_id: Any) -> HumanTask:
        if task_id not in self.by_id:
            raise BadRequest(400, f"unknown task_id {task_id!r:.40}")
        return self.by_id[task_id]

    def progress(self, rater: str) -> dict[str, int]:
        return {"done": len(self.store.judged(rater)), "total": len(self.tasks)}

    def next_task(self, rater: Any) -> dict[str, Any]:
        name = self._rater(rater)
        judged = self.store.judged(name)
        task = next((t for t in self.tasks if t.task_id not in judged), None)
        out: dict[str, Any] = {"rater": name, "progress": self.progress(name), "task": None}
        if task is not None:
            by_label = {a.label: a.text for a in task.answers}
            out["task"] = {"task_id": task.task_id, "kind": task.kind,
                           "persona": task.persona, "question": task.question,
                           "answers": [{"side": side, "text": by_label[label]} for side, label
                                       in side_labels(shown_order(self.seed, name, task)).items()]}
        return out

    def submit(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise BadRequest(400, "the body must be a JSON object")
        rater, task = self._rater(body.get("rater")), self._task(body.get("task_id"))
        order = shown_order(self.seed, rater, task)
        side_label = side_labels(order)
        scores = self._scores(body.get("scores") or {}, side_label)
        preference = self._preference(body.get("preference") or {}, side_label, task)
        if task.kind == "single" and len(scores.get(order[0], {})) != len(self.scale.dimensions):
            raise BadRequest(400, f"score every dimension ({', '.join(self.scale.dimensions)})")
        critique = body.get("critique") or ""
        if not isinstance(critique, str) or len(critique) > MAX_TEXT_CHARS:
            raise BadRequest(400, f"the critique must be text of at most {MAX_TEXT_CHARS} "
                                  "characters")
        seconds = body.get("seconds", 0.0)
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not (
                0 <= seconds <= MAX_SECONDS):
            raise BadRequest(400, "seconds must be a number of seconds on the task")
        judgement = Judgement(task.task_id, rater, round(time.time(), 3), order, scores,
                              preference, critique, self._edit(body.get("edit"), side_label),
                              round(float(seconds), 2))
        self.store.append(judgement)
        return {"ok": True, "progress": self.progress(rater)}

    def _scores(self, scores: Any, side_label: dict[str, str]) -> dict[str, dict[str, int]]:
        s = self.scale
        if not isinstance(scores, dict):
            raise BadRequest(400, "scores must map a side (A, B) to {dimension: score}")
        out = {}
        for side, dims in scores.items():
            if side not in side_label or not isinstance(dims, dict):
                raise BadRequest(400, f"scores name side {side!r:.20}; expected "
                                      f"{', '.join(side_label)} with {{dimension: score}}")
            for dim, value in dims.items():
                if dim not in s.dimensions:
                    raise BadRequest(400, f"unknown dimension {dim!r:.40}; expected one of "
                                          f"{', '.join(s.dimensions)}")
                if (isinstance(value, bool) or not isinstance(value, int)
                        or not s.score_min <= value <= s.score_max):
                    raise BadRequest(400, f"score {value!r:.20} for {dim} is not an integer "
                                          f"from {s.score_min} to {s.score_max}")
            if dims:
                out[side_label[side]] = dict(dims)
        return out

    def _preference(self, preference: Any, side_label: dict[str, str], task: HumanTask
                    ) -> dict[str, str]:
        if not isinstance(preference, dict):
            raise BadRequest(400, "preference must map a dimension or overall to A, B or tie")
        if task.kind == "single" and preference:
            raise BadRequest(400, "a single answer has no preference; give scores")
        if task.kind == "pair" and OVERALL not in preference:
            raise BadRequest(400, "choose which answer is better overall (A, tie or B)")
        out = {}
        for dim, value in preference.items():
            if dim not in (*self.scale.dimensions, OVERALL):
                raise BadRequest(400, f"unknown preference {dim!r:.40}; expected "
                                      f"{', '.join((*self.scale.dimensions, OVERALL))}")
            if value not in (*SIDES, TIE):
                raise BadRequest(400, f"preference {dim} is {value!r:.20}; expected A, B or tie")
            out[dim] = TIE if value == TIE else side_label[value]
        return out

    @staticmethod
    def _edit(edit: Any, side_label: dict[str, str]) -> Answer | None:
        if edit is None:
            return None
        if (not isinstance(edit, dict) or edit.get("side") not in side_label
                or not isinstance(edit.get("text"), str) or not edit["text"].strip()
                or len(edit["text"]) > MAX_TEXT_CHARS):
            raise BadRequest(400, "edit must be {side: A or B, text: the edited answer}")
        return Answer(side_label[edit["side"]], edit["text"])

    def hidden(self, rater: Any, task_id: Any) -> dict[str, Any]:
        name, task = self._rater(rater), self._task(task_id)
        if task.task_id not in self.store.judged(name):
            raise BadRequest(403, "judge this task first; what the machine judges said is "
                                  "shown only afterwards")
        return {"task_id": task.task_id, "hidden": task.hidden,
                "sides": side_labels(shown_order(self.seed, name, task))}


def page_html() -> str:
    return resources.files("cpe_ray.human").joinpath("page.html").read_text(encoding="utf-8")


def make_app(rating: Rating, token: str | None) -> FastAPI:
    """The FastAPI application; `token` None serves without one (loopback only)."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    html = page_html()

    @app.middleware("http")
    async def check_token(request: Request, call_next: Callable[..., Any]) -> Any:
        if token is not None:
            given = (request.query_params.get("token", "") if request.url.path == "/"
                     else request.headers.get(TOKEN_HEADER, ""))
            if not hmac.compare_digest(given.encode(), token.encode()):
                where = "?token=" if request.url.path == "/" else f"the {TOKEN_HEADER} header"
                return JSONResponse({"error": f"a token is required ({where})"}, 401)
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return html

    @app.get("/api/config")
    def config() -> dict[str, Any]:
        s = rating.scale
        return {"dimensions": list(s.dimensions), "score_min": s.score_min,
                "score_max": s.score_max, "total": len(rating.tasks)}

    @app.get("/api/next")
    def next_task(rater: str = "") -> Any:
        return _answer(lambda: rating.next_task(rater))

    @app.post("/api/judgements")
    async def submit(request: Request) -> Any:
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "the body must be JSON"}, 400)
        return _answer(lambda: rating.submit(body))

    @app.get("/api/hidden")
    def hidden(rater: str = "", task_id: str = "") -> Any:
        return _answer(lambda: rating.hidden(rater, task_id))

    return app


def _answer(call: Callable[[], dict[str, Any]]) -> Any:
    try:
        return call()
    except BadRequest as e:
        return JSONResponse({"error": str(e)}, e.status)


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket, so a taken port fails before anything else starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def serve(app: FastAPI, sock: socket.socket, stop: threading.Event) -> None:
    """uvicorn on `sock` from a thread until `stop` is set."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False,
                                           lifespan="off", ws="none",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name="cpe-ray-rate", daemon=True)
    thread.start()
    while not stop.wait(0.2) and thread.is_alive():
        pass
    server.should_exit = True
    thread.join()
    sock.close()
