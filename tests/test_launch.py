"""The launch kit: cluster YAML against Ray's schema, runtime env, Dockerfile vs pyproject,
the submit helper's failure paths, and `ray job submit` end to end against a local head."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from launch import submit

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "launch" / "cluster.yaml"
RUNTIME_ENV_YAML = REPO / "launch" / "runtime_env.yaml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
SECRET_NAME = re.compile(r"API_KEY|SECRET|PASSWORD|CREDENTIAL|(^|_)TOKEN($|_)", re.I)


def _strings(node):
    if isinstance(node, dict):
        for k, v in node.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


# ------------------------------------------------------------------ cluster.yaml


def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _validate_cluster(config: dict) -> dict:
    """What `ray up` does before contacting the cloud: schema, defaults, then Ray's checks."""
    jsonschema = pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(config, _ray_schema())  # the file as written, not only once filled
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)  # schema again on the merged config, plus cross-field rules
    return prepared


def test_cluster_yaml_is_valid_for_rays_cluster_launcher():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    prepared = _validate_cluster(config)
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    workers = {k: v for k, v in types.items() if k != prepared["head_node_type"]}
    assert head["resources"].get("GPU", 0) == 0, "the head carries no GPUs"
    assert workers and all(w["resources"]["GPU"] == 8 for w in workers.values())
    assert sum(w["min_workers"] for w in workers.values()) * 8 >= 10, (
        "the 7B experiment needs 10 GPUs up before its placement times out")
    assert config["provider"]["type"] == "aws"
    assert config["docker"]["image"] and config["docker"]["container_name"]
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("$RAY_HEAD_IP" in c for c in config["worker_start_ray_commands"])


@pytest.mark.parametrize("break_it", [
    lambda c: c.update(unknown_top_level_key=1),
    lambda c: c["docker"].update(imagee="typo"),
    lambda c: c["available_node_types"]["gpu_worker_8x"].update(resources={"GPU": "8"}),
    lambda c: c["available_node_types"]["gpu_worker_8x"].pop("node_config"),
    lambda c: c.update(head_node_type="no_such_type"),
    lambda c: c.update(max_workers=1),  # below the sum of min_workers
    lambda c: c["auth"].update(password="x"),
])
def test_cluster_yaml_check_rejects_broken_configs(break_it):
    """The validation above is live: each of these edits makes it fail."""
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    break_it(config)
    with pytest.raises(Exception):  # noqa: B017 - jsonschema.ValidationError or ValueError
        _validate_cluster(config)


def test_cluster_yaml_ships_no_secrets():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    assert config.get("file_mounts") == {}
    for text in _strings(config):
        for name in re.findall(r"\b([A-Za-z_]\w*)=", text):
            assert not SECRET_NAME.search(name), text


# ------------------------------------------------------------------ runtime_env.yaml


def test_runtime_env_is_a_valid_ray_runtime_env():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(RUNTIME_ENV_YAML.read_text())
    assert set(env) == {"excludes", "env_vars"}  # working_dir comes from the command line
    RuntimeEnv(**env)  # Ray's own type checks (List[str] excludes, Dict[str, str] env_vars)
    env_vars = env["env_vars"]
    assert env_vars["TOKENIZERS_PARALLELISM"] == "false"
    assert env_vars["NCCL_CUMEM_ENABLE"] == "0"
    for name, value in env_vars.items():
        assert not SECRET_NAME.search(name), f"{name}: keys come from the cluster's environment"
        # Ray turns an unset ${VAR} into "", and wandb refuses WANDB_MODE="".
        assert "$" not in value, f"{name}={value}"
    assert "PYTORCH_CUDA_ALLOC_CONF" not in env_vars  # vLLM's sleep mode refuses expandable


