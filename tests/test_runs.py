"""Run directories, whole checkpoints and logs that match the weights (no Ray: file level).

`Writer` stands in for a learner group's file output (an HF folder, DeepSpeed state files):
the checkpoint protocol around them is what is tested here; real learner groups write
checkpoints in tests/rl/test_trainer.py and tests/runtime/test_chaos.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from cpe_ray.config import load_config
from cpe_ray.errors import ConfigError, CpeError, RunIOError
from cpe_ray.runs import ownership, ray_join
from cpe_ray.runs.checkpoints import (
    checkpoints,
    find_resume,
    verify_checkpoint,
    write_checkpoint,
)
from cpe_ray.runs.layout import MANIFEST, POLICY_DIR
from cpe_ray.runs.ownership import open_run
from cpe_ray.runs.ray_join import wait_reachable
from cpe_ray.tracking import Tracker, cut_log

STATE_FILE = "state/policy/mp_rank_00_model_states.pt"
MODEL_FILE = f"{POLICY_DIR}/model.safetensors"


class Writer:
    """Writes what a learner group writes into a checkpoint, `size` bytes per file."""

    def __init__(self, size: int = 1000) -> None:
        self.size = size

    def export_hf(self, path: str) -> None:
        Path(path).mkdir(parents=True)
        (Path(path) / "model.safetensors").write_bytes(os.urandom(self.size))
        (Path(path) / "config.json").write_text("{}")

    def save_state(self, path: str) -> None:
        (Path(path) / "policy").mkdir(parents=True)
        (Path(path) / STATE_FILE.removeprefix("state/")).write_bytes(os.urandom(self.size))


def _cfg(tmp_path: Path, *overrides: str):
    return load_config(None, [f"run.output_dir={tmp_path}", "logging.wandb_mode=disabled",
                              *overrides])


def _run_with_checkpoints(tmp_path: Path, steps: tuple[int, ...] = (2, 4)) -> Path:
    run_dir = tmp_path / "cpe-tiny"
    for step in steps:
        write_checkpoint(Writer(), run_dir, step, POLICY_DIR, "wandb-id")
    return run_dir


def test_checkpoint_is_whole_with_a_manifest_written_last(tmp_path) -> None:
    run_dir = _run_with_checkpoints(tmp_path)
    assert [p.name for p in checkpoints(run_dir)] == ["step-2", "step-4"]
    ckpt = run_dir / "checkpoints" / "step-4"
    manifest = json.loads((ckpt / MANIFEST).read_text())
    assert sorted(manifest["files"]) == sorted(
        ["trainer_state.json", MODEL_FILE, f"{POLICY_DIR}/config.json", STATE_FILE])
    assert manifest["files"][STATE_FILE]["bytes"] == 1000
    assert len(manifest["files"][STATE_FILE]["sha256"]) == 64
    assert verify_checkpoint(ckpt) is None
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] != []  # no .tmp left
    assert not list((run_dir / "checkpoints").glob(".*"))


@pytest.mark.parametrize("damage, problem", [
    (lambda c: (c / STATE_FILE).write_bytes(b""), f"{STATE_FILE} is 0 bytes, the manifest says 1000"),
    (lambda c: (c / MODEL_FILE).unlink(), f"{MODEL_FILE} is missing"),
    (lambda c: (c / "trainer_state.json").write_text(""), "trainer_state.json is 0 bytes"),
    (lambda c: (c / STATE_FILE).write_bytes(bytes(1000)), f"{STATE_FILE} does not match its sha256"),
    (lambda c: (c / MANIFEST).unlink(), "no manifest.json"),
    (lambda c: (c / MANIFEST).write_text("{"), "manifest.json is unreadable"),
])
def test_resume_auto_skips_a_damaged_newest_checkpoint_and_says_why(
        tmp_path, capsys, damage, problem) -> None:
    run_dir = _run_with_checkpoints(tmp_path)
    damage(run_dir / "checkpoints" / "step-4")
    assert find_resume("auto", run_dir, "trainer.resume") == run_dir / "checkpoints" / "step-2"
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"cpe-ray: trainer.resume=auto: skipped {run_dir}/checkpoints/step-4: ")
    assert problem in out[0]
    assert out[1].endswith("resuming from " f"{run_dir}/checkpoints/step-2 (step 2)")
    with pytest.raises(ConfigError, match=f"step-4 is not a whole checkpoint: .*{problem[:20]}"):
        find_resume(str(run_dir / "checkpoints" / "step-4"), run_dir, "trainer.resume")


def test_sizes_only_without_checksums(tmp_path) -> None:
    run_dir = tmp_path / "run"
    ckpt = write_checkpoint(Writer(), run_dir, 1, POLICY_DIR, None, checksums=False)
    assert "sha256" not in json.loads((ckpt / MANIFEST).read_text())["files"][STATE_FILE]
    (ckpt / STATE_FILE).write_bytes(bytes(1000))  # same size: only a checksum would see it
    assert verify_checkpoint(ckpt) is None
    (ckpt / STATE_FILE).write_bytes(bytes(999))
    assert "999 bytes" in verify_checkpoint(ckpt)


def test_no_whole_checkpoint_starts_at_zero(tmp_path, capsys) -> None:
    run_dir = _run_with_checkpoints(tmp_path, (2,))
    (run_dir / "checkpoints" / "step-2" / STATE_FILE).unlink()
    assert find_resume("auto", run_dir, "trainer.resume") is None
    assert "no whole checkpoint" in capsys.readouterr().out


def test_rewriting_a_step_replaces_its_checkpoint_whole(tmp_path) -> None:
    run_dir = _run_with_checkpoints(tmp_path, (2,))
    first = (run_dir / "checkpoints" / "step-2" / STATE_FILE).read_bytes()
    write_checkpoint(Writer(), run_dir, 2, POLICY_DIR, None)
    assert (run_dir / "checkpoints" / "step-2" / STATE_FILE).read_bytes() != first
    assert verify_checkpoint(run_dir / "checkpoints" / "step-2") is None
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-2"]


def test_open_run_removes_partial_checkpoints(tmp_path, capsys) -> None:
    run_dir = _run_with_checkpoints(tmp_path, (2,))
    (run_dir / "checkpoints" / ".step-4.tmp-1234abcd" / "policy").mkdir(parents=True)
    (run_dir / "checkpoints" / ".step-2.old-1234abcd").mkdir()
    assert open_run(_cfg(tmp_path, "trainer.resume=auto"), None, "auto", "trainer.resume")[1] \
        == run_dir / "checkpoints" / "step-2"
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-2"]
    assert "removed the partial checkpoint" in capsys.readouterr().out


def test_a_directory_holding_another_run_is_refused_then_overwritten(tmp_path, capsys) -> None:
    run_dir = _run_with_checkpoints(tmp_path)
    (run_dir / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1}\n')
    with pytest.raises(ConfigError) as err:
        open_run(_cfg(tmp_path, "run.seed=7"), None, "never", "trainer.resume")
    assert str(err.value) == (
        f"{run_dir} holds another run (2 logged step(s) in metrics.jsonl and checkpoints "
        "step-2, step-4); continue it with trainer.resume=auto, replace it with "
        "run.overwrite=true, or choose another run name")
    with pytest.raises(ConfigError, match="run.overwrite=true starts .* trainer.resume=auto"):
        open_run(_cfg(tmp_path, "run.overwrite=true"), None, "auto", "trainer.resume")
    assert open_run(_cfg(tmp_path, "run.overwrite=true"), None, "never", "trainer.resume") == (
        run_dir, None)
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "config.yaml"]
    # the same directory, now empty but for config.yaml, opens without the flag
    assert open_run(_cfg(tmp_path), None, "never", "trainer.resume") == (run_dir, None)


def test_output_dir_that_is_a_file_is_one_line(tmp_path) -> None:
    (tmp_path / "afile").write_text("")
    with pytest.raises(RunIOError, match=f"{tmp_path}/afile is a file, not a directory"):
        open_run(_cfg(tmp_path / "afile"), None, "never", "trainer.resume")


class FakeClock:
    """`time` for `cpe_ray.runs.ray_join`: sleeping advances the clock and nothing else does,
    so a wait is measured in the code's own seconds, not in how busy the machine is."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps = 0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.sleeps += 1


