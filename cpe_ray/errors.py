"""User-facing errors: one clear line (what, where, how to fix), raised before expensive work.

The CLI catches `CpeError`, prints its message on one line and exits non-zero, so any
code path that detects bad input should raise one of these rather than a bare exception.
Ctrl-C and SIGTERM become one too (`Stopped`, under `stop_signals`), so a stopped job runs
its cleanup and says one line instead of a traceback.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

STOP_SIGNALS = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}
# SIGHUP (the terminal closed) stops a run as SIGTERM does: its default would end the
# process with no line and leave Ray's processes running. A process started with it
# ignored (nohup) keeps ignoring it, as its user asked.
if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
    STOP_SIGNALS[signal.SIGHUP] = "SIGHUP (terminal closed)"


class CpeError(Exception):
    """Base class for errors whose message is meant for the user, on one line."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        # A multi-line message would break the "one clear line" contract of the CLI.
        super().__init__(" ".join(str(message).split()))


class ConfigError(CpeError):
    """A configuration key, value or combination is invalid."""


class DataError(CpeError):
    """A data file or record is missing or malformed; the message names file:line."""


class TemplateError(CpeError):
    """A prompt template is missing or has unknown / missing placeholders."""


class RunIOError(CpeError):
    """A file of a run could not be read or written (disk full, read-only, not a directory);
    the message names the path and what was being done."""


class Stopped(CpeError):
    """The run was stopped from outside (Ctrl-C, SIGTERM); the exit code is the shell's."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def describe_os_error(exc: OSError, doing: str, path: object = None) -> str:
    """One line for an `OSError`: what failed, on which path, and why in the system's words
    ("no space left on device", "read-only file system", "not a directory")."""
    where = path if path is not None else (exc.filename or "")
    reason = (exc.strerror or str(exc) or type(exc).__name__).lower()
    return f"{doing} {where}: {reason}".replace("  ", " ")


def _on_stop(signum: int, _frame: Any) -> None:
    quiet_stop_signals()  # the cleanup that follows runs to its end
    raise Stopped(f"stopped by {STOP_SIGNALS[signal.Signals(signum)]}", 128 + signum)


def install_stop_handlers() -> None:
    """Ctrl-C and SIGTERM raise `Stopped` (exit 130 / 143) in the main thread. Call again after
    `ray.init`, which sets a SIGTERM handler of its own."""
    if threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            signal.signal(s, _on_stop)


def quiet_stop_signals() -> None:
    """Ignore Ctrl-C and SIGTERM while a job cleans up: a second Ctrl-C would print a traceback
    from the middle of `ray.shutdown` and leave Ray's processes behind."""
    if threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)


@contextmanager
def stop_signals() -> Iterator[None]:
    """`install_stop_handlers` for the block; the previous handlers afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    install_stop_handlers()
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
