"""The run configuration's schema: one typed dataclass per section, defaults = the CPU run.

The defaults are the offline CPU run (mirrored in `conf/default.yaml`); experiment YAMLs
state only what differs. Per-field rules live next to each field as metadata (`choices`,
`ge`, `gt`, `le`) through `_f`, and `cpe_ray.config` enforces them generically. The docstring
under each field is its help text (`helptext.py` reads it for `cpe-ray config` and
`conf/default.yaml`): a first line saying what it is and its unit, then any detail. Every
section is `Frozen`. Here: `Config` and the sections of the run, the cluster, the
policy, the learner, the data, the loop and logging; the method's sections are in
`schema_rl.py`, the other commands' in `schema_stages.py`, what every section is built
from in `schema_base.py`. Loading and validation are in `loading.py` beside this file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from cpe_ray.config.schema_base import TINY_MODEL, ApiConfig, Frozen, _f
from cpe_ray.config.schema_rl import (
    GRM_API_CONCURRENCY,
    GRM_RETRY_TEMPERATURE,
    GRMConfig,
    MonitorConfig,
    PostEditConfig,
    PPOConfig,
    RolloutConfig,
    RolloutCorrectionConfig,
)
from cpe_ray.config.schema_stages import (
    DistillConfig,
    EvalConfig,
    MergeConfig,
    MergeModelConfig,
    RMConfig,
    ServeConfig,
    SFTConfig,
    StageTrainConfig,
)

# Every section and constant of the schema, those of schema_base.py, schema_rl.py and
# schema_stages.py too: `from cpe_ray.config.schema import X` works for each.
__all__ = [
    "ApiConfig",
    "CPU_KV_CACHE_BYTES",
    "ClusterConfig",
    "Config",
    "DEFAULT_ADAM_BETAS",
    "DEFAULT_MAX_RESTARTS",
    "DEFAULT_SAVE_EVERY",
    "DEFAULT_SAVE_EVERY_MINUTES",
    "DataConfig",
    "DistillConfig",
    "EvalConfig",
    "Frozen",
    "GRMConfig",
    "GRM_API_CONCURRENCY",
    "GRM_RETRY_TEMPERATURE",
    "LearnerConfig",
    "LoggingConfig",
    "LoraConfig",
    "MAX_RECORD_BYTES",
    "MergeConfig",
    "MergeModelConfig",
    "MonitorConfig",
    "PPOConfig",
    "PolicyConfig",
    "PostEditConfig",
    "REMOVED_KEYS",
    "RESUME_KEYWORDS",
    "RMConfig",
    "RolloutConfig",
    "RolloutCorrectionConfig",
    "RunConfig",
    "SFTConfig",
    "ServeConfig",
    "StageTrainConfig",
    "TINY_MODEL",
    "TrainerConfig",
    "lora_enabled",
]

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
class LoraConfig(Frozen):
    """A LoRA adapter (peft) trained in place of the policy's weights (rank 0: off).

    The learner trains the adapter (only its tensors reach the optimiser and the engines), the
    reference is the base with the adapter off, and each checkpoint's policy/ is the merged
    model with the adapter in peft's layout beside it (adapter/). The supervised stages (sft,
    grm train, rm train) train an adapter of this shape too. ZeRO stages 0 to 3."""

    rank: int = _f(0, ge=0)
    """The adapter's rank r (0: off, every weight trains)."""
    alpha: float = _f(16.0, gt=0)
    """LoRA's alpha: the update is scaled by alpha / rank."""
    dropout: float = _f(0.0, ge=0, le=1)
    """Dropout on the adapter's input while training."""
    target_modules: list[str] = _f(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Names of the linear layers that get an adapter (peft's target_modules)."""
    critic: bool = False
    """The critic trains an adapter of its own too (and its new value head); false: all of it."""


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
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Train a LoRA adapter instead of the whole policy (rank 0: off)."""


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
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    """The reward-hacking monitor of training runs: measures, thresholds, warnings."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """`cpe-ray eval winrate | personafeedback | personamem`."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """`cpe-ray sft`: stage 1, supervised fine-tuning of the policy."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """`cpe-ray grm collect` and `cpe-ray grm train`: stage 2, the GRM distilled from a teacher."""
    rm: RMConfig = field(default_factory=RMConfig)
    """`cpe-ray rm train`: a Bradley-Terry reward model (the PPO-with-BT ablation)."""
    merge: MergeConfig = field(default_factory=MergeConfig)
    """`cpe-ray merge`: models of one architecture merged into one (DARE-TIES, TIES, ...)."""
    serve: ServeConfig = field(default_factory=ServeConfig)
    """`cpe-ray serve-judge`: the configured judge behind an OpenAI-compatible endpoint."""


def lora_enabled(cfg: Config) -> bool:
    """Whether the policy trains a LoRA adapter (policy.lora.rank > 0)."""
    return cfg.policy.lora.rank > 0
