"""The controller's view of the judge: a judge in this process, or the GRM actors.

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

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cpe_ray.config import Config
from cpe_ray.experience import split_even
from cpe_ray.judge import JudgeRequest, check_mode
from cpe_ray.pipeline import Pending, concat

SUPPORTED_BACKENDS = ("rubric", "hf", "vllm", "openai", "bt")
# Judges in the driver that wait on an endpoint or compute for long run in a thread, so the
# step's pipeline keeps dispatching engine work meanwhile; the rubric judge takes microseconds.
THREADED_BACKENDS = ("openai", "bt")


def check_backend(cfg: Config) -> None:
    """One-line errors for a judge that could not start (config checks are done already)."""
    g = cfg.grm
    if g.backend == "openai":
        from cpe_ray.evaluation.endpoint import EndpointSpec

        EndpointSpec.from_config(g.api, "grm.api").api_key()
    if g.backend == "bt" and g.model_path:
        from cpe_ray.models import resolve_model_path

        resolve_model_path(g.model_path)


def judge_in_driver(cfg: Config) -> bool:
    """Whether `grm.backend` judges in this process (no GRM actors)."""
    return cfg.grm.backend in ("rubric", "openai") or (
        cfg.grm.backend == "bt" and not cfg.cluster.use_gpu)


def _local_judge(cfg: Config) -> Any:
    g = cfg.grm
    if g.backend == "rubric":
        from cpe_ray.rubric import RubricJudge

        return RubricJudge(g)
    if g.backend == "openai":
        from cpe_ray.evaluation.endpoint import EndpointGRMJudge

        return EndpointGRMJudge.from_config(g)
    from cpe_ray.reward_model import make_bt_judge

    return make_bt_judge(cfg)


class JudgeClient:
    def __init__(self, cfg: Config, grm_actors: Sequence[Any] = (),
                 labels: Sequence[str] = ()) -> None:
        check_backend(cfg)
        self.cfg, self.actors, self.labels = cfg, list(grm_actors), list(labels)
        self.local = _local_judge(cfg) if judge_in_driver(cfg) else None
        if self.local is None and not self.actors:
            raise ValueError(f"grm.backend={cfg.grm.backend} needs GRM actors")
        # one worker: the judge sees one batch at a time, as an actor would
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="judge") if (
            self.local is not None and cfg.grm.backend in THREADED_BACKENDS) else None

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
