"""What every DeepSpeed rank group shares: actor options, the process group, the start-up dance.

`PPOLearner` (actors/learner.py) and `SupervisedRank` (actors/supervised.py) are both a
`RankActor`: one data-parallel rank that forwards to its core. The driver speaks to them
through their groups (`cpe_ray.runtime.groups`).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import ray
import torch

from cpe_ray.config import Config
from cpe_ray.weight_sync.group import free_port


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
        torch.set_num_threads(cfg.cluster.threads_per_actor)
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
