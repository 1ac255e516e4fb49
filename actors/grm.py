"""The `GRMJudge` Ray actor: a generative reward model on its own engine, behind `Judge`.

With grm.backend=bt on GPUs it holds a Bradley-Terry reward model instead (scores only).
Either is built by `cpe_ray.judges.registry.build_judge`; the engine is built here."""

from __future__ import annotations

import ray

from cpe_ray.config import Config
from cpe_ray.config.choices import GRM_BACKENDS
from cpe_ray.engines.factory import make_engine
from cpe_ray.engines.spec import EngineSpec
from cpe_ray.judges.base import JudgeRequest
from cpe_ray.judges.grm import JudgeOutcome
from cpe_ray.judges.registry import build_judge


@ray.remote
class GRMJudge:
    def __init__(self, cfg: Config, engine_index: int = 0,
                 bundle_indices: list[int] | None = None) -> None:
        import torch

        torch.set_num_threads(cfg.cluster.threads_per_actor)
        g = cfg.grm
        if g.model_path is None:
            raise ValueError("grm.model_path is required for an engine-backed GRM")
        if not GRM_BACKENDS[g.backend].engine:  # bt on a GPU: a scorer, no engine
            self.judge_core = build_judge(cfg)
            return
        engine = make_engine(EngineSpec.for_grm(cfg, engine_index), bundle_indices=bundle_indices)
        self.judge_core = build_judge(cfg, engine)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def judge(self, requests: list[JudgeRequest], mode: str, seed: int = 0
              ) -> list[JudgeOutcome]:
        return self.judge_core.judge(requests, mode, seed)
