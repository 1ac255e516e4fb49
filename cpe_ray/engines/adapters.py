"""LoRA adapter versions on an engine: which ones it holds, and an adapter as peft saves it.

With `policy.lora` the learner syncs only its adapter, each sync a new version (1, 2, ...).
An engine keeps the newest `keep` versions (`trainer.off_policy_steps + 1`, so requests still
in flight can finish on the version they began with) and generates with the newest. A
version that is not newer than every held one means the learner went back (it was restarted
from a checkpoint and counts again from 1): the held versions from it on are dropped first, so
a version number never names two different adapters.

vLLM loads adapters from a folder only (a `LoRARequest` carries a path), so each version is
written as peft would save it (`adapter_model.safetensors` + `adapter_config.json`) under
/dev/shm, a tmpfs: memory, not disk.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from cpe_ray.weight_sync.codec import WeightSyncError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TMPFS = Path("/dev/shm")


def adapter_name(version: int) -> str:
    """Adapter `version`'s name, in the HF engine's peft model and in vLLM's `LoRARequest`."""
    return f"policy-v{version}"


class AdapterVersions:
    """The adapter versions an engine holds, oldest first, at most `keep`."""

    def __init__(self, keep: int) -> None:
        if keep < 1:
            raise ValueError(f"an engine must keep at least one adapter version, got {keep}")
        self.keep = keep
        self.held: list[int] = []

    @property
    def newest(self) -> int | None:
        return self.held[-1] if self.held else None

    def admit(self, version: int) -> list[int]:
        """Record `version` as held; the versions to drop now (any not older than it, then
        the oldest beyond `keep`). Drop them before loading `version`."""
        if version < 1:
            raise ValueError(f"adapter versions count from 1, got {version}")
        dropped = [v for v in self.held if v >= version]
        kept = [v for v in self.held if v < version]
        while len(kept) >= self.keep:
            dropped.append(kept.pop(0))
        self.held = kept + [version]
        return dropped


FOLDER_PREFIX = "cpe-ray-lora-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class AdapterFolders:
    """One folder per adapter version under a private directory on tmpfs, named by this
    process's id; falls back to the system's temporary directory where there is no /dev/shm.

    Removed with this object, or, since Ray ends an engine actor without running finalisers,
    by the next engine on the machine: tmpfs is memory, and a dead process's adapters would
    hold it until a reboot."""

    def __init__(self) -> None:
        parent = TMPFS if TMPFS.is_dir() and os.access(TMPFS, os.W_OK) else None
        prefix = f"{FOLDER_PREFIX}{os.getpid()}-"
        self.root = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.root, True)
        for old in self.root.parent.glob(f"{FOLDER_PREFIX}*-*"):
            pid = old.name[len(FOLDER_PREFIX):].split("-")[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)

    def path(self, version: int) -> Path:
        return self.root / f"v{version}"

    def remove(self, version: int) -> None:
        shutil.rmtree(self.path(version), ignore_errors=True)


class VLLMAdapters:
    """The adapter versions a `vllm.LLM` serves: a tmpfs folder and a `LoRARequest` each."""

    def __init__(self, llm: Any, keep: int) -> None:
        self._llm = llm
        self.versions = AdapterVersions(keep)
        self.folders = AdapterFolders()
        self.request: Any = None  # the newest version's LoRARequest: every generate uses it

    def admit(self, version: int) -> str:
        """Drop the versions `version` displaces, from vLLM and tmpfs; the folder to write
        `version` to."""
        dropped = self.versions.admit(version)
        for old in dropped:
            self._llm.llm_engine.remove_lora(old)
            self.folders.remove(old)
        # a learner that went back reuses version numbers, and vLLM keys cached prefixes by them
        if any(old >= version for old in dropped) and not self._llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache for a reused adapter id")
        return str(self.folders.path(version))

    def add(self, version: int, path: str) -> None:
        """Load adapter `version`, written to `path`, and generate with it from now on."""
        from vllm.lora.request import LoRARequest

        request = LoRARequest(adapter_name(version), version, path)
        if not self._llm.llm_engine.add_lora(request):
            raise WeightSyncError(f"vLLM did not load adapter v{version} from {path}")
        self.request = request

    def load(self, version: int, peft_config: Mapping[str, Any],
             named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        path = self.admit(version)
        write_adapter(path, peft_config, named_tensors)
        self.add(version, path)


def write_adapter(path: str | Path, peft_config: Mapping[str, Any],
                  named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Save an adapter as `PeftModel.save_pretrained` would: its tensors, then its config
    (a reader that finds the config finds the weights complete)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in named_tensors}
    save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (path / ADAPTER_CONFIG).write_text(json.dumps(dict(peft_config), indent=1))
