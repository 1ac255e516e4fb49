"""The production `GenerationEngine`: vLLM (0.33 on GPUs, its 0.32 CPU build on CPUs), with
in-place weight updates through vLLM's layerwise reload, and sleep mode on GPUs.

Pure helpers (`llm_kwargs`, `ray_env`, `to_vllm_sampling_kwargs`, `completions_from_outputs`,
`expand_greedy`) hold the mapping to vLLM and are tested on a CPU; `VLLMEngine` wires them to
`vllm.LLM`, which is imported only when an engine is built. Weights reach the workers through
`WeightSyncExtension` (vllm_ext.py) by `LLM.collective_rpc`.

Weight update flow (`receive_weights`, `load_weights`, `load_ipc`, or a `weight_update()` block
around several calls), after `sleep()` at level 2 (weights and KV cache discarded):
  1. `wake_up(tags=["weights"])`: weight memory is mapped again (contents are garbage);
  2. the workers open vLLM's layerwise reload (checkpoint-format tensors in, each layer's
     post-load processing, e.g. the CPU backend's repacking, run once it is whole);
  3. the workers load every tensor (collective_rpc runs while vLLM's scheduler is paused);
  4. the workers close the reload and report parameters not loaded; any left after a
     level-2 sleep is an error;
  5. `wake_up(tags=["kv_cache"])`: vLLM resumes scheduling once fully awake;
  6. `reset_prefix_cache()`: cached prefixes were computed with the old weights.
Awake engines run steps 2-4 (report only) and 6.

LoRA (`lora_rank > 0`): vLLM serves the base with adapters beside it (`enable_lora`). A sync of
a LoRA policy carries only the adapter; the workers receive it and rank 0 writes it as a
folder on tmpfs (/dev/shm: vLLM loads adapters from a path, adapters.py), then the engine
loads it as `LoRARequest("policy-v{version}", version, folder)`, keeps the newest
`adapter_versions` and generates with the newest. The base weights are never touched, and
sleep mode offloads them (level 1) instead of discarding them.

On a CPU (`use_gpu=False`) the KV cache is sized in bytes (`kv_cache_memory_bytes`: vLLM's CPU
worker would otherwise reserve `gpu_memory_utilization` of the machine's memory), the engine
runs eagerly (no torch.compile warm-up) and sleep mode, which vLLM supports on CUDA only, is
refused at construction.
"""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch

from cpe_ray.engines.adapters import VLLMAdapters
from cpe_ray.engines.base import (
    FINISH_LENGTH,
    FINISH_STOP,
    Completion,
    EngineInfo,
    SamplingParams,
    order_completions,
)
from cpe_ray.engines.vllm_ext import WeightSyncExtension
from cpe_ray.errors import ConfigError
from cpe_ray.models import DTYPES
from cpe_ray.weight_sync.codec import Bucket, Manifest, WeightSyncError, encode_tensors
from cpe_ray.weight_sync.group import GroupSpec, SyncStats