def test_unreachable_cluster_address_is_one_line_within_the_timeout(monkeypatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(ray_join, "time", clock)
    with pytest.raises(CpeError, match=r"cluster.address=127.0.0.1:1: no Ray cluster answered "
                                       r"within 2 s \(connection refused\)"):
        wait_reachable("127.0.0.1:1", 2.0)
    # It retried (a real refused connection each time) until the timeout and no longer.
    assert clock.now == pytest.approx(2.0) and clock.sleeps >= 1
    with pytest.raises(ConfigError, match="is not host:port"):
        wait_reachable("localhost", 1.0)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (root only); skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_disk_full_at_a_checkpoint_says_so_and_leaves_no_partial(small_disk) -> None:
    run_dir = small_disk / "run"
    write_checkpoint(Writer(400_000), run_dir, 2, POLICY_DIR, None)
    with pytest.raises(RunIOError) as err:
        write_checkpoint(Writer(1_000_000), run_dir, 4, POLICY_DIR, None)
    assert str(err.value).startswith(f"no space left on device writing checkpoint {run_dir}/"
                                     "checkpoints/step-4 (")
    assert "free space there and resume with trainer.resume=auto" in str(err.value)
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-2"]
    # still full: the run directory says so, naming the file it could not write
    filler = small_disk / "filler"
    with filler.open("wb") as f, pytest.raises(OSError):
        while True:
            f.write(bytes(64 * 1024))
            f.flush()
    with pytest.raises(RunIOError, match=f"writing {run_dir}/config.yaml: no space left on "
                                         "device; free space there"):
        open_run(_cfg(small_disk, "run.name=run"), None, "auto", "trainer.resume")


def _rows(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_resume_cuts_logs_back_to_the_checkpoint_and_never_logs_a_step_twice(tmp_path) -> None:
    metrics, samples = tmp_path / "metrics.jsonl", tmp_path / "samples.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "x": 1.0}) + "\n" for s in range(6))
                       + '{"step": 6, "x"')  # a row cut short by kill -9
    samples.write_text("".join(json.dumps({"step": s // 4}) + "\n" for s in range(24)))
    cfg = _cfg(tmp_path)
    tracker = Tracker(cfg, tmp_path, start_step=3)
    assert tracker.dropped == 4 + 12
    assert _rows(metrics) == [0, 1, 2] and _rows(samples) == [s // 4 for s in range(12)]
    tracker.log(3, {"x": 2.0})
    tracker.log(3, {"x": 3.0})  # a replay of a logged step: ignored
    tracker.log_samples(3, [{"step": 3}] * 4)
    tracker.log_samples(3, [{"step": 3}] * 4)
    assert _rows(metrics) == [0, 1, 2, 3] and json.loads(metrics.read_text().splitlines()[-1])[
        "x"] == 2.0
    assert _rows(samples).count(3) == 4
    assert cut_log(tmp_path / "absent.jsonl", 0) == 0
    assert not list(tmp_path.glob(".*.tmp"))


def test_skipped_records_are_counted_and_listed(tmp_path, capsys) -> None:
    from cpe_ray.run import _load_records

    good = json.dumps({"persona": "a cook", "question": "hi"})
    data = tmp_path / "p.jsonl"
    data.write_text("\n".join([good, "{", good, '{"persona": "x"}', "[]", "{}", good]) + "\n")
    records = _load_records(_cfg(tmp_path, f"data.train_path={data}", "data.on_bad_record=skip"))
    assert len(records) == 3
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    assert out[0].startswith(f"cpe-ray: data.on_bad_record=skip: skipped 4 bad record(s) of "
                             f"{data} (3 loaded): {data}:2")
    assert f"{data}:4" in out[0] and out[0].endswith("; 1 more")


@pytest.mark.slow
def test_wandb_resumes_the_same_run_rewound_to_the_checkpoint(tmp_path) -> None:
    cfg = _cfg(tmp_path, "logging.wandb_mode=offline")
    first = Tracker(cfg, tmp_path, start_step=0)
    run_id = first.run_id
    for step in range(4):
        first.log(step, {"x": float(step)})
    first.finish()
    resumed = Tracker(cfg, tmp_path, run_id, start_step=2)
    try:
        assert resumed.run_id == run_id
        assert resumed.run.starting_step == 2  # steps 2 and 3 are logged again, not dropped
        assert _rows(tmp_path / "metrics.jsonl") == [0, 1]
    finally:
        resumed.finish()


# ------------------------------------------------------------ issue 21: guards of a run


@pytest.fixture
def http_server():
    """host:port of an HTTP/1 server on loopback (as `python3 -m http.server`)."""
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_an_http_server_at_cluster_address_is_not_ray_in_one_line(http_server) -> None:
    start = time.monotonic()
    with pytest.raises(CpeError, match=rf"cluster.address={http_server}: something listens "
                                       r"there but it is not Ray \(unavailable: .*HTTP/2"):
        wait_reachable(http_server, 60.0)
    # refused at once, not at the 60 s deadline (30 s of slack for a starved machine)
    assert time.monotonic() - start < 30


def test_a_silent_listener_at_cluster_address_ends_within_the_timeout() -> None:
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # accepts connections (the kernel does) and never answers
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(CpeError, match=rf"cluster.address={address}: the port is open but "
                                           r"no Ray answered within 2 s \(deadline_exceeded"):
            wait_reachable(address, 2.0)
        # it ends: one 1 s attempt at most past the deadline, and slack for a starved machine
        assert time.monotonic() - start < 2 + 20


def test_ray_answers_at_its_gcs_address() -> None:
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray of another test is up")
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        wait_reachable(ray.get_runtime_context().gcs_address, 5.0)
    finally:
        ray.shutdown()


def test_an_ipv6_address_is_bracketed() -> None:
    with pytest.raises(CpeError, match=r"cluster.address=\[::1\]:1: no Ray cluster answered"):
        wait_reachable("[::1]:1", 0.2)
    with pytest.raises(ConfigError, match=r"an IPv6 host in brackets: \[::1\]:6379"):
        wait_reachable("::1:6379", 0.2)


HOLD = """
import sys, time
from cpe_ray.config import load_config
from cpe_ray.runs.ownership import open_run
open_run(load_config(None, sys.argv[1:]), None, "never", "trainer.resume")
print("holding", flush=True)
time.sleep(120)
"""


def _holder(tmp_path: Path) -> subprocess.Popen:
    """Another process that opened the run directory cpe-tiny under tmp_path and lives on."""
    import sys

    proc = subprocess.Popen([sys.executable, "-c", HOLD, f"run.output_dir={tmp_path}",
                             "logging.wandb_mode=disabled"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "holding\n"
    return proc


def test_a_run_directory_is_owned_by_one_live_process(tmp_path) -> None:
    holder = _holder(tmp_path)
    run_dir = tmp_path / "cpe-tiny"
    try:
        with pytest.raises(CpeError) as err:
            open_run(_cfg(tmp_path), None, "never", "trainer.resume")
        assert str(err.value).startswith(f"{run_dir} is in use by another run (pid "
                                         f"{holder.pid} on ")
        assert str(err.value).endswith("; wait for it to end, or choose another run name")
        with pytest.raises(CpeError, match="is in use by another run"):  # whatever the flags
            open_run(_cfg(tmp_path, "run.overwrite=true"), None, "never", "trainer.resume")
    finally:
        holder.kill()  # kill -9: the system drops its lock, nothing stale is left
        holder.wait()
    assert open_run(_cfg(tmp_path), None, "never", "trainer.resume") == (run_dir, None)
    ownership.release_run(run_dir)


def test_two_processes_opening_one_run_directory_at_once_exactly_one_owns_it(tmp_path) -> None:
    import sys

    race = HOLD.replace('print("holding", flush=True)\ntime.sleep(120)',
                        'print("holding", flush=True)\ntime.sleep(5)')
    procs = [subprocess.Popen([sys.executable, "-c", race, f"run.output_dir={tmp_path}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    held = [out for out, _ in results if out == "holding\n"]
    refused = [err for _, err in results if "is in use by another run" in err]
    assert len(held) == 1 and len(refused) == 1, results


def _resumable(tmp_path: Path, *overrides: str) -> Path:
    """A run with a checkpoint at step 2, opened with `overrides`."""
    run_dir = tmp_path / "cpe-tiny"
    open_run(_cfg(tmp_path, *overrides), None, "never", "trainer.resume")
    write_checkpoint(Writer(), run_dir, 2, POLICY_DIR, None)
    ownership.release_run(run_dir)
    return run_dir


def test_resume_with_a_config_that_changes_the_run_is_refused_naming_the_keys(
        tmp_path, capsys) -> None:
    run_dir = _resumable(tmp_path, "run.seed=1")
    first = (run_dir / "config.yaml").read_text()
    changed = _cfg(tmp_path, "run.seed=2", "trainer.rollout_batch_size=4",
                   "trainer.max_steps=9", "trainer.resume=auto")
    with pytest.raises(ConfigError) as err:
        open_run(changed, None, "auto", "trainer.resume", ownership.TRAIN_RUN_KEYS)
    assert str(err.value) == (
        f"trainer.resume=auto: this config differs from the run's in {run_dir} in what makes "
        "the run (run.seed 1 -> 2, trainer.rollout_batch_size 8 -> 4); resume with the run's "
        "values (its config.yaml), choose another run name, or set "
        "trainer.resume_override=true to go on with these")
    assert (run_dir / "config.yaml").read_text() == first  # untouched
    # what does not make the run (more steps) resumes as before
    longer = _cfg(tmp_path, "run.seed=1", "trainer.max_steps=9", "trainer.resume=auto")
    assert open_run(longer, None, "auto", "trainer.resume", ownership.TRAIN_RUN_KEYS)[1] == (
        run_dir / "checkpoints" / "step-2")
    ownership.release_run(run_dir)
    assert (run_dir / "config.1.yaml").read_text() == first  # the history is kept
    second = (run_dir / "config.yaml").read_text()
    # the override goes on, saying what changed, and keeps the history
    forced = _cfg(tmp_path, "run.seed=2", "trainer.resume=auto", "trainer.resume_override=true")
    capsys.readouterr()
    open_run(forced, None, "auto", "trainer.resume", ownership.TRAIN_RUN_KEYS, True)
    ownership.release_run(run_dir)
    assert "trainer.resume_override=true: going on with run.seed 1 -> 2" in capsys.readouterr().out
    assert (run_dir / "config.1.yaml").read_text() == first
    assert (run_dir / "config.2.yaml").read_text() == second
    assert "seed: 2" in (run_dir / "config.yaml").read_text()


def test_a_record_over_the_size_limit_is_refused_in_training(tmp_path) -> None:
    from cpe_ray.errors import DataError
    from cpe_ray.run import _load_records

    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"persona": "a cook", "question": "q" * 2000}) + "\n")
    with pytest.raises(DataError, match=rf"{data}:1: the record is 2,\d+ bytes, over "
                                        r"data.max_record_bytes \(1,000\)"):
        _load_records(_cfg(tmp_path, f"data.train_path={data}", "data.max_record_bytes=1000"))


def test_max_prompt_length_below_the_system_turn_is_refused(tmp_path) -> None:
    from cpe_ray.run import _check_prompt_room, _load_records

    cfg = _cfg(tmp_path, "rollout.max_prompt_length=1")
    with pytest.raises(ConfigError, match=r"rollout.max_prompt_length=1 cannot hold the "
                                          r"policy's prompt before its question: (\d+) tokens"):
        _check_prompt_room(cfg, _load_records(cfg))
    _check_prompt_room(_cfg(tmp_path), _load_records(cfg))  # the default fits
