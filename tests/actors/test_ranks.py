"""Rank start-up: joining DeepSpeed's CPU group never waits on a JIT build's lock file."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from actors.ranks import SHM_COMM_OP

# Start-up of one gloo rank takes a few seconds; waiting on the lock would never end.
START_LIMIT_S = 120

JOIN = textwrap.dedent("""
    from cpe_ray.config import load_config
    from cpe_ray.weight_sync.group import free_port
    from actors.ranks import init_rank_process
    import torch.distributed as dist
    device = init_rank_process(load_config(), 0, 1, "127.0.0.1", free_port())
    print("joined", dist.get_world_size(), device)
""")


def test_a_stale_build_lock_does_not_block_joining_the_group(tmp_path: Path) -> None:
    """A build killed mid-way leaves `<op>/lock` behind; CI once hung on it at every start."""
    lock = tmp_path / SHM_COMM_OP / "lock"  # where torch builds when TORCH_EXTENSIONS_DIR is set
    lock.parent.mkdir(parents=True)
    lock.touch()
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", JOIN], capture_output=True, text=True,
                         timeout=START_LIMIT_S, env=env, cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "joined 1 cpu" in out.stdout
    assert lock.exists() and not (lock.parent / f"{SHM_COMM_OP}.so").exists()  # not built
