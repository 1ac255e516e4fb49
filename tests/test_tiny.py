"""The tiny offline Qwen2 model: files, tokenizer, chat template, determinism, atomic builds."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cpe_ray.errors import ConfigError
from cpe_ray.tiny import (
    DEFAULT_TINY_DIR,
    IM_END,
    IM_START,
    PAD_TOKEN,
    REQUIRED_FILES,
    TinyModelSpec,
    build_tiny_model,
    default_tiny_dir,
    ensure_tiny_model,
    is_complete,
)

ROUND_TRIP = [
    "Hello, world! How are you today? I'd like 3 tips for better sleep.",
    "  leading spaces,\ttabs\nand\r\nnewlines  ",
    "你好，世界！今天天气怎么样？我想学习做饭。",
    "Emoji: 🙂👍🏽🎉 and a family 👨‍👩‍👧",
    "全角标点：（括号）「引号」、顿号。！？",
    "Mixed 中文 and English, 数字 12345.",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def test_files_and_config(model_dir):
    spec = TinyModelSpec()
    assert is_complete(model_dir)
    for name in REQUIRED_FILES:
        assert (model_dir / name).is_file(), name
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen2"
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["vocab_size"] == spec.vocab_size
    assert cfg["hidden_size"] == spec.hidden_size
    assert cfg["num_hidden_layers"] == spec.num_hidden_layers
    assert cfg["num_attention_heads"] % cfg["num_key_value_heads"] == 0
    assert cfg["head_dim"] * cfg["num_attention_heads"] == cfg["hidden_size"]
    assert cfg["max_position_embeddings"] == spec.max_position_embeddings
    assert not list(model_dir.parent.glob(".model.*")), "temporary build directory left behind"


def test_special_token_ids(tokenizer, model, model_dir):
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    start_id = tokenizer.convert_tokens_to_ids(IM_START)
    assert (pad_id, start_id, eos_id) == (0, 1, 2)
    assert tokenizer.eos_token == IM_END and tokenizer.eos_token_id == eos_id
    assert tokenizer.pad_token == PAD_TOKEN and tokenizer.pad_token_id == pad_id
    assert len(tokenizer) == model.config.vocab_size
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == eos_id and gen["pad_token_id"] == pad_id
    assert model.generation_config.eos_token_id == eos_id
    assert model.generation_config.pad_token_id == pad_id
    # Specials are single tokens and are dropped by skip_special_tokens.
    ids = tokenizer.encode(f"{IM_START}user\nhi{IM_END}\n", add_special_tokens=False)
    assert ids[0] == start_id and eos_id in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi\n"


def test_chat_template(tokenizer):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hi there!"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi there!<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # No default system message is injected; no generation prompt unless asked.
    text = tokenizer.apply_chat_template(messages[1:], tokenize=False)
    assert text == "<|im_start|>user\nHi there!<|im_end|>\n"


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_bpe_compresses_english(tokenizer):
    sentence = "Could you suggest a simple dinner recipe that my family will enjoy this weekend?"
    n_tokens = len(tokenizer.encode(sentence, add_special_tokens=False))
    assert n_tokens < len(sentence.encode()) / 2


def test_forward_and_generate(tokenizer, model):
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me a joke."}], tokenize=False, add_generation_prompt=True
    )
    enc = tokenizer(prompt, return_tensors="pt")
    length = enc["input_ids"].shape[1]
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, length, model.config.vocab_size)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    new_tokens = 4
    out = model.generate(
        **enc, max_new_tokens=new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id
    )
    assert length < out.shape[1] <= length + new_tokens
    assert isinstance(tokenizer.decode(out[0, length:]), str)


def test_deterministic_and_rng_untouched(tmp_path, model_dir):
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    other = build_tiny_model(tmp_path / "again")
    assert torch.equal(torch.get_rng_state(), state)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (other / name).read_bytes() == (model_dir / name).read_bytes(), name


def test_seed_changes_weights_only(tmp_path, model_dir):
    other = build_tiny_model(tmp_path / "seeded", TinyModelSpec(seed=1))
    assert (other / "model.safetensors").read_bytes() != (
        model_dir / "model.safetensors"
    ).read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()


def test_build_refuses_existing_unless_overwrite(tmp_path):
    out = build_tiny_model(tmp_path / "m")
    with pytest.raises(ConfigError):
        build_tiny_model(out)
    (out / "stale.txt").write_text("old")
    assert build_tiny_model(out, overwrite=True) == out
    assert is_complete(out) and not (out / "stale.txt").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert is_complete(build_tiny_model(empty))


def test_ensure_reuses_and_repairs(tmp_path):
    out = ensure_tiny_model(tmp_path / "m")
    weights = out / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert ensure_tiny_model(out) == out
    assert weights.stat().st_mtime_ns == mtime
    weights.unlink()
    assert not is_complete(out)
    assert ensure_tiny_model(out) == out
    assert is_complete(out)


def test_ensure_race(tmp_path):
    out, errors = tmp_path / "raced", []

    def worker():
        try:
            assert ensure_tiny_model(out) == out
        except Exception as exc:  # noqa: BLE001 - collected and reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert is_complete(out)
    assert sorted(os.listdir(tmp_path)) == ["raced"]  # no temporary directories left behind


def test_spec_validation():
    with pytest.raises(ConfigError):
        TinyModelSpec(hidden_size=65)
    with pytest.raises(ConfigError):
        TinyModelSpec(num_key_value_heads=3)
    with pytest.raises(ConfigError):
        TinyModelSpec(vocab_size=100)


def test_default_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CPE_RAY_CACHE", str(tmp_path))
    assert default_tiny_dir() == tmp_path / "tiny-model-v2"
    monkeypatch.delenv("CPE_RAY_CACHE")
    assert default_tiny_dir() == Path.home() / ".cache" / "cpe-ray" / "tiny-model-v2"
    assert DEFAULT_TINY_DIR.name == "tiny-model-v2"
