"""The learner's forward (learners/forward.py): shared prompts and logits only on responses give
the plain forward's outputs and gradients, on the tiny model, without Ray."""

from __future__ import annotations

import pytest
import torch

from cpe_ray.algo.experience import Experience
from cpe_ray.learners.forward import ResponseForward, micro_order, prompt_groups
from cpe_ray.models import load_causal_lm, resolve_model_path

PAD = 0
# Three prompts of different lengths (so prompts are left-padded), rows of a prompt not
# adjacent, uneven group sizes, one empty response and one full-width response.
PROMPTS = {"a": [5, 6, 7, 8, 9, 10, 11], "b": [12, 13, 14], "c": [15, 16, 17, 18, 19]}
ROWS = [("a", [20, 21, 22]), ("b", [23, 24]), ("a", [25, 26, 27, 28, 29]), ("c", [30]),
        ("a", []), ("b", [31, 32, 33, 34, 35]), ("a", [36, 37])]


def _exp(rows=ROWS) -> Experience:
    return Experience.from_tokens([PROMPTS[p] for p, _ in rows], [r for _, r in rows], PAD,
                                  temperature=1.0)


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return load_causal_lm(resolve_model_path("tiny"), "float32", "cpu", False)


@pytest.fixture(scope="module")
def critic():
    from transformers import AutoModelForTokenClassification

    torch.manual_seed(0)
    return AutoModelForTokenClassification.from_pretrained(resolve_model_path("tiny"),
                                                           num_labels=1)


def _reference(model, exp: Experience) -> torch.Tensor:
    """The outputs the learner used before: one plain forward, sliced after the fact."""
    positions = (exp.attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=exp.sequences, attention_mask=exp.attention_mask,
                position_ids=positions, use_cache=False).logits
    p = exp.prompt_width
    return out[:, p - 1 : p - 1 + exp.response_width]


def _calls(model) -> list[int]:
    """Counts the model's forward calls (the shared path makes two, the plain one)."""
    count = [0]
    model.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


def test_prompt_groups_and_micro_order_by_hand() -> None:
    groups = prompt_groups(_exp())
    assert groups.index.tolist() == [0, 1, 0, 2, 0, 1, 0]
    assert groups.first.tolist() == [0, 1, 3]
    assert micro_order(_exp()).tolist() == [0, 2, 4, 6, 1, 5, 3]
    # same tokens, different padding (a batch with a longer prompt): still one group
    wide = Experience.from_tokens([PROMPTS["b"], [1] * 9, PROMPTS["b"]], [[2], [3], [4]], PAD)
    assert prompt_groups(wide).index.tolist() == [0, 1, 0]


@pytest.mark.parametrize("share", [True, False])
def test_policy_logits_equal_the_plain_forward(policy, share: bool) -> None:
    exp = _exp()
    forward = ResponseForward(policy, share_prompts=share)
    assert forward.share is share and forward.keep_logits
    calls = _calls(policy)
    with torch.no_grad():
        got, want = forward(exp), _reference(policy, exp)
    assert calls[0] == (3 if share else 2)  # the reference's call included
    mask = exp.response_mask.bool()
    assert got.shape == want.shape == (7, 5, 1024)
    assert (got - want).abs()[mask].max() < 1e-5
    # and a wrong alignment would be told apart: one position off is far
    assert (got[:, 1:] - want[:, :-1]).abs()[mask[:, 1:]].max() > 0.1


def test_critic_values_equal_the_plain_forward(critic) -> None:
    exp = _exp()
    with torch.no_grad():
        got = ResponseForward(critic, share_prompts=True)(exp)
        want = _reference(critic, exp)
    assert got.shape == want.shape == (7, 5, 1)
    assert (got - want).abs()[exp.response_mask.bool()].max() < 1e-5


def test_gradients_through_the_shared_prompt_equal_the_plain_ones(policy) -> None:
    exp = _exp()

    def grads(fn) -> dict[str, torch.Tensor]:
        policy.zero_grad()
        logp = torch.log_softmax(fn(exp), -1).gather(-1, exp.responses[..., None])[..., 0]
        (logp * exp.response_mask).sum().backward()
        return {n: p.grad.clone() for n, p in policy.named_parameters()}

    policy.train()
    try:
        shared = grads(ResponseForward(policy, share_prompts=True))
        plain = grads(lambda e: _reference(policy, e))
    finally:
        policy.eval()
    for name, g in plain.items():
        scale = float(g.abs().max())
        assert scale > 0, name  # every parameter is reached, the prompt's included
        assert float((shared[name] - g).abs().max()) <= 1e-5 * scale, name


def test_gradient_checkpointing_in_training_takes_the_plain_forward() -> None:
    model = load_causal_lm(resolve_model_path("tiny"), "float32", "cpu", False)
    model.gradient_checkpointing_enable()
    forward = ResponseForward(model, share_prompts=True)
    calls = _calls(model)
    model.train()
    forward(_exp())
    assert calls[0] == 1  # Hugging Face runs checkpointed training without a cache
    model.eval()
    with torch.no_grad():
        forward(_exp())
    assert calls[0] == 3  # no gradients: the shared prompt pass and the responses' pass