EXTENSION_CLASS = f"{WeightSyncExtension.__module__}.{WeightSyncExtension.__qualname__}"
# rollout.logprobs_mode to vllm/config/model.py ModelConfig.logprobs_mode: processed, of the
# distribution actually sampled from (after temperature and top-k/top-p); raw, of the model's
# logits before any of them. Greedy requests get the model's own log-probs under either.
VLLM_LOGPROBS_MODES = {"processed": "processed_logprobs", "raw": "raw_logprobs"}
SAMPLED_ONLY_LOGPROBS = 0  # SamplingParams.logprobs=0: only the sampled token's log-prob
DEFAULT_MAX_LOGPROBS = 1  # server-side cap on logprobs per token; we never ask for top-k
DEFAULT_GPU_MEMORY_UTILIZATION = 0.85  # leaves room for the sync buffers and CUDA graphs
RAY_EXECUTOR = "ray"  # RayExecutorV2: one Ray actor per TP rank, placed in our placement group
BUNDLE_INDICES_ENV = "VLLM_RAY_BUNDLE_INDICES"
PER_WORKER_GPUS_ENV = "VLLM_RAY_PER_WORKER_GPUS"
SLEEP_LEVEL_OFFLOAD = 1  # weights to host memory, KV cache discarded
SLEEP_LEVEL_DISCARD = 2  # weights and KV cache discarded: the next update must load everything
WEIGHTS_TAG, KV_CACHE_TAG = "weights", "kv_cache"
FINISH_REASONS = {"stop": FINISH_STOP, "length": FINISH_LENGTH}
DIRECT_LOAD_CHUNK_BYTES = 64 * 1024**2  # bounds one inline RPC message (and its copies)
MISSING_VLLM = (
    "the vllm backend needs vLLM: on GPUs pip install -e '.[vllm]', on a CPU "
    "bash launch/install.sh --vllm (or set rollout.backend=hf / grm.backend=hf)"
)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py MaxLoRARanks
# vLLM's engine core in this process: the engine actor is a process of its own already, and
# collective_rpc then reaches the worker by a call, not through a socket (vllm/envs.py)
IN_PROCESS_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def llm_kwargs(
    *,
    model_path: str,
    tensor_parallel_size: int = 1,
    dtype: str = "bfloat16",
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
    max_model_len: int | None = None,
    enable_sleep: bool = False,
    seed: int = 0,
    enforce_eager: bool = False,
    max_logprobs: int = DEFAULT_MAX_LOGPROBS,
    kv_cache_memory_bytes: int | None = None,
    chunked_prefill: bool = True,
    logprobs_mode: str = "processed",
    lora_rank: int = 0,
    max_loras: int = 1,
) -> dict[str, Any]:
    """Arguments to `vllm.LLM`, validated with one-line ConfigErrors. `lora_rank` > 0 serves
    up to `max_loras` adapters of that rank at once."""
    if tensor_parallel_size < 1:
        raise ConfigError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    if dtype not in DTYPES:
        raise ConfigError(f"vLLM dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if not 0 < gpu_memory_utilization <= 1:
        raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    if max_model_len is not None and max_model_len < 1:
        raise ConfigError(f"max_model_len must be >= 1 or None, got {max_model_len}")
    if max_logprobs < SAMPLED_ONLY_LOGPROBS:
        raise ConfigError(f"max_logprobs must be >= {SAMPLED_ONLY_LOGPROBS}, got {max_logprobs}")
    if kv_cache_memory_bytes is not None and kv_cache_memory_bytes < 1:
        raise ConfigError(
            f"kv_cache_memory_bytes must be >= 1 or None, got {kv_cache_memory_bytes}")
    if logprobs_mode not in VLLM_LOGPROBS_MODES:
        raise ConfigError(
            f"logprobs_mode {logprobs_mode!r} is not one of {sorted(VLLM_LOGPROBS_MODES)}")
    kwargs: dict[str, Any] = {
        "model": model_path,
        "tensor_parallel_size": tensor_parallel_size,
        "dtype": dtype,
        "seed": seed,
        "gpu_memory_utilization": gpu_memory_utilization,
        "enforce_eager": enforce_eager,
        "enable_sleep_mode": enable_sleep,
        "worker_extension_cls": EXTENSION_CLASS,
        "logprobs_mode": VLLM_LOGPROBS_MODES[logprobs_mode],
        "max_logprobs": max_logprobs,
    }
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    if kv_cache_memory_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = kv_cache_memory_bytes
    if not chunked_prefill:
        kwargs["enable_chunked_prefill"] = False
    if lora_rank > 0:
        kwargs.update(enable_lora=True, max_lora_rank=vllm_lora_rank(lora_rank),
                      max_loras=max_loras)
    if tensor_parallel_size > 1:
        # With one GPU vLLM runs its worker in-process ("uni") on the GPU Ray gave our actor.
        kwargs["distributed_executor_backend"] = RAY_EXECUTOR
    return kwargs


def vllm_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts as `max_lora_rank` that fits an adapter of `rank`."""
    fitting = [r for r in VLLM_LORA_RANKS if r >= rank]
    if rank < 1 or not fitting:
        raise ConfigError(f"vLLM serves LoRA ranks 1 to {VLLM_LORA_RANKS[-1]}, got {rank}")
    return fitting[0]


def ray_env(
    bundle_indices: Sequence[int] | None,
    gpu_fraction: float | None,
    tensor_parallel_size: int | None = None,
) -> dict[str, str]:
    """Environment for vLLM's Ray executor, read when the LLM is built (vllm/envs.py).

    `bundle_indices`: one bundle of the actor's placement group per TP rank, in rank order;
    `gpu_fraction`: each worker's share of its GPU when it is colocated with a learner.
    """
    env: dict[str, str] = {}
    if bundle_indices is not None:
        indices = [int(i) for i in bundle_indices]
        if not indices or min(indices) < 0 or len(set(indices)) != len(indices):
            raise ConfigError(f"bundle_indices must be distinct and >= 0, got {indices}")
        if tensor_parallel_size is not None and len(indices) != tensor_parallel_size:
            raise ConfigError(
                f"bundle_indices {indices} must name one bundle per TP rank "
                f"(tensor_parallel_size={tensor_parallel_size})"
            )
        env[BUNDLE_INDICES_ENV] = ",".join(map(str, indices))
    if gpu_fraction is not None:
        if not 0 < gpu_fraction <= 1:
            raise ConfigError(f"gpu_fraction must be in (0, 1], got {gpu_fraction}")
        env[PER_WORKER_GPUS_ENV] = str(float(gpu_fraction))
    return env


def to_vllm_sampling_kwargs(params: SamplingParams, prompt_index: int = 0) -> dict[str, Any]:
    """Arguments to `vllm.SamplingParams` for one prompt.

    vLLM refuses n > 1 with greedy sampling, so greedy asks for one sample (see `expand_greedy`).
    vLLM seeds sample j of a request with seed + j, so prompt i starts at seed + i * n: every
    sample of the batch gets its own random stream, and a fixed seed repeats the batch exactly.
    """
    n = 1 if params.greedy else params.n
    kwargs: dict[str, Any] = {
        "n": n,
        "temperature": 0.0 if params.greedy else params.temperature,
        "top_p": 1.0 if params.greedy else params.top_p,
        "max_tokens": params.max_new_tokens,
        "logprobs": SAMPLED_ONLY_LOGPROBS,
        "stop_token_ids": list(params.stop_token_ids),
    }
    if params.seed is not None and not params.greedy:
        kwargs["seed"] = params.seed + prompt_index * n
    return kwargs


def _finish_reason(reason: str | None, where: str) -> str:
    try:
        return FINISH_REASONS[str(reason)]
    except KeyError:
        raise RuntimeError(
            f"vLLM finished {where} with reason {reason!r} (aborted by a sleep, an engine error or "
            "a repetition check); only 'stop' and 'length' are valid completions"
        ) from None


def _sampled_logprobs(token_ids: list[int], logprobs: Any, where: str) -> list[float]:
    # One {token_id: Logprob} per position; with logprobs=0 it holds the sampled token.
    if logprobs is None or len(logprobs) != len(token_ids):
        raise RuntimeError(f"vLLM returned no per-token log-probs for {where}")
    try:
        return [float(entry[tok].logprob) for tok, entry in zip(token_ids, logprobs, strict=True)]
    except (KeyError, TypeError):
        raise RuntimeError(f"vLLM log-probs for {where} miss a sampled token") from None


def completions_from_outputs(outputs: Sequence[Any], n: int) -> list[Completion]:
    """`RequestOutput`s (one per prompt, in prompt order) to prompt-major Completions."""
    completions = []
    for i, output in enumerate(outputs):
        samples = sorted(output.outputs, key=lambda s: s.index)
        if len(samples) != n:
            raise RuntimeError(f"vLLM returned {len(samples)} samples for prompt {i}, expected {n}")
        for j, sample in enumerate(samples):
            where = f"prompt {i} sample {j}"
            token_ids = [int(t) for t in sample.token_ids]  # includes the EOS / stop token
            logprobs = _sampled_logprobs(token_ids, sample.logprobs, where)
            reason = _finish_reason(sample.finish_reason, where)
            completions.append(Completion(i, j, token_ids, logprobs, sample.text, reason))
    return completions


def expand_greedy(completions: list[Completion], n: int) -> list[Completion]:
    """n identical copies of each greedy completion (greedy decoding is deterministic)."""
    return [
        replace(c, sample_index=j, token_ids=list(c.token_ids), logprobs=list(c.logprobs))
        for c in completions
        for j in range(n)
    ]


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise ConfigError(MISSING_VLLM) from exc
    return vllm


class VLLMEngine:
    """`GenerationEngine` on `vllm.LLM`; contributes `tensor_parallel_size` weight-sync ranks."""

    def __init__(
        self,
        *,
        model_path: str,
        tensor_parallel_size: int = 1,
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
        max_model_len: int | None = None,
        enable_sleep: bool = False,
        sleep_level: int = SLEEP_LEVEL_DISCARD,
        seed: int = 0,
        bundle_indices: Sequence[int] | None = None,
        gpu_fraction: float | None = None,
        enforce_eager: bool = False,
        max_logprobs: int = DEFAULT_MAX_LOGPROBS,
        use_gpu: bool = True,
        kv_cache_memory_bytes: int | None = None,
        logprobs_mode: str = "processed",
        lora_rank: int = 0,
        adapter_versions: int = 1,
    ) -> None:
        if sleep_level not in (SLEEP_LEVEL_OFFLOAD, SLEEP_LEVEL_DISCARD):
            raise ConfigError(f"sleep_level must be 1 or 2, got {sleep_level}")
        if lora_rank > 0:  # adapter syncs never resend the base: it must survive a sleep
            sleep_level = SLEEP_LEVEL_OFFLOAD
        if enable_sleep and not use_gpu:
            raise ConfigError("vLLM's sleep mode is CUDA-only: enable_sleep needs use_gpu")
        if not use_gpu:
            enforce_eager = True  # torch.compile's CPU warm-up costs minutes and gains little here
        kwargs = llm_kwargs(
            model_path=model_path,
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enable_sleep=enable_sleep,
            seed=seed,
            enforce_eager=enforce_eager,
            max_logprobs=max_logprobs,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            # A prompt split over two scheduler steps has its first step's token discarded and
            # its seeded generator rewound (gpu_model_runner.py, set_offset), which a CPU
            # generator cannot do: "CPU Generator does not use offset" on any seeded batch
            # larger than one step's token budget. Whole prompts per step avoid the rewind.
            chunked_prefill=use_gpu,
            logprobs_mode=logprobs_mode,
            lora_rank=lora_rank,
            max_loras=adapter_versions,
        )
        env = ray_env(bundle_indices, gpu_fraction, tensor_parallel_size)
        for key, value in IN_PROCESS_ENV.items():
            os.environ.setdefault(key, value)
        self._vllm = _import_vllm()
        if kwargs.get("distributed_executor_backend") == RAY_EXECUTOR:
            os.environ.update(env)  # vLLM reads these when its executor places the workers
        self._llm = self._vllm.LLM(**kwargs)
        self._model_path, self._dtype, self._tp = model_path, dtype, tensor_parallel_size
        self._device = "cuda" if use_gpu else "cpu"
        self._enable_sleep, self._sleep_level = enable_sleep, sleep_level
        self._sleeping: set[str] = set()  # tags still asleep
        self._weights_discarded = False  # level-2 sleep since the last complete load
        self._updating = False
        self._adapters = VLLMAdapters(self._llm, adapter_versions) if lora_rank > 0 else None

    def info(self) -> EngineInfo:
        return EngineInfo(
            backend="vllm",
            model_path=self._model_path,
            device=self._device,
            sync_ranks=self._tp,
            extra={"vllm_version": str(self._vllm.__version__), "dtype": self._dtype,
                   "tensor_parallel_size": str(self._tp), "sleeping": ",".join(self._sleeping)},
        )

    def generate(
        self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[Completion]:
        if self._sleeping:
            raise RuntimeError("the vLLM engine is asleep; wake() or load new weights first")
        if not prompt_token_ids:
            return []
        vllm = self._vllm
        prompts = [
            vllm.TokensPrompt(prompt_token_ids=[int(t) for t in ids]) for ids in prompt_token_ids
        ]
        sampling = [
            vllm.SamplingParams(**to_vllm_sampling_kwargs(params, i)) for i in range(len(prompts))
        ]
        adapter = None if self._adapters is None else self._adapters.request
        outputs = self._llm.generate(prompts, sampling, use_tqdm=False, lora_request=adapter)
        n = 1 if params.greedy else params.n  # what to_vllm_sampling_kwargs asked for
        completions = completions_from_outputs(outputs, n)
        if n != params.n:
            completions = expand_greedy(completions, params.n)
        return order_completions(completions, len(prompts), params.n)

    @contextmanager
    def weight_update(self) -> Iterator[None]:
        """Bracket one or more loads (e.g. one `load_ipc` per bucket); see the module docstring."""
        if self._updating:  # nested: the outermost block wakes and finishes
            yield
            return
        if WEIGHTS_TAG in self._sleeping:
            self._llm.wake_up(tags=[WEIGHTS_TAG])
            self._sleeping.discard(WEIGHTS_TAG)
        self._llm.collective_rpc("cpe_begin_update")
        self._updating = True
        try:
            yield
        finally:
            self._updating = False
        self._finish_update()

    def _finish_update(self) -> None:
        reports = self._llm.collective_rpc("cpe_finish_update")
        missing = [r for r in reports if r["tracked"] and r["num_missing"]]
        if self._weights_discarded and missing:
            r = missing[0]
            raise WeightSyncError(
                f"after a level-2 sleep every weight must be reloaded, but {r['num_missing']} of "
                f"{r['total']} parameters were not (e.g. {r['missing']}); the engine stays asleep"
            )
        self._weights_discarded = False
        if KV_CACHE_TAG in self._sleeping:
            self._llm.wake_up(tags=[KV_CACHE_TAG])
            self._sleeping.discard(KV_CACHE_TAG)
        self._reset_prefix_cache()

    def _reset_prefix_cache(self) -> None:
        if not self._llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache after a weight update")

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Direct path (tensors travel inline through the RPC channel): for small models."""
        with self.weight_update():
            chunk: list[tuple[str, torch.Tensor]] = []
            size = 0
            for name, tensor in named_tensors:
                chunk.append((name, tensor))
                size += tensor.numel() * tensor.element_size()
                if size >= DIRECT_LOAD_CHUNK_BYTES:
                    self._llm.collective_rpc("cpe_load_tensors", args=(encode_tensors(chunk),))
                    chunk, size = [], 0
            if chunk:
                self._llm.collective_rpc("cpe_load_tensors", args=(encode_tensors(chunk),))

    def load_adapter(self, version: int, peft_config: Mapping[str, Any],
                     named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Direct path: write adapter `version` to its tmpfs folder and load it."""
        served = self._served()
        self.wake()  # a LoRA engine sleeps at level 1: its base comes back as it was
        served.load(version, peft_config, named_tensors)

    def _served(self) -> VLLMAdapters:
        if self._adapters is None:
            raise ConfigError("this vLLM engine serves no adapters: build it with lora_rank > 0")
        return self._adapters

    def load_ipc(self, handles: Mapping[str, Any], bucket: Bucket) -> None:
        """Load one packed bucket shared by `share_cuda`; `handles` maps GPU UUID to handle.

        The sender must keep the bucket alive until this returns.
        """
        encoded = {uuid: pickle.dumps(handle) for uuid, handle in handles.items()}
        bucket_dict = Manifest((bucket,)).to_dict()["buckets"][0]
        with self.weight_update():
            self._llm.collective_rpc("cpe_load_ipc", args=(encoded, bucket_dict))

    def join_weight_group(self, spec: GroupSpec, first_rank: int) -> None:
        self._llm.collective_rpc("cpe_join_weight_group", args=(spec.to_dict(), first_rank))

    def receive_weights(self, manifest: Manifest) -> SyncStats:
        start = time.perf_counter()
        if manifest.adapter is not None:  # the base stays as it is: no reload
            path = self._served().admit(manifest.version)
            self.wake()
            results = self._llm.collective_rpc("cpe_receive_adapter",
                                               args=(manifest.to_dict(), path))
            self._adapters.add(manifest.version, path)
            return SyncStats(int(results[0]["buckets"]), int(results[0]["bytes"]),
                             time.perf_counter() - start)
        with self.weight_update():
            results = self._llm.collective_rpc("cpe_receive_weights", args=(manifest.to_dict(),))
        return SyncStats(
            buckets=int(results[0]["buckets"]),
            bytes=int(results[0]["bytes"]),
            seconds=time.perf_counter() - start,  # includes waking and the prefix-cache reset
        )

    def named_shapes(self) -> dict[str, list[Any]]:
        """Rank 0's {name: [shape, dtype]}, to compare with a sender's manifest."""
        return self._llm.collective_rpc("cpe_named_shapes")[0]

    def sleep(self) -> None:
        """Free GPU memory (level 1: weights to host; level 2: weights discarded). Aborts
        in-flight requests (vLLM's default), which `generate` never leaves behind."""
        if not self._enable_sleep or self._sleeping:
            return
        self._llm.sleep(level=self._sleep_level)
        self._sleeping = {WEIGHTS_TAG, KV_CACHE_TAG}
        self._weights_discarded = self._sleep_level == SLEEP_LEVEL_DISCARD

    def wake(self) -> None:
        if not self._sleeping:
            return
        if self._weights_discarded:
            raise RuntimeError(
                "the vLLM engine slept at level 2 and discarded its weights; receive_weights or "
                "load_weights wakes it with new ones (use sleep_level=1 to wake without)"
            )
        self._llm.wake_up(tags=sorted(self._sleeping))
        self._sleeping.clear()
