"""Names and defaults the schema offers as choices, kept here so that `config/` stays a leaf.

The GRM's dimensions and weights (method.md section 2), what a missing dimension counts
(`grm.on_missing`), the post-edit selection strategies (method.md section 3.5) and the
table of judge backends. The modules that implement them (`judges/grm.py`,
`algo/post_edit.py`, `runtime/judging.py`) import these names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

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
STRATEGIES: tuple[str, ...] = ("random", "reward", "batch_reward", "improvement")
# What `ppo.mini_batch_size` counts (`ppo.mini_batch_unit`): prompts, whose samples and kept
# rewrites share a fixed number of optimiser steps; or rows, mini_batch_size x n of them a
# step, so that kept rewrites add steps (verl's accounting, the paper release's).
MINI_BATCH_UNITS: tuple[str, ...] = ("prompts", "rows")


@dataclass(frozen=True)
class JudgeBackend:
    """What the config checks, placement and the controller need to know of a `grm.backend`.

    The one table of backends (`GRM_BACKENDS`); the judges themselves are built in
    `cpe_ray.runtime.judging`."""

    in_driver_on_cpu: bool  # judges in the controller's process on a CPU cluster
    in_driver_on_gpu: bool  # ... and on a GPU cluster (otherwise: GRM actors in a "grm" pool)
    threaded: bool  # in the driver, judged in a thread (it waits on HTTP or computes for long)
    needs_model: bool  # grm.model_path is required
    writes_critiques: bool  # can drive post-edit
    tensor_parallel: bool  # an actor spans grm.tensor_parallel_size GPUs (else one each)
    prompted: bool = False  # prompts a model with grm.template (checked before start-up)

    def in_driver(self, use_gpu: bool) -> bool:
        return self.in_driver_on_gpu if use_gpu else self.in_driver_on_cpu


GRM_BACKENDS: Mapping[str, JudgeBackend] = {
    # the offline rule-based stand-in: microseconds, no model
    "rubric": JudgeBackend(True, True, False, False, True, False),
    # a GRM checkpoint on generation-engine actors
    "hf": JudgeBackend(False, False, False, True, True, True, prompted=True),
    "vllm": JudgeBackend(False, False, False, True, True, True, prompted=True),
    # an OpenAI-compatible endpoint (how the paper served its GRM): remote already
    "openai": JudgeBackend(True, True, True, False, True, False, prompted=True),
    # a Bradley-Terry scalar model: in the driver on CPUs, one scorer actor per GPU on GPUs
    "bt": JudgeBackend(True, False, True, True, False, False),
}
