"""`<out>/judgements.jsonl`: append-only, one line per submission, safe across crashes.

Each `append` writes one whole line, flushes and fsyncs it under a lock, so raters
submitting at once never interleave and a submission the page was told about survives a
killed server. On start the file is read back: a last line cut short by a crash (no
newline, not valid JSON) is removed with a warning; any other bad line is an error naming
file:line, since it was not written by us.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from cpe_ray.errors import DataError
from cpe_ray.human.records import HumanTask, Judgement

JUDGEMENTS_FILE = "judgements.jsonl"


def _recover(path: Path, warn: Callable[[str], None]) -> None:
    """Cut a last line a crash left unfinished; end a whole last line with its newline."""
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    start = data.rfind(b"\n") + 1
    try:
        json.loads(data[start:])
    except ValueError:
        lineno = data.count(b"\n") + 1
        warn(f"{path}:{lineno}: removed an unfinished last line "
             f"({len(data) - start} bytes) left by a crash")
        os.truncate(path, start)
        return
    with open(path, "ab") as f:
        f.write(b"\n")


class JudgementStore:
    """The judgements of every rater, in memory and in `<out>/judgements.jsonl`."""

    def __init__(self, out: Path, tasks: Mapping[str, HumanTask],
                 warn: Callable[[str], None]) -> None:
        self.path = out / JUDGEMENTS_FILE
        self._lock = threading.Lock()
        self._judged: dict[str, set[str]] = {}  # rater -> task ids
        self.judgements: list[Judgement] = []
        if self.path.is_file():
            _recover(self.path, warn)
            with open(self.path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, start=1):
                    if line.strip():
                        self._remember(self._parse(line, f"{self.path}:{lineno}", tasks))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close)

    @staticmethod
    def _parse(line: str, where: str, tasks: Mapping[str, HumanTask]) -> Judgement:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg}); this file is written by "
                            "`cpe-ray rate` only") from None
        j = Judgement.from_json(obj, where)
        if j.task_id not in tasks:
            raise DataError(f"{where}: task '{j.task_id}' is not in tasks.jsonl; the "
                            "judgements belong to other tasks (another --out?)")
        return j

    def _remember(self, j: Judgement) -> None:
        self.judgements.append(j)
        self._judged.setdefault(j.rater, set()).add(j.task_id)

    def judged(self, rater: str) -> frozenset[str]:
        with self._lock:
            return frozenset(self._judged.get(rater, ()))

    def append(self, j: Judgement) -> None:
        line = j.to_line() + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._remember(j)

    def close(self) -> None:
        with self._lock:
            self._file.close()
