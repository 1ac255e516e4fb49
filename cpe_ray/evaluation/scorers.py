"""Pointwise answer scorers: any GRM judge (weighted reward) or a Bradley-Terry reward model.

A scorer gives each (persona, question, answer) a scalar reward, or None when its judge's
output did not parse (a parse failure, which evaluations count and report). GRM judges go
through `cpe_ray.judge.Judge` in `score` mode and `weighted_reward` with the configured
weights; a Bradley-Terry model is a sequence-classification checkpoint whose single logit
on the policy's chat (system persona, user question, assistant answer) is the reward.
`ScorerPairwiseJudge` turns any scorer into a pairwise judge (higher reward wins, equal
rewards tie); it cannot depend on the order of the answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cpe_ray.chat import build_policy_messages, load_policy_system_template, render_chat_template
from cpe_ray.config import Config, GRMConfig
from cpe_ray.evaluation.pairwise import VERDICT_A, VERDICT_B, VERDICT_TIE, PairRequest, PairVerdict
from cpe_ray.grm import weighted_reward
from cpe_ray.judge import Judge, JudgeRequest
from cpe_ray.prompts import PromptTemplate

REWARD_DECIMALS = 9  # rewards equal to this many decimals are a tie
DEFAULT_BT_BATCH = 8
DEFAULT_MAX_PROMPT_TOKENS = 4096  # longer chats keep their end


@dataclass(frozen=True)
class Score:
    reward: float | None  # None: the judge's output did not parse
    detail: str = ""


class AnswerScorer(Protocol):
    def score(self, requests: Sequence[JudgeRequest]) -> list[Score]: ...

    def describe(self) -> str: ...


def reward_model_text(tokenizer: Any, template: PromptTemplate, persona: str, question: str,
                      answer: str) -> str:
    """What a Bradley-Terry model reads: the policy's chat (system persona, user question)
    closed by the answer as the assistant turn. `rm train` tokenizes pairs through this too,
    so the model is scored on exactly the text it was trained on."""
    messages = [*build_policy_messages(persona, question, template),
                {"role": "assistant", "content": answer}]
    return render_chat_template(tokenizer, messages, add_generation_prompt=False)


class GRMScorer:
    """Weighted reward of a GRM judgement; an unparsed judgement is a parse failure."""

    def __init__(self, judge: Judge, cfg: GRMConfig, label: str, seed: int = 0) -> None:
        self.judge, self.cfg, self.label, self.seed = judge, cfg, label, seed

    def describe(self) -> str:
        return self.label

    def score(self, requests: Sequence[JudgeRequest]) -> list[Score]:
        out = []
        for outcome in self.judge.judge(requests, "score", self.seed):
            j = outcome.judgement
            if not j.parsed:
                out.append(Score(None, "unparsed: " + "; ".join(j.warnings)))
                continue
            reward = weighted_reward(j, self.cfg.weights, self.cfg.on_missing)  # type: ignore[arg-type]
            scores = " ".join(f"{d}={s:g}" for d, s in j.scores.items() if s is not None)
            out.append(Score(reward, scores))
        return out


class BTScorer:
    """A Bradley-Terry (scalar) reward model: AutoModelForSequenceClassification, one logit."""

    def __init__(self, model_path: str, dtype: str = "float32", device: str | None = None,
                 system_template: str | None = None,
                 max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
                 batch_size: int = DEFAULT_BT_BATCH, trust_remote_code: bool = False) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification

        from cpe_ray.models import load_tokenizer, pick_device, resolve_model_path, torch_dtype

        self.model_path = resolve_model_path(model_path)
        self.device = pick_device(device)
        self.tokenizer = load_tokenizer(self.model_path, trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            self.model_path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code,
        ).to(self.device).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.template = load_policy_system_template(system_template) if system_template else (
            load_policy_system_template())
        self.max_tokens, self.batch_size, self._torch = max_prompt_tokens, batch_size, torch

    def describe(self) -> str:
        return f"Bradley-Terry reward model {self.model_path}"

    def _text(self, r: JudgeRequest) -> str:
        return reward_model_text(self.tokenizer, self.template, r.persona, r.question, r.answer)

    def score(self, requests: Sequence[JudgeRequest]) -> list[Score]:
        torch, out = self._torch, []
        for start in range(0, len(requests), self.batch_size):
            chunk = [self._text(r) for r in requests[start:start + self.batch_size]]
            ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"][-self.max_tokens:]
                   for t in chunk]
            width = max(len(i) for i in ids)
            pad = int(self.tokenizer.pad_token_id)
            batch = torch.full((len(ids), width), pad, dtype=torch.long)
            mask = torch.zeros((len(ids), width), dtype=torch.long)
            for row, seq in enumerate(ids):  # right padding: the last real token is scored
                batch[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
            with torch.no_grad():
                logits = self.model(input_ids=batch.to(self.device),
                                    attention_mask=mask.to(self.device)).logits
            out += [Score(float(v), "bt logit") for v in logits[:, 0].float().cpu().tolist()]
        return out


def compare_rewards(a: float, b: float) -> str:
    ra, rb = round(a, REWARD_DECIMALS), round(b, REWARD_DECIMALS)
    return VERDICT_TIE if ra == rb else (VERDICT_A if ra > rb else VERDICT_B)


class ScorerPairwiseJudge:
    """Any scorer as a pairwise judge (eval.judge=grm): the higher reward wins."""

    order_free = True

    def __init__(self, scorer: AnswerScorer) -> None:
        self.scorer = scorer

    def describe(self) -> str:
        return self.scorer.describe()

    def compare(self, requests: Sequence[PairRequest]) -> list[PairVerdict]:
        singles = [JudgeRequest(r.persona, r.question, ans) for r in requests
                   for ans in (r.answer_a, r.answer_b)]
        scores = self.scorer.score(singles)
        out = []
        for i in range(len(requests)):
            a, b = scores[2 * i], scores[2 * i + 1]
            raw = f"A: {a.reward} ({a.detail}) | B: {b.reward} ({b.detail})"
            if a.reward is None or b.reward is None:
                out.append(PairVerdict(None, raw, "the judge's output did not parse"))
            else:
                out.append(PairVerdict(compare_rewards(a.reward, b.reward), raw))
        return out


def bt_scorer(cfg: Config, max_prompt_tokens: int) -> BTScorer:
    """The Bradley-Terry model at `grm.model_path`, on this process's GPU (or the CPU)."""
    assert cfg.grm.model_path is not None  # the config requires it for grm.backend=bt
    return BTScorer(cfg.grm.model_path, cfg.policy.dtype, None if cfg.cluster.use_gpu else "cpu",
                    cfg.policy.system_template, max_prompt_tokens,
                    trust_remote_code=cfg.policy.trust_remote_code)
