"""What every training job shares: its run directory, whole checkpoints, resume, joining Ray.

`cpe-ray train`, `sft`, `grm train` and `rm train` all write

    <run.output_dir>/<name>/config.yaml, metrics.jsonl, samples.jsonl, wandb/
    <run.output_dir>/<name>/checkpoints/step-N/{<model dir> (HF), state/, trainer_state.json,
                                                manifest.json}

A run directory belongs to one run. Opening one that holds another run's logs or checkpoints
is refused unless the job continues it (`<section>.resume=auto`) or replaces it
(`run.overwrite=true`), so two runs never mix in one `metrics.jsonl`.

A checkpoint is written into a hidden temporary directory, its `manifest.json` (the size and,
with `run.checkpoint_checksums`, the sha256 of every file) written last, and the directory is
renamed into place. It is *whole* when every file of its manifest is there with that size
(and checksum): `resume=auto` takes the newest whole one and says which newer ones it skipped
and why; temporary directories that a crash left behind are removed when a run opens.

A run directory is owned by one live process: `open_run` takes an exclusive `flock` on its
`.lock` before it writes anything, and the system drops the lock when that process ends,
however it ends. Resuming a run with a config that differs in what makes the run (its
`fixed` keys: the seed, the data, the batch shape, the models) is refused unless
`<resume key>_override` is set; `config.yaml` is always the current config, and each
earlier one is kept as `config.<n>.yaml` (1 the oldest).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from cpe_ray.config import Config, config_to_yaml, save_config
from cpe_ray.errors import (
    STOP_SIGNALS,
    ConfigError,
    CpeError,
    RunIOError,
    Stopped,
    describe_os_error,
    quiet_stop_signals,
)
from cpe_ray.paths import resolve_path, sha256_file

# Set by Ray's job supervisor for a job's driver only (not by `ray start`, not in a shell).
JOB_DRIVER_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
CKPT_PREFIX = "step-"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"  # written last: a checkpoint without one is not whole
MANIFEST_FORMAT = 1
STATE_DIR = "state"  # the full training state (DeepSpeed's files) inside a checkpoint
POLICY_DIR = "policy"  # the HF policy inside a checkpoint (`policy.model_path` takes it)
TMP_INFIX = ".tmp-"  # `.step-N.tmp-<id>`: a checkpoint being written
OLD_INFIX = ".old-"  # `.step-N.old-<id>`: a checkpoint being replaced by a new one
# What a run writes into its directory (config.yaml aside): what `run.overwrite` removes.
METRICS_FILE, SAMPLES_FILE = "metrics.jsonl", "samples.jsonl"
RUN_ARTIFACTS = (METRICS_FILE, SAMPLES_FILE, "checkpoints", "wandb", "summary.json")
# A checkpoint write that fails with less than this free on its file system ran out of space
# (DeepSpeed's torch.save then says "unexpected pos ...", not ENOSPC).
DISK_FULL_MARGIN_BYTES = 1024**2
MB = 1024**2
# Between attempts to reach cluster.address, and the longest one attempt waits: a signal is
# answered between attempts, so Ctrl-C and SIGTERM stop the wait within about this long.
CONNECT_RETRY_S = 1.0
LOCK_FILE = ".lock"  # flock'ed by the process that owns the run directory
CONFIG_FILE = "config.yaml"
CONFIG_HISTORY = re.compile(r"config\.(\d+)\.yaml")  # earlier configs of the run, 1 the oldest
# What makes a `cpe-ray train` run: resuming it with other values of these is refused unless
# trainer.resume_override (seed and data; batch shape; the models; what the state holds)
TRAIN_RUN_KEYS = (
    "run.seed", "data.train_path", "data.shuffle", "data.on_bad_record",
    "trainer.rollout_batch_size", "rollout.n_samples_per_prompt", "ppo.mini_batch_size",
    "ppo.mini_batch_unit", "policy.model_path", "learner.critic_model_path", "grm.backend",
    "grm.model_path", "ppo.advantage_estimator", "learner.use_reference",
    "trainer.off_policy_steps")


def note(message: str) -> None:
    """An informational line of ours (what resume chose, what was skipped, a restart)."""
    print(f"cpe-ray: {message}", flush=True)


# --------------------------------------------------------------------------- Ray


def ray_address(cfg: Config, environ: Mapping[str, str] = os.environ) -> str | None:
    """Where to run: `cluster.address`, else the job's cluster when this is a Ray job's driver
    (a driver that started a Ray of its own there could not run the job's actors: they
    inherit its runtime env, whose working dir lives in the outer cluster), else None: a
    fresh local Ray, whatever RAY_ADDRESS a user's shell holds."""
    if cfg.cluster.address:
        return cfg.cluster.address
    return "auto" if JOB_DRIVER_ENV in environ else None


