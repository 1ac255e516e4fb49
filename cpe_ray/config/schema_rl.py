"""The method's sections of the schema (method.md 3): rollout engines, the GRM, Critique-Post-
Edit, rollout correction and the PPO update. The docstring under each field is its help
(`helptext.py`); `Config` in `schema.py` gathers these sections.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cpe_ray.config.choices import (
    ADVANTAGE_ESTIMATOR_NAMES,
    CORRECTION_MODES,
    CORRECTION_PRESETS,
    DEFAULT_DIMENSIONS,
    DEFAULT_LABEL_ALIASES,
    DEFAULT_WEIGHTS,
    GRM_BACKENDS,
    LOGPROBS_MODES,
    MICRO_BATCH_WEIGHTINGS,
    MINI_BATCH_UNITS,
    ON_MISSING_CHOICES,
    PERSONA_FORMATS,
    RELEASE_TEMPLATE_PLACEHOLDERS,
    REWARD_AGGREGATIONS,
    STRATEGIES,
)
from cpe_ray.config.schema_base import ApiConfig, Frozen, _f


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
    logprobs_mode: str = _f("processed", choices=LOGPROBS_MODES)
    """Behaviour log-probs the engines report for sampled tokens: processed or raw.

    processed (vLLM's processed_logprobs): of the distribution sampled from, after temperature
    and top_p, renormalised over the nucleus; raw (vLLM's raw_logprobs): of the model's own,
    before temperature and top_p, over the whole vocabulary. The learner scores the whole
    vocabulary at each row's temperature: processed matches it at top_p 1, raw at temperature
    1 (at top_p 0.9 processed reads higher: an unchanged policy's rewrite ratio ~0.90 a
    token). Greedy rows get the model's own log-probs under either. HF and vLLM engines alike."""
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
    critique_persona_format: str = _f("text", choices=PERSONA_FORMATS)
    """How the persona is written into the critique call: text (as given) or python_dict.

    python_dict: a persona that is a JSON object is written as Python's str(dict), as the
    release's critique call does; other personas, and the score call, stay as given."""
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
    all failed to parse stops the run before it is trained on. 1 turns both checks off (a
    GRM under test that writes no scores)."""
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
class RolloutCorrectionConfig(Frozen):
    """Importance weights of the samples against the engines' log-probs, kept bounded
    (cpe_ray/algo/correction.py; verl's algorithm.rollout_correction, slime's --use-tis)."""

    preset: str | None = _f(None, choices=tuple(CORRECTION_PRESETS))
    """A peer's setting written out as this section's keys: none, tis, mis or tis_mis.

    tis: token weights truncated at 2.0 (verl, slime); mis: sequences outside [0.5, 2.0] masked,
    veto 1e-4 (slime); both with rewrite_clip 2.0. Keys given beside it win; null: none used."""
    mode: str = _f("none", choices=CORRECTION_MODES)
    """Originals' correction: none, token_tis, seq_mis or token_tis_seq_mis.

    token_tis: each token's loss times min(pi_old / pi_engine, truncation); seq_mis: times the
    sequence's product of ratios, sequences outside seq_band leave the loss; both: token weights
    on the sequences the band keeps. None on the CPU default, where the gap is 2e-7 a token."""
    truncation: float = _f(2.0, gt=0)
    """Upper bound C of the token weights (token_tis modes)."""
    seq_band: list[float] = _f([0.5, 2.0])
    """[low, high]: a sequence whose weight pi_old / pi_engine is outside leaves the loss.

    seq_mis modes; slime's mask band, verl's seq_sum_k1 threshold "0.5_2.0"."""
    token_veto: float | None = _f(None, gt=0, le=1)
    """A token with pi_old / pi_engine below this rejects its whole sequence; null: no veto.

    verl's rollout_token_veto_threshold and slime's rs_veto_threshold (1e-4 to 1e-6)."""
    rewrite_clip: float | None = _f(None, gt=0)
    """Upper bound of a rewrite's weight pi_theta / pi_e in the edit loss; null: none.

    A truncated weight, not a clip: above it the token still learns, with weight rewrite_clip.
    The release runs the rewrite ratio unclipped (ppo.edit_clip_* null)."""


@dataclass
class PPOConfig(Frozen):
    """The PPO update: advantages, clipping, KL and the rewrite loss (method.md 3.6-3.7)."""

    advantage_estimator: str = _f("gae", choices=ADVANTAGE_ESTIMATOR_NAMES)
    """Advantages: gae (with a critic), grpo or rloo (against the prompt's other samples)."""
    reward_aggregation: str = _f("weighted_sum", choices=REWARD_AGGREGATIONS)
    """How the GRM's dimensions make the advantage: weighted_sum or per_dimension (GDPO).

    weighted_sum: grm.weights' sum of the scores is the one reward (the paper's); per_dimension
    (grpo / rloo, a GRM with dimensions): each dimension against its group, then their weighted
    sum, normalised over the batch's rows."""
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
    micro_batch_weighting: str = _f("tokens", choices=MICRO_BATCH_WEIGHTINGS)
    """How micro-batches weigh in a mini-batch's loss: tokens (ours) or rows (verl's, the release).

    tokens: loss_agg over the whole mini-batch, each token alike however rows are split; rows:
    loss_agg within each micro-batch, times its share of the mini-batch's rows (verl's
    dp_actor / dp_critic), so a token of a micro-batch of short answers weighs more."""
    epochs: int = _f(1, ge=1)
    """Passes over each step's experience."""
    mini_batch_size: int = _f(4, ge=1)
    """Prompts per optimiser step (with their samples)."""
    mini_batch_unit: str = _f("prompts", choices=MINI_BATCH_UNITS)
    """What mini_batch_size counts: prompts or rows.

    "prompts": rollout_batch_size / mini_batch_size optimiser steps a step, rewrites spread over
    them; "rows": ceil(rows / (mini_batch_size x n)) equal steps, so kept rewrites add steps (the
    release: 512 answers + 256 rewrites = 3 steps of 256 rows at ratio 0.5)."""
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)
    """Importance weights against the engines' log-probs: truncation, masking, veto."""


@dataclass
class MonitorConfig(Frozen):
    """The reward-hacking monitor of every training run (cpe_ray/rl/monitor.py): metrics under
    monitor/, a warning line when a measure stays over its threshold, a summary at the end."""

    enabled: bool = True
    """Measure each step's answers, warn and write monitor_summary.json; false: none of it."""
    baseline_steps: int = _f(3, ge=1)
    """The run's first steps whose mean answer length is the start that lengths compare to."""
    patience: int = _f(2, ge=1)
    """Steps in a row over a threshold before the warning (one warning per crossing)."""
    max_reward_length_corr: float = _f(0.5, ge=-1, le=1)
    """Pearson correlation of the answers' weighted reward with their token length, at most."""
    max_length_ratio_to_start: float = _f(1.5, gt=0)
    """Mean answer length over the baseline's (the run's first steps), at most."""
    max_persona_term_share: float = _f(0.8, ge=0, le=1)
    """Share of answers that repeat persona_terms_min or more persona terms, at most."""
    max_names_user_share: float = _f(0.2, ge=0, le=1)
    """Share of answers that call the user by a name the question does not hold, at most."""
    persona_terms_min: int = _f(3, ge=1)
    """Distinct persona terms (not in the question) that make an answer count as repeating."""
