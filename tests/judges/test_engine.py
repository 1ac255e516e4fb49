"""The GRM on a generation engine: which template and temperature each attempt uses.

The engine and tokenizer are small scripted stand-ins (the judge only needs `generate` and a
chat template); real engines are covered in tests/engines/.
"""

from __future__ import annotations

from pathlib import Path

from cpe_ray.config import GRMConfig
from cpe_ray.engines.base import Completion, SamplingParams
from cpe_ray.judges.base import JudgeRequest
from cpe_ray.judges.engine import SEED_STRIDE, EngineJudge
from cpe_ray.judges.grm import weighted_reward

RELEASE_SCORES = ("<critique>\nShorter, please.\n</critique>\n\n<scores>\nHelpfulness: 3分\n"
                  "Personalization: 3分\nNatural: 2分\n</scores>")


class CharTokenizer:
    """Each character one token; the chat template is the user turn's text."""

    chat_template = "user text only"

    def apply_chat_template(self, messages, tokenize: bool, add_generation_prompt: bool) -> str:
        return messages[-1]["content"]

    def __call__(self, text: str, add_special_tokens: bool) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}


class GreedyUntilSampled:
    """Writes a cut-off judgement whenever it decodes greedily, release scores otherwise."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, SamplingParams]] = []

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        out = []
        for i, ids in enumerate(prompts):
            self.calls.append(("".join(map(chr, ids)), params))
            text = "<scores>\nHelpfulness: 3分\n" if params.greedy else RELEASE_SCORES
            out.append(Completion(i, 0, [1], [0.0], text, "stop"))
        return out


def test_greedy_score_call_retries_by_sampling_with_each_modes_template(tmp_path: Path) -> None:
    (tmp_path / "score.txt").write_text("S {persona_str}|{question_str}|{solution_str}")
    (tmp_path / "critique.txt").write_text("C {persona}|{question}|{answer}")
    cfg = GRMConfig(backend="hf", model_path="m", template=str(tmp_path / "score.txt"),
                    critique_template=str(tmp_path / "critique.txt"), max_retries=3)
    engine = GreedyUntilSampled()
    judge = EngineJudge(engine, CharTokenizer(), cfg)
    [scored] = judge.judge([JudgeRequest("P", "Q", "A")], "score", seed=2)
    # attempt 1 greedy and cut off; attempt 2 samples at grm.retry_temperature and parses
    assert [p.temperature for _, p in engine.calls] == [0.0, cfg.retry_temperature]
    assert [p.seed for _, p in engine.calls] == [2 * SEED_STRIDE, 2 * SEED_STRIDE + 1]
    assert scored.attempts == 2 and scored.judgement.parsed
    assert weighted_reward(scored.judgement) == 0.35 * 3 + 0.40 * 3 + 0.25 * 2
    assert {prompt for prompt, _ in engine.calls} == {"S P|Q|A"}
    engine.calls.clear()
    [critiqued] = judge.judge([JudgeRequest("P", "Q", "A")], "critique")
    assert [(prompt, p.temperature) for prompt, p in engine.calls] == [("C P|Q|A", 0.9)]
    assert critiqued.attempts == 1 and critiqued.judgement.critique == "Shorter, please."
