"""The GRM on a `GenerationEngine` in this process (inside a GRM actor, or an evaluation).

Critique mode samples at grm.critique_temperature with grm.critique_template, score mode at
grm.score_temperature with grm.template; unparsed outputs are regenerated
(`judge_with_retries`) with a new seed each attempt, and a greedy call's retries sample at
grm.retry_temperature (a greedy repeat would write the same text).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cpe_ray.chat import apply_chat_template
from cpe_ray.config import GRMConfig
from cpe_ray.engines.base import GenerationEngine, SamplingParams
from cpe_ray.judges.base import JudgeRequest, check_mode
from cpe_ray.judges.grm import (
    JudgeOutcome,
    attempt_temperature,
    build_grm_messages,
    judge_with_retries,
    load_grm_templates,
    mode_persona_format,
)

SEED_STRIDE = 7919  # a prime: retries and batches draw seeds that do not collide


class EngineJudge:
    """A generative reward model served by a `GenerationEngine` in this process."""

    def __init__(self, engine: GenerationEngine, tokenizer: Any, cfg: GRMConfig) -> None:
        self.engine, self.tokenizer, self.cfg = engine, tokenizer, cfg
        self.templates = load_grm_templates(cfg)

    def prompt_ids(self, request: JudgeRequest, mode: str = "score") -> list[int]:
        messages = build_grm_messages(self.templates[mode], request.persona, request.question,
                                      request.answer, mode_persona_format(self.cfg, mode))
        return apply_chat_template(self.tokenizer, messages)

    def judge(
        self, requests: Sequence[JudgeRequest], mode: str, seed: int = 0
    ) -> list[JudgeOutcome]:
        check_mode(mode)
        prompts = [self.prompt_ids(r, mode) for r in requests]
        temperature = self.cfg.critique_temperature if mode == "critique" else (
            self.cfg.score_temperature)
        attempt = 0

        def generate(indices: list[int]) -> list[str]:
            nonlocal attempt
            params = SamplingParams(
                n=1, temperature=attempt_temperature(temperature, attempt,
                                                     self.cfg.retry_temperature),
                max_new_tokens=self.cfg.max_new_tokens, seed=seed * SEED_STRIDE + attempt,
            )
            attempt += 1
            completions = self.engine.generate([prompts[i] for i in indices], params)
            return [c.text for c in completions]

        return judge_with_retries(
            generate, len(requests), self.cfg.max_retries, self.cfg.dimensions,
            (self.cfg.score_min, self.cfg.score_max), require_critique=mode == "critique",
            aliases=self.cfg.label_aliases,
        )
