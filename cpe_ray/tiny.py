"""Build, offline and in seconds, a deterministic tiny Qwen2 chat model for tests and smoke runs.

The result is a standard Hugging Face directory (config.json, generation_config.json,
model.safetensors, tokenizer.json, tokenizer_config.json) that loads with `AutoTokenizer` /
`AutoModelForCausalLM` and vLLM. The tokenizer is a byte-level BPE with Qwen2's pipeline,
trained on the small English corpus below: any NFC text (English, Chinese, emoji...)
round-trips exactly; the chat template is Qwen-style ChatML. The same spec gives
byte-identical files. Builds are atomic: files are written to a temporary sibling directory
that is renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from cpe_ray.errors import ConfigError

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Trained first, so their ids are 0, 1, 2 in this order.
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)
RESERVED_TOKEN = "<|reserved_{}|>"  # pads the vocab if the corpus yields too few merges
# Qwen2's pre-tokenization regex (transformers' tokenization_qwen2.PRETOKENIZE_REGEX).
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


TINY_DIR_NAME = "tiny-model-v2"


CACHE_ENV = "CPE_RAY_CACHE"  # where built models live; default ~/.cache/cpe-ray
MOVE_ATTEMPTS = 8  # renames tried against racing builders before giving up


def cache_root() -> Path:
    """`$CPE_RAY_CACHE`, else `~/.cache/cpe-ray` (read now, not at import): where the model
    aliases (`tiny`, `smollm2-135m`) are built."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "cpe-ray"


def default_tiny_dir() -> Path:
    """`$CPE_RAY_CACHE/tiny-model-v2`, else `~/.cache/cpe-ray/tiny-model-v2` (read now, not at
    import). v2: head size 32, which vLLM's CPU attention accepts (v1's 16 it refuses); a new
    name, so a cache holding v1 is not reused as if it were v2."""
    return cache_root() / TINY_DIR_NAME


DEFAULT_TINY_DIR = default_tiny_dir()

_CORPUS = """\
You are a helpful assistant. When a user asks a question, read it carefully, think about what
they really need, and give a clear, friendly and honest answer. If you do not know something,
say so, and suggest where the user could find out more. Good answers are short when the question
is simple and detailed when the problem is hard.

Cooking at home is one of the easiest ways to eat well and save money. Start with a few simple
recipes: a vegetable soup, a pasta with tomato sauce, rice with beans, or an omelette with cheese
and herbs. Buy fresh fruit and vegetables at the market on the weekend, keep bread in the freezer,
and plan the meals for the week so that nothing is wasted. Cooking with friends or family makes
the evening more fun, and children enjoy helping in the kitchen.

Travel is exciting, but a little planning helps. Check the weather before you leave, pack light,
and keep your passport, tickets and phone charger in one place. Trains are often more comfortable
than planes for short trips, and walking around a new city in the morning is the best way to see
it. Ask local people for their favourite restaurants, try the food, learn a few words of the
language, and always be polite and patient.

Health and sleep matter more than most people think. Try to go to bed at the same time every night,
drink enough water during the day, and take a walk after lunch. Regular exercise, even twenty
minutes of running, cycling or swimming, improves your mood and your energy. If you feel stressed
at work or at school, take a short break, breathe slowly, talk to someone you trust, and remember
that it is fine to ask for help.

Learning something new is easier with a routine. Read for half an hour each day, write notes in
your own words, and explain the idea to a friend to check that you understand it. Music, painting,
gardening and programming are all skills that grow with practice. Do not compare yourself with
others; compare yourself with the person you were last month.

Personalization means adapting a response to the persona and preferences of a particular user.
A personalized assistant remembers that one user likes short answers, another prefers a formal
tone, and a third enjoys jokes and examples. To improve personalization, a model writes a response,
a reward model gives a critique and scores for helpfulness, personalization and naturalness, and an
editor revises the response according to the critique. The edited response is then used to train
the policy with reinforcement learning, so that the next response is more helpful, more personal
and more natural than the previous one.

The critique should be specific and constructive: it explains what the response did well, what it
missed, and how it could better match the persona. Scores are given on a scale from one to ten.
A high helpfulness score means the answer solves the problem; a high naturalness score means it
sounds like a real person talking; a high personalization score means it fits the user's interests,
background, age, job, hobbies and style of communication.

Money, work and home life are common topics too. Make a monthly budget, pay bills on time, and save
a small amount every week. At work, write clear emails, keep meetings short, and thank your
colleagues for their help. At home, open the windows in the morning, clean the kitchen after dinner,
water the plants, and spend time with the people and pets you love. Small habits, repeated every
day, make a big difference over the years.
"""


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the tiny model; vocab_size counts the special tokens."""

    vocab_size: int = 1024
    hidden_size: int = 64
    num_hidden_layers: int = 2
    # head size 64 / 2 = 32: the smallest vLLM's CPU attention supports
    # (vllm/v1/attention/backends/cpu_attn.py, get_supported_head_sizes)
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    intermediate_size: int = 128
    max_position_embeddings: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        min_vocab = 256 + len(SPECIAL_TOKENS)  # byte alphabet + specials
        if self.vocab_size < min_vocab:
            raise ConfigError(f"TinyModelSpec.vocab_size={self.vocab_size} must be >= {min_vocab}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"TinyModelSpec.hidden_size={self.hidden_size} must be divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"TinyModelSpec.num_attention_heads={self.num_attention_heads} must be divisible "
                f"by num_key_value_heads={self.num_key_value_heads}"
            )


def is_complete(model_dir: str | Path) -> bool:
    """True if `model_dir` holds every file a complete tiny model has."""
    d = Path(model_dir)
    return all((d / name).is_file() for name in REQUIRED_FILES)


def _train_tokenizer(spec: TinyModelSpec):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # Exactly Qwen2's pipeline (NFC, split regex, byte level): transformers 5 rebuilds qwen2
    # tokenizers with it whatever tokenizer.json says, so tokenizer.json must agree with it.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    missing = spec.vocab_size - tok.get_vocab_size()
    if missing > 0:  # small corpus ran out of merges: keep len(tokenizer) == config.vocab_size
        tok.add_special_tokens([RESERVED_TOKEN.format(i) for i in range(missing)])
    return tok


def _write_model(out: Path, spec: TinyModelSpec) -> None:
    import torch
    from transformers import (
        GenerationConfig,
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForCausalLM,
    )
    from transformers.utils import logging as hf_logging

    tok = _train_tokenizer(spec)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=spec.max_position_embeddings,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    # The template goes into tokenizer_config.json (readable by every loader), not a .jinja file.
    hf_tok.save_pretrained(out, save_jinja_files=False)
    # What Qwen2 checkpoints declare: transformers 4 then loads tokenizer.json as is (fast class).
    _update_json(out / "tokenizer_config.json", tokenizer_class="Qwen2Tokenizer")
    pad_id, eos_id = tok.token_to_id(PAD_TOKEN), tok.token_to_id(IM_END)

    config = Qwen2Config(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.hidden_size // spec.num_attention_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    # Construction draws from the global RNG: fork_rng hands the caller's state back untouched.
    with torch.random.fork_rng(devices=[]):
        model = Qwen2ForCausalLM(config).to(torch.float32).eval()
    _init_weights(model, spec.seed, config.initializer_range)
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # keep CLI output to the printed path
    try:
        model.save_pretrained(out)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    (out / "tiny_spec.json").write_text(_spec_json(spec))


def _init_weights(model, seed: int, std: float) -> None:
    """Re-initialize every parameter from a private generator: deterministic even across threads."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied lm_head is listed once
            if name.endswith("norm.weight"):  # RMSNorm scales
                param.fill_(1.0)
            else:  # biases too: a loader that drops any tensor changes the outputs
                param.normal_(0.0, std, generator=gen)


