"""`cpe-ray merge`: models of one architecture merged into one HF model folder, on mergekit.

DARE-TIES, TIES, linear and SLERP (`MERGE_METHODS`), configured by the `merge:` section. Every
input is checked before a weight is read (`plan_merge`): the method's model count, the base,
each path (aliases, HF folders, checkpoints holding `policy/` or `grm/`), that every
config.json describes the same architecture and shapes, and the output folder. The merge
then runs through mergekit's Python API into a private sibling folder, gets the tokenizer,
generation config and config.json of its donor (the base model, else the first model) and a
`merge.json` recording what was merged, and is renamed into `run.output_dir/<merge.name>` in
one step. The result is a model path like any other: `policy.model_path`, `grm.model_path`,
`distill.model_path`.

DARE's drops are the only randomness: they draw from torch's global generator, which is
seeded with `merge.seed` (null: `run.seed`) for the merge and restored afterwards, so one
seed gives the same tensors, run after run.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpe_ray.config import Config
from cpe_ray.config.choices import Table
from cpe_ray.errors import ConfigError
from cpe_ray.models import resolve_model_path
from cpe_ray.paths import resolve_path
from cpe_ray.runs.layout import POLICY_DIR
from cpe_ray.runs.ownership import run_dir_for
from cpe_ray.tiny import atomic_build

MERGE_INFO = "merge.json"
CHECKPOINT_MODEL_DIRS = (POLICY_DIR, "grm")  # a checkpoint's HF model (sft / train, grm train)
# What must agree between the merged models' config.json, besides `architectures`: tensors
# are merged by name, so every shape must match.
SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
              "tie_word_embeddings")
# Copied from the donor model, so the result loads wherever a model path is taken.
DONOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
               "chat_template.jinja", "chat_template.json", "generation_config.json")
INSTALL_HINT = "pip install -e '.[merge]'"


@dataclass(frozen=True)
class MergeMethod:
    """A `merge.method`: mergekit's name for it and what it takes."""

    mergekit_name: str
    # merge.base_model: "separate" (required; the task vectors' origin, not in merge.models),
    # "among" (one of merge.models; null: the first) or "none"
    base: str
    min_models: int
    max_models: int | None = None
    uses_density: bool = False  # merge.models[*].density
    by_t: bool = False  # merge.t places the result (no weights, no normalize)


MERGE_METHODS: Table[MergeMethod] = Table("merge method")
MERGE_METHODS.register("dare_ties", MergeMethod("dare_ties", "separate", 1, uses_density=True))
MERGE_METHODS.register("ties", MergeMethod("ties", "separate", 1, uses_density=True))
MERGE_METHODS.register("linear", MergeMethod("linear", "none", 2))
MERGE_METHODS.register("slerp", MergeMethod("slerp", "among", 2, 2, by_t=True))


@dataclass(frozen=True)
class MergeInput:
    """One merged model: as configured, and the local folder it resolved to."""

    key: str  # the config key naming it, for error lines
    given: str
    folder: Path
    weight: float
    density: float


@dataclass(frozen=True)
class MergePlan:
    """Everything `run_merge` needs, checked: no weight has been read yet."""

    method: str
    models: tuple[MergeInput, ...]
    base: MergeInput | None  # ties / dare_ties: the task vectors' origin; slerp: the t=0 end
    seed: int
    output: Path


@dataclass(frozen=True)
class MergeResult:
    path: Path
    method: str
    seed: int
    seconds: float


def model_folder(path: str, key: str) -> Path:
    """A local HF model folder for a configured path: an alias, a folder, a checkpoint
    holding `policy/` or `grm/`, or a hub id already in the local hub cache."""
    if not path.strip():
        raise ConfigError(f"{key} is empty; give a model path or alias")
    local = resolve_path(path)
    if local.is_dir() and not (local / "config.json").is_file():
        for name in CHECKPOINT_MODEL_DIRS:
            if (local / name / "config.json").is_file():
                return local / name
    try:
        resolved = Path(resolve_model_path(path))
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    if resolved.is_dir():
        return resolved
    try:  # a hub id: only what the cache holds (nothing here downloads)
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, local_files_only=True))
    except Exception:  # any miss (not cached, not a repo id) is the same answer
        raise ConfigError(f"{key} = {path!r} is no local model folder, alias or cached hub "
                          "model; download it first and give its folder") from None


