"""LoRA adapter-only sync (issue #23): the sender's adapter manifest, adapter versions, and
adapters reaching the HF engine and vLLM's CPU build through a real gloo sync group.

The learner's side is a peft model of the tiny model with random adapters (peft starts B at
zero, which would change nothing), sent by `WeightSender` from a thread of this process; the
engine receives in another thread, as in tests/engines/test_vllm.py.
"""

from __future__ import annotations

import importlib.util
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from cpe_ray.engines.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterVersions,
    adapter_name,
    write_adapter,
)
from cpe_ray.engines.base import SamplingParams
from cpe_ray.engines.hf import HFEngine
from cpe_ray.models import load_causal_lm
from cpe_ray.tiny import ensure_tiny_model
from cpe_ray.weight_sync.codec import Manifest
from cpe_ray.weight_sync.group import GroupSpec, free_port
from cpe_ray.weight_sync.sender import WeightSender

RANK = 8
BUCKET_BYTES = 16 * 1024  # several buckets even for the adapter
PROMPTS = [[1, 40, 41, 42, 43], [1, 50, 60]]
GREEDY = SamplingParams(n=1, temperature=0.0, max_new_tokens=12)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CPU_KV_BYTES = 16 * 1024**2
LOGPROB_ATOL = 1e-3  # vLLM's CPU kernels against transformers, as in test_vllm.py


@pytest.fixture(scope="module")
def tiny_path() -> str:
    return str(ensure_tiny_model())


def peft_policy(path: str):
    """The learner's policy as L1 builds it: the tiny model wrapped by peft."""
    import peft

    config = peft.LoraConfig(r=RANK, lora_alpha=16.0, lora_dropout=0.0, target_modules=TARGETS,
                             task_type="CAUSAL_LM")
    return peft.get_peft_model(load_causal_lm(path, "float32", "cpu"), config).eval()


@torch.no_grad()
def randomise_adapter(model, seed: int) -> None:
    """Adapter weights large enough to move the tiny model's greedy tokens."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def sender_for(model) -> WeightSender:
    return WeightSender(model, rank=0, world=1, device=torch.device("cpu"), zero3=False,
                        bucket_bytes=BUCKET_BYTES, adopt=False)


def gloo_spec() -> GroupSpec:
    return GroupSpec("gloo", "127.0.0.1", free_port("127.0.0.1"), 2, 60.0)


def together(*fns):
    with ThreadPoolExecutor(len(fns)) as pool:
        return [f.result() for f in [pool.submit(fn) for fn in fns]]


class Learner:
    """A peft policy, its sender joined with one engine, and a sync count like LearnerGroup's."""

    def __init__(self, path: str, engine) -> None:
        self.model = peft_policy(path)
        self.sender = sender_for(self.model)
        self.manifest = self.sender.manifest()
        spec = gloo_spec()
        together(lambda: self.sender.join(spec, self.manifest),
                 lambda: engine.join_weight_group(spec, 1))
        self.engine, self.version = engine, 0

    def sync(self, seed: int):
        """Sync adapter `seed`'s weights as the next version; the engine's stats."""
        randomise_adapter(self.model, seed)
        self.version += 1
        manifest = Manifest(self.manifest.buckets, self.manifest.adapter, self.version)
        _, stats = together(lambda: self.sender.broadcast(manifest),
                            lambda: self.engine.receive_weights(manifest))
        return stats


def tokens_and_logprobs(completions):
    return [(c.token_ids, c.logprobs) for c in completions]


# --- the sender --------------------------------------------------------------------------------


def test_adapter_manifest_is_peft_state_dict_and_much_smaller(tiny_path) -> None:
    from peft import get_peft_model_state_dict

    model = peft_policy(tiny_path)
    manifest = sender_for(model).manifest()
    full = sender_for(load_causal_lm(tiny_path, "float32", "cpu")).manifest()
    names = [t.name for b in manifest.buckets for t in b.tensors]
    state = get_peft_model_state_dict(model)
    assert sorted(names) == sorted(state) and all("lora_" in n for n in names)
    assert manifest.adapter["r"] == RANK and sorted(manifest.adapter["target_modules"]) == sorted(
        TARGETS)
    assert full.adapter is None
    json.dumps(manifest.adapter)  # plain data: crosses msgpack and JSON
    again = Manifest.from_dict(json.loads(json.dumps({**manifest.to_dict(), "version": 3})))
    assert again.adapter == manifest.adapter and again.version == 3
    assert again.buckets == manifest.buckets
    # r=8 on every projection of the tiny model: 65,536 B against 559,360 B (8.5x)
    print(f"adapter sync {manifest.total_bytes} B, full sync {full.total_bytes} B, "
          f"{full.total_bytes / manifest.total_bytes:.1f}x fewer")
    assert manifest.total_bytes == sum(t.numel() * 4 for t in state.values())
    assert full.total_bytes > 8 * manifest.total_bytes


