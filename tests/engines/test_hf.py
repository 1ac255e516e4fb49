"""HF engine: log-probs equal a teacher-forced forward, stopping, seeds, top-p, weight loading."""

from __future__ import annotations

import math

import pytest
import torch

from cpe_ray.engines.base import FINISH_LENGTH, FINISH_STOP, SamplingParams
from cpe_ray.engines.hf import HFEngine, sampling_logprobs


@pytest.fixture(scope="module")
def engine() -> HFEngine:
    return HFEngine("tiny")


def _prompts(engine: HFEngine) -> list[list[int]]:
    tok = engine.tokenizer
    texts = ["What should I cook tonight?", "Hi", "Plan a weekend trip for a retired teacher."]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _teacher_forced(engine: HFEngine, prompt: list[int], response: list[int], temperature: float):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = engine.model(input_ids=ids).logits[0]
    pred = logits[len(prompt) - 1 : len(prompt) + len(response) - 1]
    logp = torch.log_softmax(pred.float() / temperature, dim=-1)
    return logp.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_teacher_forced_forward(engine: HFEngine, temperature: float) -> None:
    prompts = _prompts(engine)  # different lengths: exercises left padding and positions
    params = SamplingParams(n=2, temperature=temperature, max_new_tokens=24, seed=3)
    completions = engine.generate(prompts, params)
    assert [(c.prompt_index, c.sample_index) for c in completions] == [
        (i, j) for i in range(3) for j in range(2)
    ]
    for c in completions:
        expected = _teacher_forced(engine, prompts[c.prompt_index], c.token_ids, temperature)
        torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=2e-5, rtol=1e-5)


def test_greedy_is_deterministic_and_matches_argmax(engine: HFEngine) -> None:
    prompts = _prompts(engine)
    a = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=12))
    b = engine.generate(prompts[::-1], SamplingParams(temperature=0, max_new_tokens=12))
    assert [c.token_ids for c in a] == [c.token_ids for c in b][::-1]
    ids = torch.tensor([prompts[1] + a[1].token_ids])
    with torch.no_grad():
        logits = engine.model(input_ids=ids).logits[0, len(prompts[1]) - 1 : -1]
    assert logits.argmax(-1).tolist() == a[1].token_ids


def test_seed_reproduces_and_differs(engine: HFEngine) -> None:
    prompts = _prompts(engine)
    p = SamplingParams(n=2, max_new_tokens=16, seed=11)
    first = [c.token_ids for c in engine.generate(prompts, p)]
    again = [c.token_ids for c in engine.generate(prompts, p)]
    other = [c.token_ids for c in engine.generate(prompts, SamplingParams(n=2, max_new_tokens=16,
                                                                         seed=12))]
    assert first == again
    assert first != other


def test_stop_token_ends_row_and_is_kept(engine: HFEngine) -> None:
    prompt = _prompts(engine)[0]
    greedy = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=10))[0]
    stop_at = greedy.token_ids[3]
    first_hit = greedy.token_ids.index(stop_at)
    got = engine.generate(
        [prompt], SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=(stop_at,))
    )[0]
    assert got.finish_reason == FINISH_STOP
    assert got.token_ids == greedy.token_ids[: first_hit + 1]
    assert len(got.logprobs) == first_hit + 1
    assert greedy.finish_reason == FINISH_LENGTH or greedy.token_ids[-1] in engine.default_stop_ids


def test_top_p_nucleus_logprobs() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = torch.softmax(logits, -1)[0]
    # top_p 0.8: mass before token 1 is 0.644 < 0.8 (kept), before token 2 is 0.881 (dropped)
    logp = sampling_logprobs(logits, temperature=1.0, top_p=0.8)[0]
    kept = probs[:2] / probs[:2].sum()
    torch.testing.assert_close(logp[:2].exp(), kept)
    assert math.isinf(logp[2].item()) and math.isinf(logp[3].item())
    # the top token always survives, however small top_p is
    tiny_p = sampling_logprobs(logits, temperature=1.0, top_p=1e-6)[0]
    assert tiny_p[0].item() == 0.0 and torch.isinf(tiny_p[1:]).all()


def test_sampled_tokens_stay_inside_top_p(engine: HFEngine) -> None:
    prompts = _prompts(engine)
    params = SamplingParams(n=4, temperature=1.0, top_p=0.05, max_new_tokens=8, seed=0)
    for c in engine.generate(prompts, params):
        assert all(math.isfinite(lp) and lp <= 1e-6 for lp in c.logprobs)


def test_load_weights_changes_outputs_and_rejects_unknown_names() -> None:
    eng = HFEngine("tiny")
    prompt = _prompts(eng)[0]
    before = eng.generate([prompt], SamplingParams(temperature=0, max_new_tokens=6))[0]
    name = "lm_head.weight" if "lm_head.weight" in eng._params else "model.embed_tokens.weight"
    new = eng._params[name].detach() * 3.0
    eng.load_weights([(name, new)])
    assert torch.equal(dict(eng.model.named_parameters())[name], new)
    after = eng.generate([prompt], SamplingParams(temperature=0, max_new_tokens=6))[0]
    delta = max(abs(a - b) for a, b in zip(after.logprobs, before.logprobs, strict=False))
    assert delta > 0.1
    with pytest.raises(KeyError, match="no parameter 'nope'"):
        eng.load_weights([("nope", torch.zeros(1))])


@pytest.mark.gpu
def test_cuda_engine_logprobs_match_cpu_teacher_forcing(engine: HFEngine) -> None:
    gpu = HFEngine("tiny", device="cuda")
    prompts = _prompts(engine)
    completions = gpu.generate(prompts, SamplingParams(n=2, max_new_tokens=16, seed=0))
    for c in completions:
        expected = _teacher_forced(engine, prompts[c.prompt_index], c.token_ids, 1.0)
        torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=1e-4)
