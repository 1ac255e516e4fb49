"""The JSON-lines files of judgement records that `grm collect` appends to (and the files in
its format: a judge reference, people's judgements exported the same way)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cpe_ray.errors import DataError


def read_records(path: Path, repair: bool = True) -> list[dict[str, Any]]:
    """The JSON lines of an appended-to file; a truncated last line (a crash mid-write) is
    cut off the file when `repair`, and skipped either way. Any other bad line is an error."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        complete = data.rfind(b"\n") + 1
        if repair:
            with path.open("r+b") as f:
                f.truncate(complete)
        data = data[:complete]
    records = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}:{lineno}: not a JSON line ({exc}); this file is appended "
                            "to by grm collect: fix or remove that line") from None
        if not isinstance(value, dict) or "key" not in value:
            raise DataError(f"{path}:{lineno}: not a grm collect record (no 'key'); point "
                            "distill.output_path at a file of its own")
        records.append(value)
    return records
