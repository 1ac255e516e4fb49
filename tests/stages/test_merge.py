"""`cpe-ray merge`: what each method returns on known inputs, determinism, the folder it
writes, every refusal as one line before a weight is read, and a SmolLM2 merge that both
engines serve.

The tiny-model tests take about a second each after mergekit's ~15 s import (65 s in all on
a loaded 2-core box). The SmolLM2 test (`slow`, 217 s there) saves a perturbed copy of the
alias and merges 135M parameters (128 s), then generates on the HF engine and, where vLLM's
CPU build is installed, on vLLM (84 s)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cpe_ray.cli import main
from cpe_ray.config import load_config
from cpe_ray.config.choices import MERGE_METHODS as MERGE_METHOD_NAMES
from cpe_ray.errors import ConfigError
from cpe_ray.models import resolve_model_path
from cpe_ray.stages.merge import MERGE_INFO, MERGE_METHODS, plan_merge, run_merge
from cpe_ray.tiny import TinyModelSpec, ensure_tiny_model

pytest.importorskip("mergekit")


@pytest.fixture(scope="session")
def tiny() -> Path:
    return Path(resolve_model_path("tiny"))


@pytest.fixture(scope="session")
def tiny_copy(tiny, tmp_path_factory) -> Path:
    """The same weights under another path: merging a model with itself."""
    return Path(shutil.copytree(tiny, tmp_path_factory.mktemp("copy") / "tiny"))


@pytest.fixture(scope="session")
def tiny_b(tmp_path_factory) -> Path:
    """A second tiny model of the same architecture: other seeded weights."""
    return ensure_tiny_model(tmp_path_factory.mktemp("b") / "tiny-b", TinyModelSpec(seed=1))


def _models(*entries: tuple[Path, float, float]) -> str:
    return "merge.models=[" + ", ".join(
        f"{{path: '{p}', weight: {w}, density: {d}}}" for p, w, d in entries) + "]"


def _cfg(out: Path, *overrides: str):
    return load_config(None, [f"run.output_dir={out}", *overrides])


def _merge(out: Path, *overrides: str) -> dict[str, torch.Tensor]:
    result = run_merge(_cfg(out, *overrides))
    return load_file(str(result.path / "model.safetensors"))


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], **tol: float) -> None:
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **tol)


def test_the_table_offers_exactly_the_schemas_methods() -> None:
    assert tuple(MERGE_METHODS) == MERGE_METHOD_NAMES


@pytest.mark.parametrize("method, overrides", [
    ("dare_ties", ["merge.base_model={a}", "merge.models=[{{path: '{c}', density: 0.5}}]"]),
    ("ties", ["merge.base_model={a}", "merge.models=[{{path: '{c}', density: 0.5}}]"]),
    ("linear", ["merge.models=[{{path: '{a}', weight: 0.3}}, {{path: '{c}', weight: 0.7}}]"]),
    ("slerp", ["merge.models=[{{path: '{a}'}}, {{path: '{c}'}}]", "merge.t=0.3"]),
])
def test_a_model_merged_with_itself_is_that_model(tmp_path, tiny, tiny_copy, method,
                                                  overrides) -> None:
    got = _merge(tmp_path, f"merge.method={method}",
                 *(o.format(a=tiny, c=tiny_copy) for o in overrides))
    _close(got, _weights(tiny), rtol=0, atol=1e-6)


def test_linear_is_the_weighted_average(tmp_path, tiny, tiny_b) -> None:
    a, b = _weights(tiny), _weights(tiny_b)
    got = _merge(tmp_path, "merge.method=linear", _models((tiny, 0.25, 1), (tiny_b, 0.75, 1)))
    _close(got, {k: (0.25 * a[k] + 0.75 * b[k]) / 1.0 for k in a})
    summed = _merge(tmp_path, "merge.method=linear", "merge.normalize=false", "merge.name=sum",
                    _models((tiny, 1, 1), (tiny_b, 1, 1)))
    _close(summed, {k: a[k] + b[k] for k in a})


def test_dare_ties_keeping_everything_of_one_model_is_that_model(tmp_path, tiny, tiny_b) -> None:
    got = _merge(tmp_path, "merge.base_model=tiny", _models((tiny_b, 1, 1)))
    _close(got, _weights(tiny_b))


def test_dare_is_deterministic_by_seed_and_leaves_the_callers_generators(tmp_path, tiny,
                                                                          tiny_b) -> None:
    args = ["merge.base_model=tiny", _models((tiny_b, 1, 0.5))]
    torch.manual_seed(123)
    first = run_merge(_cfg(tmp_path, *args, "merge.seed=7", "merge.name=one"))
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3))  # the merge drew from a forked generator
    second = run_merge(_cfg(tmp_path, *args, "merge.seed=7", "merge.name=two"))
    other = run_merge(_cfg(tmp_path, *args, "merge.seed=8", "merge.name=three"))
    assert (first.path / "model.safetensors").read_bytes() == (
        second.path / "model.safetensors").read_bytes()
    one, three, b = _weights(first.path), _weights(other.path), _weights(tiny_b)
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(one[name], three[name]) and not torch.equal(one[name], b[name])


def test_the_result_is_a_whole_model_folder(tmp_path, tiny, tiny_copy, tiny_b) -> None:
    from transformers import AutoModelForCausalLM

    from cpe_ray.models import load_tokenizer

    result = run_merge(_cfg(tmp_path, "merge.method=ties", "merge.base_model=tiny",
                            "merge.name=m", _models((tiny_b, 1, 0.5))))
    assert result.path == tmp_path / "m" and sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    info = json.loads((result.path / MERGE_INFO).read_text())
    assert (info["method"], info["seed"], info["models"][0]["density"]) == ("ties", 42, 0.5)
    assert info["base_model"] == str(tiny) and info["mergekit_version"] == "0.1.5"
    assert json.loads((result.path / "config.json").read_text())["architectures"] == [
        "Qwen2ForCausalLM"]
    assert load_tokenizer(str(result.path)).chat_template
    model = AutoModelForCausalLM.from_pretrained(result.path)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 40, 41]])).logits).all()
    again = _cfg(tmp_path, "merge.method=ties", "merge.base_model=tiny", "merge.name=m",
                 "merge.overwrite=true", _models((tiny_copy, 1, 0.5)))
    with pytest.raises(ConfigError, match="is one of the merged models"):
        plan_merge(load_config(None, [f"run.output_dir={tmp_path}", "merge.base_model=tiny",
                                      f"merge.models=[{{path: '{result.path}'}}]",
                                      "merge.name=m", "merge.overwrite=true"]))
    replaced = run_merge(again)  # overwrite: the new merge replaces the old one whole
    assert json.loads((replaced.path / MERGE_INFO).read_text())["models"][0]["path"] == str(tiny_copy)


def test_a_checkpoint_folder_resolves_to_its_policy(tmp_path, tiny, tiny_b) -> None:
    ckpt = tmp_path / "run" / "checkpoints" / "step-3"
    shutil.copytree(tiny_b, ckpt / "policy")
    plan = plan_merge(_cfg(tmp_path, "merge.base_model=tiny", _models((ckpt, 1, 0.5))))
    assert plan.models[0].folder == ckpt / "policy" and plan.base.folder == tiny


def _other_shape(tmp: Path, tiny: Path) -> Path:
    folder = tmp / "wide"
    folder.mkdir()
    config = json.loads((tiny / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"hidden_size": 128}))
    return folder


@pytest.mark.parametrize("overrides, message", [
    (["merge.method=task_arithmetic"], "merge.method = 'task_arithmetic' is not one of: "
     "dare_ties, ties, linear, slerp"),
    (["merge.base_model=tiny"], "merge.method=dare_ties merges at least 1 model(s) of "
     "merge.models; it lists 0"),
    (["merge.method=linear", "merge.models=[{{path: tiny}}]"], "merge.method=linear merges at "
     "least 2 model(s) of merge.models; it lists 1"),
    (["merge.method=slerp", "merge.models=[{{path: tiny}}, {{path: '{b}'}}, {{path: '{c}'}}]"],
     "merge.method=slerp merges exactly 2 model(s) of merge.models; it lists 3"),
    (["merge.models=[{{path: '{b}'}}]"], "merge.method=dare_ties needs merge.base_model"),
    (["merge.method=ties", "merge.base_model=tiny", "merge.models=[{{path: tiny}}]"],
     "merge.base_model is merge.models[0] too"),
    (["merge.method=linear", "merge.base_model=tiny",
      "merge.models=[{{path: tiny}}, {{path: '{b}'}}]"], "merge.base_model: merge.method=linear "
     "has no base"),
    (["merge.method=slerp", "merge.base_model='{c}'",
      "merge.models=[{{path: tiny}}, {{path: '{b}'}}]"], "slerp's base is the end at t=0"),
    (["merge.method=linear", "merge.models=[{{path: tiny}}, {{path: '{c}'}}, {{path: tiny}}]"],
     "merge.models[2] is merge.models[0] again"),
    (["merge.base_model=tiny", "merge.models=[{{path: '{w}'}}]"], "merge.models[0] ({w}) has "
     "hidden_size 128, merge.base_model ({a}) 64; merge only models of one architecture"),
    (["merge.base_model=tiny", "merge.models=[{{path: ./nowhere/model}}]"],
     "merge.models[0].path: model path ./nowhere/model does not exist"),
    (["merge.base_model=tiny", "merge.models=[{{path: '{b}', density: 0}}]"],
     "merge.models[0].density = 0.0 is outside (0, 1]"),
    (["merge.base_model=tiny", "merge.models=[{{path: '{b}', weight: .nan}}]"],
     "merge.models[0].weight = nan is not a finite number"),
    (["merge.method=slerp", "merge.models=[{{path: tiny, weight: 2}}, {{path: '{b}'}}]"],
     "merge.models[0].weight: merge.method=slerp does not weigh models"),
    (["merge.method=linear", "merge.models=[{{path: tiny, density: 0.5}}, {{path: '{b}'}}]"],
     "merge.models[0].density: merge.method=linear keeps every weight"),
    (["merge.method=linear", "merge.models=[{{path: tiny, weight: 1}}, {{path: '{b}', "
      "weight: -1}}]"], "merge.models' weights sum to 0"),
    (["merge.base_model=tiny", "merge.models=[{{path: '{b}'}}]", "merge.name=taken"],
     "taken already exists; set merge.overwrite=true"),
    (["merge.models=[{{pth: tiny}}]"], "Key 'pth' not in 'MergeModelConfig'"),
])
def test_each_refusal_is_one_line_before_any_weight(tmp_path, tiny, tiny_copy, tiny_b, capsys,
                                                    overrides, message) -> None:
    (tmp_path / "taken").mkdir()
    wide = _other_shape(tmp_path, tiny)
    args = [o.format(a=tiny, b=tiny_b, c=tiny_copy, w=wide) for o in overrides]
    message = message.format(a=tiny, w=wide)
    with pytest.raises(ConfigError) as err:
        plan_merge(_cfg(tmp_path, *args))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert main(["merge", f"run.output_dir={tmp_path}", *args]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert [x for x in lines if x.startswith("cpe-ray")] == [f"cpe-ray: error: {err.value}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken", "wide"]


def test_the_command_prints_where_the_model_went(tmp_path, tiny_b, capsys) -> None:
    assert main(["merge", f"run.output_dir={tmp_path}", "merge.base_model=tiny",
                 _models((tiny_b, 1, 0.5))]) == 0
    out = capsys.readouterr().out
    assert f"model         {tmp_path / 'merged-tiny'}" in out and "dare_ties" in out


# ---------------------------------------------------------------- SmolLM2, both engines

PERTURB_SCALE = 1e-3  # of each tensor's std: a distinct model whose answers stay fluent
TOKENS = 8


@pytest.fixture(scope="session")
def smollm2_merge(tmp_path_factory) -> Path:
    """DARE-TIES of the `smollm2-135m` alias and a seeded perturbation of it."""
    from transformers import AutoModelForCausalLM

    from cpe_ray.smollm2 import SMOLLM2_MODEL
    from cpe_ray.stages.merge import DONOR_FILES

    try:
        base = Path(resolve_model_path(SMOLLM2_MODEL))
    except ConfigError as exc:  # the alias is neither cached nor buildable here
        pytest.skip(str(exc))
    root = tmp_path_factory.mktemp("smollm2-merge")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * (PERTURB_SCALE * p.std().item()))
    model.save_pretrained(root / "tuned")
    for name in DONOR_FILES:
        if (base / name).is_file():
            shutil.copyfile(base / name, root / "tuned" / name)
    del model
    models = _models((root / "tuned", 1, 0.5))
    return run_merge(_cfg(root, f"merge.base_model={SMOLLM2_MODEL}", models,
                          "merge.name=merged")).path


@pytest.mark.slow
@pytest.mark.timeout(900)  # 217 s on a loaded 2-core box; 300 s was once not enough
def test_a_smollm2_merge_generates_on_the_hf_engine_and_on_vllm(smollm2_merge) -> None:
    from cpe_ray.chat import apply_chat_template, build_policy_messages
    from cpe_ray.engines.base import SamplingParams
    from cpe_ray.engines.hf import HFEngine

    path = str(smollm2_merge)
    hf = HFEngine(path)
    ids = apply_chat_template(hf.tokenizer, build_policy_messages(
        "Name: Ada\nOccupation: retired nurse", "How do I keep tomatoes from splitting?"))
    params = SamplingParams(temperature=0, max_new_tokens=TOKENS)
    [answer] = hf.generate([ids], params)
    assert len(answer.token_ids) == TOKENS and answer.text.strip()
    assert all(math.isfinite(lp) for lp in answer.logprobs)
    pytest.importorskip("vllm")
    from cpe_ray.engines.factory import make_engine
    from cpe_ray.engines.spec import EngineSpec

    engine = make_engine(EngineSpec("vllm", path, dtype="float32", seed=0, use_gpu=False,
                                    max_model_len=512))
    [served] = engine.generate([ids], params)
    with torch.no_grad():  # each of vLLM's tokens is the HF model's argmax after its prefix
        logits = hf.model(torch.tensor([ids + served.token_ids])).logits[0, len(ids) - 1:-1]
    assert served.token_ids == logits.argmax(-1).tolist()
