"""The Bradley-Terry (scalar) reward model as a judge: its single logit is the reward.

`BTScorer` loads a sequence-classification checkpoint (what `cpe-ray rm train` writes under
`reward_model/`) and scores the policy's chat (system persona, user question) closed by the
answer as the assistant turn (`reward_model_text`, which `rm train` tokenizes through too).
`BTJudge` puts it behind `Judge` for PPO (`grm.backend=bt`, score mode only: it writes no
critique, so it cannot drive post-edit); evaluation reads it as an `AnswerScorer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cpe_ray.chat import build_policy_messages, load_policy_system_template, render_chat_template
from cpe_ray.config import Config
from cpe_ray.judges.base import JudgeRequest, Score, check_mode
from cpe_ray.judges.grm import Judgement, JudgeOutcome
from cpe_ray.prompts import PromptTemplate

DEFAULT_BT_BATCH = 8
DEFAULT_MAX_PROMPT_TOKENS = 4096  # longer chats keep their end


def reward_model_text(tokenizer: Any, template: PromptTemplate, persona: str, question: str,
                      answer: str) -> str:
    """What a Bradley-Terry model reads: the policy's chat (system persona, user question)
    closed by the answer as the assistant turn. `rm train` tokenizes pairs through this too,
    so the model is scored on exactly the text it was trained on."""
    messages = [*build_policy_messages(persona, question, template),
                {"role": "assistant", "content": answer}]
    return render_chat_template(tokenizer, messages, add_generation_prompt=False)



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


def bt_scorer(cfg: Config, max_prompt_tokens: int) -> BTScorer:
    """The Bradley-Terry model at `grm.model_path`, on this process's GPU (or the CPU)."""
    assert cfg.grm.model_path is not None  # the config requires it for grm.backend=bt
    return BTScorer(cfg.grm.model_path, cfg.policy.dtype, None if cfg.cluster.use_gpu else "cpu",
                    cfg.policy.system_template, max_prompt_tokens,
                    trust_remote_code=cfg.policy.trust_remote_code)


class BTJudge:
    """A Bradley-Terry reward model behind `cpe_ray.judges.base.Judge`: its logit is the reward.

    Score mode only: it writes no critique (so grm.backend=bt cannot drive post-edit)."""

    def __init__(self, scorer: BTScorer) -> None:
        self.scorer = scorer

    def judge(self, requests: Sequence[JudgeRequest], mode: str, seed: int = 0
              ) -> list[JudgeOutcome]:
        check_mode(mode)
        if mode != "score":
            raise ValueError("a Bradley-Terry reward model writes no critiques; post-edit "
                             "needs a generative GRM backend")
        out = []
        for score in self.scorer.score(requests):
            assert score.reward is not None  # a scalar model always answers
            judgement = Judgement(scores={}, critique="", raw=f"bt reward {score.reward:.6g}",
                                  parsed=True)
            out.append(JudgeOutcome(judgement, attempts=1, reward=score.reward))
        return out


def make_bt_judge(cfg: Config) -> BTJudge:
    """The reward model at `grm.model_path` as PPO's judge: it reads whole rollouts."""
    r = cfg.rollout
    return BTJudge(bt_scorer(cfg, r.max_prompt_length + r.max_new_tokens))