def _host_port(address: str) -> tuple[str, int]:
    """(host, port) of host:port or ray://host:port; an IPv6 host is written [::1]:6379."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if not host or not port.isdigit() or (":" in host and not bracketed):
        raise ConfigError(f"cluster.address={address!r} is not host:port, ray://host:port or "
                          "auto (an IPv6 host in brackets: [::1]:6379)")
    return host.strip("[]"), int(port)


def _ray_answers(address: str, timeout_s: float) -> tuple[bool, str]:
    """(True, "") when Ray answers one gRPC call at `address` within `timeout_s` (its GCS for
    host:port, its client server for ray://), else (False, gRPC's status and detail)."""
    import grpc

    target = address.removeprefix("ray://")
    channel = grpc.insecure_channel(target)
    try:
        if address.startswith("ray://"):
            from ray.core.generated import ray_client_pb2 as client_pb
            from ray.core.generated import ray_client_pb2_grpc as client_grpc

            client_grpc.RayletDriverStub(channel).ClusterInfo(
                client_pb.ClusterInfoRequest(type=client_pb.ClusterInfoType.PING),
                timeout=timeout_s)
        else:
            from ray.core.generated import gcs_service_pb2 as gcs_pb
            from ray.core.generated import gcs_service_pb2_grpc as gcs_grpc

            gcs_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_pb.GetClusterIdRequest(), timeout=timeout_s)
    except grpc.RpcError as exc:
        code = exc.code()
        # a cluster with token authentication refuses us, but it is Ray that refuses
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return True, ""
        return False, f"{code.name.lower()}: {' '.join(str(exc.details()).split())[:200]}"
    finally:
        channel.close()
    return True, ""


def _not_http2(reason: str) -> bool:
    """gRPC's words for a server that answered in something other than HTTP/2 (an HTTP/1
    server, the dashboard): no Ray will come up behind it, so there is no point waiting."""
    return "parsing HTTP/2" in reason or "http1" in reason.lower()


def wait_reachable(address: str, timeout_s: float) -> None:
    """Until Ray answers at `address` (host:port of its GCS, or ray://host:port of its client
    server), at most `timeout_s`; else one line. The port must accept a connection and Ray
    must answer a gRPC call: `ray.init` against anything else that listens there (an HTTP
    server, the dashboard's port, a silent socket) retries forever inside C++, where neither
    Ctrl-C nor SIGTERM reaches it. Each attempt takes at most CONNECT_RETRY_S, so a signal
    stops the wait within about that long."""
    if address == "auto":
        return
    host, port = _host_port(address)
    hint = "(cluster.connect_timeout_s sets the wait)"
    deadline = time.monotonic() + timeout_s
    opened = False  # the port accepted a connection at least once
    while True:
        began = time.monotonic()
        attempt_s = max(min(deadline - began, CONNECT_RETRY_S), 0.1)
        try:
            with socket.create_connection((host, port), timeout=attempt_s):
                listening, reason = True, ""
        except OSError as exc:
            listening, reason = False, (exc.strerror or str(exc) or type(exc).__name__).lower()
        opened = opened or listening
        if listening and os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return  # a TLS cluster's certificates are Ray's business: the port has to do
        if listening:
            answered, reason = _ray_answers(address, attempt_s)
            if answered:
                return
            if _not_http2(reason) or "unimplemented" in reason:
                raise CpeError(f"cluster.address={address}: something listens there but it "
                               f"is not Ray ({reason}); give the address of Ray's GCS "
                               "(`ray start --head` prints it, port 6379 by default) or "
                               "ray://host:10001 for Ray Client")
        left = deadline - time.monotonic()
        if left <= 0:
            if opened:
                raise CpeError(f"cluster.address={address}: the port is open but no Ray "
                               f"answered within {timeout_s:g} s ({reason}); give the address "
                               f"of Ray's GCS (port 6379 by default) or ray://host:10001 {hint}")
            raise CpeError(
                f"cluster.address={address}: no Ray cluster answered within {timeout_s:g} s "
                f"({reason}); start it (ray start --head) or fix the address {hint}")
        time.sleep(max(min(began + CONNECT_RETRY_S - time.monotonic(), left), 0))


