"""`cpe-ray sft`: stage 1, supervised fine-tuning of the policy on personalized conversations.

Conversations (`sft.data_path`, `load_sft`: a top-level `persona` becomes the policy's system
prompt through `policy.system_template`, as in training and evaluation) are tokenized through
the policy's chat template with the loss on assistant tokens only, split into a training and
a held-out part (`sft.eval_fraction`), and trained by the shared supervised loop
(`cpe_ray.stages.loop`). Each checkpoint's `policy/` folder is an HF model that
`cpe-ray train policy.model_path=...` starts from.
"""

from __future__ import annotations

import json

from cpe_ray.chat import load_policy_system_template
from cpe_ray.config import Config
from cpe_ray.data import load_sft
from cpe_ray.models import load_tokenizer, resolve_model_path
from cpe_ray.paths import resolve_path
from cpe_ray.runs.layout import POLICY_DIR
from cpe_ray.stages.data import heldout_split, tokenize_conversation
from cpe_ray.stages.loop import StageJob, StageResult, run_stage


def prepare_sft(cfg: Config) -> StageJob:
    """Every check and the tokenization, before any actor starts (one line on bad input)."""
    s = cfg.sft
    path = resolve_path(s.data_path)
    template = load_policy_system_template(cfg.policy.system_template)
    loaded = load_sft(path, cfg.data.on_bad_record, template)
    model_path = resolve_model_path(cfg.policy.model_path)
    tokenizer = load_tokenizer(model_path, cfg.policy.trust_remote_code)
    records = loaded.records
    keys = [json.dumps(r.as_dicts(), ensure_ascii=False) for r in records]
    train_idx, held_idx = heldout_split(keys, s.eval_fraction, cfg.run.seed)
    tokens = [tokenize_conversation(tokenizer, r.messages, s.max_length,
                                    where=f"{path}: conversation {i + 1}")
              for i, r in enumerate(records)]
    too_long = sum(t is None for t in tokens)  # nothing labelled left within max_length
    data = {"path": str(path), "records": len(records), "skipped_records": loaded.skipped,
            "dropped_too_long": too_long}
    return StageJob(
        "sft", s, "sft", model_path, POLICY_DIR,
        [tokens[i] for i in train_idx if tokens[i] is not None],
        [tokens[i] for i in held_idx if tokens[i] is not None], data)


def run_sft(cfg: Config, progress: bool = True) -> StageResult:
    return run_stage(cfg, prepare_sft(cfg), progress=progress)
