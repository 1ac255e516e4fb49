"""The run configuration's schema: one typed dataclass per section, defaults = the CPU run.

The defaults are the offline CPU run (mirrored in `conf/default.yaml`); experiment YAMLs
state only what differs. Per-field rules live next to each field as metadata (`choices`,
`ge`, `gt`, `le`) through `_f`, so the schema documents itself and `cpe_ray.config`
enforces the rules generically. Loading and validation are in `loading.py` beside this file.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from cpe_ray.config.choices import (
    DEFAULT_DIMENSIONS,
    DEFAULT_LABEL_ALIASES,
    DEFAULT_WEIGHTS,
    GRM_BACKENDS,
    MINI_BATCH_UNITS,
    ON_MISSING_CHOICES,
    RELEASE_TEMPLATE_PLACEHOLDERS,
    STRATEGIES,
)

TINY_MODEL = "tiny"  # policy.model_path value meaning "the offline tiny model, built if needed"
# vLLM's KV cache on a CPU when *.kv_cache_memory_bytes is unset: 256 MiB holds about 5,700
# tokens of SmolLM2-135M in float32 and 260,000 of the tiny model, well inside a 24 GiB box
CPU_KV_CACHE_BYTES = 256 * 1024**2
RESUME_KEYWORDS = ("never", "auto")  # trainer.resume values that are not a path
# Checkpoint cadence by default: a fault costs at most this many steps or minutes of replay
# (a tiny-model checkpoint is 4 MB and takes a fraction of a second)
DEFAULT_SAVE_EVERY = 10
DEFAULT_SAVE_EVERY_MINUTES = 30.0
DEFAULT_MAX_RESTARTS = 3
# AdamW's (beta1, beta2) by default: OpenRLHF's for RLHF actors and critics (a shorter second-
# moment memory than torch's (0.9, 0.999), which verl and the paper release keep)
DEFAULT_ADAM_BETAS = (0.9, 0.95)


def _f(default: Any, **rules: Any) -> Any:
    """A dataclass field with validation rules as metadata (mutable defaults copied)."""
    if isinstance(default, list | dict):  # nested lists too: no instance shares them
        return field(default_factory=lambda: copy.deepcopy(default), metadata=rules)
    return field(default=default, metadata=rules)


@dataclass
class RunConfig:
    name: str = "cpe-tiny"
    output_dir: str = "outputs"
    seed: int = _f(42, ge=0)
    # Replace what another run left in output_dir/<name> (logs, checkpoints, wandb); without
    # it a run directory holding another run is refused unless the job resumes it.
    overwrite: bool = False
    # sha256 of every checkpoint file in its manifest, checked on resume; false records and
    # checks sizes only (hashing a 7B run's ~100 GB checkpoint takes minutes)
    checkpoint_checksums: bool = True


@dataclass
class ClusterConfig:
    address: str | None = None  # None: start a local Ray; "auto" or ray://host:port: connect
    use_gpu: bool = False
    placement_strategy: str = _f("PACK", choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    colocate_learner_rollout: bool = False
    cpus_per_bundle: float = _f(1.0, gt=0)
    placement_timeout_s: float = _f(60.0, gt=0)
    # cluster.address must accept a connection within this; Ray's own connect retries for
    # minutes with a warning every few seconds
    connect_timeout_s: float = _f(30.0, gt=0)

    @property
    def threads_per_actor(self) -> int:
        """Torch threads of each actor process: its bundle's CPUs, at least one."""
        return max(1, int(self.cpus_per_bundle))


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
    # vLLM's KV cache in bytes; None: gpu_memory_utilization decides on GPUs, and
    # CPU_KV_CACHE_BYTES on a CPU (vLLM's CPU worker would take that fraction of the
    # machine's memory)
    kv_cache_memory_bytes: int | None = _f(None, ge=1)
    enable_sleep: bool = False  # vLLM sleep mode between steps: CUDA only
    max_batch_rows: int = _f(64, ge=1)  # HF engine: sequences decoded together


@dataclass
class ApiConfig:
    """An OpenAI-compatible endpoint: the GRM (`grm.api`), an evaluation judge (`eval.api`),
    the distillation teacher (`distill.api`)."""

    base_url: str | None = None
    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"  # the variable's name; the key itself never enters config
    timeout_s: float = _f(60.0, gt=0)
    max_retries: int = _f(5, ge=0)  # per request, on timeouts, connection errors, 408/409/429/5xx
    backoff_initial_s: float = _f(1.0, gt=0)  # exponential back-off with jitter between retries
    backoff_max_s: float = _f(30.0, gt=0)
    max_concurrency: int = _f(8, ge=1)


GRM_API_CONCURRENCY = 16  # the GRM judges every answer of a step: more requests in flight
# A retry of an unparsed judgement from a greedy (temperature 0) call would write the same
# text again; it samples at this temperature instead, below the critique call's 0.9 so that
# the scores stay close to the greedy ones while the format gets another chance.
GRM_RETRY_TEMPERATURE = 0.7