def _spec_json(spec: TinyModelSpec) -> str:
    return json.dumps(asdict(spec), indent=2, sort_keys=True) + "\n"


def _update_json(path: Path, **items: object) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(items)
    path.write_text(
        json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def _discard(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _move_aside(path: Path) -> None:
    """Rename `path` out of the way (then delete it); another process may have done so first."""
    trash = path.with_name(f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    _discard(trash)


def atomic_build(out_dir: Path, write: Callable[[Path], None],
                 complete: Callable[[Path], bool], replace_complete: bool,
                 what: str = "model") -> Path:
    """Run `write` into a private sibling directory, then rename it to `out_dir` in one step.

    Readers never see a half-written model, and processes that race each build privately:
    the first rename wins; a loser that finds a complete `out_dir` uses it (unless
    `replace_complete`, then it replaces it once), and one that finds an incomplete leftover
    moves it aside and tries again. Shared by every built model alias (`tiny`, `smollm2-135m`).
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir()
        write(tmp)
        for _ in range(MOVE_ATTEMPTS):
            try:
                os.rename(tmp, out_dir)  # atomic; fails if out_dir is a non-empty directory
                return out_dir
            except OSError:
                if not out_dir.exists():
                    raise
            if complete(out_dir) and not replace_complete:
                return out_dir  # another process won the race; use its result
            replace_complete = False  # replace at most once, then accept whatever wins
            _move_aside(out_dir)
        raise OSError(f"could not move the {what} into {out_dir}")
    finally:
        _discard(tmp)


def _build(out_dir: Path, spec: TinyModelSpec, replace_complete: bool) -> Path:
    return atomic_build(out_dir, lambda tmp: _write_model(tmp, spec), is_complete,
                        replace_complete, "tiny model")


def build_tiny_model(
    out_dir: str | Path, spec: TinyModelSpec = TinyModelSpec(), overwrite: bool = False
) -> Path:
    """Build the tiny model into `out_dir` and return its path.

    An existing non-empty `out_dir` is replaced if `overwrite`, else a ConfigError is raised.
    """
    out_dir = Path(out_dir).expanduser()
    in_use = out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir()))
    if in_use and not overwrite:
        raise ConfigError(
            f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it"
        )
    if out_dir.exists() and not out_dir.is_dir():
        out_dir.unlink()
    return _build(out_dir, spec, replace_complete=True)


def ensure_tiny_model(
    out_dir: str | Path | None = None, spec: TinyModelSpec = TinyModelSpec()
) -> Path:
    """Return `out_dir` (default `default_tiny_dir()`), building only if no complete model is there.

    Safe when several processes race: each builds privately, one rename wins, the rest reuse it.
    An existing complete model is reused as is, even if it was built from a different spec.
    """
    out_dir = default_tiny_dir() if out_dir is None else Path(out_dir).expanduser()
    if is_complete(out_dir):
        return out_dir
    return _build(out_dir, spec, replace_complete=False)
