"""`python -m launch.submit [--address URL] [--stage S] [--config FILE] [--no-wait] [k=v ...]`.

Submits a cpe-ray command as a Ray job (`python -m launch.train` by default; `--stage` picks
SFT, GRM training or Bradley-Terry training instead), shipping the repository as the working
dir with the runtime env of `launch/runtime_env.yaml`, then follows the job's logs until it
ends. The config is validated here first, so a bad key costs one line and no cluster round
trip.

    python -m launch.submit --address http://127.0.0.1:8265 \
        --config conf/experiment/qwen2.5-7b-cpe.yaml policy.model_path=/ckpt/sft-7b
    python -m launch.submit --stage sft --config conf/experiment/qwen2.5-stages.yaml

Exit status: 0 when the job SUCCEEDED (or was submitted, with --no-wait); 1 when it failed,
was stopped, or the cluster could not be reached; 2 for a bad config or argument.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from cpe_ray.errors import CpeError

REPO_ROOT = Path(__file__).resolve().parents[1]
RUNTIME_ENV_FILE = REPO_ROOT / "launch" / "runtime_env.yaml"
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# What each --stage runs: the launch/ module of the cpe-ray command of the same name.
ENTRYPOINTS: dict[str, tuple[str, ...]] = {
    "train": ("python", "-m", "launch.train"),
    "sft": ("python", "-m", "launch.sft"),
    "grm-train": ("python", "-m", "launch.grm", "train"),
    "rm-train": ("python", "-m", "launch.rm", "train"),
}
DEFAULT_STAGE = "train"
CONNECT_TIMEOUT_S = 5.0
# Right after `ray start`, the head's job agent may not be registered yet.
AGENT_WAIT_S = 60.0
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Variables that make Ray's client ignore the address it is given.
_ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


class ClusterError(CpeError):
    """The cluster cannot be reached, refuses the request, or the job did not succeed."""

    exit_code = 1


def resolve_address(given: str | None, environ: Any = os.environ) -> str:
    """--address, else an http(s) RAY_API_SERVER_ADDRESS / RAY_ADDRESS, else the local head."""
    address = given
    if not address:
        for key in _ADDRESS_ENV:
            value = environ.get(key, "")
            if value.startswith(("http://", "https://")):
                address = value
                break
    address = (address or DEFAULT_ADDRESS).rstrip("/")
    if "://" not in address:
        address = "http://" + address
    if urlparse(address).scheme not in ("http", "https"):
        raise CpeError(f"--address {address}: give the dashboard's http://host:port "
                       f"(default {DEFAULT_ADDRESS}), not a GCS or ray:// address")
    return address


def unreachable(address: str, why: str) -> ClusterError:
    return ClusterError(
        f"cannot reach the Ray dashboard at {address} ({why}); start one with `ray start --head` "
        "on this machine, or `ray up launch/cluster.yaml` then `ray dashboard "
        "launch/cluster.yaml` for the GPU cluster, or pass --address http://<head>:8265")


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """A plain TCP connect first: fails in seconds, where an HTTP client may hang."""
    url = urlparse(address)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "127.0.0.1", port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise unreachable(address, exc.strerror or type(exc).__name__) from None


def relative_config(path: str | None) -> str | None:
    """The --config path as the job sees it: relative to the shipped repository."""
    if path is None:
        return None
    resolved = Path(path).expanduser().resolve()
    try:
        return resolved.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        raise CpeError(f"--config {path} is outside the repository {REPO_ROOT}; the job sees "
                       "only the files shipped as its working dir: put the file under conf/"
                       ) from None


def job_overrides(cfg: Any, overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """The overrides the job runs with, and notes for the user."""
    out, notes = list(overrides), []
    if cfg.cluster.address is None:
        # A job's driver that calls ray.init(address="local") starts a second Ray inside the
        # job instead of using the cluster's nodes; join the job's cluster instead.
        out.append("cluster.address=auto")
        notes.append("cluster.address is unset; the job joins the cluster it runs on "
                     "(cluster.address=auto)")
    if not Path(cfg.run.output_dir).expanduser().is_absolute():
        notes.append(f"run.output_dir={cfg.run.output_dir} is relative: on the cluster it is "
                     "inside the job's temporary working dir; give an absolute path on "
                     "shared storage to keep checkpoints")
    return out, notes


def runtime_env() -> dict[str, Any]:
    env = yaml.safe_load(RUNTIME_ENV_FILE.read_text(encoding="utf-8")) or {}
    env["working_dir"] = str(REPO_ROOT)
    return env


def entrypoint(config: str | None, overrides: Sequence[str], stage: str = DEFAULT_STAGE
               ) -> str:
    args = [*ENTRYPOINTS[stage], *(["--config", config] if config else []), *overrides]
    return shlex.join(args)


@contextlib.contextmanager
def _explicit_address() -> Iterator[None]:
    """Ray's client prefers RAY_API_SERVER_ADDRESS / RAY_ADDRESS to its argument: hide them."""
    saved = {k: os.environ.pop(k) for k in _ADDRESS_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _enable_token_auth_if_available() -> None:
    """Send the Ray auth token when one is at hand (the `ray start` default in Ray >= 2.5x)."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    token_file = Path(path).expanduser() if path else Path.home() / ".ray" / "auth_token"
    if os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


def connect(address: str) -> Any:
    check_reachable(address)
    _enable_token_auth_if_available()
    from ray.job_submission import JobSubmissionClient

    for name in ("ray", "ray.dashboard.modules.dashboard_sdk"):  # not Ray's INFO lines
        logging.getLogger(name).setLevel(logging.WARNING)

    try:
        with _explicit_address():
            return JobSubmissionClient(address)
    except ConnectionError:
        raise unreachable(address, "no answer from the jobs API") from None
    except Exception as exc:  # AuthenticationError, version errors: one line, not a traceback
        raise _client_error(address, exc) from None


def _client_error(address: str, exc: Exception) -> ClusterError:
    first = " ".join(str(exc).split())[:300]
    if type(exc).__name__ == "AuthenticationError" or "authentication" in first.lower():
        return ClusterError(
            f"the Ray cluster at {address} requires its auth token: set RAY_AUTH_TOKEN (or "
            "RAY_AUTH_TOKEN_PATH) to the token of the head node (`ray get-auth-token` there) "
            f"and RAY_AUTH_MODE=token ({first})")
    return ClusterError(f"the Ray cluster at {address} refused the request: {first}")


def submit(client: Any, entry: str, env: dict[str, Any], wait_s: float = AGENT_WAIT_S) -> str:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.submit_job(entrypoint=entry, runtime_env=env)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def follow(client: Any, job_id: str, poll_s: float = 2.0) -> str:
    """Print the job's logs as they come; return its terminal status."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    try:
        asyncio.run(tail())
    except RuntimeError as exc:  # the log stream broke: keep waiting on the status
        print(f"(log stream ended early: {' '.join(str(exc).split())[:200]}; "
              f"waiting for the job's status)", file=sys.stderr)
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launch.submit", description=__doc__.splitlines()[0])
    parser.add_argument("--address", default=None,
                        help="the Ray dashboard (jobs API); default: an http(s) "
                             "RAY_API_SERVER_ADDRESS or RAY_ADDRESS, else " + DEFAULT_ADDRESS)
    parser.add_argument("--stage", choices=tuple(ENTRYPOINTS), default=DEFAULT_STAGE,
                        help="the command the job runs: train (CPE / PPO, the default), sft, "
                             "grm-train or rm-train (`grm collect` calls an API from where "
                             "its key is: run it with cpe-ray, not as a job)")
    parser.add_argument("--config", default=None, help="YAML file inside the repository")
    parser.add_argument("--no-wait", action="store_true",
                        help="return once the job is submitted instead of following it")
    parser.add_argument("overrides", nargs="*",
                        help="key=value overrides, as for the cpe-ray command")
    return parser


def run(args: argparse.Namespace) -> int:
    from cpe_ray.config import load_config

    cfg = load_config(args.config, args.overrides)  # before any contact with the cluster
    config = relative_config(args.config)
    overrides, notes = job_overrides(cfg, args.overrides)
    for note in notes:
        print(f"note: {note}")
    address = resolve_address(args.address)
    client = connect(address)
    entry = entrypoint(config, overrides, args.stage)
    try:
        job_id = submit(client, entry, runtime_env())
    except Exception as exc:
        raise _client_error(address, exc) from None
    print(f"submitted job {job_id} to {address}: {entry}")
    print(f"  follow  ray job logs -f {job_id} --address {address}")
    print(f"  stop    ray job stop {job_id} --address {address}")
    if args.no_wait:
        return 0
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on (ray job stop {job_id} "
              f"--address {address} ends it)", file=sys.stderr)
        return 130
    if status != "SUCCEEDED":
        message = client.get_job_info(job_id).message or ""
        raise ClusterError(f"job {job_id} ended {status}: {' '.join(message.split())[:300]}")
    print(f"job {job_id} SUCCEEDED")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except CpeError as exc:
        print(f"cpe-ray: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