def _read_config(model: MergeInput) -> dict[str, Any]:
    try:
        return json.loads((model.folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{model.key}: cannot read {model.folder}/config.json ({exc})"
                          ) from None


def _check_same_architecture(models: list[MergeInput]) -> None:
    first, *rest = models
    ref = _read_config(first)
    for other in rest:
        cfg = _read_config(other)
        for key in ("architectures", *SHAPE_KEYS):
            if cfg.get(key) != ref.get(key):
                raise ConfigError(
                    f"{other.key} ({other.folder}) has {key} {cfg.get(key)}, {first.key} "
                    f"({first.folder}) {ref.get(key)}; merge only models of one architecture")
    for model in models:
        if not any(model.folder.glob("*.safetensors")) and not any(
                model.folder.glob("pytorch_model*.bin")):
            raise ConfigError(f"{model.key}: {model.folder} holds no weights (*.safetensors)")


def plan_merge(cfg: Config) -> MergePlan:
    """Check the `merge:` section and every model's config.json; one line on bad input."""
    m = cfg.merge
    method = MERGE_METHODS[m.method]
    count = len(m.models)
    if count < method.min_models or (method.max_models and count > method.max_models):
        wanted = (f"exactly {method.max_models}" if method.max_models == method.min_models
                  else f"at least {method.min_models}")
        raise ConfigError(f"merge.method={m.method} merges {wanted} model(s) of merge.models; "
                          f"it lists {count} (e.g. merge.models='[{{path: a}}, {{path: b}}]')")
    models: list[MergeInput] = []
    for i, entry in enumerate(m.models):
        key = f"merge.models[{i}]"
        if not math.isfinite(entry.weight):
            raise ConfigError(f"{key}.weight = {entry.weight} is not a finite number")
        if not 0 < entry.density <= 1:
            raise ConfigError(f"{key}.density = {entry.density} is outside (0, 1]")
        if method.by_t and entry.weight != 1.0:
            raise ConfigError(f"{key}.weight: merge.method={m.method} does not weigh models "
                              "(merge.t places the result); leave it out")
        if not method.uses_density and entry.density != 1.0:
            raise ConfigError(f"{key}.density: merge.method={m.method} keeps every weight; "
                              "leave it out, or use ties or dare_ties")
        folder = model_folder(entry.path, f"{key}.path")
        models.append(MergeInput(key, entry.path, folder, entry.weight, entry.density))
    seen: dict[Path, str] = {}
    for model in models:
        if model.folder.resolve() in seen:
            raise ConfigError(f"{model.key} is {seen[model.folder.resolve()]} again "
                              f"({model.folder}); list each model once")
        seen[model.folder.resolve()] = model.key
    if method.base == "none" and m.normalize and sum(x.weight for x in models) == 0:
        raise ConfigError("merge.models' weights sum to 0, which merge.normalize divides by; "
                          "give weights with a non-zero sum")
    base = _base(cfg, method, models, seen)
    output = run_dir_for(cfg, m.name)
    if output.resolve() in seen or (base and output.resolve() == base.folder.resolve()):
        raise ConfigError(f"merge.name: {output} is one of the merged models; name another "
                          "folder")
    if output.exists() and not m.overwrite:
        raise ConfigError(f"{output} already exists; set merge.overwrite=true to replace it, "
                          "or another merge.name")
    _check_same_architecture([base, *models] if method.base == "separate" else models)
    return MergePlan(m.method, tuple(models), base,
                     cfg.run.seed if m.seed is None else m.seed, output)


def _base(cfg: Config, method: MergeMethod, models: list[MergeInput],
          seen: dict[Path, str]) -> MergeInput | None:
    m = cfg.merge
    if method.base == "separate":
        if m.base_model is None:
            raise ConfigError(f"merge.method={m.method} needs merge.base_model (the model the "
                              "merged models were fine-tuned from)")
        base = MergeInput("merge.base_model", m.base_model,
                          model_folder(m.base_model, "merge.base_model"), 1.0, 1.0)
        if base.folder.resolve() in seen:
            raise ConfigError(f"merge.base_model is {seen[base.folder.resolve()]} too; list "
                              "in merge.models only the models merged into the base")
        return base
    if method.base == "none":
        if m.base_model is not None:
            raise ConfigError(f"merge.base_model: merge.method={m.method} has no base; leave "
                              "it null")
        return None
    if m.base_model is None:
        return models[0]
    folder = model_folder(m.base_model, "merge.base_model").resolve()
    if folder not in seen:
        raise ConfigError("merge.base_model: slerp's base is the end at t=0, one of the two "
                          "merge.models; name one of them, or null for the first")
    return next(x for x in models if x.folder.resolve() == folder)


def _mergekit_config(plan: MergePlan, cfg: Config) -> dict[str, Any]:
    """The merge in mergekit's configuration layout (`MergeConfiguration`)."""
    m, method = cfg.merge, MERGE_METHODS[plan.method]
    entries = []
    for x in plan.models:
        params = {} if method.by_t else {"weight": x.weight}
        if method.uses_density:
            params["density"] = x.density
        entries.append({"model": str(x.folder), "parameters": params or None})
    out: dict[str, Any] = {"merge_method": method.mergekit_name, "models": entries,
                           "dtype": m.dtype}
    if plan.base is not None:
        out["base_model"] = str(plan.base.folder)
    out["parameters"] = {"t": m.t} if method.by_t else {"normalize": m.normalize}
    return out


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Python's, numpy's and torch's generators seeded for the block, then as they were."""
    import numpy as np
    import torch

    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _donor_files(plan: MergePlan, out: Path, dtype: str) -> None:
    """Tokenizer, generation config and config.json of one fixed donor (the base, else the
    first model): mergekit picks its donor from a set, whose order varies between processes."""
    donor = (plan.base or plan.models[0]).folder
    for name in DONOR_FILES:
        if (donor / name).is_file():
            shutil.copyfile(donor / name, out / name)
    config = json.loads((donor / "config.json").read_text(encoding="utf-8"))
    config["dtype" if "torch_dtype" not in config else "torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n",
                                     encoding="utf-8")


def _info(plan: MergePlan, cfg: Config, version: str) -> dict[str, Any]:
    m = cfg.merge
    return {
        "method": plan.method,
        "models": [{"path": x.given, "folder": str(x.folder), "weight": x.weight,
                    "density": x.density} for x in plan.models],
        "base_model": None if plan.base is None else str(plan.base.folder),
        "t": m.t if MERGE_METHODS[plan.method].by_t else None,
        "normalize": None if MERGE_METHODS[plan.method].by_t else m.normalize,
        "seed": plan.seed,
        "dtype": m.dtype,
        "mergekit_version": version,
    }


def _mergekit() -> Any:
    """mergekit's modules, imported on use (they take ~15 s: peft, transformers' auto)."""
    import importlib.util

    if importlib.util.find_spec("mergekit") is None:
        raise ConfigError(f"cpe-ray merge needs mergekit, which is not installed; "
                          f"{INSTALL_HINT}")
    import mergekit.config
    import mergekit.merge
    import mergekit.options

    return mergekit


def run_merge(cfg: Config) -> MergeResult:
    """Check everything (`plan_merge`), merge, and move the result into place atomically."""
    from importlib.metadata import version

    plan = plan_merge(cfg)
    mk = _mergekit()
    config = mk.config.MergeConfiguration.model_validate(_mergekit_config(plan, cfg))
    options = mk.options.MergeOptions(random_seed=plan.seed, device="cpu", quiet=True,
                                      copy_tokenizer=False, write_model_card=False)
    info = _info(plan, cfg, version("mergekit"))
    start = time.monotonic()

    def write(tmp: Path) -> None:
        with seeded(plan.seed):
            mk.merge.run_merge(config, str(tmp), options)
        _donor_files(plan, tmp, cfg.merge.dtype)
        (tmp / MERGE_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")

    path = atomic_build(plan.output, write, lambda d: (d / MERGE_INFO).is_file(),
                        cfg.merge.overwrite, "merged model")
    return MergeResult(path, plan.method, plan.seed, time.monotonic() - start)
