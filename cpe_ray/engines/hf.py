"""The transformers engine: batched KV-cached sampling with per-token log-probs, CPU or GPU.

It exists so that the whole system runs and is tested on a CPU, and as a fallback on GPUs
without vLLM. Prompts are left-padded into one batch (n copies of each), decoded step by
step with the model's cache; each sampled token's log-prob is taken under the distribution
it was sampled from (temperature, then top-p, renormalised: `logprobs_mode="processed"`, vLLM's
`processed_logprobs`) or under the model's own (`"raw"`: log_softmax of the logits, vLLM's
`raw_logprobs`). Rows stop at an EOS / stop token, which is kept.

A LoRA policy's syncs carry only its adapter: the engine wraps its model with peft at the
first one and keeps the newest `adapter_versions` versions as peft adapters beside the base,
generating with the newest (adapters.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from cpe_ray.config.choices import LOGPROBS_MODES
from cpe_ray.engines.adapters import AdapterVersions, adapter_name
from cpe_ray.engines.base import (
    FINISH_LENGTH,
    FINISH_STOP,
    Completion,
    EngineInfo,
    SamplingParams,
)
from cpe_ray.models import (
    last_token_logits,
    left_pad,
    load_causal_lm,
    load_tokenizer,
    pick_device,
    position_ids,
    resolve_model_path,
    stop_token_ids,
)
from cpe_ray.weight_sync.codec import Bucket, Manifest, unpack
from cpe_ray.weight_sync.cuda import cuda_index, gpu_uuid, open_cuda
from cpe_ray.weight_sync.group import (
    GroupSpec,
    SyncGroup,
    SyncStats,
    adopt_buckets,
    receive_buckets,
    receive_into,
)

DEFAULT_MAX_BATCH_ROWS = 64  # sequences decoded together; bounds the KV cache's memory


def sampling_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Log-probs of the distribution a token is drawn from; -inf outside the top-p nucleus."""
    logits = logits.float()
    if temperature == 0:
        return torch.log_softmax(logits, dim=-1)
    logp = torch.log_softmax(logits / temperature, dim=-1)
    if top_p >= 1:
        return logp
    sorted_logp, order = logp.sort(dim=-1, descending=True)
    mass_before = sorted_logp.exp().cumsum(dim=-1) - sorted_logp.exp()
    drop_sorted = mass_before >= top_p  # the most likely token always stays
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)


