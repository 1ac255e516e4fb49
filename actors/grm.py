"""The `GRMJudge` Ray actor: a generative reward model on its own engine, behind `Judge`.

With grm.backend=bt on GPUs it holds a Bradley-Terry reward model instead (scores only)."""

from __future__ import annotations

import ray

from cpe_ray.config import Config
from cpe_ray.engines.factory import make_engine
from cpe_ray.judges.base import Judge, JudgeRequest
from cpe_ray.judges.engine import EngineJudge
from cpe_ray.judges.grm import JudgeOutcome


@ray.remote
class GRMJudge:
    def __init__(self, cfg: Config, engine_index: int = 0,
                 bundle_indices: list[int] | None = None) -> None:
        import torch

        from cpe_ray.models import load_tokenizer

        torch.set_num_threads(cfg.cluster.threads_per_actor)
        g = cfg.grm
        if g.model_path is None:
            raise ValueError("grm.model_path is required for an engine-backed GRM")
        self.judge_core: Judge
        if g.backend == "bt":
            from cpe_ray.judges.bt import make_bt_judge

            self.judge_core = make_bt_judge(cfg)
            return
        engine = make_engine(
            g.backend, g.model_path, dtype=cfg.policy.dtype, seed=cfg.run.seed + engine_index,
            use_gpu=cfg.cluster.use_gpu, tensor_parallel_size=g.tensor_parallel_size,
            gpu_memory_utilization=g.gpu_memory_utilization,
            max_batch_rows=cfg.rollout.max_batch_rows, bundle_indices=bundle_indices,
            trust_remote_code=cfg.policy.trust_remote_code,
            kv_cache_memory_bytes=g.kv_cache_memory_bytes,
        )
        tokenizer = load_tokenizer(engine.info().model_path, cfg.policy.trust_remote_code)
        self.judge_core = EngineJudge(engine, tokenizer, g)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def judge(self, requests: list[JudgeRequest], mode: str, seed: int = 0
              ) -> list[JudgeOutcome]:
        return self.judge_core.judge(requests, mode, seed)
