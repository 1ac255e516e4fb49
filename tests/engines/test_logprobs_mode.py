"""rollout.logprobs_mode: the HF and the vLLM engine report the same behaviour log-probs under
each mode, on the tiny model (vLLM's CPU build on a CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from cpe_ray.config import load_config
from cpe_ray.engines.base import SamplingParams
from cpe_ray.engines.hf import HFEngine, sampling_logprobs
from cpe_ray.engines.spec import EngineSpec
from cpe_ray.engines.vllm import llm_kwargs
from cpe_ray.errors import ConfigError
from cpe_ray.tiny import ensure_tiny_model

LOGPROB_ATOL = 1e-3
PROMPTS = [[1, 40, 41, 42, 43], [1, 50, 60]]
MAX_NEW = 10
TEMPERATURE, TOP_P = 0.7, 0.8
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
CPU_KV_BYTES = 16 * 1024**2


def test_the_mode_reaches_both_engines_settings() -> None:
    assert load_config().rollout.logprobs_mode == "processed"  # today's behaviour
    cfg = load_config(None, ["rollout.logprobs_mode=raw"])
    assert EngineSpec.for_policy(cfg).logprobs_mode == "raw"
    assert llm_kwargs(model_path="/m")["logprobs_mode"] == "processed_logprobs"
    assert llm_kwargs(model_path="/m", logprobs_mode="raw")["logprobs_mode"] == "raw_logprobs"
    with pytest.raises(ConfigError):
        llm_kwargs(model_path="/m", logprobs_mode="raw_logits")
    with pytest.raises(ValueError, match="logprobs_mode"):
        HFEngine("tiny", device="cpu", logprobs_mode="processed_logprobs")


@pytest.fixture(scope="module")
def tiny_path() -> str:
    return str(ensure_tiny_model())


@pytest.fixture(scope="module")
def reference(tiny_path):
    return AutoModelForCausalLM.from_pretrained(tiny_path).to(DEVICE).eval()


@pytest.fixture(scope="module", params=["processed", "raw"])
def engines(request, tiny_path):
    pytest.importorskip("vllm")
    from cpe_ray.engines.vllm import VLLMEngine

    mode = request.param
    vllm = VLLMEngine(model_path=tiny_path, dtype="float32", gpu_memory_utilization=0.3,
                      max_model_len=256, enforce_eager=True, seed=0, use_gpu=ON_GPU,
                      kv_cache_memory_bytes=None if ON_GPU else CPU_KV_BYTES,
                      logprobs_mode=mode)
    hf = HFEngine(tiny_path, dtype="float32", device=DEVICE, logprobs_mode=mode)
    yield mode, {"hf": hf, "vllm": vllm}
    del vllm


@torch.no_grad()
def expected_logprobs(model, completion, mode: str) -> torch.Tensor:
    """What `mode` means, from teacher-forced logits: the sampled distribution (temperature,
    then the top-p nucleus renormalised) or the model's own."""
    prompt = PROMPTS[completion.prompt_index]
    ids = torch.tensor([prompt + completion.token_ids], device=DEVICE)
    logits = model(ids).logits[0, len(prompt) - 1 : -1].float().cpu()
    if mode == "processed":
        lp = sampling_logprobs(logits, TEMPERATURE, TOP_P)
    else:
        lp = torch.log_softmax(logits, dim=-1)
    return lp.gather(-1, torch.tensor(completion.token_ids)[:, None])[:, 0]


@pytest.mark.slow
def test_both_engines_report_the_modes_log_probs(engines, reference) -> None:
    mode, by_backend = engines
    params = SamplingParams(n=2, temperature=TEMPERATURE, top_p=TOP_P,
                            max_new_tokens=MAX_NEW, seed=3)
    for name, engine in by_backend.items():
        got = engine.generate(PROMPTS, params)
        other_mode = "raw" if mode == "processed" else "processed"
        far = 0.0
        for c in got:
            reported = torch.tensor(c.logprobs)
            assert torch.allclose(reported, expected_logprobs(reference, c, mode),
                                  atol=LOGPROB_ATOL), (name, mode)
            other = expected_logprobs(reference, c, other_mode)
            far = max(far, (reported - other).abs().max().item())
        assert far > 100 * LOGPROB_ATOL, (name, mode)  # the tolerance tells the modes apart


@pytest.mark.slow
def test_both_engines_agree_token_for_token(engines) -> None:
    """A nucleus of one token makes both engines sample the same (most likely) tokens; their
    log-probs then agree: 0 for the one-token distribution sampled, the model's own for raw."""
    mode, by_backend = engines
    params = SamplingParams(n=1, temperature=TEMPERATURE, top_p=1e-6, max_new_tokens=MAX_NEW,
                            seed=0)
    hf, vllm = (by_backend[name].generate(PROMPTS, params) for name in ("hf", "vllm"))
    for a, b in zip(hf, vllm, strict=True):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs),
                                   atol=LOGPROB_ATOL, rtol=0)
        if mode == "processed":
            assert all(lp == pytest.approx(0.0, abs=1e-6) for lp in a.logprobs + b.logprobs)
        else:
            assert all(math.isfinite(lp) and lp < -1e-3 for lp in a.logprobs)