class HFEngine:
    """A `GenerationEngine` on a transformers causal LM held in this process."""

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        device: str | None = None,
        max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS,
        trust_remote_code: bool = False,
        logprobs_mode: str = "processed",
        adapter_versions: int = 1,
    ) -> None:
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode {logprobs_mode!r} is not one of {LOGPROBS_MODES}")
        self.logprobs_mode = logprobs_mode
        self.model_path = resolve_model_path(model_path)
        self.device = pick_device(device)
        self.tokenizer = load_tokenizer(self.model_path, trust_remote_code)
        self.model = load_causal_lm(self.model_path, dtype, self.device, trust_remote_code).eval()
        self.max_batch_rows = max_batch_rows
        self.default_stop_ids = stop_token_ids(self.tokenizer, self.model_path)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self._params = dict(self.model.named_parameters())
        self._group: SyncGroup | None = None
        self._adopted: list[torch.Tensor] | None = None
        self._adopted_for: tuple[Bucket, ...] | None = None  # the buckets, not the version
        self._adapters = AdapterVersions(adapter_versions)
        self._asleep = False

    def info(self) -> EngineInfo:
        return EngineInfo("hf", self.model_path, str(self.device), sync_ranks=1)

    # --- generation -----------------------------------------------------------------------
    def generate(
        self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[Completion]:
        if self._asleep:
            raise RuntimeError("engine is asleep; call wake() before generate()")
        rows = [(i, j) for i in range(len(prompt_token_ids)) for j in range(params.n)]
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        stop_ids = tuple(sorted(set(self.default_stop_ids) | set(params.stop_token_ids)))
        out: list[Completion] = []
        for start in range(0, len(rows), self.max_batch_rows):
            chunk = rows[start : start + self.max_batch_rows]
            prompts = [list(prompt_token_ids[i]) for i, _ in chunk]
            for (i, j), (tokens, lps, reason) in zip(
                chunk, self._sample(prompts, params, stop_ids, gen), strict=True
            ):
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                out.append(Completion(i, j, tokens, lps, text, reason))
        return out

    @torch.no_grad()
    def _sample(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        stop_ids: tuple[int, ...],
        gen: torch.Generator | None,
    ) -> list[tuple[list[int], list[float], str]]:
        batch = len(prompts)
        ids, mask, positions = self._left_padded(prompts)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        next_pos = positions[:, -1:] + 1
        stop = torch.tensor(stop_ids, dtype=torch.long, device=self.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        ended_at = torch.full((batch,), params.max_new_tokens, device=self.device)
        tokens, logprobs = [], []
        for step in range(params.max_new_tokens):
            logits = out.logits[:, -1, :]
            logp = sampling_logprobs(logits, params.temperature, params.top_p)
            if params.greedy:
                tok = logp.argmax(dim=-1)
            else:
                tok = torch.multinomial(logp.exp(), 1, generator=gen).squeeze(-1)
            tokens.append(tok)
            reported = logp if self.logprobs_mode == "processed" else torch.log_softmax(
                logits.float(), dim=-1)
            logprobs.append(reported.gather(-1, tok[:, None]).squeeze(-1))
            hit = torch.isin(tok, stop) & ~finished
            ended_at = torch.where(hit, step + 1, ended_at)
            finished |= hit
            if bool(finished.all()) or step + 1 == params.max_new_tokens:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            out = self.model(
                input_ids=tok[:, None],
                attention_mask=mask,
                position_ids=next_pos,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
            next_pos = next_pos + 1
        tok_mat = torch.stack(tokens, dim=1).tolist()
        lp_mat = torch.stack(logprobs, dim=1).tolist()
        results = []
        for r in range(batch):
            n = int(ended_at[r])
            reason = FINISH_STOP if bool(finished[r]) else FINISH_LENGTH
            results.append((tok_mat[r][:n], lp_mat[r][:n], reason))
        return results

    @torch.no_grad()
    def next_token_logits(self, prompt_token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Raw logits after each prompt, [B, V] on the CPU: for checks against the learner."""
        ids, mask, _ = self._left_padded(prompt_token_ids)
        return last_token_logits(self.model, ids, mask)

    def _left_padded(self, prompts: Sequence[Sequence[int]]):
        """(ids, attention mask, position ids) on the engine's device, prompts left-padded."""
        if min(len(p) for p in prompts) == 0:
            raise ValueError("every prompt needs at least one token")
        ids, mask = left_pad(prompts, self.pad_id)
        return ids.to(self.device), mask.to(self.device), position_ids(mask).to(self.device)

    # --- weights --------------------------------------------------------------------------
    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in named_tensors:
            param = self._params.get(name)
            if param is None:
                raise KeyError(f"HF engine has no parameter {name!r} (model {self.model_path})")
            param.copy_(tensor)

    @torch.no_grad()
    def load_adapter(self, version: int, peft_config: Mapping[str, Any],
                     named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Hold adapter `version` (tensors named as `get_peft_model_state_dict` names them)
        beside the untouched base, and generate with it from now on."""
        from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict

        config = LoraConfig.from_peft_type(**{**peft_config, "inference_mode": True})
        name = adapter_name(version)
        dropped = self._adapters.admit(version)
        if not isinstance(self.model, PeftModel):
            self.model = get_peft_model(self.model, config, adapter_name=name)
        elif name not in self.model.peft_config:
            self.model.add_adapter(name, config)
        result = set_peft_model_state_dict(self.model, dict(named_tensors), adapter_name=name)
        if result.unexpected_keys:
            raise KeyError(f"adapter v{version} has tensors the model lacks: "
                           f"{result.unexpected_keys[:3]} (model {self.model_path})")
        self.model.set_adapter(name)
        for old in dropped:
            if old != version:
                self.model.delete_adapter(adapter_name(old))
        self.model.eval()

    def join_weight_group(self, spec: GroupSpec, first_rank: int) -> None:
        self._group = SyncGroup(spec, first_rank, self.device)

    def receive_weights(self, manifest: Manifest) -> SyncStats:
        """In place when the manifest matches this model (the parameters then live in the
        bucket buffers and a received bucket needs no copy), else unpack and load; a LoRA
        manifest's tensors become adapter version `manifest.version`."""
        if self._group is None:
            raise RuntimeError("receive_weights before join_weight_group")
        if manifest.adapter is not None:
            received: list[tuple[str, torch.Tensor]] = []
            stats = receive_buckets(self._group, manifest, lambda named: received.extend(
                (n, t.clone()) for n, t in named))  # views into the staging buffers
            self.load_adapter(manifest.version, manifest.adapter, received)
            return stats
        if self._adopted_for != manifest.buckets:
            self._adopted = adopt_buckets(self._params, manifest, self.device)
            self._adopted_for = manifest.buckets
        if self._adopted is not None:
            return receive_into(self._group, manifest, self._adopted)
        return receive_buckets(self._group, manifest, self.load_weights)

    def load_ipc(self, handles: Mapping[str, Any], bucket: Bucket) -> None:
        """Load one packed bucket that a learner on the same GPU shared by CUDA IPC."""
        if self.device.type != "cuda":
            raise RuntimeError("CUDA IPC weight loading needs the engine on a GPU")
        index = cuda_index(self.device)
        flat = open_cuda(handles[gpu_uuid(index)], index)
        self.load_weights(unpack(bucket, flat))
        torch.cuda.synchronize(self.device)  # the sender reuses the buffer once we return

    def close_weight_group(self) -> None:
        self._group = None

    # --- memory ---------------------------------------------------------------------------
    def sleep(self) -> None:
        """On a GPU, move the weights to host memory so a colocated learner can use the card."""
        if self.device.type == "cuda":
            self.model.to("cpu")
            torch.cuda.empty_cache()
        self._asleep = True

    def wake(self) -> None:
        if self.device.type == "cuda":
            self.model.to(self.device)
            self._adopted = self._adopted_for = None  # .to() gave the parameters new storage
        self._params = dict(self.model.named_parameters())
        self._asleep = False


def timed_generate(engine: HFEngine, prompts: Sequence[Sequence[int]], params: SamplingParams):
    """Generate and return (completions, seconds): used by benchmarks and logs."""
    start = time.perf_counter()
    result = engine.generate(prompts, params)
    return result, time.perf_counter() - start
