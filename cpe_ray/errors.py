"""User-facing errors: one clear line (what, where, how to fix), raised before expensive work.

The CLI catches `CpeError`, prints its message on one line and exits non-zero, so any
code path that detects bad input should raise one of these rather than a bare exception.
"""

from __future__ import annotations


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
