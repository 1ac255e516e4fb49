"""The Bradley-Terry reward model: `cpe-ray rm train`, and its use as PPO's reward.

Training data are chosen / rejected answers to a (persona, question): a pairwise JSONL
(`load_pairwise`) or a PersonaFeedback root folder (`load_personafeedback`, `reject` as the
rejected answer). Each answer is read as `BTScorer` reads it (the policy's chat closed by the
answer), the model is `AutoModelForSequenceClassification(num_labels=1)` from `rm.model_path`
(default: the policy's model, as the PPO critic is built), the loss -log sigmoid(r_chosen -
r_rejected). The held-out split's pairwise accuracy (r_chosen > r_rejected; ties count
wrong) is the stage's figure. Checkpoints hold `reward_model/`, which `BTScorer` loads:
`grm.backend=bt grm.model_path=.../reward_model` in PPO (scores only: post-edit needs
critiques, which the config rejects) and in `cpe-ray eval personafeedback`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from cpe_ray.chat import load_policy_system_template
from cpe_ray.config import Config
from cpe_ray.data import LoadResult, PairwiseExample, load_pairwise, load_personafeedback
from cpe_ray.models import load_tokenizer, resolve_model_path
from cpe_ray.paths import resolve_path
from cpe_ray.stages.data import heldout_split, tokenize_pair
from cpe_ray.stages.loop import StageJob, StageResult, run_stage

REWARD_MODEL_DIR = "reward_model"


def load_pairs(cfg: Config) -> LoadResult[PairwiseExample]:
    """`rm.data_path`: a PersonaFeedback root folder, or a pairwise JSONL file."""
    path = resolve_path(cfg.rm.data_path)
    on_bad = cfg.data.on_bad_record
    if path.is_dir():
        cases = load_personafeedback(path, on_bad)
        return LoadResult([PairwiseExample(c.persona, c.question, c.chosen, c.reject)
                           for c in cases.records], cases.skipped, cases.problems)
    return load_pairwise(path, on_bad)


def pair_key(p: PairwiseExample) -> str:
    """What the held-out split hashes: the pair's content."""
    return json.dumps([p.persona, p.question, p.chosen, p.rejected], ensure_ascii=False)


def split_pairs(cfg: Config, pairs: Sequence[PairwiseExample]
                ) -> tuple[list[PairwiseExample], list[PairwiseExample]]:
    train, held = heldout_split([pair_key(p) for p in pairs], cfg.rm.eval_fraction, cfg.run.seed)
    return [pairs[i] for i in train], [pairs[i] for i in held]


def prepare_rm(cfg: Config) -> StageJob:
    """Every check and the tokenization, before any actor starts (one line on bad input)."""
    r = cfg.rm
    loaded = load_pairs(cfg)
    model_path = resolve_model_path(r.model_path or cfg.policy.model_path)
    tokenizer = load_tokenizer(model_path, cfg.policy.trust_remote_code)
    template = load_policy_system_template(cfg.policy.system_template)
    train, held = split_pairs(cfg, loaded.records)

    def tokens(pairs: list[PairwiseExample]):
        return [tokenize_pair(tokenizer, template, p.persona, p.question, p.chosen, p.rejected,
                              r.max_length) for p in pairs]

    data = {"path": str(resolve_path(r.data_path)), "pairs": len(loaded.records),
            "skipped_records": loaded.skipped}
    return StageJob("rm", r, "bt", model_path, REWARD_MODEL_DIR, tokens(train), tokens(held),
                    data)


def run_rm(cfg: Config, progress: bool = True) -> StageResult:
    return run_stage(cfg, prepare_rm(cfg), progress=progress)