@dataclass
class GRMConfig:
    backend: str = _f("rubric", choices=tuple(GRM_BACKENDS))
    model_path: str | None = None
    template: str = "grm_en.txt"  # the score call's prompt (a shipped name or a file path)
    critique_template: str | None = None  # the critique call's prompt; None: grm.template
    # a template's placeholder -> persona / question / answer; the default maps the
    # release's names, so a prompt taken out of it loads as is (README: "The GRM")
    template_placeholders: dict[str, str] = _f(dict(RELEASE_TEMPLATE_PLACEHOLDERS))
    dimensions: list[str] = _f(list(DEFAULT_DIMENSIONS))
    # other labels the GRM may write for a dimension (the release's `Natural`, Chinese names)
    label_aliases: dict[str, list[str]] = _f({d: list(a) for d, a in
                                              DEFAULT_LABEL_ALIASES.items()})
    weights: dict[str, float] = _f(dict(DEFAULT_WEIGHTS))
    score_min: float = -5.0
    score_max: float = 5.0
    on_missing: str = _f("zero", choices=ON_MISSING_CHOICES)
    critique_temperature: float = _f(0.9, ge=0)
    score_temperature: float = _f(0.0, ge=0)
    # retries of an unparsed judgement from a temperature-0 call sample at this temperature
    retry_temperature: float = _f(GRM_RETRY_TEMPERATURE, gt=0)
    max_new_tokens: int = _f(512, ge=1)
    max_retries: int = _f(5, ge=0)  # regenerations of an output that did not parse
    num_engines: int = _f(1, ge=1)
    tensor_parallel_size: int = _f(1, ge=1)
    gpu_memory_utilization: float = _f(0.9, gt=0, le=1)
    kv_cache_memory_bytes: int | None = _f(None, ge=1)  # as rollout.kv_cache_memory_bytes
    api: ApiConfig = field(default_factory=lambda: ApiConfig(
        max_concurrency=GRM_API_CONCURRENCY))
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
    # Rewrites are sampled at this temperature (with rollout.top_p); the learner scores each
    # row at the temperature it was sampled with (`Experience.temperature`).
    temperature: float = _f(1.0, ge=0)
    max_new_tokens: int = _f(48, ge=1)
    # The number of kept rewrites is rounded down to a multiple of this (1: no rounding). The
    # release keeps a multiple of its GPU count (8), because verl splits a batch evenly over
    # data-parallel ranks; our learner takes any row count.
    kept_multiple: int = _f(1, ge=1)


@dataclass
class PPOConfig:
    advantage_estimator: str = _f("gae", choices=("gae", "grpo", "rloo"))
    gamma: float = _f(1.0, ge=0, le=1)
    lam: float = _f(1.0, ge=0, le=1)
    # GAE only: whiten advantages over the batch's tokens (as verl and OpenRLHF do). GRPO /
    # RLOO advantages are already relative to their group and are never whitened: over tokens,
    # one long answer would shift every other answer's sign (verl, OpenRLHF, TRL agree).
    whiten_advantages: bool = True
    clip_low: float = _f(0.2, ge=0, le=1)
    clip_high: float = _f(0.2, ge=0)
    dual_clip: float | None = _f(None, gt=1)
    edit_loss: bool = True  # the off-policy rewrite loss of method.md 3.7; False: plain PPO
    # The rewrite ratio pi_theta / pi_e is clipped to [1 - edit_clip_low, 1 + edit_clip_high]
    # (the paper's text); null leaves that side open. The release's main CPE script runs both
    # null (off_policy_min_clip = off_policy_max_clip = -1, method.md 3.7).
    edit_clip_low: float | None = _f(0.2, ge=0, le=1)
    edit_clip_high: float | None = _f(0.2, ge=0)
    value_clip: float | None = _f(0.5, gt=0)
    kl_coef: float = _f(0.0, ge=0)
    kl_estimator: str = _f("k1", choices=("k1", "k2", "k3"))
    kl_in_reward: bool = True  # True: subtract kl_coef x KL from rewards; False: add as a loss
    entropy_coef: float = _f(0.0, ge=0)
    loss_agg: str = _f("token_mean", choices=("token_mean", "seq_mean_token_mean",
                                              "seq_mean_token_sum"))
    epochs: int = _f(1, ge=1)
    mini_batch_size: int = _f(4, ge=1)  # prompts per optimiser step (with their samples)
    # "prompts": rollout_batch_size / mini_batch_size optimiser steps a step, rewrites spread
    # over them; "rows": ceil(rows / (mini_batch_size x n)) equal steps, so kept rewrites add
    # steps (the release: 512 answers + 256 rewrites = 3 steps of 256 rows at ratio 0.5)
    mini_batch_unit: str = _f("prompts", choices=MINI_BATCH_UNITS)


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
    adam_betas: list[float] = _f(list(DEFAULT_ADAM_BETAS))  # AdamW's, policy's and critic's
    warmup_steps: int = _f(0, ge=0)
    max_grad_norm: float = _f(1.0, gt=0)
    micro_batch_size: int = _f(4, ge=1)  # samples per rank per forward/backward
    use_reference: bool = False
    critic_model_path: str | None = None  # None: initialise the critic from the policy
    gradient_checkpointing: bool = False
    # A micro-batch runs each distinct prompt once and its rows' responses on its keys and
    # values (learners/forward.py): the same results up to rounding; on the CPU default a
    # forward and backward 1.7x faster at micro_batch_size 4, 3.7x with the whole batch in
    # one (bench/learner_forward.py). Off: one plain forward over every row (and under
    # gradient checkpointing, which runs without a cache, in training)
    share_prompts: bool = True
    weight_sync_bucket_mb: float = _f(64.0, gt=0)
    weight_sync_timeout_s: float = _f(120.0, gt=0)  # a peer silent this long fails the sync
    dist_timeout_s: float = _f(600.0, gt=0)  # DeepSpeed's own group: collectives and start-up


