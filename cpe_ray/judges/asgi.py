"""The HTTP side of `cpe-ray serve-judge`: uvicorn in a thread, with every wait bounded.

Why uvicorn: the standard library's `ThreadingHTTPServer` gave each connection a thread, a
listen backlog of 5 and no timeouts, so it reset connections under load and held a thread
per idle connection. uvicorn (vLLM serves with it too) answers every connection from one
event loop; here it gets:
- a real backlog, and a connection limit past which requests get 503;
- a deadline for each request's head (`Limits.head_timeout_s`: uvicorn itself times out only
  kept-alive connections that send nothing, not a new one, nor one that sends its head a
  byte at a time) and for its body (`body_timeout_s`, then 408); idle kept-alive
  connections close after `idle_timeout_s`;
- a body over `max_body_bytes` answered 413 without keeping it: known from Content-Length
  before the body is read, then read and dropped (up to `drain_bytes`), because a client
  that sends its whole body before it reads (urllib, the `openai` client) would otherwise
  see the connection reset instead of the 413. A client that waits for `100 Continue` gets
  the 413 at once. A head over h11's 16 KB is refused with 400.

The app (`JSONApp`) hands each request, body read, to an async handler and sends back its
dict as JSON, or a `RequestError` in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

START_TIMEOUT_S = 30.0  # uvicorn starts in milliseconds: past this, its thread is stuck
STOP_GRACE_S = 5  # requests still in flight when the server stops get this long to finish
CLOSE_AFTER = frozenset({408, 413})  # the body was not read to its end: the socket is unusable


class RequestError(Exception):
    """A request this server refuses: an HTTP status and one line for the client."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, " ".join(message.split()), kind

    def payload(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "code": self.status}}


@dataclass(frozen=True)
class Limits:
    """What one client may cost the server (see the module docstring)."""

    max_body_bytes: int = 4 * 1024**2  # a GRM prompt is a few KB; anything this big is a mistake
    drain_bytes: int = 64 * 1024**2  # bodies up to this size are read (and dropped) for the 413
    head_timeout_s: float = 30.0  # from connecting (or the last reply) to a complete head
    body_timeout_s: float = 30.0  # from the head to the end of the body
    idle_timeout_s: float = 15.0  # above httpx's 5 s keep-alive, so clients close idle ones first
    max_connections: int = 512  # past this, requests get 503; under the usual 1024 open files
    backlog: int = 1024  # connections the kernel queues before they are accepted


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes


Handler = Callable[[Request], Awaitable[dict[str, Any]]]


def _head_deadline_protocol(timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose next request head is not complete
    `timeout_s` after it opened or after the last reply."""

    class HeadDeadline(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(timeout_s, self.timeout_keep_alive_handler)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)  # type: ignore[arg-type]
            self._arm()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a whole head arrived and its request began
                self._disarm()

        def on_response_complete(self) -> None:
            self._arm()  # first: a pipelined request that starts inside disarms it again
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeadDeadline


async def send_json(send: Callable[[dict[str, Any]], Awaitable[None]], status: int,
                    payload: dict[str, Any], close: bool = False) -> None:
    data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(data)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class JSONApp:
    """The ASGI app: each request's body read within `limits`, then `handle(request)`."""

    def __init__(self, handle: Handler, limits: Limits) -> None:
        self.handle, self.limits = handle, limits

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            body = await self._body(receive, headers)
            if body is None:  # the client left
                return
            reply = await self.handle(Request(scope["method"], scope["path"], headers, body))
        except RequestError as exc:
            await send_json(send, exc.status, exc.payload(), close=exc.status in CLOSE_AFTER)
            return
        await send_json(send, 200, reply)

    async def _body(self, receive: Callable[[], Awaitable[Any]],
                    headers: dict[str, str]) -> bytes | None:
        limits, loop = self.limits, asyncio.get_running_loop()
        declared = int(headers["content-length"]) if "content-length" in headers else None
        too_big = declared is not None and declared > limits.max_body_bytes
        read_none = declared is not None and declared > limits.max_body_bytes and (
            headers.get("expect", "").lower() == "100-continue" or declared > limits.drain_bytes)
        chunks: list[bytes] = []
        total, deadline = 0, loop.time() + limits.body_timeout_s
        while not read_none:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                if too_big:
                    break
                raise RequestError(408, f"the body did not arrive within "
                                        f"{limits.body_timeout_s:g} s") from None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            total += len(chunk)
            too_big = too_big or total > limits.max_body_bytes
            if not too_big:
                chunks.append(chunk)
            if not message.get("more_body") or total > limits.drain_bytes:
                break
        if too_big:
            size = f"{declared} bytes" if declared is not None else "over that"
            raise RequestError(413, f"body of {size} is over the limit of "
                                    f"{limits.max_body_bytes} bytes")
        return b"".join(chunks)


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    """A listening socket, bound here so that a taken port fails in the caller."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


class ServerThread:
    """uvicorn serving `app` from a daemon thread named `name`; serving once this returns."""

    def __init__(self, app: JSONApp, host: str, port: int, name: str) -> None:
        limits = app.limits
        self.socket = _listen(host, port, limits.backlog)
        self.address: tuple[str, int] = self.socket.getsockname()[:2]
        config = uvicorn.Config(
            app, interface="asgi3", loop="asyncio", http=_head_deadline_protocol(
                limits.head_timeout_s), ws="none", lifespan="off", log_config=None,
            access_log=False, proxy_headers=False, backlog=limits.backlog,
            limit_concurrency=limits.max_connections,
            timeout_keep_alive=limits.idle_timeout_s,  # type: ignore[arg-type]
            timeout_graceful_shutdown=STOP_GRACE_S)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       name=name, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the HTTP server on {host}:{port} did not start")
            time.sleep(0.005)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join()
        self.socket.close()
