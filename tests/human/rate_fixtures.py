"""Hand-made sources for `cpe-ray rate` (eval winrate's judgements.jsonl, a run's
samples.jsonl) and a rating server in a subprocess, shared by tests/human/test_*.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# `cpe-ray rate` through the real argument parser and error handling, whether or not the
# top-level parser lists it yet.
RATE_MAIN = """
import argparse, sys
from cpe_ray.cli import build_parser, main
from cpe_ray.human.cli import add_rate_command
parser = build_parser()
sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
if "rate" not in sub.choices:
    add_rate_command(sub)
import cpe_ray.cli
cpe_ray.cli.build_parser = lambda: parser
sys.exit(main(sys.argv[1:]))
"""


def write_winrate(folder: Path, n: int = 6, theta: float | None = 0.4) -> Path:
    """`<folder>/winrate/` as `cpe-ray eval winrate` writes it (the fields tasks read)."""
    out = folder / "winrate"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        rows.append({
            "id": f"p{i}", "persona": json.dumps({"name": f"user {i}", "age": 30 + i,
                                                  "likes": ["tea", "maps"]}),
            "question": f"question {i}?", "model_answer": f"model answer {i}",
            "baseline_answer": f"baseline answer {i}", "model_length": 14,
            "baseline_length": 17, "preference": [1.0, 0.5, 0.0, None][i % 4],
            "unjudged_reason": None, "verdicts": {},
            "model_reward": 1.5 + i, "baseline_reward": -0.5})
    (out / "judgements.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = {"theta": theta, "n_total": n, "lc_identified": theta is not None}
    (out / "results.json").write_text(json.dumps({"metrics": metrics}))
    return out


def write_samples(path: Path, n: int = 6) -> Path:
    """A run's samples.jsonl: every even row has a rewrite, odd rows none."""
    rows = []
    for i in range(n):
        rewrite = i % 2 == 0
        rows.append({
            "step": i // 3, "prompt_id": f"q{i}", "persona": "Likes short answers.",
            "question": f"sample question {i}?", "answer": f"original {i}",
            "critique": f"critique {i}", "rewrite": f"rewrite {i}" if rewrite else None,
            "answer_reward": 0.1 * i, "rewrite_reward": 0.2 * i if rewrite else None,
            "kept": rewrite})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_rate(*args: str, env: dict[str, str] | None = None, timeout: float = 60
             ) -> subprocess.CompletedProcess:
    """`cpe-ray rate ARGS` to the end (for commands that fail before serving)."""
    return subprocess.run([sys.executable, "-c", RATE_MAIN, "rate", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


class RateServer:
    """`cpe-ray rate ARGS` in a subprocess; `url` once it said "serving ... at URL"."""

    def __init__(self, *args: str, env: dict[str, str] | None = None,
                 timeout: float = 60) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-c", RATE_MAIN, "rate", *args], cwd=REPO,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"rate exited: {''.join(self.lines)}")
            self.lines.append(line)
            found = re.search(r"serving .* at (http://\S+?)/", line)
            if found:
                self.url = found.group(1)
                return
        self.kill()
        raise RuntimeError(f"rate did not start: {''.join(self.lines)}")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
