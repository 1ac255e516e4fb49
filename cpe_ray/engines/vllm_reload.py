"""Loading weights into one vLLM worker's model in place, through vLLM's own reload.

Loading goes through vLLM's in-place reload (vllm/model_executor/model_loader/reload/):
`begin` opens it (`initialize_layerwise_reload`: each layer gets back its checkpoint-format
parameters and defers its post-load processing), every transport's tensors then go to
`model.load_weights` in checkpoint names (a layer is processed, e.g. repacked for the CPU
kernels or quantized, as soon as all its tensors have arrived), and `finish` closes it
(`finalize_layerwise_reload`) and resets what vLLM's `reload_weights` resets. A raw
`load_weights` without it writes into parameters that a layer repacked and freed after the
first load ("parameter torch.Size([0])"). vLLM's one-shot
`model_runner.reload_weights(weights_iterator=...)` is the same three calls in one; ours spans
several RPCs (one per bucket or chunk), so the update is opened and closed around them.
vLLM is imported only inside the methods, so this module imports on any machine.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from cpe_ray.weight_sync.codec import WeightSyncError

MISSING_NAMES_SHOWN = 8  # enough to recognise a naming mismatch without flooding a log line


class LayerwiseLoader:
    """One worker's update: opened by `begin`, fed by `load`, closed by `finish`, which
    reports the parameters not loaded in between."""

    def __init__(self, rank: int, model_runner: Any, vllm_config: Any) -> None:
        self.rank, self.model_runner, self.vllm_config = rank, model_runner, vllm_config
        self.reloading = False
        self.loaded: set[str] | None = None
        self.tracked = False

    def begin(self) -> None:
        """Open vLLM's layerwise reload and start recording which parameters get loaded."""
        self._open_reload()
        self.reloading = True
        self.loaded = set()
        self.tracked = True

    def finish(self) -> dict[str, Any]:
        """Report parameters not loaded since `begin`.

        After a level-2 sleep every parameter not loaded holds garbage, so the engine refuses
        to wake the KV cache then. Like vLLM's own loader (default_loader.py,
        track_weights_loading) this relies on `load_weights` returning the loaded names; a
        model that returns None is reported as untracked.
        """
        model = self.model_runner.get_model()
        if self.reloading:
            self._close_reload()
            self.reloading = False
        loaded = self.loaded or set()
        tracked = self.tracked
        names = {name for name, _ in model.named_parameters()}
        missing = sorted(names - loaded) if tracked else []
        self.loaded, self.tracked = None, False
        return {
            "tracked": tracked,
            "total": len(names),
            "num_missing": len(missing),
            "missing": missing[:MISSING_NAMES_SHOWN],
        }

    def load_borrowed(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        """Load views into memory the caller reuses (a receive buffer, a peer's IPC bucket).

        vLLM's layerwise reload keeps each tensor until its layer is whole, and a layer can
        span two buckets: without the copies the next bucket overwrote the pending half of
        a layer (0.03 nats off on the tiny model). A copy lives until its layer is done."""
        self.load([(name, tensor.clone()) for name, tensor in weights])

    def load(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        if not self.reloading:
            raise WeightSyncError(
                f"vLLM worker rank {self.rank}: weights arrived outside an update; the engine "
                "brackets every load with cpe_begin_update / cpe_finish_update")
        model = self.model_runner.get_model()
        with self._config_context():
            loaded = model.load_weights(weights=weights)
        if self.loaded is not None:
            if loaded is None:
                self.tracked = False
            else:
                self.loaded.update(loaded)

    def _open_reload(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        # An update left open by a failed one stays open: layers not yet whole keep waiting
        # for their tensors (initialize skips layers already reloading).
        with self._config_context():
            initialize_layerwise_reload(self.model_runner.get_model())

    def _close_reload(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        with self._config_context():
            finalize_layerwise_reload(self.model_runner.get_model(),
                                      self.vllm_config.model_config)
        self._reprocess_tied()
        # what vLLM's reload_weights resets after loading (gpu_model_runner.py)
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            fn = getattr(self.model_runner, reset, None)
            if callable(fn):
                fn()

    def _reprocess_tied(self) -> None:
        """Redo the post-load processing of layers that share a weight (tied embeddings).

        vLLM's reload processes each layer that received tensors; a tied `lm_head` receives
        none (the checkpoint has no `lm_head.weight`), so a kernel copy it made at start-up
        (the CPU backend packs one for its GEMM) keeps the old weights: with vLLM 0.32 the
        CPU engine's log-probs after an update were off by 0.66 nats until this ran."""
        by_storage: dict[int, list[torch.nn.Module]] = {}
        for module in self.model_runner.get_model().modules():
            weight = getattr(module, "weight", None)
            method = getattr(module, "quant_method", None)
            if isinstance(weight, torch.Tensor) and weight.numel() and hasattr(
                    method, "process_weights_after_loading"):
                by_storage.setdefault(weight.data_ptr(), []).append(module)
        with self._config_context():
            for modules in by_storage.values():
                if len(modules) > 1:
                    for module in modules:
                        module.quant_method.process_weights_after_loading(module)

    def _config_context(self) -> contextlib.AbstractContextManager[Any]:
        # vLLM's own weight-transfer paths load under the current vLLM config (some layers
        # read it while loading and processing).
        from vllm.config import set_current_vllm_config

        return set_current_vllm_config(self.vllm_config)