def check_cluster(cfg: Config) -> None:
    """That Ray answers at `cluster.address` (`wait_reachable`); a local Ray has nothing to
    check."""
    address = ray_address(cfg)
    if address:
        wait_reachable(address, cfg.cluster.connect_timeout_s)


def init_ray(cfg: Config) -> bool:
    """Connect to (or start) Ray unless this process already has; True if it did.

    A stop (Ctrl-C, SIGTERM, SIGHUP) or a failure half-way through `ray.init` ends the Ray
    processes it had started, and the caller's signal handlers are back afterwards (`ray.init`
    sets a SIGTERM handler of its own that exits without any cleanup)."""
    import ray

    if ray.is_initialized():
        return False
    check_cluster(cfg)
    address = ray_address(cfg)
    main = threading.current_thread() is threading.main_thread()
    handlers = {s: signal.getsignal(s) for s in STOP_SIGNALS} if main else {}
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
    except BaseException as exc:
        quiet_stop_signals()
        ray.shutdown()
        if isinstance(exc, SystemExit) and exc.code == signal.SIGTERM:  # Ray's handler
            raise Stopped(f"stopped by {STOP_SIGNALS[signal.SIGTERM]}",
                          128 + signal.SIGTERM) from None
        if isinstance(exc, ConnectionError):
            detail = " ".join(str(exc).split())[:300]
            raise CpeError(f"cluster.address={address}: could not join the Ray cluster "
                           f"({detail})") from None
        raise
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return True


def progress_bar(total: int, start: int, desc: str, progress: bool) -> Any:
    """A step counter on a terminal; none when output goes to a file or `ray job logs`
    (carriage-return redraws would fill the log), where each step's line still prints."""
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", desc=desc,
                disable=None if progress else True, dynamic_ncols=True)


# --------------------------------------------------------------------------- run directory


def run_dir_for(cfg: Config, name: str | None = None) -> Path:
    """`run.output_dir/<name>`; the name is `run.name` for `cpe-ray train`."""
    return Path(cfg.run.output_dir).expanduser() / (name or cfg.run.name)


def _dir_problem(run_dir: Path, exc: OSError) -> str:
    """Why `run_dir` cannot be used, naming the path at fault (a file in the way, ...)."""
    for parent in [run_dir, *run_dir.parents]:
        if parent.exists() and not parent.is_dir():
            return f"{parent} is a file, not a directory"
    return describe_os_error(exc, "cannot write", exc.filename or run_dir)


def describe_run(run_dir: Path) -> str | None:
    """What another run left in `run_dir` (logged steps, checkpoints), or None if nothing."""
    parts = []
    metrics = run_dir / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_size:
        with metrics.open("rb") as f:
            lines = sum(1 for line in f if line.strip())
        parts.append(f"{lines} logged step(s) in {METRICS_FILE}")
    found = sorted((run_dir / "checkpoints").glob(f"{CKPT_PREFIX}*"), key=_step_of)
    if found:
        parts.append(f"checkpoints {', '.join(p.name for p in found)}")
    if not parts and (run_dir / SAMPLES_FILE).is_file() and (run_dir / SAMPLES_FILE).stat(
            ).st_size:
        parts.append(f"a {SAMPLES_FILE}")
    return " and ".join(parts) or None


