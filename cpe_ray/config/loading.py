"""Typed run configuration: loading with OmegaConf, and validation (the schema: `schema.py`).

`load_config(path, overrides)` starts from the schema's defaults (which are the offline
CPU run, mirrored in `conf/default.yaml`), merges a YAML file and `key=value` overrides,
and validates everything before any actor starts. Every problem is one `ConfigError` line
that names the key: unknown keys get the nearest valid name, values outside their range
or choices say the range, and cross-field rules (batch sizes that must divide, a KL term
without a reference model, ...) say what to change.

Per-field rules live next to the field in the schema as metadata (`choices`, `ge`, `gt`,
`le`), and `_check_fields` enforces them generically. The schema's names are re-exported
here: `from cpe_ray.config import Config, load_config` is how code reads config.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import keyword
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cpe_ray.config.choices import (
    CORRECTION_PRESETS,
    GRM_BACKENDS,
    GRM_TEMPLATE_FIELDS,
    GROUP_ESTIMATOR_NAMES,
)
from cpe_ray.config.schema import (
    REMOVED_KEYS,
    RESUME_KEYWORDS,
    ApiConfig,
    Config,
    EvalConfig,
    GRMConfig,
)
from cpe_ray.errors import ConfigError

OVERRIDES_SOURCE = "the command line"
PRESET_KEY = "ppo.rollout_correction.preset"


# ---------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Schema defaults, then the YAML file at `path`, then `key=value` overrides; validated."""
    layers: list[tuple[str, DictConfig]] = []
    if path is not None:
        layers.append((str(path), _load_yaml(Path(path))))
    if overrides:
        layers.append((OVERRIDES_SOURCE, _parse_overrides(overrides)))
    for source, layer in layers:
        _drop_removed_keys(layer, source)
        _check_keys(OmegaConf.to_container(layer, resolve=False), Config, "", source)
    layers = [expanded for source, layer in layers
              for expanded in _expand_correction_preset(source, layer)]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), *(layer for _, layer in layers))
        # OmegaConf unions mappings, but a file (or an override `grm.weights={...}`) that gives
        # a whole mapping means exactly those entries; `grm.weights.x=1` still sets one entry.
        for source, layer in layers:
            for key in _mapping_keys(Config):
                given = OmegaConf.select(layer, key, default=None)
                whole = source != OVERRIDES_SOURCE or any(
                    o.split("=", 1)[0] == key for o in overrides)
                if given is not None and whole:
                    OmegaConf.update(merged, key, given, merge=False)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(_omegaconf_message(exc)) from None
    assert isinstance(cfg, Config)
    validate(cfg)
    return cfg


def _expand_correction_preset(source: str, layer: DictConfig
                              ) -> list[tuple[str, DictConfig]]:
    """A layer naming `ppo.rollout_correction.preset` is preceded by the preset's keys, so
    that they replace what earlier layers set and the layer's own keys replace them."""
    name = OmegaConf.select(layer, PRESET_KEY, default=None)
    if name is None or name not in CORRECTION_PRESETS:  # an unknown name: validate says so
        return [(source, layer)]
    section = {k: copy.deepcopy(v) for k, v in CORRECTION_PRESETS[name].items()}
    preset = OmegaConf.create({"ppo": {"rollout_correction": section}})
    return [(f"{source} (preset {name})", preset), (source, layer)]


