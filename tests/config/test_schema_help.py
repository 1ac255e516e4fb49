"""The config reads itself: each key's help (the docstring under its schema field) is in
`conf/default.yaml`, removed keys warn, and a built config cannot be changed."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from pathlib import Path

import pytest

from cpe_ray.cli import main
from cpe_ray.config import PPOConfig, load_config, schema_help
from cpe_ray.config.schema import REMOVED_KEYS
from cpe_ray.paths import CONF_DIR


def test_default_yaml_is_what_cpe_ray_config_writes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config"]) == 0
    written = capsys.readouterr().out
    assert (CONF_DIR / "default.yaml").read_text(encoding="utf-8") == written, (
        "conf/default.yaml is stale: regenerate it with cpe-ray config > conf/default.yaml")
    lines = written.splitlines()
    at = 0
    for key, help_ in schema_help().items():
        assert help_, f"{key} has no docstring under its field in cpe_ray/config/schema*.py"
        depth, name = key.count("."), key.rsplit(".", 1)[-1]
        at = next(i for i in range(at, len(lines))
                  if lines[i].startswith("  " * depth + name + ":"))
        above = []
        for line in reversed(lines[:at]):
            if not line.lstrip().startswith("#"):
                break
            above.insert(0, line.lstrip()[2:])
        assert " ".join(above).startswith(help_), (key, above)


def test_help_is_one_line_and_removed_keys_are_gone() -> None:
    helps = schema_help()
    assert helps["ppo.kl_coef"].startswith("Weight of the KL to the reference model")
    assert helps["sft.eval_every"] == helps["rm.eval_every"]  # inherited from StageTrainConfig
    assert all(len(h) <= 92 for h in helps.values()), [k for k, h in helps.items() if len(h) > 92]
    assert set(REMOVED_KEYS).isdisjoint(helps)


def test_a_removed_key_is_one_warning_line(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    old = tmp_path / "old.yaml"
    old.write_text("logging:\n  log_every: 5\n  project: p\n", encoding="utf-8")
    assert load_config(old).logging.project == "p"
    assert capsys.readouterr().err.splitlines() == [
        f"cpe-ray: warning: logging.log_every in {old} is no longer a setting (every step is "
        "logged); it is ignored, delete it"]


def test_a_config_is_frozen() -> None:
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError, match=(
            r"cannot set PPOConfig\.epochs: a config is frozen once built; make a new one with "
            r"dataclasses\.replace\(\.\.\.\) or load_config\(path, overrides\)")):
        cfg.ppo.epochs = 3
    with pytest.raises(dataclasses.FrozenInstanceError, match=r"cannot set Config\.ppo"):
        cfg.ppo = PPOConfig()
    with pytest.raises(dataclasses.FrozenInstanceError, match=r"cannot delete RunConfig\.seed"):
        del cfg.run.seed
    changed = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, epochs=3))
    assert (changed.ppo.epochs, cfg.ppo.epochs) == (3, 1)
    assert pickle.loads(pickle.dumps(cfg)) == cfg == copy.deepcopy(cfg)  # how Ray ships it
