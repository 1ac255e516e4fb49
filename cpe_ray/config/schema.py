"""The run configuration's schema: one typed dataclass per section, defaults = the CPU run.

The defaults are the offline CPU run (mirrored in `conf/default.yaml`); experiment YAMLs
state only what differs. Per-field rules live next to each field as metadata (`choices`,
`ge`, `gt`, `le`) through `_f`, and `cpe_ray.config` enforces them generically. The docstring
under each field is its help text (`helptext.py` reads it for `cpe-ray config` and
`conf/default.yaml`): a first line saying what it is and its unit, then any detail. Every
section is `Frozen`. Loading and validation are in `loading.py` beside this file.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import FrozenInstanceError, dataclass, field
from typing import Any

from cpe_ray.config.choices import (
    ADVANTAGE_ESTIMATOR_NAMES,
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
# A record over this many bytes is refused: a 50 MB prompt took minutes a step before it was
# cut to rollout.max_prompt_length, and filled samples.jsonl (1 MiB: ~250,000 tokens of text)
MAX_RECORD_BYTES = 1024**2
# Checkpoint cadence by default: a fault costs at most this many steps or minutes of replay
# (a tiny-model checkpoint is 4 MB and takes a fraction of a second)
DEFAULT_SAVE_EVERY = 10
DEFAULT_SAVE_EVERY_MINUTES = 30.0
DEFAULT_MAX_RESTARTS = 3
# AdamW's (beta1, beta2) by default: OpenRLHF's for RLHF actors and critics (a shorter second-
# moment memory than torch's (0.9, 0.999), which verl and the paper release keep)
DEFAULT_ADAM_BETAS = (0.9, 0.95)
# Keys that were settings once and that nothing reads now: a file naming one still loads,
# with one warning line (the key never changed a run), where an unknown key is an error.
REMOVED_KEYS: Mapping[str, str] = {
    "data.eval_path": "evaluation reads eval.prompts_path",
    "logging.log_every": "every step is logged",
}


def _f(default: Any, **rules: Any) -> Any:
    """A dataclass field with validation rules as metadata (mutable defaults copied)."""
    if isinstance(default, list | dict):  # nested lists too: no instance shares them
        return field(default_factory=lambda: copy.deepcopy(default), metadata=rules)
    return field(default=default, metadata=rules)


class Frozen:
    """A schema section's fields are set once, by its constructor: nothing changes a loaded
    config while a run goes (verl's config dataclasses are frozen the same way). A changed
    config is a new one: `dataclasses.replace`, or `load_config` with overrides."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__:
            raise FrozenInstanceError(
                f"cannot set {type(self).__name__}.{name}: a config is frozen once built; "
                "make a new one with dataclasses.replace(...) or load_config(path, overrides)")
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete {type(self).__name__}.{name}: a config is "
                                  "frozen once built")


@dataclass
class RunConfig(Frozen):
    """What names a run, where it writes, and how it starts."""

    name: str = "cpe-tiny"
    """The run's name: its folder is run.output_dir/<name>; also its wandb name."""
    output_dir: str = "outputs"
    """Folder holding the run folders (a path)."""
    seed: int = _f(42, ge=0)
    """Seed of every random choice: sampling, data order, rewrite selection."""
    overwrite: bool = False
    """Replace what another run left in output_dir/<name> (logs, checkpoints, wandb).

    Without it a run directory holding another run is refused unless the job resumes it."""
    checkpoint_checksums: bool = True
    """Record the sha256 of every checkpoint file in its manifest and check it on resume.

    false records and checks sizes only (hashing a 7B run's ~100 GB checkpoint takes minutes)."""


