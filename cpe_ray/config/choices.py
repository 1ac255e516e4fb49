"""Names and defaults the schema offers as choices, kept here so that `config/` stays a leaf.

The GRM's dimensions and weights (method.md section 2), what a missing dimension counts
(`grm.on_missing`), the post-edit selection strategies (method.md section 3.5) and the
table of judge backends. The modules that implement them (`judges/grm.py`,
`rl/post_edit.py`, `judges/client.py`) import these names.
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
STRATEGIES: tuple[str, ...] = ("random", "reward", "batch_reward", "improvement")


@dataclass(frozen=True)
class JudgeBackend:
    """What the config checks, placement and the controller need to know of a `grm.backend`.

    The one table of backends (`GRM_BACKENDS`); the judges themselves are built in
    `cpe_ray.judges.client`."""

    in_driver_on_cpu: bool  # judges in the controller's process on a CPU cluster
    in_driver_on_gpu: bool  # ... and on a GPU cluster (otherwise: GRM actors in a "grm" pool)
    threaded: bool  # in the driver, judged in a thread (it waits on HTTP or computes for long)
    needs_model: bool  # grm.model_path is required
    writes_critiques: bool  # can drive post-edit
    tensor_parallel: bool  # an actor spans grm.tensor_parallel_size GPUs (else one each)

    def in_driver(self, use_gpu: bool) -> bool:
        return self.in_driver_on_gpu if use_gpu else self.in_driver_on_cpu


GRM_BACKENDS: Mapping[str, JudgeBackend] = {
    # the offline rule-based stand-in: microseconds, no model
    "rubric": JudgeBackend(True, True, False, False, True, False),
    # a GRM checkpoint on generation-engine actors
    "hf": JudgeBackend(False, False, False, True, True, True),
    "vllm": JudgeBackend(False, False, False, True, True, True),
    # an OpenAI-compatible endpoint (how the paper served its GRM): remote already
    "openai": JudgeBackend(True, True, True, False, True, False),
    # a Bradley-Terry scalar model: in the driver on CPUs, one scorer actor per GPU on GPUs
    "bt": JudgeBackend(True, False, True, True, False, False),
}