def test_adapter_versions_keep_newest_and_rewind() -> None:
    versions = AdapterVersions(keep=2)
    assert versions.admit(1) == [] and versions.admit(2) == []
    assert versions.admit(3) == [1] and versions.held == [2, 3] and versions.newest == 3
    # a restarted learner counts from 1 again: everything from 1 on names other weights
    assert versions.admit(1) == [2, 3] and versions.held == [1]
    assert versions.admit(1) == [1] and versions.held == [1]
    with pytest.raises(ValueError):
        AdapterVersions(keep=0)


def test_adapter_folders_sweep_those_of_dead_processes(tmp_path: Path, monkeypatch) -> None:
    from cpe_ray.engines import adapters

    monkeypatch.setattr(adapters, "TMPFS", tmp_path)
    dead = tmp_path / f"{adapters.FOLDER_PREFIX}999999999-x"  # above any pid_max
    alive = tmp_path / f"{adapters.FOLDER_PREFIX}1-y"  # init never dies
    for d in (dead, alive):
        (d / "v1").mkdir(parents=True)
    folders = adapters.AdapterFolders()
    assert folders.root.parent == tmp_path and folders.root.is_dir()
    assert not dead.exists() and alive.exists()
    root = folders.root
    del folders
    assert not root.exists()


def test_write_adapter_is_peft_readable(tiny_path, tmp_path: Path) -> None:
    from peft import PeftModel, get_peft_model_state_dict

    model = peft_policy(tiny_path)
    randomise_adapter(model, seed=5)
    state = get_peft_model_state_dict(model)
    write_adapter(tmp_path / "v1", sender_for(model).adapter, state.items())
    assert {p.name for p in (tmp_path / "v1").iterdir()} == {ADAPTER_WEIGHTS, ADAPTER_CONFIG}
    loaded = PeftModel.from_pretrained(load_causal_lm(tiny_path, "float32", "cpu"),
                                       tmp_path / "v1")
    for name, t in get_peft_model_state_dict(loaded).items():
        assert torch.equal(t, state[name])


# --- engine settings ---------------------------------------------------------------------------


def test_policy_engines_serve_adapters_and_judges_do_not() -> None:
    from cpe_ray.config import load_config
    from cpe_ray.engines.spec import EngineSpec
    from cpe_ray.engines.vllm import llm_kwargs, vllm_lora_rank
    from cpe_ray.errors import ConfigError

    cfg = load_config(None, ["policy.lora.rank=12", "trainer.off_policy_steps=1",
                             "grm.model_path=/g"])
    spec = EngineSpec.for_policy(cfg)
    assert (spec.lora_rank, spec.adapter_versions) == (12, 2)
    assert EngineSpec.for_grm(cfg).lora_rank == 0
    assert EngineSpec.for_policy(load_config(None, [])).lora_rank == 0
    kwargs = llm_kwargs(model_path="/p", lora_rank=12, max_loras=2)
    assert (kwargs["enable_lora"], kwargs["max_lora_rank"], kwargs["max_loras"]) == (True, 16, 2)
    assert "enable_lora" not in llm_kwargs(model_path="/p")
    assert vllm_lora_rank(1) == 1 and vllm_lora_rank(16) == 16 and vllm_lora_rank(17) == 32
    for bad in (0, 513):
        with pytest.raises(ConfigError):
            vllm_lora_rank(bad)


# --- the HF engine -----------------------------------------------------------------------------


def test_adapter_sync_reaches_hf_engine(tiny_path) -> None:
    engine = HFEngine(tiny_path, device="cpu", adapter_versions=2)
    base = tokens_and_logprobs(engine.generate(PROMPTS, GREEDY))
    learner = Learner(tiny_path, engine)

    stats = learner.sync(seed=1)
    assert stats.bytes == learner.manifest.total_bytes
    first = tokens_and_logprobs(engine.generate(PROMPTS, GREEDY))
    assert [t for t, _ in first] != [t for t, _ in base]
    learner.sync(seed=2)
    second = tokens_and_logprobs(engine.generate(PROMPTS, GREEDY))
    assert [t for t, _ in second] != [t for t, _ in first]
    assert sorted(engine.model.peft_config) == [adapter_name(1), adapter_name(2)]

    learner.sync(seed=1)  # the first adapter again, as version 3: the same output exactly
    assert tokens_and_logprobs(engine.generate(PROMPTS, GREEDY)) == first
    assert sorted(engine.model.peft_config) == [adapter_name(2), adapter_name(3)]
    with engine.model.disable_adapter():  # the base's weights were never touched
        assert tokens_and_logprobs(engine.generate(PROMPTS, GREEDY)) == base


