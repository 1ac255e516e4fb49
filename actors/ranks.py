"""What every DeepSpeed rank group shares: actor options, the process group, the start-up dance.

`PPOLearner` (actors/learner.py) and `SupervisedRank` (actors/supervised.py) are both a
`RankActor`: one data-parallel rank that forwards to its core. Their groups are `RankGroup`s:
they place the ranks in placement-group bundles, ask rank 0 for a free address, have every
rank join DeepSpeed's group there, and save, load and export through every rank. All remote
calls go through `cpe_ray.runtime.remote.wait_all`, so a failure is one line naming the rank.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import ray
import torch

from cpe_ray.config import Config
from cpe_ray.runtime.remote import actor_env, threads_per_actor, wait_all
from cpe_ray.runtime.weight_sync import free_port


def rank_options(cfg: Config, num_ranks: int, strategies: list[Any] | None,
                 gpus_per_rank: float | None, cpus_per_rank: float | None
                 ) -> list[dict[str, Any]]:
    """Ray options of each rank: its CPUs and GPU, its env, its bundle when given."""
    if strategies is not None and len(strategies) != num_ranks:
        raise ValueError(f"need {num_ranks} scheduling strategies, got {len(strategies)}")
    gpus = gpus_per_rank if gpus_per_rank is not None else (1 if cfg.cluster.use_gpu else 0)
    threads = threads_per_actor(cfg)
    out = []
    for rank in range(num_ranks):
        options: dict[str, Any] = {
            "num_cpus": cpus_per_rank if cpus_per_rank is not None else (
                cfg.cluster.cpus_per_bundle),
            "num_gpus": gpus,
            "runtime_env": {"env_vars": actor_env(cfg, threads)},
        }
        if strategies is not None:
            options["scheduling_strategy"] = strategies[rank]
        out.append(options)
    return out


def rank_address() -> tuple[str, int]:
    """This node's address and a free port on it (rank 0's, for the group's rendezvous).

    The port is checked on every address: torch's TCPStore listens on all of them, so a port
    free on the node's IP but in use on another (e.g. the local end of a connection to
    127.0.0.1) failed the rendezvous with EADDRINUSE."""
    return ray.util.get_node_ip_address(), free_port()


SHM_COMM_OP = "deepspeed_shm_comm"


def skip_shm_comm_build() -> None:
    """Keep DeepSpeed's CPU backend from JIT-building its shared-memory all-reduce op.

    DeepSpeed builds that op with ninja under ~/.cache/torch_extensions the first time any
    process joins a group on a CPU, behind a lock file. A build killed mid-way leaves the lock,
    and every later start on that machine then waits on it forever (this is what made CI
    time out). The op serves only `inference_all_reduce`; training's collectives go through
    torch.distributed (gloo) either way, so marking it incompatible changes no result."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False


def init_rank_process(cfg: Config, rank: int, world: int, master_addr: str,
                      master_port: int) -> torch.device:
    """Join DeepSpeed's process group (gloo on CPU, NCCL on GPU); this rank's device."""
    import deepspeed

    os.environ.update(
        MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
        WORLD_SIZE=str(world), LOCAL_RANK="0",  # Ray shows each rank only its GPU
    )
    use_gpu = cfg.cluster.use_gpu
    skip_shm_comm_build()
    deepspeed.init_distributed(
        dist_backend="nccl" if use_gpu else "gloo",
        timeout=timedelta(seconds=cfg.learner.dist_timeout_s),
    )
    return torch.device("cuda", 0) if use_gpu else torch.device("cpu")


class RankActor:
    """One DeepSpeed data-parallel rank as a Ray actor: it sets up its process, builds its
    core (`make_core`), and forwards to it. Subclasses add their own forwards."""

    def __init__(self, cfg: Config, rank: int, world: int) -> None:
        torch.set_num_threads(threads_per_actor(cfg))
        self.cfg, self.rank, self.world = cfg, rank, world
        self.core: Any = None

    def make_core(self, device: torch.device) -> Any:
        raise NotImplementedError

    def address(self) -> tuple[str, int]:
        return rank_address()

    def setup(self, master_addr: str, master_port: int) -> dict[str, Any]:
        device = init_rank_process(self.cfg, self.rank, self.world, master_addr, master_port)
        self.core = self.make_core(device)
        return self.core.info()

    def save_state(self, path: str) -> None:
        self.core.save_state(path)

    def load_state(self, path: str) -> None:
        self.core.load_state(path)

    def export_hf(self, path: str) -> None:
        self.core.export_hf(path)


class RankGroup:
    """`learner.num_ranks` actors of one `RankActor` class, spoken to as one; every call is a
    bounded wait (`learner.dist_timeout_s`) whose failure is one line naming the rank."""

    def __init__(self, cfg: Config, actor_cls: Any, args: tuple, what: str,
                 strategies: list[Any] | None, gpus_per_rank: float | None,
                 cpus_per_rank: float | None) -> None:
        self.cfg, self.what = cfg, what
        n = cfg.learner.num_ranks
        options = rank_options(cfg, n, strategies, gpus_per_rank, cpus_per_rank)
        self.actors = [actor_cls.options(**options[r]).remote(cfg, *args, r, n)
                       for r in range(n)]
        self.labels = [f"{what} rank {r}" for r in range(n)]

    @property
    def world(self) -> int:
        return len(self.actors)

    def setup(self) -> list[dict[str, Any]]:
        """Rank 0 picks the rendezvous address; every rank's `setup(host, port)` joins there."""
        timeout = self.cfg.learner.dist_timeout_s
        host, port = wait_all([self.actors[0].address.remote()], self.labels[:1], timeout,
                              f"{self.what} address")[0]
        return wait_all([a.setup.remote(host, port) for a in self.actors], self.labels,
                        timeout, f"{self.what} start-up")

    def _call(self, method: str, args_per_rank: list[tuple], what: str) -> list[Any]:
        futures = [getattr(a, method).remote(*args) for a, args in
                   zip(self.actors, args_per_rank, strict=True)]
        return wait_all(futures, self.labels, self.cfg.learner.dist_timeout_s, what)

    def _on_all(self, method: str, *args: Any) -> list[Any]:
        return self._call(method, [args] * self.world, f"{self.what} {method}")

    def save_state(self, path: str) -> None:
        self._on_all("save_state", path)

    def load_state(self, path: str) -> None:
        self._on_all("load_state", path)

    def export_hf(self, path: str) -> None:
        self._on_all("export_hf", path)

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
