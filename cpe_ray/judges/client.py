"""The controller's view of the judge: a judge in this process, or the GRM actors.

Where each backend runs is `cpe_ray.config.choices.GRM_BACKENDS` (the table the schema,
the config checks and placement read too); the judges built in this process are
`LOCAL_JUDGES`.

| grm.backend | where it judges |
| --- | --- |
| `rubric` | in the driver (the offline rubric judge) |
| `openai` | in the driver, on the `grm.api` endpoint (the paper served its GRM from vLLM) |
| `bt` | in the driver on CPUs; on GPUs one Bradley-Terry scorer actor per `grm.num_engines` |
| `hf`, `vllm` | GRM engine actors |

Requests for actors are split evenly over them and judged in parallel; the result keeps the
request order. `check_backend` runs the cheap checks (the endpoint's key variable, the
reward model's path) before any actor starts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cpe_ray.config import Config
from cpe_ray.config.choices import GRM_BACKENDS
from cpe_ray.judges.base import Judge, JudgeRequest, check_mode
from cpe_ray.rl.experience import split_even
from cpe_ray.runtime.pipeline import Pending, concat


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


class JudgeClient:
    def __init__(self, cfg: Config, grm_actors: Sequence[Any] = (),
                 labels: Sequence[str] = ()) -> None:
        check_backend(cfg)
        self.cfg, self.actors, self.labels = cfg, list(grm_actors), list(labels)
        self.local = LOCAL_JUDGES[cfg.grm.backend](cfg) if judge_in_driver(cfg) else None
        if self.local is None and not self.actors:
            raise ValueError(f"grm.backend={cfg.grm.backend} needs GRM actors")
        # one worker: the judge sees one batch at a time, as an actor would
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="judge") if (
            self.local is not None and GRM_BACKENDS[cfg.grm.backend].threaded) else None

    def submit(self, requests: Sequence[JudgeRequest], mode: str, seed: int) -> Pending:
        """Start judging: work in flight that yields one outcome per request, in order."""
        check_mode(mode)
        what = f"GRM judging ({mode})"
        if self._thread is not None:
            return Pending.in_thread(self._thread.submit(self.local.judge, list(requests), mode,
                                                         seed), what)
        if self.local is not None:
            return Pending.done(self.local.judge(requests, mode, seed), what)
        parts = [rows for rows in split_even(len(requests), len(self.actors)) if rows]
        refs = [a.judge.remote([requests[i] for i in rows], mode, seed * len(self.actors) + k)
                for k, (a, rows) in enumerate(zip(self.actors, parts, strict=False))]
        return Pending(refs, self.labels[: len(refs)], what, combine=concat)