def test_push_adapter_hands_the_engine_the_adapter_by_value(tiny_path) -> None:
    """Colocated GPUs' path (`WeightSender.push_adapter`), here on the CPU into the HF engine."""
    from peft import get_peft_model_state_dict

    model = peft_policy(tiny_path)
    randomise_adapter(model, seed=1)
    sender = sender_for(model)
    planned = sender.manifest()
    engine = HFEngine(tiny_path, device="cpu")
    base = tokens_and_logprobs(engine.generate(PROMPTS, GREEDY))
    calls = []

    def load(version, config, named):
        calls.append((version, dict(named)))
        engine.load_adapter(version, config, named)

    stats = sender.push_adapter(Manifest(planned.buckets, planned.adapter, 4), load)
    assert stats.bytes == planned.total_bytes and [v for v, _ in calls] == [4]
    state = get_peft_model_state_dict(model)
    assert calls[0][1].keys() == state.keys()
    assert all(torch.equal(calls[0][1][k], v) for k, v in state.items())
    assert tokens_and_logprobs(engine.generate(PROMPTS, GREEDY)) != base
    assert sender.push_adapter(planned, None).bytes == planned.total_bytes  # other ranks


# --- vLLM's CPU build --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_engine(tiny_path):
    if importlib.util.find_spec("vllm") is None or torch.cuda.is_available():
        pytest.skip("vLLM's CPU build is not installed (GPU runs: tests/engines/test_vllm.py)")
    from cpe_ray.engines.vllm import VLLMEngine

    return VLLMEngine(model_path=tiny_path, dtype="float32", max_model_len=256, seed=0,
                      use_gpu=False, kv_cache_memory_bytes=CPU_KV_BYTES, lora_rank=RANK,
                      adapter_versions=2)


def base_outputs(engine):
    """vLLM without any adapter request: the base model as loaded."""
    import vllm

    prompts = [vllm.TokensPrompt(prompt_token_ids=p) for p in PROMPTS]
    sampling = vllm.SamplingParams(temperature=0.0, max_tokens=GREEDY.max_new_tokens)
    return [list(o.outputs[0].token_ids) for o in engine._llm.generate(prompts, sampling,
                                                                         use_tqdm=False)]


def test_adapter_sync_reaches_vllm(vllm_engine, tiny_path) -> None:
    engine = vllm_engine
    base_tokens = base_outputs(engine)
    base = tokens_and_logprobs(engine.generate(PROMPTS, GREEDY))
    assert [t for t, _ in base] == base_tokens
    learner = Learner(tiny_path, engine)

    learner.sync(seed=1)
    first = tokens_and_logprobs(engine.generate(PROMPTS, GREEDY))
    assert [t for t, _ in first] != [t for t, _ in base]
    # what the HF engine with the same adapter generates (vLLM's CPU kernels sum differently)
    hf = HFEngine(tiny_path, device="cpu")
    hf.load_adapter(1, learner.manifest.adapter, _adapter_state(learner.model))
    for (tokens, lps), (hf_tokens, hf_lps) in zip(
            first, tokens_and_logprobs(hf.generate(PROMPTS, GREEDY)), strict=True):
        assert tokens == hf_tokens
        assert torch.allclose(torch.tensor(lps), torch.tensor(hf_lps), atol=LOGPROB_ATOL)

    learner.sync(seed=2)
    second = tokens_and_logprobs(engine.generate(PROMPTS, GREEDY))
    assert [t for t, _ in second] != [t for t, _ in first]
    learner.sync(seed=1)  # version 3: the first adapter again gives its output exactly
    assert tokens_and_logprobs(engine.generate(PROMPTS, GREEDY)) == first
    assert engine._llm.llm_engine.list_loras() == {2, 3}  # two versions kept, v1 removed
    assert not engine._adapters.folders.path(1).exists() and engine._adapters.folders.path(3).is_dir()
    assert str(engine._adapters.folders.root).startswith("/dev/shm/")
    assert base_outputs(engine) == base_tokens  # the base without an adapter: unchanged

    # the direct path, and a learner that went back to version 1 (a restart)
    engine.load_adapter(1, learner.manifest.adapter, _adapter_state(learner.model))
    assert engine._llm.llm_engine.list_loras() == {1}
    assert tokens_and_logprobs(engine.generate(PROMPTS, GREEDY)) == first


def _adapter_state(model) -> list[tuple[str, torch.Tensor]]:
    from peft import get_peft_model_state_dict

    return list(get_peft_model_state_dict(model).items())