@dataclass
class DataConfig:
    train_path: str = "data/demo/train.jsonl"  # prompts JSONL or verl parquet (the release's)
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
    # Checkpoints every save_every steps (0: none by count), every save_every_minutes of
    # training (0: none by time), and at the end; a learner that dies replays from the newest
    save_every: int = _f(DEFAULT_SAVE_EVERY, ge=0)
    save_every_minutes: float = _f(DEFAULT_SAVE_EVERY_MINUTES, ge=0)
    sample_table_every: int = _f(1, ge=1)
    resume: str = "never"  # "never", "auto" (newest whole checkpoint) or a checkpoint path
    # Restarts of dead engine (rollout, GRM) or learner actors within one run; past it the run
    # ends with one line naming the actor (0: the first death ends it)
    max_restarts: int = _f(DEFAULT_MAX_RESTARTS, ge=0)
    # One-step off-policy (1): the engines generate, critique and rewrite batch t+1 with the
    # weights they hold while the learner trains on batch t; weights move between batches.
    # 0: the synchronous loop (the default until 1 has shown equal learning at scale).
    off_policy_steps: int = _f(0, ge=0, le=1)
    # Truncation of the importance weight pi_prox / pi_behav of stale originals (decoupled
    # PPO; AReaL's behav_imp_weight_cap); rewrites already carry their ratio against log pi_e
    behaviour_weight_cap: float = _f(2.0, gt=0)


@dataclass
class LoggingConfig:
    wandb_mode: str = _f("offline", choices=("online", "offline", "disabled"))
    project: str = "cpe-ray"
    entity: str | None = None
    tags: list[str] = _f([])
    log_every: int = _f(1, ge=1)


@dataclass
class EvalConfig:
    """`cpe-ray eval winrate | personafeedback | personamem` (cpe_ray/evaluation/)."""

    output_dir: str = "outputs/eval"  # each command writes <output_dir>/<command>/
    model_path: str | None = None  # None: policy.model_path; a checkpoint dir holding policy/ works
    model_name: str | None = None  # generator name in the outputs; None: from the model path
    prompts_path: str = "data/demo/eval.jsonl"  # prompts JSONL or verl parquet (the release's)
    # alpaca_eval answers, or the release's generate_data_300 (question, persona, response)
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
    personafeedback_path: str = "data/demo/personafeedback"  # published layout or release eval/data
    personafeedback_judge: str = _f("grm", choices=("grm", "pairwise"))
    personamem_questions_path: str = "data/demo/personamem/questions.csv"
    personamem_contexts_path: str = "data/demo/personamem/shared_contexts.jsonl"
    personamem_answerer: str = _f("policy", choices=("policy", "openai"))
    api: ApiConfig = field(default_factory=ApiConfig)


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
    api: ApiConfig = field(default_factory=ApiConfig)  # the teacher's endpoint
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
class ServeConfig:
    """`cpe-ray serve-judge`: the configured judge (`grm.*`) behind an OpenAI-compatible
    chat endpoint (cpe_ray/judges/serve.py)."""

    host: str = "127.0.0.1"  # loopback: only this machine can reach the judge
    port: int = _f(8000, ge=0, le=65535)  # 0: any free port (the start line prints it)
    model: str = "cpe-ray-judge"  # the model name clients send (grm.api.model, distill.api.model)
    # the variable holding the key clients must send; None: any key (loopback hosts only)
    api_key_env: str | None = None
    max_batch: int = _f(16, ge=1)  # queued requests judged in one call (one engine batch)
    batch_wait_s: float = _f(0.01, ge=0)  # how long a request waits for others to join it


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
    serve: ServeConfig = field(default_factory=ServeConfig)
