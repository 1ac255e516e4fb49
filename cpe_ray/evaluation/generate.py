"""The evaluated model's answers, through the same engines and prompts as training.

`PolicyAnswerer` holds one engine in this process (`rollout.backend`: hf on CPU, vllm on a
GPU) for `eval.model_path` (default `policy.model_path`; `tiny` builds the offline model; a
training checkpoint `.../checkpoints/step-N` is read from its `policy/` folder). Prompts are
built exactly as in rollouts: the policy system template with the persona, the question as
the user turn, the tokenizer's chat template; a prompt longer than `eval.max_prompt_tokens`
keeps its end.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cpe_ray.chat import apply_chat_template, build_policy_messages, load_policy_system_template
from cpe_ray.config import Config
from cpe_ray.engines.base import SamplingParams
from cpe_ray.errors import ConfigError
from cpe_ray.paths import resolve_path
from cpe_ray.runs.layout import POLICY_DIR


def eval_model_path(cfg: Config) -> str:
    """eval.model_path or policy.model_path; a checkpoint dir resolves to its policy/."""
    path = cfg.eval.model_path or cfg.policy.model_path
    local = resolve_path(path)
    inner = local / POLICY_DIR
    if local.is_dir() and not (local / "config.json").is_file() and (
            inner / "config.json").is_file():
        return str(inner)
    return path


def model_label(cfg: Config) -> str:
    """The generator name written to the outputs."""
    if cfg.eval.model_name:
        return cfg.eval.model_name
    path = Path(eval_model_path(cfg))
    if path.name == POLICY_DIR:
        path = path.parent
    return f"{path.parent.parent.name}-{path.name}" if path.name.startswith("step-") else (
        path.name or str(path))


class PolicyAnswerer:
    """Greedy (or eval.temperature) answers of the evaluated policy, one per prompt."""

    def __init__(self, cfg: Config) -> None:
        from cpe_ray.engines.factory import make_engine
        from cpe_ray.engines.spec import EngineSpec
        from cpe_ray.models import load_tokenizer

        self.cfg = cfg
        spec = EngineSpec.for_eval_policy(cfg, eval_model_path(cfg))
        # a prompt keeps its last tokens: eval.max_prompt_tokens, or less where the model's
        # window leaves less beside eval.max_new_tokens
        self.prompt_limit = cfg.eval.max_prompt_tokens if spec.max_model_len is None else min(
            cfg.eval.max_prompt_tokens, spec.max_model_len - cfg.eval.max_new_tokens)
        if self.prompt_limit < 1:
            raise ConfigError(
                f"eval.max_new_tokens={cfg.eval.max_new_tokens} leaves no room for a prompt in "
                f"{spec.model_path}'s {spec.max_model_len}-token window; lower eval.max_new_tokens")
        self.engine = make_engine(spec)
        self.tokenizer = load_tokenizer(self.engine.info().model_path,
                                        cfg.policy.trust_remote_code)
        self.system_template = load_policy_system_template(cfg.policy.system_template)
        self.truncated = 0  # prompts cut to eval.max_prompt_tokens so far

    def describe(self) -> str:
        info = self.engine.info()
        return f"{info.model_path} ({info.backend}, {info.device})"

    def _ids(self, messages: list[dict[str, str]]) -> list[int]:
        ids = apply_chat_template(self.tokenizer, messages)
        limit = self.prompt_limit
        if len(ids) > limit:
            self.truncated += 1
            ids = ids[-limit:]
        return ids

    def chat(self, conversations: Sequence[list[dict[str, str]]]) -> list[str]:
        """One reply per conversation (the messages end with the user's turn)."""
        e = self.cfg.eval
        ids = [self._ids(list(c)) for c in conversations]
        params = SamplingParams(n=1, temperature=e.temperature, top_p=self.cfg.rollout.top_p,
                                max_new_tokens=e.max_new_tokens, seed=self.cfg.run.seed)
        return [c.text for c in self.engine.generate(ids, params)]

    def answer(self, prompts: Sequence[tuple[str, str]]) -> list[str]:
        """Answers to (persona, question) pairs with the policy's system prompt."""
        return self.chat([build_policy_messages(persona, question, self.system_template)
                          for persona, question in prompts])
