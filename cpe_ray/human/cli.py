"""`cpe-ray rate`: build (or reuse) the rating tasks and serve the rating page.

Everything is checked before the server starts (sources, the output folder, the token
rule, the port), each problem one `cpe-ray: error: ...` line and exit code 2.
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from cpe_ray.errors import CpeError

DEFAULT_PORT = 8765
DEFAULT_SIZE = 50


def _cmd_rate(args: argparse.Namespace) -> int:
    from cpe_ray.config import load_config
    from cpe_ray.human.server import Rating, Scale, access_token, listen, make_app, serve
    from cpe_ray.human.store import JudgementStore
    from cpe_ray.human.tasks import TaskSpec, build_tasks

    if args.size < 1:
        raise CpeError(f"--size {args.size}: give the number of tasks to draw (1 or more)")
    for flag, path, want in (("--winrate", args.winrate, "folder"),
                             ("--samples", args.samples, "file")):
        if path is not None and not (Path(path).is_dir() if want == "folder"
                                     else Path(path).is_file()):
            raise CpeError(f"{flag} {path} is not a {want}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CpeError(f"--out {out} is not a folder")
    g = load_config(args.config, args.overrides).grm
    token = access_token(args.host, args.token_env)
    say = lambda line: print(line, flush=True)  # noqa: E731
    spec = TaskSpec(str(Path(args.winrate).resolve()) if args.winrate else None,
                    str(Path(args.samples).resolve()) if args.samples else None,
                    args.size, args.seed)
    tasks = build_tasks(out, spec, say)
    store = JudgementStore(out, {t.task_id: t for t in tasks}, lambda w: say(f"warning: {w}"))
    try:
        sock = listen(args.host, args.port)
    except OSError as e:
        store.close()
        raise CpeError(f"cannot listen on {args.host}:{args.port}: "
                       f"{(e.strerror or str(e)).lower()}; give another --port (0: any "
                       "free port)") from None
    rating = Rating(tasks, store, Scale.from_grm(g.dimensions, g.score_min, g.score_max),
                    args.seed)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    say(f"serving {len(tasks)} tasks at http://{shown}:{port}/"
        + ("?token=<the token in $" + args.token_env + ">" if token else ""))
    say(f"  judgements  {store.path} ({len(store.judgements)} so far)")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve(make_app(rating, token), sock, stop)
    finally:
        store.close()
    say("stopped")
    return 0


def add_rate_command(sub: argparse._SubParsersAction) -> None:
    """Register `cpe-ray rate` on the top-level subparsers."""
    p = sub.add_parser("rate", help="serve a local page where people rate answers (eval "
                                    "winrate pairs, run samples); judgements to --out")
    p.add_argument("--winrate", default=None, metavar="DIR",
                   help="the winrate/ folder `cpe-ray eval winrate` wrote (judgements.jsonl)")
    p.add_argument("--samples", default=None, metavar="FILE",
                   help="a run's samples.jsonl (original vs rewrite, or single answers)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder for tasks.jsonl (built once, then reused) and judgements.jsonl")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE,
                   help=f"tasks to draw from the sources (default {DEFAULT_SIZE})")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw and answer order")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default loopback; any other needs --token-env)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"port (default {DEFAULT_PORT}; 0: any free port)")
    p.add_argument("--token-env", default=None, metavar="NAME",
                   help="environment variable holding the token every request must carry")
    p.add_argument("--config", default=None, help="YAML file on top of the defaults (grm.*)")
    p.add_argument("overrides", nargs="*",
                   help="key=value overrides, e.g. grm.score_min=1 grm.score_max=10")
    p.set_defaults(func=_cmd_rate)
