"""What an actor would fail on in its `__init__` is checked before Ray starts, in one line; what
still dies in an actor brings its exception's line (issue #21, item 5)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from cpe_ray.config import load_config
from cpe_ray.errors import ConfigError, CpeError, TemplateError
from cpe_ray.runtime.start import check_startup

NO_VLLM = "the vllm backend needs vLLM: on GPUs pip install -e '.[vllm]', on a CPU bash " \
          "launch/install.sh --vllm"


@pytest.mark.parametrize("overrides, error, expected", [
    (["policy.system_template=/nonexistent/sys.txt"], TemplateError,
     "prompt template '/nonexistent/sys.txt' not found"),
    (["policy.system_template=edit_en.txt"], TemplateError, "uses unknown placeholder"),
    (["post_edit.template=/nonexistent/edit.txt"], TemplateError,
     "prompt template '/nonexistent/edit.txt' not found"),
    (["post_edit.template=policy_system_en.txt"], TemplateError,
     "lacks required placeholder"),
    (["grm.backend=hf", "grm.model_path=tiny", "grm.template=/nonexistent/grm.txt"],
     TemplateError, "prompt template '/nonexistent/grm.txt' not found"),
    (["policy.model_path=/nonexistent/policy"], ConfigError,
     "policy.model_path: model path /nonexistent/policy does not exist"),
    (["grm.backend=hf", "grm.model_path=/nonexistent/grm"], ConfigError,
     "grm.model_path: model path /nonexistent/grm does not exist"),
    (["ppo.advantage_estimator=gae", "learner.critic_model_path=/nonexistent/critic"],
     ConfigError, "learner.critic_model_path: model path /nonexistent/critic does not exist"),
])
def test_what_an_actor_loads_is_checked_first(overrides, error, expected) -> None:
    with pytest.raises(error, match=expected):
        check_startup(load_config(None, overrides))


def test_the_defaults_pass() -> None:
    check_startup(load_config(None, []))
    # a critic path is not looked at where no critic is trained
    check_startup(load_config(None, ["ppo.advantage_estimator=grpo",
                                     "learner.critic_model_path=/nonexistent/critic"]))


@pytest.mark.parametrize("overrides, key", [
    (["rollout.backend=vllm"], "rollout.backend"),
    (["grm.backend=vllm", "grm.model_path=tiny"], "grm.backend"),
])
def test_a_vllm_backend_without_vllm_is_one_line(overrides, key, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # find_spec and import both fail on it
    with pytest.raises(ConfigError) as err:
        check_startup(load_config(None, overrides))
    assert str(err.value).startswith(f"{key}=vllm: {NO_VLLM}")


def _hide_vllm(tmp_path) -> dict[str, str]:
    """An environment in which no process (the CLI, Ray's workers) can import vLLM."""
    import os

    site = tmp_path / "no_vllm"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['vllm'] = None\n")
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


@pytest.mark.parametrize("override, expected", [
    ("policy.system_template=/nonexistent/sys.txt",
     "prompt template '/nonexistent/sys.txt' not found"),
    ("post_edit.template=/nonexistent/edit.txt",
     "prompt template '/nonexistent/edit.txt' not found"),
    ("rollout.backend=vllm", f"rollout.backend=vllm: {NO_VLLM}"),
])
def test_train_ends_in_one_line_before_ray(override, expected, tmp_path) -> None:
    """Each of these ended, 12-22 s after Ray started, as 'rollout engine 0 died
    (ActorDiedError)', the cause only in Ray's worker logs."""
    env = _hide_vllm(tmp_path) if "vllm" in override else None
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "cpe_ray", "train", "trainer.max_steps=1",
         f"run.output_dir={tmp_path / 'runs'}", override],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cpe-ray: error:") and expected in lines[0]
    assert "Ray" not in proc.stderr + proc.stdout  # nothing started
    assert not (tmp_path / "runs").exists()  # nor any run directory written
    assert time.monotonic() - start < 60


def test_what_still_dies_in_an_actor_names_its_cause(local_ray) -> None:
    """Past the checks (here skipped), a rollout engine whose `__init__` fails ends start-up
    with the line of what it raised, not only that it died."""
    from cpe_ray.runtime.start import start_runtime

    cfg = load_config(None, ["post_edit.template=/nonexistent/edit.txt",
                             "cluster.placement_timeout_s=30"])
    with pytest.raises(CpeError, match=r"^engine start-up: rollout engine 0 died during "
                                       r"start-up: TemplateError: prompt template "
                                       r"'/nonexistent/edit.txt' not found"):
        start_runtime(cfg, with_learner=False)