@dataclass
class ClusterConfig(Frozen):
    """The Ray cluster and how actors are placed on it."""

    address: str | None = None
    """Ray to use: null starts a local Ray; "auto" or ray://host:port connects."""
    use_gpu: bool = False
    """Engines and learners on CUDA GPUs, one bundle each; false: everything on CPUs."""
    placement_strategy: str = _f("PACK", choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    """Ray placement-group strategy of the actors' bundles."""
    colocate_learner_rollout: bool = False
    """Each rollout engine GPU shares a bundle with one learner rank (weights move by CUDA IPC).

    Needs rollout.num_engines x rollout.tensor_parallel_size = learner.num_ranks."""
    cpus_per_bundle: float = _f(1.0, gt=0)
    """CPUs reserved per actor bundle; also each actor's torch threads (at least 1)."""
    placement_timeout_s: float = _f(60.0, gt=0)
    """Seconds Ray may take to place every bundle before the run stops with what is missing."""
    connect_timeout_s: float = _f(30.0, gt=0)
    """Seconds cluster.address has to accept a connection.

    Ray's own connect retries for minutes with a warning every few seconds."""

    @property
    def threads_per_actor(self) -> int:
        """Torch threads of each actor process: its bundle's CPUs, at least one."""
        return max(1, int(self.cpus_per_bundle))


@dataclass
class PolicyConfig(Frozen):
    """The policy model being trained (and, by default, the model every stage starts from)."""

    model_path: str = TINY_MODEL
    """The policy: a Hugging Face name or folder, or an alias (tiny, smollm2-135m).

    An alias's model is built on first use; tiny is the offline tiny model."""
    dtype: str = _f("float32", choices=("float32", "bfloat16", "float16"))
    """Precision of the policy, critic and reference in learners and engines.

    Shared: the GRM's engines, the Bradley-Terry scorer and the supervised stages load in it."""
    system_template: str = "policy_system_en.txt"
    """The policy's system prompt around the persona (a name in conf/prompts/ or a file path)."""
    trust_remote_code: bool = False
    """Let transformers run a model repository's own code.

    Shared: also for the GRM, the Bradley-Terry scorer and evaluation models."""


@dataclass
class RolloutConfig(Frozen):
    """The engines that sample the policy's answers and rewrites (method.md 3.1)."""

    backend: str = _f("hf", choices=("hf", "vllm"))
    """Generation engine: hf (transformers, any device) or vllm."""
    num_engines: int = _f(1, ge=1)
    """Rollout engine actors."""
    tensor_parallel_size: int = _f(1, ge=1)
    """GPUs per rollout engine (vLLM tensor parallelism)."""
    n_samples_per_prompt: int = _f(4, ge=1)
    """Answers sampled per prompt (n)."""
    temperature: float = _f(1.0, ge=0)
    """Sampling temperature of the answers (0: greedy)."""
    top_p: float = _f(1.0, gt=0, le=1)
    """Nucleus-sampling mass of answers, rewrites and evaluation answers (1: off)."""
    max_prompt_length: int = _f(1024, ge=1)
    """Tokens of an answer or edit prompt at most; a longer one is shortened (never the persona)."""
    max_new_tokens: int = _f(48, ge=1)
    """Tokens of an answer at most."""
    gpu_memory_utilization: float = _f(0.6, gt=0, le=1)
    """Share of each GPU a vLLM engine takes (weights and KV cache)."""
    kv_cache_memory_bytes: int | None = _f(None, ge=1)
    """vLLM's KV cache in bytes; null: gpu_memory_utilization on GPUs, 256 MiB on a CPU.

    On a CPU (CPU_KV_CACHE_BYTES) because vLLM's CPU worker would take that fraction of the
    machine's memory."""
    enable_sleep: bool = False
    """vLLM sleep mode between steps (the engine frees its GPU memory meanwhile): CUDA only."""
    max_batch_rows: int = _f(64, ge=1)
    """HF engine: sequences decoded together at most.

    Shared: every HF judge engine (the GRM's, evaluation's) and evaluation's policy use it too."""


@dataclass
class ApiConfig(Frozen):
    """An OpenAI-compatible endpoint: the GRM (`grm.api`), an evaluation judge (`eval.api`),
    the distillation teacher (`distill.api`)."""

    base_url: str | None = None
    """The endpoint's URL, e.g. https://api.openai.com/v1 (null: none configured)."""
    model: str | None = None
    """The model name sent with each request."""
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the key; the key itself never enters config."""
    timeout_s: float = _f(60.0, gt=0)
    """Seconds a request may take."""
    max_retries: int = _f(5, ge=0)
    """Retries per request, on timeouts, connection errors, 408/409/429/5xx."""
    backoff_initial_s: float = _f(1.0, gt=0)
    """Seconds of the first wait before a retry; waits double, with jitter."""
    backoff_max_s: float = _f(30.0, gt=0)
    """Seconds of the longest wait between retries."""
    max_concurrency: int = _f(8, ge=1)
    """Requests in flight at most."""
    max_wait_s: float = _f(300.0, gt=0)
    """Seconds one request may take with all its retries; then it fails (a GRM: the run stops)."""


GRM_API_CONCURRENCY = 16  # the GRM judges every answer of a step: more requests in flight
# A retry of an unparsed judgement from a greedy (temperature 0) call would write the same
# text again; it samples at this temperature instead, below the critique call's 0.9 so that
# the scores stay close to the greedy ones while the format gets another chance.
GRM_RETRY_TEMPERATURE = 0.7


@dataclass
class GRMConfig(Frozen):
    """The generative reward model, the judge that critiques and scores (method.md 2, 3.2-3.3).

    Its engine has no settings of its own for precision, HF batch size and remote code: an `hf`
    or `vllm` GRM (and a `bt` scorer) loads in `policy.dtype`, with `policy.trust_remote_code`,
    and an `hf` GRM decodes `rollout.max_batch_rows` sequences together."""

    backend: str = _f("rubric", choices=tuple(GRM_BACKENDS))
    """The judge: rubric, hf, vllm, openai or bt (cpe_ray/judges/registry.py).

    rubric: offline rules; hf, vllm: a GRM checkpoint on engines; openai: an endpoint; bt: a
    Bradley-Terry model."""
    model_path: str | None = None
    """The GRM (or Bradley-Terry) checkpoint for backend hf, vllm or bt."""
    template: str = "grm_en.txt"
    """The score call's prompt (a name in conf/prompts/ or a file path)."""
    critique_template: str | None = None
    """The critique call's prompt; null: grm.template for both calls."""
    template_placeholders: dict[str, str] = _f(dict(RELEASE_TEMPLATE_PLACEHOLDERS))
    """A template's placeholder -> persona / question / answer.

    The default maps the release's names, so a prompt taken out of it loads as is
    (docs/judges.md)."""
    dimensions: list[str] = _f(list(DEFAULT_DIMENSIONS))
    """The score dimensions the GRM writes in its <scores> block."""
    label_aliases: dict[str, list[str]] = _f({d: list(a) for d, a in
                                              DEFAULT_LABEL_ALIASES.items()})
    """Other labels the GRM may write for a dimension (the release's `Natural`, Chinese names)."""
    weights: dict[str, float] = _f(dict(DEFAULT_WEIGHTS))
    """Weight of each dimension in the scalar reward, sum of weight x score (method.md 2)."""
    score_min: float = -5.0
    """Lowest score of a dimension; a score below is clamped to it (with a warning)."""
    score_max: float = 5.0
    """Highest score of a dimension; a score above is clamped to it (with a warning)."""
    on_missing: str = _f("zero", choices=ON_MISSING_CHOICES)
    """What a dimension missing from a judgement counts: zero, renormalize or none.

    zero: 0 (the release's); renormalize: its weight spread over the present ones; none: no
    reward."""
    critique_temperature: float = _f(0.9, ge=0)
    """Sampling temperature of the critique call."""
    score_temperature: float = _f(0.0, ge=0)
    """Sampling temperature of the score call (0: greedy)."""
    retry_temperature: float = _f(GRM_RETRY_TEMPERATURE, gt=0)
    """Sampling temperature of retries of an unparsed judgement from a temperature-0 call.

    A greedy retry would write the same text again; below the critique's 0.9 so that the scores
    stay close to the greedy ones."""
    max_new_tokens: int = _f(512, ge=1)
    """Tokens of a judgement (critique and scores) at most."""
    max_retries: int = _f(5, ge=0)
    """Regenerations of a judgement that did not parse."""
    judge_timeout_s: float = _f(900.0, gt=0)
    """Seconds a step waits for any of the judge's answers; then the run stops naming the judge.

    An endpoint's own retries are bounded by grm.api.max_wait_s; this bounds a judge that hangs
    (a stalled GRM actor, a judge thread that never returns)."""
    max_parse_failure_frac: float = _f(0.5, ge=0, le=1)
    """Share of a step's judgements that may fail to parse before a warning.

    Past it for grm.parse_failure_patience steps in a row, the run stops; a step whose scores
    all failed to parse stops the run before it is trained on."""
    parse_failure_patience: int = _f(3, ge=1)
    """Steps in a row over grm.max_parse_failure_frac that stop the run."""
    num_engines: int = _f(1, ge=1)
    """GRM engine actors (hf, vllm), or Bradley-Terry scorer actors on GPUs (bt)."""
    tensor_parallel_size: int = _f(1, ge=1)
    """GPUs per GRM engine (hf, vllm)."""
    gpu_memory_utilization: float = _f(0.9, gt=0, le=1)
    """Share of each GPU a vLLM GRM engine (or evaluation's judge engine) takes."""
    kv_cache_memory_bytes: int | None = _f(None, ge=1)
    """The vLLM GRM engine's KV cache in bytes, as rollout.kv_cache_memory_bytes."""
    api: ApiConfig = field(default_factory=lambda: ApiConfig(
        max_concurrency=GRM_API_CONCURRENCY))
    """The GRM's endpoint (backend openai)."""
    rubric_min_words: int = _f(24, ge=0)
    """backend=rubric: answers shorter than this many words lose helpfulness.

    The length rule of method.md 2 (300-400 tokens) in words, scaled to the tiny model's 48-token
    answers: most of the budget in real words."""
    rubric_max_words: int = _f(40, ge=1)
    """backend=rubric: answers longer than this many words lose helpfulness and naturalness."""
    rubric_words_per_point: int = _f(3, ge=1)
    """backend=rubric: each this many words (or part) outside the word range cost a point."""


@dataclass
class PostEditConfig(Frozen):
    """Critique-Post-Edit: the policy rewrites answers from their critiques, and some rewrites
    join the batch (method.md 3.4-3.5)."""

    enabled: bool = True
    """Critique and rewrite answers, and train on the kept rewrites; false: plain PPO on answers."""
    strategy: str = _f("random", choices=STRATEGIES)
    """Which rewrites are kept (method.md 3.5): random, reward, batch_reward or improvement."""
    ratio: float = _f(0.5, ge=0, le=1)
    """Share of the rewrites kept: at most floor(ratio x N) of a step's N."""
    template: str = "edit_en.txt"
    """The edit prompt (a name in conf/prompts/ or a file path)."""
    temperature: float = _f(1.0, ge=0)
    """Sampling temperature of the rewrites (with rollout.top_p).

    The learner scores each row at the temperature it was sampled with
    (`Experience.temperature`)."""
    max_new_tokens: int = _f(48, ge=1)
    """Tokens of a rewrite at most."""
    kept_multiple: int = _f(1, ge=1)
    """The number of kept rewrites is rounded down to a multiple of this (1: no rounding).

    The release keeps a multiple of its GPU count (8), because verl splits a batch evenly over
    data-parallel ranks; our learner takes any row count."""


@dataclass
class PPOConfig(Frozen):
    """The PPO update: advantages, clipping, KL and the rewrite loss (method.md 3.6-3.7)."""

    advantage_estimator: str = _f("gae", choices=ADVANTAGE_ESTIMATOR_NAMES)
    """Advantages: gae (with a critic), grpo or rloo (against the prompt's other samples)."""
    gamma: float = _f(1.0, ge=0, le=1)
    """GAE's discount per token."""
    lam: float = _f(1.0, ge=0, le=1)
    """GAE's lambda."""
    whiten_advantages: bool = True
    """GAE only: whiten advantages over the batch's tokens (as verl and OpenRLHF do).

    GRPO / RLOO advantages are already relative to their group and are never whitened: over
    tokens, one long answer would shift every other answer's sign (verl, OpenRLHF, TRL agree)."""
    clip_low: float = _f(0.2, ge=0, le=1)
    """PPO's ratio is clipped below at 1 - clip_low."""
    clip_high: float = _f(0.2, ge=0)
    """PPO's ratio is clipped above at 1 + clip_high."""
    dual_clip: float | None = _f(None, gt=1)
    """Dual-clip bound c (> 1) on the loss of negative-advantage tokens; null: off."""
    edit_loss: bool = True
    """The off-policy rewrite loss of method.md 3.7; false: rewrites get the plain PPO loss."""
    edit_clip_low: float | None = _f(0.2, ge=0, le=1)
    """The rewrite ratio pi_theta / pi_e is clipped to [1 - edit_clip_low, 1 + edit_clip_high].

    The paper's text; null leaves that side open. The release's main CPE script runs both null
    (off_policy_min_clip = off_policy_max_clip = -1, method.md 3.7)."""
    edit_clip_high: float | None = _f(0.2, ge=0)
    """Upper side of the rewrite ratio's clip: 1 + edit_clip_high; null: open."""
    value_clip: float | None = _f(0.5, gt=0)
    """The critic's new values are clipped to old values +- value_clip; null: unclipped."""
    kl_coef: float = _f(0.0, ge=0)
    """Weight of the KL to the reference model (needs learner.use_reference); 0: no KL."""
    kl_estimator: str = _f("k1", choices=("k1", "k2", "k3"))
    """Per-token KL estimator: k1, k2 or k3."""
    kl_in_reward: bool = True
    """true: subtract kl_coef x KL from the rewards; false: add it to the loss."""
    entropy_coef: float = _f(0.0, ge=0)
    """Weight of the entropy bonus in the policy loss (0: none)."""
    loss_agg: str = _f("token_mean", choices=("token_mean", "seq_mean_token_mean",
                                              "seq_mean_token_sum"))
    """How token losses make the loss: token_mean, seq_mean_token_mean or seq_mean_token_sum.

    token_mean: over all tokens; seq_mean_*: per sequence (mean or sum of its tokens), then over
    sequences."""
    epochs: int = _f(1, ge=1)
    """Passes over each step's experience."""
    mini_batch_size: int = _f(4, ge=1)
    """Prompts per optimiser step (with their samples)."""
    mini_batch_unit: str = _f("prompts", choices=MINI_BATCH_UNITS)
    """What mini_batch_size counts: prompts or rows.

    "prompts": rollout_batch_size / mini_batch_size optimiser steps a step, rewrites spread over
    them; "rows": ceil(rows / (mini_batch_size x n)) equal steps, so kept rewrites add steps (the
    release: 512 answers + 256 rewrites = 3 steps of 256 rows at ratio 0.5)."""


@dataclass
class LearnerConfig(Frozen):
    """The DeepSpeed learner ranks: optimiser, precision of memory, weight sync."""

    num_ranks: int = _f(1, ge=1)
    """Data-parallel learner ranks (one GPU each on GPUs)."""
    zero_stage: int = _f(0, choices=(0, 1, 2, 3))
    """DeepSpeed ZeRO stage (0: off)."""
    offload: bool = False
    """ZeRO offload to CPU memory: optimiser state (stage >= 1), parameters too (stage 3)."""
    actor_lr: float = _f(1e-3, gt=0)
    """The policy's learning rate.

    The tiny model's rates: 1e-5 moved its reward by nothing measurable in 16 steps, 1e-3 by +0.2
    (the paper's 7B uses 1e-6 / 1e-5: conf/experiment/)."""
    critic_lr: float = _f(1e-3, gt=0)
    """The critic's learning rate (as actor_lr, the tiny model's)."""
    weight_decay: float = _f(0.0, ge=0)
    """AdamW's weight decay, policy's and critic's."""
    adam_betas: list[float] = _f(list(DEFAULT_ADAM_BETAS))
    """AdamW's (beta1, beta2), policy's and critic's."""
    warmup_steps: int = _f(0, ge=0)
    """Optimiser steps of linear learning-rate warm-up (0: none)."""
    max_grad_norm: float = _f(1.0, gt=0)
    """Gradients are clipped to this global norm."""
    micro_batch_size: int = _f(4, ge=1)
    """Rows per rank per forward and backward."""
    use_reference: bool = False
    """Keep a frozen reference policy for the KL term (ppo.kl_coef)."""
    critic_model_path: str | None = None
    """The critic's starting model; null: initialise the critic from the policy."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, slower."""
    share_prompts: bool = True
    """Run each distinct prompt of a micro-batch once, its rows' responses on its keys and
    values.

    See learners/forward.py. The same results up to rounding; on the CPU default a forward and
    backward 1.7x faster at micro_batch_size 4, 3.7x with the whole batch in one
    (bench/learner_forward.py). Off: one plain forward over every row (and under gradient
    checkpointing, which runs without a cache, in training)."""
    weight_sync_bucket_mb: float = _f(64.0, gt=0)
    """MiB of weights per bucket when the learner sends weights to the engines."""
    weight_sync_timeout_s: float = _f(120.0, gt=0)
    """Seconds a weight-sync peer may stay silent before the sync fails."""
    dist_timeout_s: float = _f(600.0, gt=0)
    """Seconds of DeepSpeed's own group's collectives and start-up at most."""


@dataclass
class DataConfig(Frozen):
    """The training prompts."""

    train_path: str = "data/demo/train.jsonl"
    """The training prompts: JSONL or verl parquet (the release's)."""
    on_bad_record: str = _f("error", choices=("error", "skip"))
    """A malformed record: error stops with its line, skip drops it with a warning."""
    max_record_bytes: int = _f(MAX_RECORD_BYTES, ge=1)
    """A longer record (JSONL line, parquet user turn) is a malformed one (on_bad_record)."""
    shuffle: bool = True
    """Shuffle the prompts each epoch (seeded by run.seed)."""


@dataclass
class TrainerConfig(Frozen):
    """The training loop: batch size, length, checkpoints, restarts, off-policy steps."""

    rollout_batch_size: int = _f(8, ge=1)
    """Prompts per step."""
    chunks_per_engine: int = _f(1, ge=1)
    """Prompt chunks per rollout engine and step.

    With more than one, the GRM critiques and scores a chunk's answers while the engine still
    generates the next (smaller batches)."""
    total_epochs: int = _f(1, ge=1)
    """Passes over the training prompts."""
    max_steps: int | None = _f(None, ge=1)
    """Steps at most; null: total_epochs passes over the data."""
    save_every: int = _f(DEFAULT_SAVE_EVERY, ge=0)
    """Checkpoint every save_every steps (0: none by count).

    Checkpoints are also written every save_every_minutes and at the end; a learner that dies
    replays from the newest."""
    save_every_minutes: float = _f(DEFAULT_SAVE_EVERY_MINUTES, ge=0)
    """Checkpoint every this many minutes of training (0: none by time)."""
    sample_table_every: int = _f(1, ge=1)
    """Steps between wandb tables of samples (samples.jsonl gets every step)."""
    resume: str = "never"
    """never, auto (the newest whole checkpoint) or a checkpoint path."""
    resume_override: bool = False
    """Resume although the seed, data, batch shape or models differ from the run's config."""
    max_restarts: int = _f(DEFAULT_MAX_RESTARTS, ge=0)
    """Restarts of dead engine (rollout, GRM) or learner actors within one run.

    Past it the run ends with one line naming the actor (0: the first death ends it)."""
    off_policy_steps: int = _f(0, ge=0, le=1)
    """0: the synchronous loop; 1: one-step off-policy.

    With 1 the engines generate, critique and rewrite batch t+1 with the weights they hold while
    the learner trains on batch t; weights move between batches. 0 is the default until 1 has
    shown equal learning at scale."""
    behaviour_weight_cap: float = _f(2.0, gt=0)
    """Truncation of the importance weight pi_prox / pi_behav of stale originals.

    Decoupled PPO (AReaL's behav_imp_weight_cap); rewrites already carry their ratio against log
    pi_e."""


@dataclass
class LoggingConfig(Frozen):
    """Metrics and samples to Weights & Biases (the run folder's JSONL files are always written)."""

    wandb_mode: str = _f("offline", choices=("online", "offline", "disabled"))
    """Weights & Biases: online, offline (files in the run's wandb/) or disabled."""
    project: str = "cpe-ray"
    """The wandb project."""
    entity: str | None = None
    """The wandb entity (team or user); null: wandb's default."""
    tags: list[str] = _f([])
    """Tags of the wandb run."""


@dataclass
class EvalConfig(Frozen):
    """`cpe-ray eval winrate | personafeedback | personamem` (cpe_ray/evaluation/)."""

    output_dir: str = "outputs/eval"
    """Each command writes <output_dir>/<command>/."""
    model_path: str | None = None
    """The evaluated model; null: policy.model_path. A checkpoint folder holding policy/ works."""
    model_name: str | None = None
    """The generator's name in the outputs; null: from the model path."""
    prompts_path: str = "data/demo/eval.jsonl"
    """The win-rate prompts: JSONL or verl parquet (the release's)."""
    baseline_path: str | None = "data/demo/eval_baseline.jsonl"
    """The baseline's answers: alpaca_eval format, or the release's generate_data_300.

    The release's file holds (question, persona, response) records."""
    answers_path: str | None = None
    """Judge these answers (alpaca_eval format) instead of generating them; null: generate."""
    limit: int | None = _f(None, ge=1)
    """Evaluate only the first N prompts / cases / questions; null: all."""
    max_new_tokens: int = _f(256, ge=1)
    """Tokens of an evaluated answer at most."""
    temperature: float = _f(0.0, ge=0)
    """Sampling temperature of the evaluated answers (0: greedy)."""
    max_prompt_tokens: int = _f(4096, ge=1)
    """Tokens of an evaluation prompt at most; a longer one keeps its end (PersonaMem histories)."""
    judge: str = _f("grm", choices=("grm", "openai", "hf", "length"))
    """The pairwise judge: grm, openai, hf or length.

    grm: the configured GRM's rewards; openai: eval.api; hf: eval.judge_model_path; length: the
    longer answer (a sanity check)."""
    judge_model_path: str | None = None
    """judge=hf: a local judge model."""
    judge_template: str = "pairwise_en.txt"
    """The pairwise judge's prompt (a name in conf/prompts/ or a file path)."""
    judge_max_new_tokens: int = _f(512, ge=1)
    """Tokens of a pairwise verdict at most."""
    judge_temperature: float = _f(0.0, ge=0)
    """Sampling temperature of the pairwise judge (0: greedy)."""
    max_parse_retries: int = _f(2, ge=0)
    """Re-asks of a sampled judge whose verdict did not parse."""
    both_orders: bool = True
    """Judge (model, baseline) and (baseline, model): no position bias."""
    score_answers: bool = True
    """The GRM reward of every evaluated answer, for reward-vs-length plots."""
    personafeedback_path: str = "data/demo/personafeedback"
    """PersonaFeedback's root folder: the published layout or the release's eval/data."""
    personafeedback_judge: str = _f("grm", choices=("grm", "pairwise"))
    """grm: the GRM scores each answer alone; pairwise: eval.judge compares them."""
    personamem_questions_path: str = "data/demo/personamem/questions.csv"
    """PersonaMem's questions (CSV)."""
    personamem_contexts_path: str = "data/demo/personamem/shared_contexts.jsonl"
    """PersonaMem's shared contexts (JSONL)."""
    personamem_answerer: str = _f("policy", choices=("policy", "openai"))
    """Who answers PersonaMem: policy (the evaluated model) or openai (eval.api)."""
    api: ApiConfig = field(default_factory=ApiConfig)
    """The endpoint of judge=openai and personamem_answerer=openai."""


@dataclass
class StageTrainConfig(Frozen):
    """What the supervised stages share (`cpe-ray sft`, `grm train`, `rm train`).

    Ranks, ZeRO stage, offload, micro-batch size, gradient clipping and checkpointing come
    from `learner`, the precision from `policy.dtype`. Each stage writes under
    `run.output_dir/<name>/` in the layout of `cpe-ray train`.
    """

    name: str = "stage"
    """The stage's run folder: run.output_dir/<name>."""
    epochs: int = _f(1, ge=1)
    """Passes over the training split."""
    batch_size: int = _f(8, ge=1)
    """Examples (conversations or pairs) per optimiser step."""
    lr: float = _f(1e-3, gt=0)
    """Learning rate: the tiny model's; a 7B SFT uses ~1e-5 (docs/stages.md)."""
    schedule: str = _f("constant", choices=("constant", "cosine"))
    """Learning rate after warm-up: constant, or cosine decay to 0."""
    warmup_steps: int = _f(0, ge=0)
    """Optimiser steps of linear learning-rate warm-up (0: none)."""
    max_length: int = _f(1024, ge=2)
    """Tokens per sequence; longer ones lose their end."""
    max_steps: int | None = _f(None, ge=1)
    """Optimiser steps at most; null: `epochs` passes over the training split."""
    eval_fraction: float = _f(0.125, ge=0, le=0.5)
    """Share of the records held out (by a seeded hash of each record)."""
    eval_every: int = _f(0, ge=0)
    """Steps between held-out evaluations (0: only at the end)."""
    save_every: int = _f(0, ge=0)
    """Steps between checkpoints (0: only at the end)."""
    shuffle: bool = True
    """Shuffle the training split each epoch (seeded by run.seed)."""
    resume: str = "never"
    """never, auto (the newest whole checkpoint) or a checkpoint path."""


@dataclass
class SFTConfig(StageTrainConfig):
    """`cpe-ray sft`: stage 1, the policy fine-tuned on personalized conversations."""

    name: str = "sft-tiny"
    data_path: str = "data/demo/sft.jsonl"
    """`load_sft` conversations (JSONL); the loss is on assistant turns."""


@dataclass
class DistillConfig(StageTrainConfig):
    """`cpe-ray grm collect` (a teacher judges triples) and `grm train` (stage 2: GRM SFT)."""

    name: str = "grm-tiny"
    max_length: int = _f(2048, ge=2)
    """Tokens per sequence; the rubric prompt alone is ~1000 tiny-model tokens."""
    input_path: str = "data/demo/grm_inputs.jsonl"
    """(persona, question, answer) triples for the teacher to judge (JSONL)."""
    output_path: str = "outputs/grm-judgements.jsonl"
    """The teacher's judgements (JSONL): appended to, so collection resumes."""
    failures_path: str | None = None
    """Inputs the teacher could not judge; null: <output_path without .jsonl>.failures.jsonl."""
    api: ApiConfig = field(default_factory=ApiConfig)
    """The teacher's endpoint."""
    temperature: float = _f(0.0, ge=0)
    """The teacher's sampling temperature."""
    max_tokens: int = _f(1024, ge=1)
    """Tokens of a teacher's judgement at most."""
    model_path: str = TINY_MODEL
    """The student GRM's starting model (the paper: Qwen2.5-14B-Instruct)."""
    train_unparsed: bool = False
    """Also train on teacher outputs parse_judgement rejects."""
    eval_backend: str = _f("hf", choices=("hf", "vllm"))
    """Engine that generates the student's outputs for the parse-share check: hf or vllm."""


@dataclass
class RMConfig(StageTrainConfig):
    """`cpe-ray rm train`: a Bradley-Terry reward model (scalar head) on chosen/rejected pairs."""

    name: str = "rm-tiny"
    eval_fraction: float = _f(0.25, ge=0, le=0.5)
    data_path: str = "data/demo/pairwise.jsonl"
    """Pairwise JSONL (chosen / rejected), or a PersonaFeedback root."""
    model_path: str | None = None
    """The reward model's starting model; null: policy.model_path, with a new scalar head."""


@dataclass
class ServeConfig(Frozen):
    """`cpe-ray serve-judge`: the configured judge (`grm.*`) behind an OpenAI-compatible
    chat endpoint (cpe_ray/judges/serve.py)."""

    host: str = "127.0.0.1"
    """Address to listen on; loopback: only this machine can reach the judge."""
    port: int = _f(8000, ge=0, le=65535)
    """TCP port; 0: any free port (the start line prints it)."""
    model: str = "cpe-ray-judge"
    """The model name clients send (grm.api.model, distill.api.model)."""
    api_key_env: str | None = None
    """Variable holding the key clients must send; null: any key (loopback hosts only)."""
    max_batch: int = _f(16, ge=1)
    """Queued requests judged in one call (one engine batch) at most."""
    batch_wait_s: float = _f(0.01, ge=0)
    """Seconds a request waits for others to join its batch."""


@dataclass
class Config(Frozen):
    """The whole configuration: one section per concern (conf/default.yaml lists every key)."""

    run: RunConfig = field(default_factory=RunConfig)
    """The run's name, folder and seed."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """The Ray cluster: GPUs or CPUs, placement."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    """The policy model."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """The rollout engines that sample answers and rewrites."""
    grm: GRMConfig = field(default_factory=GRMConfig)
    """The generative reward model (the judge) and its engines or endpoint."""
    post_edit: PostEditConfig = field(default_factory=PostEditConfig)
    """Critique-Post-Edit: rewrites and which of them are kept."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """The PPO update."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """The DeepSpeed learner ranks and their optimiser."""
    data: DataConfig = field(default_factory=DataConfig)
    """The training prompts."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """The training loop: steps, checkpoints, restarts."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Weights & Biases logging."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """`cpe-ray eval winrate | personafeedback | personamem`."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """`cpe-ray sft`: stage 1, supervised fine-tuning of the policy."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """`cpe-ray grm collect` and `cpe-ray grm train`: stage 2, the GRM distilled from a teacher."""
    rm: RMConfig = field(default_factory=RMConfig)
    """`cpe-ray rm train`: a Bradley-Terry reward model (the PPO-with-BT ablation)."""
    serve: ServeConfig = field(default_factory=ServeConfig)
    """`cpe-ray serve-judge`: the configured judge behind an OpenAI-compatible endpoint."""
