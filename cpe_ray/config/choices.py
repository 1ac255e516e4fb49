"""Names and defaults the schema offers as choices, kept here so that `config/` stays a leaf.

The GRM's dimensions and weights (method.md section 2), what a missing dimension counts
(`grm.on_missing`), the advantage estimators and post-edit selection strategies (method.md
section 3.5 and 3.7), and where each judge backend runs (`GRM_BACKENDS`).

Each family of interchangeable parts is one `Table` in the package that implements it:
`cpe_ray.algo.advantages.ADVANTAGE_ESTIMATORS`, `cpe_ray.algo.post_edit.SELECTION_STRATEGIES`,
`cpe_ray.algo.losses.POLICY_LOSSES` and `cpe_ray.judges.registry.JUDGES`. The config cannot
import them (it is a leaf), so the names it offers live here and a test per table checks
that the table's keys are exactly these names: adding a member is its name here, its entry
in the table, and its test.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

DEFAULT_DIMENSIONS: tuple[str, ...] = ("helpfulness", "personalization", "naturalness")
# The paper's scalar reward (method.md section 2).
DEFAULT_WEIGHTS: Mapping[str, float] = {
    "helpfulness": 0.35,
    "personalization": 0.40,
    "naturalness": 0.25,
}
ON_MISSING_CHOICES: tuple[str, ...] = ("zero", "renormalize", "none")
# Other names a GRM may write for a dimension in its <scores> block (`grm.label_aliases`).
# The paper release's prompts (versions P0815 and P0805) label the third dimension
# `Natural`; its Chinese rubric names the dimensions 帮助性 / 个性化 / 自然度.
DEFAULT_LABEL_ALIASES: Mapping[str, tuple[str, ...]] = {
    "helpfulness": ("有用性", "帮助性"),
    "personalization": ("personalisation", "个性化", "个性化程度"),
    "naturalness": ("natural", "自然度", "自然性"),
}
# What a GRM prompt template is filled with: one user turn of persona, question and answer.
GRM_TEMPLATE_FIELDS: tuple[str, ...] = ("persona", "question", "answer")
# Placeholders of other prompts mapped to ours (`grm.template_placeholders`): the release
# fills its GRM prompts with str.format fields of these names, so a prompt taken out of it
# loads unchanged.
RELEASE_TEMPLATE_PLACEHOLDERS: Mapping[str, str] = {
    "persona_str": "persona",
    "question_str": "question",
    "solution_str": "answer",
}
# Post-edit selection strategies (`post_edit.strategy`, method.md 3.5).
STRATEGIES: tuple[str, ...] = ("random", "reward", "batch_reward", "improvement")
# Advantage estimators (`ppo.advantage_estimator`, method.md 3.7), and those that compare the
# samples of one prompt (so they need rollout.n_samples_per_prompt >= 2).
ADVANTAGE_ESTIMATOR_NAMES: tuple[str, ...] = ("gae", "grpo", "rloo")
GROUP_ESTIMATOR_NAMES: tuple[str, ...] = ("grpo", "rloo")
# How the GRM's dimension scores make the advantage (`ppo.reward_aggregation`): their weighted
# sum as one reward, or each dimension against its group first, then weighted (GDPO).
REWARD_AGGREGATIONS: tuple[str, ...] = ("weighted_sum", "per_dimension")
# What `ppo.mini_batch_size` counts (`ppo.mini_batch_unit`): prompts, whose samples and kept
# rewrites share a fixed number of optimiser steps; or rows, mini_batch_size x n of them a
# step, so that kept rewrites add steps (verl's accounting, the paper release's).
MINI_BATCH_UNITS: tuple[str, ...] = ("prompts", "rows")
# How a mini-batch's micro-batches weigh in its loss (`ppo.micro_batch_weighting`): every
# token alike (the mini-batch's global count divides each micro-batch's sum), or verl's
# (each micro-batch's own mean, times its share of the mini-batch's rows).
MICRO_BATCH_WEIGHTINGS: tuple[str, ...] = ("tokens", "rows")
# Which log-probs the engines report for a sampled token (`rollout.logprobs_mode`): those of
# the distribution it was drawn from (after temperature and top-p, vLLM's processed_logprobs)
# or the model's own (before either, vLLM's raw_logprobs).
LOGPROBS_MODES: tuple[str, ...] = ("processed", "raw")
# How the persona enters the GRM's critique prompt (`grm.critique_persona_format`): as given,
# or a JSON object re-written as a Python dict (the release's str(dict)).
PERSONA_FORMATS: tuple[str, ...] = ("text", "python_dict")
# `cpe-ray merge`'s methods (`merge.method`; their table: cpe_ray.stages.merge.MERGE_METHODS).
MERGE_METHODS: tuple[str, ...] = ("dare_ties", "ties", "linear", "slerp")
# Rollout correction of originals against the engines' log-probs (`ppo.rollout_correction`,
# cpe_ray/algo/correction.py): none, truncated token weights (verl's rollout_is=token, slime's
# --use-tis), sequence-level masked IS (slime's mask mode, verl's seq_sum_k1 rejection), or
# both: token weights on the sequences the band keeps.
CORRECTION_MODES: tuple[str, ...] = ("none", "token_tis", "seq_mis", "token_tis_seq_mis")
# `ppo.rollout_correction.preset`: the peers' common settings, written out as the section's
# keys (keys given beside the preset in the same file or command line win over it).
CORRECTION_PRESETS: Mapping[str, Mapping[str, object]] = {
    "none": {"mode": "none", "rewrite_clip": None},
    "tis": {"mode": "token_tis", "truncation": 2.0, "token_veto": None, "rewrite_clip": 2.0},
    "mis": {"mode": "seq_mis", "seq_band": [0.5, 2.0], "token_veto": 1e-4, "rewrite_clip": 2.0},
    "tis_mis": {"mode": "token_tis_seq_mis", "truncation": 2.0, "seq_band": [0.5, 2.0],
                "token_veto": 1e-4, "rewrite_clip": 2.0},
}


class UnknownName(KeyError, ValueError):
    """A name no entry of a table has; the message lists the names it has."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Table(Generic[T]):
    """One family of interchangeable parts by name (verl's registries, prime-rl's tables).

    A second entry under one name raises, and so does an unknown name, listing the known
    ones. Entries are registered where they are defined, in the order the table shows them.
    """

    def __init__(self, family: str) -> None:
        self.family = family
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.family} {name!r} is registered already")
        self._entries[name] = entry
        return entry

    def __getitem__(self, name: str) -> T:
        if name not in self._entries:
            raise UnknownName(f"unknown {self.family} {name!r}; use one of "
                              f"{', '.join(self._entries)}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class JudgeBackend:
    """Where a `grm.backend` judges and what the config checks of it: what the config, the
    placement and the controller read. How its judge is built is its entry in
    `cpe_ray.judges.registry.JUDGES`."""

    in_driver_on_cpu: bool = False  # judges in the controller's process on a CPU cluster
    in_driver_on_gpu: bool = False  # ... on a GPU cluster (otherwise: GRM actors, "grm" pool)
    threaded: bool = False  # in the driver, judged in a thread (waits on HTTP or computes long)
    needs_model: bool = False  # grm.model_path is required
    writes_critiques: bool = False  # can drive post-edit
    # judges on a generation engine that its process builds; an actor spans
    # grm.tensor_parallel_size GPUs (else one each)
    engine: bool = False
    prompted: bool = False  # prompts a model with grm.template (checked before start-up)
    scalar: bool = False  # one reward, no grm.dimensions scores (no per_dimension advantages)

    def in_driver(self, use_gpu: bool) -> bool:
        return self.in_driver_on_gpu if use_gpu else self.in_driver_on_cpu


GRM_BACKENDS: Mapping[str, JudgeBackend] = {
    # the offline rule-based stand-in: microseconds, no model
    "rubric": JudgeBackend(in_driver_on_cpu=True, in_driver_on_gpu=True, writes_critiques=True),
    # a GRM checkpoint on generation-engine actors
    "hf": JudgeBackend(needs_model=True, writes_critiques=True, engine=True, prompted=True),
    "vllm": JudgeBackend(needs_model=True, writes_critiques=True, engine=True, prompted=True),
    # an OpenAI-compatible endpoint (how the paper served its GRM): remote already
    "openai": JudgeBackend(in_driver_on_cpu=True, in_driver_on_gpu=True, threaded=True,
                           writes_critiques=True, prompted=True),
    # a Bradley-Terry scalar model: in the driver on CPUs, one scorer actor per GPU on GPUs
    "bt": JudgeBackend(in_driver_on_cpu=True, threaded=True, needs_model=True, scalar=True),
}