def clear_run(run_dir: Path) -> None:
    """Remove what a run wrote (`RUN_ARTIFACTS`, its earlier configs), for
    `run.overwrite=true`."""
    for name in RUN_ARTIFACTS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    for path in run_dir.glob("config.*.yaml"):
        if CONFIG_HISTORY.fullmatch(path.name):
            path.unlink()


_OWNED: dict[Path, int] = {}  # run directories this process holds the lock of: their fds


def own_run(run_dir: Path) -> bool:
    """Take `run_dir`'s lock for this process, True if it was not held yet; one line if
    another live process holds it. The system releases a flock when its process ends, kill -9
    included, so a lock is never stale; the file stays (removing it would race a process
    opening it)."""
    key = run_dir.resolve()
    if key in _OWNED:
        return False
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = " ".join(os.pread(fd, 4096, 0).decode("utf-8", "replace").split())
        os.close(fd)
        raise CpeError(f"{run_dir} is in use by another run ({holder or 'a process starting'}"
                       "); wait for it to end, or choose another run name") from None
    except OSError as exc:  # a file system without locks (some network mounts)
        os.close(fd)
        note(f"warning: {describe_os_error(exc, 'cannot lock', path)}; nothing stops a "
             "second run from writing into the same directory")
        return False
    _OWNED[key] = fd
    holder = (f"pid {os.getpid()} on {socket.gethostname()} since "
              f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n").encode()
    try:  # who holds it, for the line another process says; the lock does not need it
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder, 0)
    except OSError:
        pass  # a full disk: the next write (config.yaml) says so, naming its file
    return True


