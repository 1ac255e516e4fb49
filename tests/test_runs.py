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
from cpe_ray.runs import (
    MANIFEST,
    POLICY_DIR,
    checkpoints,
    find_resume,
    open_run,
    verify_checkpoint,
    wait_reachable,
    write_checkpoint,
)
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
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]
    # the same directory, now empty but for config.yaml, opens without the flag
    assert open_run(_cfg(tmp_path), None, "never", "trainer.resume") == (run_dir, None)


def test_output_dir_that_is_a_file_is_one_line(tmp_path) -> None:
    (tmp_path / "afile").write_text("")
    with pytest.raises(RunIOError, match=f"{tmp_path}/afile is a file, not a directory"):
        open_run(_cfg(tmp_path / "afile"), None, "never", "trainer.resume")


def test_unreachable_cluster_address_is_one_line_within_the_timeout() -> None:
    start = time.monotonic()
    with pytest.raises(CpeError, match=r"cluster.address=127.0.0.1:1: no Ray cluster answered "
                                       r"within 2 s \(connection refused\)"):
        wait_reachable("127.0.0.1:1", 2.0)
    assert 2 <= time.monotonic() - start < 4
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