def _shipped_files() -> dict[str, int]:
    """What Ray would zip for --working-dir REPO with our excludes (ignoring .gitignore)."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    excludes = yaml.safe_load(RUNTIME_ENV_YAML.read_text())["excludes"]
    files: dict[str, int] = {}

    def handler(path: Path) -> None:
        if path.is_file():
            files[path.relative_to(REPO).as_posix()] = path.stat().st_size

    _dir_travel(REPO, [_get_excludes(REPO, excludes)], handler, include_gitignore=False)
    return files


def test_working_dir_upload_is_small_and_complete():
    files = _shipped_files()
    total = sum(files.values())
    assert total < 20 * 2**20, f"{total / 2**20:.1f} MiB shipped; Ray warns at 256, fails at 512"
    for needed in ("launch/train.py", "launch/submit.py", "cpe_ray/run.py", "actors/learner.py",
                   "conf/default.yaml", "conf/prompts/grm_en.txt", "data/demo/train.jsonl",
                   "pyproject.toml"):
        assert needed in files, needed
    for path in files:
        top = path.split("/", 1)[0]
        assert top not in {".git", ".venv", ".ci-venv", "outputs", "wandb", ".hypothesis",
                           ".pytest_cache", ".ruff_cache"}, path
        assert "__pycache__" not in path and not path.endswith((".pyc", ".safetensors")), path
    tracked = _git_tracked()
    if tracked is not None:  # everything under version control ships
        missing = sorted(t for t in tracked if (REPO / t).is_file() and t not in files)
        assert not missing, missing


def _git_tracked() -> list[str] | None:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        return None
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    return out.stdout.split() if out.returncode == 0 else None


# ------------------------------------------------------------------ Dockerfile


# From each vllm release's wheel metadata (Requires-Dist, Requires-Python) and the CUDA build
# of that torch on PyPI. Bumping the vllm extra means reading the new wheel's metadata and
# adding a row; where vllm is installed, its metadata is used instead.
VLLM_NEEDS = {"0.33.0": {"torch": "2.14.0", "cuda_major": 13, "python": ">=3.11,<3.15"}}
UBUNTU_PYTHON = {"22.04": "3.10", "24.04": "3.12"}


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _vllm_needs(version: str) -> dict | None:
    from importlib import metadata

    from packaging.requirements import Requirement

    try:
        if metadata.version("vllm") == version:
            torch_req = next(Requirement(r) for r in metadata.requires("vllm") or ()
                             if Requirement(r).name == "torch" and not Requirement(r).marker)
            pinned = next(s.version for s in torch_req.specifier if s.operator == "==")
            known = VLLM_NEEDS.get(version, {})
            return {"torch": pinned, "cuda_major": known.get("cuda_major"),
                    "python": metadata.metadata("vllm")["Requires-Python"]}
    except (metadata.PackageNotFoundError, StopIteration):
        pass
    return VLLM_NEEDS.get(version)


def dockerfile_problems(text: str, pyproject: dict) -> list[str]:
    """Inconsistencies between the Dockerfile and pyproject.toml (empty when consistent)."""
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    problems: list[str] = []
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M))
    deps = {Requirement(d).name: Requirement(d) for d in pyproject["project"]["dependencies"]}
    extras = pyproject["project"]["optional-dependencies"]
    run_lines = [" ".join(m.split()) for m in
                 re.findall(r"^RUN\s+((?:.*\\\n)*.*)$", text, re.M)]

    def line_index(pattern: str) -> int:
        return next((i for i, line in enumerate(run_lines) if re.search(pattern, line)), -1)

    for name in ("TORCH_VERSION", "VLLM_VERSION", "DEEPSPEED_VERSION", "RAY_VERSION"):
        if name not in args:
            problems.append(f"no ARG {name}=<version> pin")
    if problems:
        return problems
    vllm_pin = next(Requirement(r) for r in extras["vllm"] if Requirement(r).name == "vllm")
    if str(vllm_pin.specifier) != f"=={args['VLLM_VERSION']}":
        problems.append(f"VLLM_VERSION={args['VLLM_VERSION']} but pyproject's vllm extra is "
                        f"{vllm_pin.specifier}")
    needs = _vllm_needs(args["VLLM_VERSION"])
    if needs is None:
        problems.append(f"vllm {args['VLLM_VERSION']}: unknown torch/CUDA needs; add a row to "
                        "VLLM_NEEDS from its wheel metadata")
    else:
        if args["TORCH_VERSION"] != needs["torch"]:
            problems.append(f"TORCH_VERSION={args['TORCH_VERSION']} but vllm "
                            f"{args['VLLM_VERSION']} pins torch=={needs['torch']}")
        cuda = re.search(r"nvidia/cuda:(\d+)\.", args.get("CUDA_IMAGE", ""))
        if not cuda or (needs["cuda_major"] and int(cuda.group(1)) != needs["cuda_major"]):
            problems.append(f"CUDA_IMAGE={args.get('CUDA_IMAGE')} is not a CUDA "
                            f"{needs['cuda_major']}.x nvidia/cuda image (torch "
                            f"{needs['torch']}'s wheel is built for it)")
        ubuntu = re.search(r"ubuntu(\d+\.\d+)", args.get("CUDA_IMAGE", ""))
        python = UBUNTU_PYTHON.get(ubuntu.group(1)) if ubuntu else None
        for spec, who in ((needs["python"], "vllm"),
                          (pyproject["project"]["requires-python"], "cpe-ray")):
            if python is None or Version(python) not in SpecifierSet(spec):
                problems.append(f"the base image's Python {python} is outside {who}'s {spec}")
    for name, arg in (("torch", "TORCH_VERSION"), ("deepspeed", "DEEPSPEED_VERSION"),
                      ("ray", "RAY_VERSION")):
        if Version(args[arg]) not in deps[name].specifier:
            problems.append(f"{arg}={args[arg]} is outside pyproject's {deps[name]}")
    if "default" not in deps["ray"].extras:
        problems.append("pyproject's ray lacks the [default] extra (dashboard, Jobs API)")
    torch_at = line_index(r'pip install "torch==\$\{TORCH_VERSION\}"')
    ds_at = line_index(r'pip install --no-build-isolation "deepspeed==\$\{DEEPSPEED_VERSION\}"')
    vllm_at = line_index(r'"vllm==\$\{VLLM_VERSION\}"')
    ray_at = line_index(r'"ray\[default\]==\$\{RAY_VERSION\}"')
    project_at = line_index(r'pip install -e "\.\[([\w,]*vllm[\w,]*)\]"')
    if torch_at < 0:
        problems.append('torch is not installed as "torch==${TORCH_VERSION}"')
    if ds_at < 0:
        problems.append("DeepSpeed is not installed with --no-build-isolation at its pin")
    elif torch_at >= 0 and ds_at < torch_at:
        problems.append("DeepSpeed is installed before torch (its build imports torch)")
    if vllm_at < 0 or ray_at < 0:
        problems.append("vllm / ray[default] are not installed at their pins")
    if project_at < 0:
        problems.append('the project is not installed with its vllm extra (pip install -e ".[vllm]")')
    if "wandb" not in deps and not re.search(r"pip install .*\bwandb\b", text):
        problems.append("wandb is installed neither by pyproject nor by the Dockerfile")
    if not re.search(r"^WORKDIR\s+/workspace/cpe-ray\s*$", text, re.M):
        problems.append("WORKDIR is not /workspace/cpe-ray")
    return problems


def test_dockerfile_is_consistent_with_pyproject():
    assert dockerfile_problems(DOCKERFILE.read_text(), _pyproject()) == []


@pytest.mark.parametrize("old,new,expect", [
    ("ARG VLLM_VERSION=0.33.0", "ARG VLLM_VERSION=0.32.0", "pyproject's vllm extra"),
    ("ARG TORCH_VERSION=2.14.0", "ARG TORCH_VERSION=2.13.0", "pins torch"),
    ("ARG DEEPSPEED_VERSION=0.19.8", "ARG DEEPSPEED_VERSION=0.16.0", "outside pyproject"),
    ("cuda:13.0.0-devel", "cuda:12.8.1-devel", "CUDA 13.x"),
    ("ubuntu24.04", "ubuntu22.04", "Python 3.10 is outside vllm"),
    ('-e ".[vllm]"', '-e "."', "vllm extra"),
    ("--no-build-isolation ", "", "--no-build-isolation"),
    ("WORKDIR /workspace/cpe-ray", "WORKDIR /app", "WORKDIR"),
])
def test_dockerfile_check_catches_drift(old, new, expect):
    text = DOCKERFILE.read_text()
    assert old in text
    problems = dockerfile_problems(text.replace(old, new), _pyproject())
    assert any(expect in p for p in problems), problems


def test_dockerignore_keeps_the_context_small():
    patterns = {line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", ".ci-venv", "outputs", "wandb"} <= patterns
    for needed in ("cpe_ray", "actors", "launch", "conf", "data", "tests", "pyproject.toml"):
        assert needed not in patterns


# ------------------------------------------------------------------ launch.train as a job


def test_train_joins_the_jobs_cluster_only_as_a_job_driver():
    from cpe_ray.config import load_config
    from cpe_ray.runs.ray_join import JOB_DRIVER_ENV, ray_address

    job = {JOB_DRIVER_ENV: "{}", "RAY_ADDRESS": "127.0.0.1:6379"}
    assert ray_address(load_config(None, []), job) == "auto"
    # A RAY_ADDRESS in the user's shell is not a job: `cpe-ray train` starts its own Ray.
    assert ray_address(load_config(None, []), {"RAY_ADDRESS": "http://h:8265"}) is None
    # The config's own address wins, in a job or not.
    exp = load_config(REPO / "conf/experiment/qwen2.5-7b-cpe.yaml", [])
    assert ray_address(exp, {}) == "auto"
    assert ray_address(load_config(None, ["cluster.address=ray://h:10001"]), job) == (
        "ray://h:10001")


# ------------------------------------------------------------------ the submit helper


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_submit_rejects_a_bad_config_before_contacting_the_cluster(monkeypatch, capsys):
    def no_contact(*_a, **_k):
        raise AssertionError("contacted the cluster")

    monkeypatch.setattr(submit, "check_reachable", no_contact)
    monkeypatch.setattr(submit, "connect", no_contact)
    code = submit.main(["--address", "http://127.0.0.1:1", "ppo.kl_coeff=0.1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("cpe-ray: error: unknown key 'ppo.kl_coeff'")
    assert "did you mean 'ppo.kl_coef'" in err


def test_submit_rejects_a_config_outside_the_repository(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(submit, "connect", lambda *_: pytest.fail("contacted the cluster"))
    outside = tmp_path / "exp.yaml"
    outside.write_text("trainer:\n  max_steps: 1\n")
    assert submit.main(["--config", str(outside)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "outside the repository" in err and "conf/" in err


def test_submit_names_an_unreachable_address_in_one_line():
    """A real process, so that nothing (imports, Ray's client) leaks a traceback."""
    (port,) = _free_ports(1)  # closed again: nothing listens there
    address = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",
                                                           "RAY_API_SERVER_ADDRESS")}
    out = subprocess.run([sys.executable, "-m", "launch.submit", "--address", address,
                          "trainer.max_steps=1"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith("cpe-ray: error: cannot reach the Ray dashboard at " + address)
    assert "ray start --head" in lines[0] and "ray up launch/cluster.yaml" in lines[0]


def test_submit_address_and_entrypoint():
    assert submit.resolve_address(None, {}) == submit.DEFAULT_ADDRESS
    assert submit.resolve_address("10.0.0.5:8265", {}) == "http://10.0.0.5:8265"
    env = {"RAY_ADDRESS": "http://h:8265"}
    assert submit.resolve_address(None, env) == "http://h:8265"
    assert submit.resolve_address("http://x:1/", env) == "http://x:1"  # the flag wins
    assert submit.resolve_address(None, {"RAY_ADDRESS": "10.0.0.5:6379"}) == (
        submit.DEFAULT_ADDRESS)  # a GCS address is not the jobs API
    with pytest.raises(submit.CpeError, match="dashboard"):
        submit.resolve_address("ray://h:10001", {})
    assert submit.entrypoint("conf/x y.yaml", ["run.name=a b"]) == (
        "python -m launch.train --config 'conf/x y.yaml' 'run.name=a b'")
    assert submit.entrypoint(None, ["sft.max_steps=1"], "sft") == (
        "python -m launch.sft sft.max_steps=1")
    assert submit.entrypoint(None, [], "grm-train") == "python -m launch.grm train"
    assert submit.entrypoint(None, [], "rm-train") == "python -m launch.rm train"
    for stage, entry in submit.ENTRYPOINTS.items():  # each names a module that exists
        assert (REPO / (entry[2].replace(".", "/") + ".py")).is_file(), stage
    env = submit.runtime_env()
    assert env["working_dir"] == str(REPO) and ".venv/" in env["excludes"]


def test_submit_joins_the_cluster_and_warns_about_relative_outputs():
    from cpe_ray.config import load_config

    overrides, notes = submit.job_overrides(load_config(None, []), [])
    assert overrides == ["cluster.address=auto"] and len(notes) == 2
    cfg = load_config("conf/experiment/qwen2.5-7b-cpe.yaml", [])
    assert submit.job_overrides(cfg, ["x=1"]) == (["x=1"], [])


# ------------------------------------------------------------------ end to end


class LocalHead:
    """`ray start --head` with the dashboard, in its own session, temp dir and ports.

    Torn down by killing the processes of that session (by pid): `ray stop` would end every
    Ray on the machine, including other people's.
    """

    PORT_FLAGS = ("port", "dashboard-port", "dashboard-agent-listen-port",
                  "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
                  "ray-client-server-port", "node-manager-port", "object-manager-port")

    def __init__(self, work: Path) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="cpe", dir="/tmp")  # sockets: <= 107 chars
        token = work / "ray_token"
        token.write_text(secrets.token_hex(32))
        bin_dir = str(Path(sys.executable).parent)
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        self.env.update(
            PATH=bin_dir + os.pathsep + self.env.get("PATH", ""),  # `python` in the entrypoint
            RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),  # Ray's default for heads
            CPE_RAY_CACHE=str(work / "cache"),  # the job's driver builds the tiny model here
        )
        self.ports = dict(zip(self.PORT_FLAGS, _free_ports(len(self.PORT_FLAGS)), strict=True))
        self.address = f"http://127.0.0.1:{self.ports['dashboard-port']}"
        self.sid: int | None = None

    def start(self) -> None:
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--num-cpus=4",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1",
               f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
               "--object-store-memory=500000000",
               *(f"--{flag}={port}" for flag, port in self.ports.items())]
        proc = subprocess.Popen(cmd, env=self.env, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.sid = proc.pid  # a new session: every process of this Ray inherits its id
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out[-3000:]

    def stop(self) -> None:
        import psutil

        if self.sid is not None:
            def ours() -> list[psutil.Process]:
                found = []
                for p in psutil.process_iter():
                    try:
                        if os.getsid(p.pid) == self.sid and p.status() != psutil.STATUS_ZOMBIE:
                            found.append(p)
                    except (OSError, psutil.Error):
                        continue
                return found

            gone = contextlib.suppress(OSError, psutil.Error)
            procs = ours()
            for p in procs:
                with gone:
                    p.send_signal(signal.SIGTERM)
            _, alive = psutil.wait_procs(procs, timeout=5)
            for p in alive + ours():
                with gone:
                    p.kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def local_head(tmp_path):
    head = LocalHead(tmp_path)
    try:
        head.start()
        yield head
    finally:
        head.stop()


def _check_run(out_dir: Path, log: str) -> None:
    run = out_dir / "cpe-tiny"
    metrics = (run / "metrics.jsonl").read_text().splitlines() if run.exists() else []
    assert len(metrics) == 1, log[-4000:]
    ckpt = run / "checkpoints" / "step-1"
    assert (ckpt / "trainer_state.json").is_file(), log[-4000:]
    assert (ckpt / "policy" / "config.json").is_file()


@pytest.mark.slow
def test_ray_job_submit_end_to_end(local_head, tmp_path):
    t0 = time.monotonic()
    # 1. The helper, with the defaults' cluster.address unset: it must join the job's cluster.
    out1 = tmp_path / "out-helper"
    helper = subprocess.run(
        [sys.executable, "-m", "launch.submit", "--address", local_head.address,
         "trainer.max_steps=1", f"run.output_dir={out1}", "logging.wandb_mode=offline"],
        cwd=REPO, env=local_head.env, capture_output=True, text=True, timeout=480)
    log = helper.stdout + helper.stderr
    assert helper.returncode == 0, log[-4000:]
    assert "SUCCEEDED" in helper.stdout and "ray job logs -f raysubmit_" in helper.stdout
    _check_run(out1, log)
    t1 = time.monotonic()
    # 2. Plain `ray job submit`, docs/gpus.md's command, without cluster.address: launch.train
    #    itself must join the job's cluster rather than start a Ray of its own.
    out2 = tmp_path / "out-cli"
    cli = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit",
         "--address", local_head.address, "--working-dir", str(REPO),
         "--runtime-env", str(RUNTIME_ENV_YAML), "--",
         "python", "-m", "launch.train", "trainer.max_steps=1", f"run.output_dir={out2}",
         "logging.wandb_mode=offline"],
        cwd=REPO, env=local_head.env, capture_output=True, text=True, timeout=480)
    log = cli.stdout + cli.stderr
    assert cli.returncode == 0, log[-4000:]
    assert "Started a local Ray instance" not in log
    _check_run(out2, log)
    t2 = time.monotonic()
    # 3. The helper with --stage: stage 1 (SFT) as a job, its checkpoint on the same disk.
    out3 = tmp_path / "out-sft"
    sft = subprocess.run(
        [sys.executable, "-m", "launch.submit", "--address", local_head.address,
         "--stage", "sft", "sft.max_steps=1", f"run.output_dir={out3}",
         "logging.wandb_mode=disabled"],
        cwd=REPO, env=local_head.env, capture_output=True, text=True, timeout=480)
    log = sft.stdout + sft.stderr
    assert sft.returncode == 0, log[-4000:]
    assert "python -m launch.sft sft.max_steps=1" in sft.stdout
    summary = json.loads((out3 / "sft-tiny" / "summary.json").read_text())
    assert summary["stage"] == "sft" and summary["steps"] == 1, summary
    assert (out3 / "sft-tiny" / "checkpoints" / "step-1" / "policy" / "config.json").is_file()
    print(f"\nray job submit end to end: helper {t1 - t0:.1f} s, ray job submit CLI "
          f"{t2 - t1:.1f} s, helper --stage sft {time.monotonic() - t2:.1f} s")
