"""`cpe-ray train` as a user runs it (issue 21): a non-Ray cluster address, a run directory
another process owns, and SIGHUP / SIGTERM at start-up and mid-run end in one line with none
of the run's Ray processes left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cpe_ray.paths import REPO_ROOT

SMALL = ["trainer.rollout_batch_size=2", "ppo.mini_batch_size=1",
         "rollout.n_samples_per_prompt=2", "rollout.max_new_tokens=8",
         "post_edit.max_new_tokens=8", "learner.micro_batch_size=2",
         "logging.wandb_mode=disabled"]
RUN_TIMEOUT_S = 280
GONE_WITHIN_S = 5  # after the driver exits, every process it started is gone by then


def train(tmp_path: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cpe_ray", "train", *SMALL, f"run.output_dir={tmp_path}", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
        start_new_session=True)


def descendants(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True,
                         check=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.split("\n"):
        if line.strip():
            child, parent = map(int, line.split())
            children.setdefault(parent, []).append(child)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def one_error_line(proc: subprocess.Popen, out: str, err: str, code: int) -> str:
    assert proc.returncode == code, (out[-2000:], err[-3000:])
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error" in line.lower()]  # Ray warns too
    assert len(lines) == 1 and lines[0].startswith("cpe-ray: error: "), err[-3000:]
    return lines[0]


def stop_when(proc: subprocess.Popen, sig: int, ready) -> tuple[str, str, set[int]]:
    """Send `sig` to the driver once `ready(its descendants)`; its output and every process
    that was under it meanwhile."""
    seen: set[int] = set()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        seen |= descendants(proc.pid)
        if ready(seen):
            break
        time.sleep(0.05)
    os.kill(proc.pid, sig)
    while proc.poll() is None and time.monotonic() < deadline:
        seen |= descendants(proc.pid)
        time.sleep(0.05)
    out, err = proc.communicate(timeout=60)
    return out, err, seen


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def assert_none_left(seen: set[int]) -> None:
    time.sleep(GONE_WITHIN_S)
    left = {pid: _cmdline(pid) for pid in seen if alive(pid)}
    assert not left


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_while_ray_starts_is_one_line_and_leaves_no_ray(tmp_path, sig) -> None:
    proc = train(tmp_path, "trainer.max_steps=1")
    out, err, seen = stop_when(proc, sig, lambda pids: any(
        "gcs_server" in _cmdline(p) for p in pids))
    line = one_error_line(proc, out, err, 128 + sig)
    assert line.startswith(f"cpe-ray: error: stopped by {signal.Signals(sig).name}"), line
    assert_none_left(seen)


@pytest.mark.slow
def test_sighup_mid_run_is_one_line_naming_the_checkpoint_and_leaves_no_ray(tmp_path) -> None:
    run_dir = tmp_path / "cpe-tiny"
    proc = train(tmp_path, "trainer.max_steps=50", "trainer.save_every=1")
    out, err, seen = stop_when(proc, signal.SIGHUP, lambda _: (
        run_dir / "checkpoints" / "step-1" / "manifest.json").is_file())
    line = one_error_line(proc, out, err, 128 + signal.SIGHUP)
    assert line.startswith("cpe-ray: error: stopped by SIGHUP (terminal closed) (at step ")
    assert "the newest whole checkpoint is " + str(run_dir / "checkpoints" / "step-") in line
    assert line.endswith("resume with trainer.resume=auto)")
    assert_none_left(seen)


def test_a_non_ray_cluster_address_is_one_line(tmp_path) -> None:
    server = subprocess.Popen([sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        port = server.stdout.readline().split("port ")[1].split()[0]
        start = time.monotonic()
        proc = train(tmp_path, "trainer.max_steps=1", f"cluster.address=127.0.0.1:{port}",
                     "cluster.connect_timeout_s=5")
        out, err = proc.communicate(timeout=120)
        line = one_error_line(proc, out, err, 2)
        assert f"cluster.address=127.0.0.1:{port}: something listens there but it is not Ray" in line
        print(f"non-Ray address: one line after {time.monotonic() - start:.1f} s")
    finally:
        server.kill()
        server.wait()


def test_a_train_into_a_directory_another_process_owns_is_refused(tmp_path) -> None:
    hold = ("import sys, time\nfrom cpe_ray.config import load_config\n"
            "from cpe_ray.runs.ownership import open_run\n"
            "open_run(load_config(None, sys.argv[1:]), None, 'never', 'trainer.resume')\n"
            "print('holding', flush=True)\ntime.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", hold, f"run.output_dir={tmp_path}"],
                              stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    try:
        assert holder.stdout.readline() == "holding\n"
        config = (tmp_path / "cpe-tiny" / "config.yaml").read_text()
        proc = train(tmp_path, "trainer.max_steps=1")
        out, err = proc.communicate(timeout=120)
        line = one_error_line(proc, out, err, 2)
        assert f"{tmp_path / 'cpe-tiny'} is in use by another run (pid {holder.pid} on " in line
        assert (tmp_path / "cpe-tiny" / "config.yaml").read_text() == config  # not touched
    finally:
        holder.kill()
        holder.wait()
