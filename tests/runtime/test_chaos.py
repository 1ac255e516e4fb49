"""Chaos: kill an actor of a running `cpe-ray train` by PID; the run must not notice in its results.

Each run is the real command in a subprocess (local Ray, HF engine, one DeepSpeed gloo rank).
The killed run must exit 0, log every step exactly once, and end on weights bit-equal to an
uninterrupted run with the same seed. Past `trainer.max_restarts`, and on Ctrl-C or SIGTERM,
it ends with one line, its checkpoint whole and none of its Ray processes left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cpe_ray.paths import REPO_ROOT

pytestmark = pytest.mark.slow

STEPS = 4
SMALL = [
    "trainer.rollout_batch_size=2", "ppo.mini_batch_size=1", "rollout.n_samples_per_prompt=2",
    "rollout.max_new_tokens=8", "post_edit.max_new_tokens=8", "learner.micro_batch_size=2",
    "logging.wandb_mode=disabled", f"trainer.max_steps={STEPS}", "trainer.save_every=2",
]
RUN_TIMEOUT_S = 280
STOP_LIMIT_S = 30  # Ctrl-C / SIGTERM to exit, cleanup included
GONE_WITHIN_S = 3  # after the driver exits, every process it started is gone by then


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process under `pid` (Ray's raylet, its workers, ...)."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True,
                         check=True).stdout
    children: dict[int, list[tuple[int, str]]] = {}
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2:
            children.setdefault(int(parts[1]), []).append(
                (int(parts[0]), parts[2] if len(parts) > 2 else ""))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def logged_steps(run_dir: Path, name: str = "metrics.jsonl") -> list[int]:
    path = run_dir / name
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def train(out: Path, name: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cpe_ray", "train", *SMALL, f"run.output_dir={out}",
         f"run.name={name}", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT,
        start_new_session=True)


def kill_when(proc: subprocess.Popen, run_dir: Path, after_steps: int, actor: str) -> int:
    """SIGKILL the process of Ray actor `actor` under `proc` once `after_steps` are logged."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        if len(logged_steps(run_dir)) >= after_steps:
            victims = [p for p, args in descendants(proc.pid) if args.startswith(f"ray::{actor}")]
            assert len(victims) == 1, descendants(proc.pid)
            os.kill(victims[0], signal.SIGKILL)
            return victims[0]
        time.sleep(0.05)
    raise AssertionError(f"the run ended or stalled before step {after_steps}: "
                         f"{proc.communicate()[0][-3000:]}")


def finish(proc: subprocess.Popen) -> str:
    try:
        out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, out[-4000:]
    return out


def final_policy(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "checkpoints" / f"step-{STEPS}" / "policy" /
                         "model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The final weights of an uninterrupted run with the given extra overrides (cached)."""
    cache: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}

    def weights(extra: tuple[str, ...]) -> dict[str, torch.Tensor]:
        if extra not in cache:
            out = tmp_path_factory.mktemp("reference")
            finish(train(out, "straight", *extra))
            assert logged_steps(out / "straight") == list(range(STEPS))
            cache[extra] = final_policy(out / "straight")
        return cache[extra]

    return weights


def _assert_same_run(run_dir: Path, reference: dict[str, torch.Tensor]) -> None:
    assert logged_steps(run_dir) == list(range(STEPS))  # each step exactly once
    samples = logged_steps(run_dir, "samples.jsonl")
    assert samples == sorted(samples) and all(samples.count(s) == 4 for s in range(STEPS))
    weights = final_policy(run_dir)
    assert weights.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(weights[name], tensor), name


@pytest.mark.parametrize("actor, after_steps, extra", [
    ("PolicyRollout", 2, ()),
    ("PPOLearner", 3, ()),
    # a step spans two batches: the engine's fault rewinds the learner to step-2 and replays
    ("PolicyRollout", 3, ("trainer.off_policy_steps=1",)),
])
def test_killed_actor_is_restarted_and_the_run_ends_as_if_never_killed(
        tmp_path, reference, actor, after_steps, extra) -> None:
    proc = train(tmp_path, "chaos", *extra)
    kill_when(proc, tmp_path / "chaos", after_steps, actor)
    out = finish(proc)
    restarts = [line for line in out.splitlines() if "cpe-ray: restart " in line]
    assert len(restarts) == 1, out[-4000:]
    assert "restart 1/3:" in restarts[0] and " died at step " in restarts[0]
    metrics = [json.loads(line) for line in
               (tmp_path / "chaos" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["faults/restarts"] == 1.0
    assert metrics[-1]["faults/seconds_lost"] > 0
    lost = float(restarts[0].rsplit("; ", 1)[1].split(" s lost")[0])
    print(f"\n{restarts[0]}\n{actor}: {lost:.1f} s lost in the restart, "
          f"{metrics[-1]['faults/seconds_lost']:.1f} s in all")
    _assert_same_run(tmp_path / "chaos", reference(extra))


def test_past_max_restarts_the_run_ends_with_one_line_and_its_checkpoint_intact(
        tmp_path) -> None:
    from cpe_ray.runs.checkpoints import verify_checkpoint

    run_dir = tmp_path / "limit"
    proc = train(tmp_path, "limit", "trainer.max_restarts=0")
    kill_when(proc, run_dir, 2, "PolicyRollout")
    out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("cpe-ray: error:")]
    assert len(errors) == 1, out[-3000:]
    assert errors[0].startswith("cpe-ray: error: rollout engine 0 died (")
    assert errors[0].endswith(
        "and trainer.max_restarts=0 restart(s) are used up (at step 3/4; the newest whole "
        f"checkpoint is {run_dir}/checkpoints/step-2: resume with trainer.resume=auto)")
    assert verify_checkpoint(run_dir / "checkpoints" / "step-2") is None
    assert logged_steps(run_dir) == [0, 1]


@pytest.mark.parametrize("sig, whole_group, code", [
    (signal.SIGINT, True, 130),  # Ctrl-C in a terminal signals the whole process group
    (signal.SIGTERM, False, 143),  # a scheduler's stop signals the driver
])
def test_ctrl_c_and_sigterm_stop_within_seconds_with_one_line_and_no_ray_left(
        tmp_path, sig, whole_group, code) -> None:
    run_dir = tmp_path / "stop"
    proc = train(tmp_path, "stop", "trainer.max_steps=100")
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while len(logged_steps(run_dir)) < 2 and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    ours = descendants(proc.pid)
    assert any(args.startswith("ray::PPOLearner") for _, args in ours)
    start = time.monotonic()
    if whole_group:
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid, sig)
    out, _ = proc.communicate(timeout=STOP_LIMIT_S)
    took = time.monotonic() - start
    assert proc.returncode == code, out[-3000:]
    assert took < STOP_LIMIT_S and "Traceback" not in out
    errors = [line for line in out.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("cpe-ray: error: stopped by "), out[-3000:]
    time.sleep(GONE_WITHIN_S)
    left = [(pid, args) for pid, args in ours if _alive(pid)]
    assert not left
    print(f"{signal.Signals(sig).name}: stopped in {took:.1f} s")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
