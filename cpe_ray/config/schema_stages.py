"""The schema's sections of the other commands: `cpe-ray eval`, the supervised stages (`sft`,
`grm collect` / `grm train`, `rm train`, their shared `StageTrainConfig`), `merge` and
`serve-judge`.
The docstring under each field is its help (`helptext.py`); `Config` in `schema.py` gathers
these sections.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cpe_ray.config.choices import MERGE_METHODS
from cpe_ray.config.schema_base import TINY_MODEL, ApiConfig, Frozen, _f


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
    lc_target_se: float = _f(5.0, gt=0)
    """The LC win rate's standard error (points) whose prompt count lc_status estimates."""
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
class DistillFilterConfig(Frozen):
    """`distill.filter`: rejection sampling of judgements (MiCoTA, arXiv 2507.01887).

    Every judgement stays in `distill.output_path`, marked `kept` with a `reject_reason`;
    `grm train` trains on the kept ones. Parsing is the first test (`distill.train_unparsed`
    lifts it), then agreement with the reference, then the critique's length. With the
    defaults every parsed judgement is kept (no reference, no bound).
    """

    max_critique_tokens: int | None = _f(None, ge=1)
    """Tokens of the critique (distill.model_path's tokenizer) at most; null: no bound."""
    reference_path: str | None = None
    """What a judgement must agree with (see reference_kind); null: no agreement test."""
    reference_kind: str = _f("judge", choices=("judge", "preference"))
    """judge: judgements in grm collect's format; preference: chosen/rejected pairs.

    judge: the record of the same (persona, question, answer) in reference_path (another
    judge's collect output, people's judgements exported in that format), compared with
    max_score_diff. preference: pairwise JSONL (or PersonaFeedback's `reject`); both answers
    of a pair must be judged in this output, and the chosen one must get the higher
    weighted reward (grm.weights)."""
    max_score_diff: float = _f(1.0, ge=0)
    """reference_kind=judge: largest |difference| to the reference that still agrees."""
    score_diff_on: str = _f("reward", choices=("reward", "dimensions"))
    """reference_kind=judge: compare the weighted reward, or every dimension on its own."""


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
    filter: DistillFilterConfig = field(default_factory=DistillFilterConfig)
    """Which judgements grm train trains on: parsed, agreeing with a reference, short enough."""


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
class MergeModelConfig(Frozen):
    """One entry of `merge.models`: a model and its share of the merge."""

    path: str
    """The model: an alias (tiny, smollm2-135m), an HF folder, or a checkpoint holding policy/."""
    weight: float = 1.0
    """Its weight: linear: in the weighted average; ties, dare_ties: its task vector's."""
    density: float = 1.0
    """ties, dare_ties: share of its task vector kept (TIES: the largest, DARE: at random)."""


@dataclass
class MergeConfig(Frozen):
    """`cpe-ray merge`: models of one architecture merged into one HF folder (mergekit)."""

    method: str = _f("dare_ties", choices=MERGE_METHODS)
    """dare_ties, ties, linear or slerp (docs/stages.md).

    ties and dare_ties add to base_model the models' task vectors (model - base), trimmed to
    `density` and kept where their signs agree; linear averages the models; slerp interpolates
    two along the sphere."""
    models: list[MergeModelConfig] = _f([])
    """The merged models, each {path, weight, density}; slerp: exactly two."""
    base_model: str | None = None
    """ties, dare_ties: the model the task vectors start from (required, not in models).

    slerp: the end at t=0, one of the two models (null: the first); linear: unused."""
    t: float = _f(0.5, ge=0, le=1)
    """slerp: where between base_model (0) and the other model (1)."""
    normalize: bool = True
    """linear, ties, dare_ties: divide by the sum of the weights (TIES: of those that agree)."""
    seed: int | None = _f(None, ge=0)
    """Seed of dare_ties' random drops; null: run.seed."""
    dtype: str = _f("float32", choices=("float32", "bfloat16", "float16"))
    """Precision of the merge's arithmetic and of the merged weights."""
    name: str = "merged-tiny"
    """The merged model's folder: run.output_dir/<name>."""
    overwrite: bool = False
    """Replace an existing run.output_dir/<name>; without it such a folder is refused."""


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