def release_run(run_dir: Path) -> None:
    """Give `run_dir`'s lock back (a process's end does it too)."""
    fd = _OWNED.pop(run_dir.resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the file releases its flock


def _value(tree: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, Mapping) or part not in tree:
            return _MISSING
        tree = tree[part]
    return tree


_MISSING = object()  # a key an older config.yaml does not have


def changed_run_keys(cfg: Config, saved: Path, keys: Sequence[str]) -> list[str]:
    """`key old -> new` for each of `keys` whose value in `cfg` differs from the config.yaml
    at `saved`; keys that file lacks (an older version's) are not compared."""
    try:
        old = yaml.safe_load(saved.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise RunIOError(f"{saved} is unreadable ({type(exc).__name__}), so a resume cannot "
                         "be checked against the run's config; restore or remove it") from None
    new = OmegaConf.to_container(OmegaConf.structured(cfg))
    changed = []
    for key in keys:
        before, now = _value(old, key), _value(new, key)
        if before is not _MISSING and before != now:
            changed.append(f"{key} {before} -> {now}")
    return changed


def _save_config(cfg: Config, run_dir: Path) -> str | None:
    """Write `config.yaml`; an earlier, different one is kept as `config.<n>.yaml` (its name
    returned)."""
    path = run_dir / CONFIG_FILE
    text = config_to_yaml(cfg)
    kept = None
    if path.is_file() and path.read_text(encoding="utf-8") != text:
        numbers = [int(m.group(1)) for p in run_dir.glob("config.*.yaml")
                   if (m := CONFIG_HISTORY.fullmatch(p.name))]
        kept = f"config.{max(numbers, default=0) + 1}.yaml"
        shutil.copyfile(path, run_dir / kept)
    try:
        save_config(cfg, path)
    except OSError as exc:
        exc.filename = exc.filename or str(path)
        raise
    return kept


def remove_partial(run_dir: Path) -> list[str]:
    """Remove checkpoint directories a crash left half-written or half-replaced."""
    removed = []
    for path in sorted((run_dir / "checkpoints").glob(f".{CKPT_PREFIX}*")):
        if TMP_INFIX in path.name or OLD_INFIX in path.name:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def _inside(path: Path, run_dir: Path) -> bool:
    try:
        path.resolve().relative_to(run_dir.resolve())
    except ValueError:
        return False
    return True


def open_run(cfg: Config, name: str | None, resume_mode: str, resume_key: str,
             fixed: Sequence[str] = (), override: bool = False) -> tuple[Path, Path | None]:
    """The run directory (created, locked for this process, with the resolved `config.yaml`)
    and the checkpoint to resume from (`resume_mode` is the config key `resume_key`), checked
    before Ray starts.

    A directory holding another run is refused unless this job continues it (resume=auto, or a
    checkpoint inside it) or replaces it (`run.overwrite=true`): one line saying which. One
    that another live process owns is refused whatever the settings. Continuing the run with
    other values of its `fixed` keys is refused unless `override` (`<resume_key>_override`)."""
    run_dir = run_dir_for(cfg, name)
    if cfg.run.overwrite and resume_mode != "never":
        raise ConfigError(f"run.overwrite=true starts {run_dir} afresh, {resume_key}="
                          f"{resume_mode} continues it; set one of them")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        taken = own_run(run_dir)  # before anything else is written or removed
    except OSError as exc:
        raise _run_io_error(run_dir, exc) from None
    try:
        return run_dir, _prepare_run(cfg, run_dir, resume_mode, resume_key, fixed, override)
    except OSError as exc:
        if taken:
            release_run(run_dir)
        raise _run_io_error(run_dir, exc) from None
    except BaseException:
        if taken:  # refused: the directory is free for the next try
            release_run(run_dir)
        raise


def _prepare_run(cfg: Config, run_dir: Path, resume_mode: str, resume_key: str,
                 fixed: Sequence[str], override: bool) -> Path | None:
    """`open_run` once the directory is ours: the checkpoint to resume from."""
    for name in remove_partial(run_dir):
        note(f"removed the partial checkpoint {run_dir / 'checkpoints' / name}")
    resume = find_resume(resume_mode, run_dir, resume_key, cfg.run.checkpoint_checksums)
    continues = resume_mode == "auto" or (resume is not None and _inside(resume, run_dir))
    held = None if continues else describe_run(run_dir)
    if held and not cfg.run.overwrite:
        raise ConfigError(
            f"{run_dir} holds another run ({held}); continue it with {resume_key}=auto, "
            "replace it with run.overwrite=true, or choose another run name")
    if held:
        note(f"run.overwrite=true: removing the previous run in {run_dir} ({held})")
        clear_run(run_dir)
    changed = changed_run_keys(cfg, run_dir / CONFIG_FILE, fixed) if (
        resume is not None and _inside(resume, run_dir)) else []
    if changed and not override:
        raise ConfigError(
            f"{resume_key}={resume_mode}: this config differs from the run's in {run_dir} in "
            f"what makes the run ({', '.join(changed)}); resume with the run's values (its "
            f"{CONFIG_FILE}), choose another run name, or set {resume_key}_override=true to "
            "go on with these")
    kept = _save_config(cfg, run_dir)
    if changed:
        note(f"{resume_key}_override=true: going on with {', '.join(changed)}; the run's "
             f"earlier config is kept as {run_dir / str(kept)}")
    return resume


def _run_io_error(run_dir: Path, exc: OSError) -> RunIOError:
    if exc.errno == errno.ENOSPC:
        return RunIOError(describe_os_error(exc, "writing") + "; free space there")
    return RunIOError(f"run directory {run_dir}: {_dir_problem(run_dir, exc)}; set "
                      "run.output_dir to a writable directory")


def is_due(done: int, total: int, every: int) -> bool:
    """Checkpoint (or evaluate) after `done` steps: at the last step, and every `every`
    steps when `every` > 0."""
    return done == total or bool(every and done % every == 0)


# --------------------------------------------------------------------------- checkpoints


def _step_of(path: Path) -> int:
    tail = path.name.removeprefix(CKPT_PREFIX)
    return int(tail) if tail.isdigit() else -1


def checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints that finished writing (they hold a manifest), oldest first. Whether each
    is still whole is `verify_checkpoint`'s question, asked on resume."""
    root = run_dir / "checkpoints"
    found = [p for p in root.glob(f"{CKPT_PREFIX}*")
             if _step_of(p) >= 0 and (p / MANIFEST).is_file()]
    return sorted(found, key=_step_of)


def _files(root: Path) -> Iterator[Path]:
    for dirpath, _, names in os.walk(root):
        for name in sorted(names):
            yield Path(dirpath, name)



def write_manifest(ckpt: Path, step: int, checksums: bool) -> dict[str, Any]:
    """`manifest.json`: every file under `ckpt` with its size (and sha256), fsynced."""
    files = {}
    for path in _files(ckpt):
        rel = path.relative_to(ckpt).as_posix()
        if rel == MANIFEST:
            continue
        entry: dict[str, Any] = {"bytes": path.stat().st_size}
        if checksums:
            entry["sha256"] = sha256_file(path)
        files[rel] = entry
    manifest = {"format": MANIFEST_FORMAT, "step": step, "files": files}
    _write_json(ckpt / MANIFEST, manifest)
    return manifest


def verify_checkpoint(ckpt: Path, checksums: bool = True) -> str | None:
    """Why `ckpt` is not whole (naming the file), or None. Sizes are always compared;
    checksums too when the manifest has them and `checksums` is set."""
    manifest_path = ckpt / MANIFEST
    if not manifest_path.is_file():
        return f"no {MANIFEST} (interrupted while written, or written before manifests)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        return f"{MANIFEST} is unreadable ({type(exc).__name__})"
    if TRAINER_STATE not in files:
        return f"{MANIFEST} lists no {TRAINER_STATE}"
    for rel, entry in sorted(files.items()):
        path = ckpt / rel
        if not path.is_file():
            return f"{rel} is missing"
        size = path.stat().st_size
        if size != entry.get("bytes"):
            return f"{rel} is {size} bytes, the manifest says {entry.get('bytes')}"
        if checksums and entry.get("sha256") and sha256_file(path) != entry["sha256"]:
            return f"{rel} does not match its sha256 in the manifest"
    try:
        state = read_trainer_state(ckpt)
    except CpeError as exc:
        return str(exc)
    if state["step"] != _step_of(ckpt):
        return f"{TRAINER_STATE} says step {state['step']}, the folder step {_step_of(ckpt)}"
    return None


def find_resume(mode: str, run_dir: Path, key: str, checksums: bool = True) -> Path | None:
    """The checkpoint `mode` ("never", "auto" or a path; the config key `key`) points to.
    "auto" takes the newest whole checkpoint of `run_dir` and says which it skipped and why."""
    if mode == "never":
        return None
    if mode == "auto":
        root = run_dir / "checkpoints"
        candidates = sorted((p for p in root.glob(f"{CKPT_PREFIX}*") if _step_of(p) >= 0),
                            key=_step_of, reverse=True)
        for ckpt in candidates:
            problem = verify_checkpoint(ckpt, checksums)
            if problem is None:
                note(f"{key}=auto: resuming from {ckpt} (step {_step_of(ckpt)})")
                return ckpt
            note(f"{key}=auto: skipped {ckpt}: {problem}")
        if candidates:
            note(f"{key}=auto: no whole checkpoint in {root}; starting at step 0")
        return None
    path = resolve_path(mode)
    problem = verify_checkpoint(path, checksums) if path.is_dir() else "no such directory"
    if problem is not None:
        raise ConfigError(f"{key}={mode}: {path} is not a whole checkpoint: {problem}; use "
                          "auto, never or a whole step-N directory")
    return path


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """`trainer_state.json` of a checkpoint; one line naming the file if it is damaged."""
    path = checkpoint / TRAINER_STATE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise CpeError(f"{path} is missing") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CpeError(f"{path} is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CpeError(f"{path} holds no integer 'step'")
    return state


def restore(learners: Any, checkpoint: Path, run_dir: Path | None = None
            ) -> tuple[int, str | None]:
    """Load `checkpoint`'s full training state into `learners` (a learner group); the step
    it was written at and its wandb run id, which only a checkpoint inside `run_dir` gives
    (one of another run starts a wandb run of this one, rather than rewinding that run's)."""
    state = read_trainer_state(checkpoint)
    learners.load_state(str(checkpoint / STATE_DIR))
    ours = run_dir is None or _inside(checkpoint, run_dir)
    return int(state["step"]), state.get("wandb_run_id") if ours else None


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    with path.open("w") as f:
        f.write(json.dumps(data) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _tree_bytes(root: Path) -> int:
    try:
        return sum(p.stat().st_size for p in _files(root))
    except OSError:
        return 0


def out_of_space(exc: BaseException, where: Path) -> bool:
    """Whether `exc` (or what caused it, through Ray's wrappers) is a full disk at `where`."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "no space left" in str(e).lower():
            return True
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    try:
        return shutil.disk_usage(where).free < DISK_FULL_MARGIN_BYTES
    except OSError:
        return False


def write_checkpoint(learners: Any, run_dir: Path, step: int, model_dir: str,
                     run_id: str | None, checksums: bool = True,
                     extra: Mapping[str, Any] | None = None,
                     resume_key: str = "trainer.resume",
                     files: Mapping[str, bytes] | None = None) -> Path:
    """`checkpoints/step-<step>`: `learners` (a learner group: PPO or supervised) exports its
    model in HF format to `<model_dir>/` and its full training state to `state/`, beside
    `trainer_state.json` (with `extra`) and `files` (name: bytes), and `manifest.json` last;
    all in a temporary directory renamed once complete. A failure removes the temporary
    directory; a full disk is one line saying so."""
    root = run_dir / "checkpoints"
    final = root / f"{CKPT_PREFIX}{step}"
    tag = uuid.uuid4().hex[:8]
    tmp = root / f".{final.name}{TMP_INFIX}{tag}"
    try:
        tmp.mkdir(parents=True)
        learners.export_hf(str(tmp / model_dir))
        learners.save_state(str(tmp / STATE_DIR))
        state = {"step": step, "wandb_run_id": run_id, "model_dir": model_dir, **(extra or {})}
        _write_json(tmp / TRAINER_STATE, state)
        for name, data in (files or {}).items():  # the trainer's own (e.g. batches in flight)
            (tmp / name).write_bytes(data)
        write_manifest(tmp, step, checksums)  # last: the proof that the rest is there
        if final.exists():  # a checkpoint of this step from before a resume: set it aside
            old = root / f".{final.name}{OLD_INFIX}{tag}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)  # atomic: a checkpoint either exists whole or not at all
    except BaseException as exc:
        written = _tree_bytes(tmp)
        full = out_of_space(exc, root)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise RunIOError(
                f"no space left on device writing checkpoint {final} ({written / MB:.1f} MB "
                f"written, removed again); free space there and resume with {resume_key}=auto"
            ) from None
        if isinstance(exc, OSError):
            raise RunIOError(describe_os_error(exc, f"writing checkpoint {final}: cannot write"
                                               )) from None
        raise
    return final


@dataclass
class SavePolicy:
    """When to checkpoint: every `every` steps, every `minutes` of training, and at the end."""

    every: int
    minutes: float
    last_save: float = 0.0  # time.monotonic() of the last checkpoint (or the start)

    def __post_init__(self) -> None:
        self.last_save = self.last_save or time.monotonic()

    def due(self, done: int, total: int) -> bool:
        late = self.minutes > 0 and time.monotonic() - self.last_save >= self.minutes * 60
        return late or is_due(done, total, self.every)

    def saved(self) -> None:
        self.last_save = time.monotonic()
