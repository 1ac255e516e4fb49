"""Which judge a `grm.backend` is, where it runs, and what is checked before start-up.

Where each backend runs is `cpe_ray.config.choices.GRM_BACKENDS` (the table the schema,
the config checks and placement read too); the judges built in this process are
`LOCAL_JUDGES`.

| grm.backend | where it judges |
| --- | --- |
| `rubric` | in the driver (the offline rubric judge) |
| `openai` | in the driver, on the `grm.api` endpoint (the paper served its GRM from vLLM) |
| `bt` | in the driver on CPUs; on GPUs one Bradley-Terry scorer actor per `grm.num_engines` |
| `hf`, `vllm` | GRM engine actors |

`check_backend` runs the cheap checks (the endpoint's key variable, the reward model's path)
before any actor starts.
"""

from __future__ import annotations

from collections.abc import Callable

from cpe_ray.config import Config
from cpe_ray.config.choices import GRM_BACKENDS
from cpe_ray.judges.base import Judge


def check_backend(cfg: Config) -> None:
    """One-line errors for a judge that could not start (config checks are done already)."""
    g = cfg.grm
    if g.backend == "openai":
        from cpe_ray.judges.endpoint import EndpointSpec

        EndpointSpec.from_config(g.api, "grm.api").api_key()
    if GRM_BACKENDS[g.backend].prompted:  # a bad prompt file fails here, not in an actor
        from cpe_ray.judges.grm import load_grm_templates

        load_grm_templates(g)
    if GRM_BACKENDS[g.backend].needs_model and g.model_path:
        from cpe_ray.models import resolve_model_path

        resolve_model_path(g.model_path)


def judge_in_driver(cfg: Config) -> bool:
    """Whether `grm.backend` judges in this process (no GRM actors)."""
    return GRM_BACKENDS[cfg.grm.backend].in_driver(cfg.cluster.use_gpu)


def _rubric(cfg: Config) -> Judge:
    from cpe_ray.judges.rubric import RubricJudge

    return RubricJudge(cfg.grm)


def _endpoint(cfg: Config) -> Judge:
    from cpe_ray.judges.endpoint import EndpointGRMJudge

    return EndpointGRMJudge.from_config(cfg.grm)


def _bt(cfg: Config) -> Judge:
    from cpe_ray.judges.bt import make_bt_judge

    return make_bt_judge(cfg)


# The judges built in this process, by backend (imported only when chosen). Engine-backed
# GRMs are built inside their actors (actors/grm.py), which a bt scorer on a GPU shares.
LOCAL_JUDGES: dict[str, Callable[[Config], Judge]] = {
    "rubric": _rubric, "openai": _endpoint, "bt": _bt}
