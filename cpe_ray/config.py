"""Typed run configuration: the dataclass schema, loading with OmegaConf, and validation.

`load_config(path, overrides)` starts from the schema's defaults (which are the offline
CPU run, mirrored in `conf/default.yaml`), merges a YAML file and `key=value` overrides,
and validates everything before any actor starts. Every problem is one `ConfigError` line
that names the key: unknown keys get the nearest valid name, values outside their range
or choices say the range, and cross-field rules (batch sizes that must divide, a KL term
without a reference model, ...) say what to change.

Per-field rules live next to the field as metadata (`choices`, `ge`, `gt`, `le`), so the
schema documents itself and `_check_fields` enforces it generically.
"""

from __future__ import annotations

import dataclasses
import difflib
import keyword
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cpe_ray.errors import ConfigError
from cpe_ray.grm import DEFAULT_DIMENSIONS, DEFAULT_WEIGHTS, ON_MISSING_CHOICES
from cpe_ray.post_edit import STRATEGIES

TINY_MODEL = "tiny"  # policy.model_path value meaning "the offline tiny model, built if needed"
RESUME_KEYWORDS = ("never", "auto")
OVERRIDES_SOURCE = "the command line"


def _f(default: Any, **rules: Any) -> Any:
    """A dataclass field with validation rules as metadata (mutable defaults copied)."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=rules)
    return field(default=default, metadata=rules)


@dataclass
class RunConfig:
    name: str = "cpe-tiny"
    output_dir: str = "outputs"
    seed: int = _f(42, ge=0)


@dataclass
class ClusterConfig:
    address: str | None = None  # None: start a local Ray; "auto" or ray://host:port: connect
    use_gpu: bool = False
    placement_strategy: str = _f("PACK", choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    colocate_learner_rollout: bool = False
    cpus_per_bundle: float = _f(1.0, gt=0)
    placement_timeout_s: float = _f(60.0, gt=0)


@dataclass
class PolicyConfig:
    model_path: str = TINY_MODEL
    dtype: str = _f("float32", choices=("float32", "bfloat16", "float16"))
    system_template: str = "policy_system_en.txt"
    trust_remote_code: bool = False


@dataclass
class RolloutConfig:
    backend: str = _f("hf", choices=("hf", "vllm"))
    num_engines: int = _f(1, ge=1)
    tensor_parallel_size: int = _f(1, ge=1)
    n_samples_per_prompt: int = _f(4, ge=1)
    temperature: float = _f(1.0, ge=0)
    top_p: float = _f(1.0, gt=0, le=1)
    max_prompt_length: int = _f(1024, ge=1)
    max_new_tokens: int = _f(48, ge=1)
    gpu_memory_utilization: float = _f(0.6, gt=0, le=1)
    enable_sleep: bool = False
    max_batch_rows: int = _f(64, ge=1)  # HF engine: sequences decoded together


@dataclass
class GRMApiConfig:
    base_url: str | None = None
    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"  # the variable's name; the key itself never enters config
    timeout_s: float = _f(60.0, gt=0)
    max_concurrency: int = _f(16, ge=1)


@dataclass
class GRMConfig:
    backend: str = _f("rubric", choices=("rubric", "hf", "vllm", "openai", "bt"))
    model_path: str | None = None
    template: str = "grm_en.txt"
    dimensions: list[str] = _f(list(DEFAULT_DIMENSIONS))
    weights: dict[str, float] = _f(dict(DEFAULT_WEIGHTS))
    score_min: float = -5.0
    score_max: float = 5.0
    on_missing: str = _f("zero", choices=ON_MISSING_CHOICES)
    critique_temperature: float = _f(0.9, ge=0)
    score_temperature: float = _f(0.0, ge=0)
    max_new_tokens: int = _f(512, ge=1)
    max_retries: int = _f(5, ge=0)
    num_engines: int = _f(1, ge=1)
    tensor_parallel_size: int = _f(1, ge=1)
    gpu_memory_utilization: float = _f(0.9, gt=0, le=1)
    api: GRMApiConfig = field(default_factory=GRMApiConfig)
    # backend=rubric only: the length rule in words (method.md 2 uses 300-400 tokens)
    # (scaled to the tiny model's 48-token answers: most of the budget in real words)
    rubric_min_words: int = _f(24, ge=0)
    rubric_max_words: int = _f(40, ge=1)
    rubric_words_per_point: int = _f(3, ge=1)


@dataclass
class PostEditConfig:
    enabled: bool = True
    strategy: str = _f("random", choices=STRATEGIES)
    ratio: float = _f(0.5, ge=0, le=1)
    template: str = "edit_en.txt"
    temperature: float = _f(1.0, ge=0)
    max_new_tokens: int = _f(48, ge=1)


@dataclass
class PPOConfig:
    advantage_estimator: str = _f("gae", choices=("gae", "grpo", "rloo"))
    gamma: float = _f(1.0, ge=0, le=1)
    lam: float = _f(1.0, ge=0, le=1)
    whiten_advantages: bool = True
    clip_low: float = _f(0.2, ge=0, le=1)
    clip_high: float = _f(0.2, ge=0)
    dual_clip: float | None = _f(None, gt=1)
    edit_loss: bool = True  # the off-policy rewrite loss of method.md 3.7; False: plain PPO
    edit_clip_low: float = _f(0.2, ge=0, le=1)
    edit_clip_high: float = _f(0.2, ge=0)
    value_clip: float | None = _f(0.5, gt=0)
    kl_coef: float = _f(0.0, ge=0)
    kl_estimator: str = _f("k1", choices=("k1", "k2", "k3"))
    kl_in_reward: bool = True  # True: subtract kl_coef x KL from rewards; False: add as a loss
    entropy_coef: float = _f(0.0, ge=0)
    loss_agg: str = _f("token_mean", choices=("token_mean", "seq_mean_token_mean",
                                              "seq_mean_token_sum"))
    epochs: int = _f(1, ge=1)
    mini_batch_size: int = _f(4, ge=1)  # prompts per optimiser step (with their samples)


@dataclass
class LearnerConfig:
    num_ranks: int = _f(1, ge=1)
    zero_stage: int = _f(0, choices=(0, 1, 2, 3))
    offload: bool = False
    # The tiny model's rates: 1e-5 moved its reward by nothing measurable in 16 steps, 1e-3
    # by +0.2 (the paper's 7B uses 1e-6 / 1e-5: conf/experiment/).
    actor_lr: float = _f(1e-3, gt=0)
    critic_lr: float = _f(1e-3, gt=0)
    weight_decay: float = _f(0.0, ge=0)
    warmup_steps: int = _f(0, ge=0)
    max_grad_norm: float = _f(1.0, gt=0)
    micro_batch_size: int = _f(4, ge=1)  # samples per rank per forward/backward
    use_reference: bool = False
    critic_model_path: str | None = None  # None: initialise the critic from the policy
    gradient_checkpointing: bool = False
    weight_sync_bucket_mb: float = _f(64.0, gt=0)
    weight_sync_timeout_s: float = _f(120.0, gt=0)  # a peer silent this long fails the sync
    dist_timeout_s: float = _f(600.0, gt=0)  # DeepSpeed's own group: collectives and start-up


@dataclass
class DataConfig:
    train_path: str = "data/demo/train.jsonl"
    eval_path: str | None = "data/demo/eval.jsonl"
    on_bad_record: str = _f("error", choices=("error", "skip"))
    shuffle: bool = True


@dataclass
class TrainerConfig:
    rollout_batch_size: int = _f(8, ge=1)  # prompts per step
    # Prompt chunks per rollout engine and step: with more than one, the GRM critiques and
    # scores a chunk's answers while the engine still generates the next (smaller batches).
    chunks_per_engine: int = _f(1, ge=1)
    total_epochs: int = _f(1, ge=1)
    max_steps: int | None = _f(None, ge=1)  # None: run total_epochs over the data
    save_every: int = _f(0, ge=0)  # 0: only at the end
    sample_table_every: int = _f(1, ge=1)
    resume: str = "never"  # "never", "auto" (newest whole checkpoint) or a checkpoint path


@dataclass
class LoggingConfig:
    wandb_mode: str = _f("offline", choices=("online", "offline", "disabled"))
    project: str = "cpe-ray"
    entity: str | None = None
    tags: list[str] = _f([])
    log_every: int = _f(1, ge=1)


@dataclass
class EvalApiConfig:
    """An OpenAI-compatible endpoint for judging (and optionally answering) in evaluations."""

    base_url: str | None = None
    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"  # the variable's name; the key itself never enters config
    timeout_s: float = _f(60.0, gt=0)
    max_retries: int = _f(5, ge=0)  # per request, on timeouts, connection errors, 408/409/429/5xx
    backoff_initial_s: float = _f(1.0, gt=0)  # exponential back-off with jitter between retries
    backoff_max_s: float = _f(30.0, gt=0)
    max_concurrency: int = _f(8, ge=1)


@dataclass
class EvalConfig:
    """`cpe-ray eval winrate | personafeedback | personamem` (cpe_ray/evaluation/)."""

    output_dir: str = "outputs/eval"  # each command writes <output_dir>/<command>/
    model_path: str | None = None  # None: policy.model_path; a checkpoint dir holding policy/ works
    model_name: str | None = None  # generator name in the outputs; None: from the model path
    prompts_path: str = "data/demo/eval.jsonl"
    baseline_path: str | None = "data/demo/eval_baseline.jsonl"
    answers_path: str | None = None  # judge these answers (alpaca_eval format), not generated
    limit: int | None = _f(None, ge=1)  # evaluate only the first N prompts / cases / questions
    max_new_tokens: int = _f(256, ge=1)
    temperature: float = _f(0.0, ge=0)  # 0: greedy answers
    max_prompt_tokens: int = _f(4096, ge=1)  # longer prompts keep their end (PersonaMem histories)
    judge: str = _f("grm", choices=("grm", "openai", "hf", "length"))
    judge_model_path: str | None = None  # judge=hf: a local judge model
    judge_template: str = "pairwise_en.txt"
    judge_max_new_tokens: int = _f(512, ge=1)
    judge_temperature: float = _f(0.0, ge=0)
    max_parse_retries: int = _f(2, ge=0)  # re-ask a sampled judge whose verdict did not parse
    both_orders: bool = True  # judge (model, baseline) and (baseline, model): no position bias
    score_answers: bool = True  # GRM reward of every evaluated answer, for reward-vs-length plots
    personafeedback_path: str = "data/demo/personafeedback"
    personafeedback_judge: str = _f("grm", choices=("grm", "pairwise"))
    personamem_questions_path: str = "data/demo/personamem/questions.csv"
    personamem_contexts_path: str = "data/demo/personamem/shared_contexts.jsonl"
    personamem_answerer: str = _f("policy", choices=("policy", "openai"))
    api: EvalApiConfig = field(default_factory=EvalApiConfig)


@dataclass
class StageTrainConfig:
    """What the supervised stages share (`cpe-ray sft`, `grm train`, `rm train`).

    Ranks, ZeRO stage, offload, micro-batch size, gradient clipping and checkpointing come
    from `learner`, the precision from `policy.dtype`. Each stage writes under
    `run.output_dir/<name>/` in the layout of `cpe-ray train`.
    """

    name: str = "stage"
    epochs: int = _f(1, ge=1)
    batch_size: int = _f(8, ge=1)  # examples (conversations or pairs) per optimiser step
    lr: float = _f(1e-3, gt=0)  # the tiny model's rate; a 7B SFT uses ~1e-5 (README)
    schedule: str = _f("constant", choices=("constant", "cosine"))
    warmup_steps: int = _f(0, ge=0)
    max_length: int = _f(1024, ge=2)  # tokens per sequence; longer ones lose their end
    max_steps: int | None = _f(None, ge=1)  # None: `epochs` passes over the training split
    eval_fraction: float = _f(0.125, ge=0, le=0.5)  # held out (by a seeded hash of each record)
    eval_every: int = _f(0, ge=0)  # 0: evaluate the held-out split only at the end
    save_every: int = _f(0, ge=0)  # 0: checkpoint only at the end
    shuffle: bool = True
    resume: str = "never"  # "never", "auto" (newest whole checkpoint) or a checkpoint path


@dataclass
class SFTConfig(StageTrainConfig):
    """`cpe-ray sft`: stage 1, the policy fine-tuned on personalized conversations."""

    name: str = "sft-tiny"
    data_path: str = "data/demo/sft.jsonl"  # `load_sft` conversations; loss on assistant turns


@dataclass
class DistillConfig(StageTrainConfig):
    """`cpe-ray grm collect` (a teacher judges triples) and `grm train` (stage 2: GRM SFT)."""

    name: str = "grm-tiny"
    max_length: int = _f(2048, ge=2)  # the rubric prompt alone is ~1000 tiny-model tokens
    input_path: str = "data/demo/grm_inputs.jsonl"  # (persona, question, answer) triples
    output_path: str = "outputs/grm-judgements.jsonl"  # appended to; resumable
    failures_path: str | None = None  # None: <output_path without .jsonl>.failures.jsonl
    api: EvalApiConfig = field(default_factory=EvalApiConfig)  # the teacher's endpoint
    temperature: float = _f(0.0, ge=0)
    max_tokens: int = _f(1024, ge=1)
    model_path: str = TINY_MODEL  # the student (the paper: Qwen2.5-14B-Instruct)
    train_unparsed: bool = False  # also train on teacher outputs parse_judgement rejects
    eval_backend: str = _f("hf", choices=("hf", "vllm"))  # generates the parse-share outputs


@dataclass
class RMConfig(StageTrainConfig):
    """`cpe-ray rm train`: a Bradley-Terry reward model (scalar head) on chosen/rejected pairs."""

    name: str = "rm-tiny"
    eval_fraction: float = _f(0.25, ge=0, le=0.5)
    data_path: str = "data/demo/pairwise.jsonl"  # pairwise JSONL, or a PersonaFeedback root
    model_path: str | None = None  # None: policy.model_path, with a new scalar head


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grm: GRMConfig = field(default_factory=GRMConfig)
    post_edit: PostEditConfig = field(default_factory=PostEditConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    rm: RMConfig = field(default_factory=RMConfig)


# ---------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Schema defaults, then the YAML file at `path`, then `key=value` overrides; validated."""
    layers: list[tuple[str, DictConfig]] = []
    if path is not None:
        layers.append((str(path), _load_yaml(Path(path))))
    if overrides:
        layers.append((OVERRIDES_SOURCE, _parse_overrides(overrides)))
    for source, layer in layers:
        _check_keys(OmegaConf.to_container(layer, resolve=False), Config, "", source)
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
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: invalid YAML ({problem}); fix the syntax") from None
    if loaded is None or not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: top level must be a mapping of sections (run:, ppo:, ...)")
    return loaded


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        key = item.split("=", 1)[0]
        if "=" not in item or not key or any(not p.isidentifier() for p in key.split(".")):
            raise ConfigError(f"override '{item}' is not key=value (e.g. ppo.kl_coef=0.01)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except (OmegaConfBaseException, yaml.YAMLError) as exc:
        raise ConfigError(f"overrides {list(overrides)}: {exc}".splitlines()[0]) from None


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
    if g.score_min >= g.score_max:
        yield (f"grm.score_min ({g.score_min:g}) must be below grm.score_max ({g.score_max:g})")
    if g.backend in ("hf", "vllm", "bt") and not g.model_path:
        yield f"grm.backend={g.backend} needs grm.model_path (a GRM checkpoint)"
    if g.backend == "openai" and not (g.api.base_url and g.api.model):
        yield "grm.backend=openai needs grm.api.base_url and grm.api.model"
    env = g.api.api_key_env
    if not env.isidentifier() or keyword.iskeyword(env):
        yield f"grm.api.api_key_env = {env!r} is not an environment variable name"
    if pe.enabled and g.backend == "bt":
        yield ("post_edit.enabled needs critiques, which grm.backend=bt (a scalar reward model) "
               "cannot write; set post_edit.enabled=false or use a generative GRM backend")
    if "vllm" in (r.backend, g.backend, cfg.distill.eval_backend) and not cfg.cluster.use_gpu:
        yield "the vllm backend needs GPUs; set cluster.use_gpu=true or use backend hf"
    if p.advantage_estimator in ("grpo", "rloo") and r.n_samples_per_prompt < 2:
        yield (f"ppo.advantage_estimator={p.advantage_estimator} compares samples of a prompt; "
               f"set rollout.n_samples_per_prompt >= 2 (it is {r.n_samples_per_prompt})")
    if p.kl_coef > 0 and not le.use_reference:
        yield "ppo.kl_coef > 0 needs a reference model; set learner.use_reference=true"
    if t.rollout_batch_size % p.mini_batch_size:
        yield (f"trainer.rollout_batch_size ({t.rollout_batch_size}) is not a multiple of "
               f"ppo.mini_batch_size ({p.mini_batch_size})")
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


def _api_problems(a: EvalApiConfig, section: str) -> Iterable[str]:
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
