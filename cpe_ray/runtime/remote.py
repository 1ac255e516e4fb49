"""Driver-side Ray helpers: the environment actors start with, and bounded waits that name peers.

A collective step (a DeepSpeed start-up, a weight sync) involves several actors at once; if
one of them dies or stalls the others block. `wait_all` waits for all of them up to a
deadline and turns the first failure or the laggards into one `RemoteError` line naming
which actor did what, instead of a hang or a traceback from deep inside Ray.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from typing import Any

import ray

from cpe_ray.config import Config
from cpe_ray.errors import CpeError

# Collect stragglers' results for a moment after the deadline so one slow peer's error is
# reported rather than a timeout, when both happened.
GRACE_S = 1.0
DETAIL_CHARS = 400  # of a failure's message in the one line
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the actor's name in the traceback
_QUALIFIED = re.compile(r"^(?:\w+\.)+(\w+(?::|$))")  # cpe_ray.errors.TemplateError: ...


class RemoteError(CpeError):
    """An actor failed, died or did not answer in time; the message names it. `actor` is the
    label of the actor at fault (None for a stall of several) and `died` says whether its
    process is gone (what fault recovery restarts) rather than its call raising."""

    def __init__(self, message: str, actor: str | None = None, died: bool = False) -> None:
        super().__init__(message)
        self.actor, self.died = actor, died


def actor_env(cfg: Config, threads: int) -> dict[str, str]:
    """Environment variables for every actor process (passed through Ray's runtime_env)."""
    env = {
        "OMP_NUM_THREADS": str(threads),  # 2 threads per rank on 2 cores ran 10x slower
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "TRANSFORMERS_OFFLINE": os.environ.get("TRANSFORMERS_OFFLINE", "1"),
    }
    if not cfg.cluster.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    for key in ("TORCH_EXTENSIONS_DIR", "CPE_RAY_CACHE", "HF_HOME"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def _raised_in_init(exc: ray.exceptions.RayActorError) -> str | None:
    """The last line of the traceback of what an actor's `__init__` raised ("TemplateError:
    prompt template ... not found"), None if it died otherwise. Ray keeps only the text of
    the creation task's error: the exception follows the traceback's last frame, the source
    line and carets under that frame indented."""
    if not exc.actor_init_failed:
        return None
    lines = _ANSI.sub("", str(exc)).splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
    rest = lines[frames[-1] + 1:] if frames else lines[-1:]
    tail = [line for line in rest if line.strip() and not line[:1].isspace()] or rest[-1:]
    text = " ".join(" ".join(tail).split())
    return _QUALIFIED.sub(r"\1", text)[:DETAIL_CHARS] or type(exc).__name__


def _outcome(fut: ray.ObjectRef, label: str, what: str
             ) -> tuple[Any, tuple[bool, str, str, BaseException] | None]:
    """(result, None) or (None, (died, label, message, exception)) of a finished future."""
    try:
        return ray.get(fut), None
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(exc.cause, BaseException) else exc
        detail = " ".join(str(cause).split())[:DETAIL_CHARS] or type(cause).__name__
        return None, (False, label, f"{what}: {label} failed: {detail}", exc)
    except ray.exceptions.RayActorError as exc:
        raised = _raised_in_init(exc)
        message = (f"{what}: {label} died during start-up: {raised}" if raised is not None
                   else f"{what}: {label} died ({type(exc).__name__})")
        return None, (True, label, message, exc)
    except ray.exceptions.RayError as exc:  # e.g. RuntimeEnvSetupError: never started
        detail = " ".join(str(exc).split())[:DETAIL_CHARS]
        return None, (True, label, f"{what}: {label} could not run: {detail}", exc)


def wait_all(
    futures: Sequence[ray.ObjectRef], labels: Sequence[str], timeout_s: float, what: str
) -> list[Any]:
    """`ray.get` of all futures within `timeout_s`, or one RemoteError naming the culprit.

    The first failure ends the wait (after `GRACE_S` for its peers to report): a collective
    whose peer died would otherwise block the others until their own timeout."""
    if len(futures) != len(labels):
        raise ValueError("one label per future")
    label_of = dict(zip(futures, labels, strict=True))
    results: dict[ray.ObjectRef, Any] = {}
    failures: list[tuple[bool, str, str, BaseException]] = []
    pending = list(futures)
    deadline = time.monotonic() + timeout_s

    def collect(ready: list[ray.ObjectRef]) -> None:
        for fut in ready:
            value, failure = _outcome(fut, label_of[fut], what)
            if failure is None:
                results[fut] = value
            else:
                failures.append(failure)

    while pending and not failures:
        left = deadline - time.monotonic()
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(left, 0))
        if not ready:
            break
        collect(ready)
    if pending:  # give peers that failed because of the culprit a moment to report it
        more, pending = ray.wait(pending, num_returns=len(pending), timeout=GRACE_S)
        collect(more)
    if failures:
        # A dead actor is the root cause of its peers' errors (a broken collective): name it.
        failures.sort(key=lambda f: not f[0])
        died, label, message, exc = failures[0]
        raise RemoteError(message, label, died) from exc
    if pending:
        late = [label for fut, label in zip(futures, labels, strict=True) if fut in pending]
        raise RemoteError(
            f"{what}: no answer within {timeout_s:g} s from {', '.join(late)}; the others "
            "finished. Check that actor's log (ray logs), or raise the timeout"
        )
    return [results[fut] for fut in futures]