def flat_items(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf of a config as {"section.key": value} (to compare configs key by key)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flat_items(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def config_to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (atomic: a crash never leaves a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(config_to_yaml(cfg), encoding="utf-8")
    tmp.replace(path)


def _load_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass an existing YAML file to --config")
    try:
        loaded = OmegaConf.load(path)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file (byte 0x{exc.object[exc.start]:02x} at "
                          f"offset {exc.start} is not UTF-8); pass a YAML file") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read it ({exc.strerror or exc})"
                          ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: invalid YAML ({problem}); fix the syntax") from None
    if loaded is None or not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: top level must be a mapping of sections (run:, ppo:, ...)")
    if not loaded:  # a user who names a file means it to change something: a wrong file?
        raise ConfigError(f"{path} sets nothing (it is empty or only comments); give the file "
                          "meant, or leave out --config to run on the defaults")
    return loaded


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        key = item.split("=", 1)[0]
        if "=" not in item or not key or any(not p.isidentifier() for p in key.split(".")):
            raise ConfigError(f"override '{item}' is not key=value (e.g. ppo.kl_coef=0.01)")
    for item in overrides:  # one at a time, so that a bad value is named by its key
        key, value = item.split("=", 1)
        try:
            OmegaConf.from_dotlist([item])
        except (OmegaConfBaseException, yaml.YAMLError) as exc:
            problem = " ".join(str(getattr(exc, "problem", None) or exc).split()[:12])
            raise ConfigError(f"{key}: the value {value} is not valid YAML ({problem}); quote "
                              f"it as a string, e.g. '{key}=\"{value}\"'") from None
    return OmegaConf.from_dotlist(list(overrides))


def _drop_removed_keys(layer: DictConfig, source: str) -> None:
    """A key that was a setting once (`REMOVED_KEYS`) never changed a run: one warning line,
    and the rest of the file (an old run's config.yaml) loads."""
    for key, why in REMOVED_KEYS.items():
        section, name = key.rsplit(".", 1)
        parent = OmegaConf.select(layer, section, default=None)
        if isinstance(parent, DictConfig) and name in parent:
            parent.pop(name)
            print(f"cpe-ray: warning: {key} in {source} is no longer a setting ({why}); it is "
                  "ignored, delete it", file=sys.stderr)


def _omegaconf_message(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or "config"
    first = str(getattr(exc, "msg", None) or exc).splitlines()[0]
    return f"{key}: {first}; give a value of the type the schema expects (see conf/default.yaml)"


def _all_keys(schema: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(schema):
        full = f"{prefix}{f.name}"
        keys.append(full)
        sub = _dataclass_type(schema, f)
        if sub is not None:
            keys.extend(_all_keys(sub, full + "."))
    return keys


def _mapping_keys(schema: type, prefix: str = "") -> list[str]:
    """Dotted keys of the schema's free-form mapping fields (replaced, not merged)."""
    keys = []
    for f in dataclasses.fields(schema):
        sub = _dataclass_type(schema, f)
        if sub is not None:
            keys.extend(_mapping_keys(sub, f"{prefix}{f.name}."))
        elif f.default_factory is not dataclasses.MISSING and isinstance(f.default_factory(), dict):
            keys.append(f"{prefix}{f.name}")
    return keys


def _dataclass_type(schema: type, f: dataclasses.Field[Any]) -> type | None:
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
    return type(default) if dataclasses.is_dataclass(default) else None


def _check_keys(data: Any, schema: type, prefix: str, source: str) -> None:
    """Reject unknown keys with the nearest valid name; sections must be mappings."""
    if not isinstance(data, Mapping):
        fields = ", ".join(f.name for f in dataclasses.fields(schema))
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} in {source} is a section; "
                          f"give it as a mapping of: {fields}")
    by_name = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in by_name:
            raise ConfigError(f"unknown key '{full}' in {source}; {_suggest(str(key), prefix)}")
        sub = _dataclass_type(schema, by_name[key])
        if sub is not None:
            _check_keys(value, sub, full + ".", source)


def _suggest(key: str, prefix: str) -> str:
    every = _all_keys(Config)
    siblings = [k[len(prefix):] for k in every
                if k.startswith(prefix) and "." not in k[len(prefix):]]
    near = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
    if near:
        return f"did you mean '{prefix}{near[0]}'?"
    elsewhere = [k for k in every if k.rsplit(".", 1)[-1] == key]
    if elsewhere:
        return f"did you mean '{elsewhere[0]}'?"
    return f"valid keys here: {', '.join(siblings)}"


# ---------------------------------------------------------------- validation


def validate(cfg: Config) -> None:
    """Per-field rules from metadata, then cross-field rules; the first problem raises."""
    _check_fields(cfg, "")
    for problem in _cross_field_problems(cfg):
        raise ConfigError(problem)


def _check_fields(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_fields(value, key + ".")
            continue
        rules = f.metadata
        if value is None or not rules:
            continue
        if "choices" in rules and value not in rules["choices"]:
            choices = ", ".join(str(c) for c in rules["choices"])
            near = difflib.get_close_matches(str(value), [str(c) for c in rules["choices"]], n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise ConfigError(f"{key} = {value!r} is not one of: {choices}{hint}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} = {value} is not a finite number")
        low, high = rules.get("ge", rules.get("gt")), rules.get("le")
        too_low = ("ge" in rules and value < rules["ge"]) or (
            "gt" in rules and value <= rules["gt"])
        too_high = "le" in rules and value > rules["le"]
        if too_low or too_high:
            lo = "" if low is None else ("[" if "ge" in rules else "(") + f"{low:g}"
            hi = "inf)" if high is None else f"{high:g}]"
            raise ConfigError(f"{key} = {value} is outside {lo}, {hi}; set it inside that range")


def _cross_field_problems(cfg: Config) -> Iterable[str]:
    g, r, p, pe, le, t = cfg.grm, cfg.rollout, cfg.ppo, cfg.post_edit, cfg.learner, cfg.trainer
    if not g.dimensions:
        yield "grm.dimensions is empty; list the GRM's score dimensions"
    if len(set(g.dimensions)) != len(g.dimensions):
        yield f"grm.dimensions {g.dimensions} has duplicates; list each dimension once"
    if not g.weights:
        yield ("grm.weights is empty; give a weight per dimension "
               "(e.g. grm.weights.helpfulness=0.35)")
    for dim, w in g.weights.items():
        if dim not in g.dimensions:
            yield f"grm.weights.{dim} names no dimension in grm.dimensions {g.dimensions}"
        if not math.isfinite(w) or w < 0:
            yield f"grm.weights.{dim} = {w} must be a finite number >= 0"
    if g.weights and sum(g.weights.values()) <= 0:
        yield "grm.weights sum to 0; give at least one positive weight"
    if g.rubric_min_words > g.rubric_max_words:
        yield (f"grm.rubric_min_words ({g.rubric_min_words}) must not exceed "
               f"grm.rubric_max_words ({g.rubric_max_words})")
    yield from _grm_template_problems(g)
    if g.score_min >= g.score_max:
        yield (f"grm.score_min ({g.score_min:g}) must be below grm.score_max ({g.score_max:g})")
    backend = GRM_BACKENDS[g.backend]
    if backend.needs_model and not g.model_path:
        yield f"grm.backend={g.backend} needs grm.model_path (a GRM checkpoint)"
    if g.backend == "openai" and not (g.api.base_url and g.api.model):
        yield "grm.backend=openai needs grm.api.base_url and grm.api.model"
    yield from _api_problems(g.api, "grm.api")
    if pe.enabled and not backend.writes_critiques:
        yield (f"post_edit.enabled needs critiques, which grm.backend={g.backend} (a scalar "
               "reward model) cannot write; set post_edit.enabled=false or use a generative "
               "GRM backend")
    if r.backend == "vllm" and r.enable_sleep and not cfg.cluster.use_gpu:
        yield ("rollout.enable_sleep: vLLM's sleep mode is CUDA-only; set it false with "
               "cluster.use_gpu=false")
    if p.advantage_estimator in GROUP_ESTIMATOR_NAMES and r.n_samples_per_prompt < 2:
        yield (f"ppo.advantage_estimator={p.advantage_estimator} compares samples of a prompt; "
               f"set rollout.n_samples_per_prompt >= 2 (it is {r.n_samples_per_prompt})")
    if p.reward_aggregation == "per_dimension":
        yield from _per_dimension_problems(p.advantage_estimator, g.backend)
    band = p.rollout_correction.seq_band
    if len(band) != 2 or not 0 <= band[0] < band[1]:
        yield (f"ppo.rollout_correction.seq_band = {band} must be [low, high] with "
               "0 <= low < high (e.g. [0.5, 2.0])")
    if p.kl_coef > 0 and not le.use_reference:
        yield "ppo.kl_coef > 0 needs a reference model; set learner.use_reference=true"
    if p.mini_batch_unit == "prompts" and t.rollout_batch_size % p.mini_batch_size:
        yield (f"trainer.rollout_batch_size ({t.rollout_batch_size}) is not a multiple of "
               f"ppo.mini_batch_size ({p.mini_batch_size})")
    if len(le.adam_betas) != 2 or not all(0 <= b < 1 for b in le.adam_betas):
        yield (f"learner.adam_betas = {le.adam_betas} must be two numbers in [0, 1) "
               "(beta1, beta2), e.g. [0.9, 0.999]")
    c = cfg.cluster
    if c.colocate_learner_rollout and c.use_gpu and (
            r.num_engines * r.tensor_parallel_size != le.num_ranks):
        yield ("cluster.colocate_learner_rollout puts each rollout engine GPU beside one learner "
               "rank (CUDA IPC sync); set rollout.num_engines x rollout.tensor_parallel_size "
               f"({r.num_engines * r.tensor_parallel_size}) = learner.num_ranks ({le.num_ranks})")
    resumes = {"trainer": t.resume, "sft": cfg.sft.resume, "distill": cfg.distill.resume,
               "rm": cfg.rm.resume}
    for section, resume in resumes.items():
        if resume not in RESUME_KEYWORDS and not resume.strip():
            yield f"{section}.resume is empty; use never, auto or a checkpoint path"
    yield from _eval_problems(cfg.eval)
    yield from _api_problems(cfg.distill.api, "distill.api")


def _per_dimension_problems(estimator: str, backend: str) -> Iterable[str]:
    if estimator not in GROUP_ESTIMATOR_NAMES:
        yield (f"ppo.reward_aggregation=per_dimension normalises each GRM dimension within its "
               f"prompt's group, which ppo.advantage_estimator={estimator} has not (its critic "
               f"learns one return); use {' or '.join(GROUP_ESTIMATOR_NAMES)}, or weighted_sum")
    if GRM_BACKENDS[backend].scalar:
        yield (f"ppo.reward_aggregation=per_dimension needs the GRM's dimension scores, and "
               f"grm.backend={backend} gives one scalar reward; use weighted_sum")


def _grm_template_problems(g: GRMConfig) -> Iterable[str]:
    """The GRM prompt's placeholder mapping and label aliases (the files load at start-up)."""
    if g.critique_template is not None and not g.critique_template.strip():
        yield "grm.critique_template is empty; name a template file, or null for grm.template"
    fields = ", ".join(GRM_TEMPLATE_FIELDS)
    for name, target in g.template_placeholders.items():
        if not str(name).isidentifier():
            yield (f"grm.template_placeholders: {name!r} is not a placeholder name; use the "
                   "name written between the braces, e.g. persona_str")
        elif target not in GRM_TEMPLATE_FIELDS:
            yield (f"grm.template_placeholders.{name} = {target!r} is not one of: {fields}")
        elif name in GRM_TEMPLATE_FIELDS and name != target:
            yield (f"grm.template_placeholders.{name} = {target!r} renames one of our own "
                   f"placeholders ({fields}); map another prompt's names only")
    for dim, labels in g.label_aliases.items():
        if any(not isinstance(a, str) or not a.strip() for a in labels):
            yield f"grm.label_aliases.{dim} holds an empty label; list non-empty names"


def _api_problems(a: ApiConfig, section: str) -> Iterable[str]:
    if not a.api_key_env.isidentifier() or keyword.iskeyword(a.api_key_env):
        yield f"{section}.api_key_env = {a.api_key_env!r} is not an environment variable name"
    if a.backoff_initial_s > a.backoff_max_s:
        yield (f"{section}.backoff_initial_s ({a.backoff_initial_s:g}) must not exceed "
               f"{section}.backoff_max_s ({a.backoff_max_s:g})")


def _eval_problems(e: EvalConfig) -> Iterable[str]:
    a = e.api
    yield from _api_problems(a, "eval.api")
    for key, value in (("eval.judge", e.judge), ("eval.personamem_answerer",
                                                  e.personamem_answerer)):
        if value == "openai" and not (a.base_url and a.model):
            yield f"{key}=openai needs eval.api.base_url and eval.api.model"
    if e.judge == "hf" and not e.judge_model_path:
        yield "eval.judge=hf needs eval.judge_model_path (a local judge model)"
