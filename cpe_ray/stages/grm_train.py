"""`cpe-ray grm train`: stage 2, the GRM distilled from the teacher's judgements by SFT.

The judgements `grm collect` wrote (`distill.output_path`) become conversations: the GRM's
prompt (`grm.template` with persona, question and answer; one user turn, exactly what the GRM
sees when judging) and the teacher's output as the assistant turn, the loss on that output
only, on the judgements `distill.filter` keeps (computed again here with this run's settings:
parsed unless `distill.train_unparsed`, agreeing with the reference, a short enough critique;
cpe_ray/stages/distill_filter.py); its counts go to `summary.json` (`data.filter`). A seeded
hash of each record's key holds out `distill.eval_fraction` of the prompts. After training, the
exported GRM (`checkpoints/step-N/grm/`, usable as `grm.model_path`) judges the held-out
prompts once each (score mode: `grm.score_temperature`, `grm.max_new_tokens`, no retries)
on an engine of `distill.eval_backend` in a Ray actor, and the share of its outputs that
`parse_judgement` reads is reported (`parse_share.json`, and `summary.json`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from cpe_ray.config import Config
from cpe_ray.errors import DataError
from cpe_ray.judges.grm import build_grm_messages, load_grm_template
from cpe_ray.models import load_tokenizer, resolve_model_path
from cpe_ray.runs.ownership import run_dir_for
from cpe_ray.stages.data import heldout_split, tokenize_conversation
from cpe_ray.stages.distill_filter import JudgementFilter, filter_line, report
from cpe_ray.stages.judgements import read_records
from cpe_ray.stages.loop import StageJob, StageResult, run_stage

GRM_DIR = "grm"
PARSE_SHARE = "parse_share.json"


def load_judgements(cfg: Config) -> list[dict[str, Any]]:
    path = Path(cfg.distill.output_path).expanduser()
    if not path.is_file():
        raise DataError(f"distill.output_path {path} not found; run `cpe-ray grm collect` "
                        "first, or point it at collected judgements")
    records = list({r["key"]: r for r in read_records(path, repair=False)}.values())
    for n, r in enumerate(records, start=1):
        missing = [k for k in ("persona", "question", "answer", "output", "parsed") if k not in r]
        if missing:
            raise DataError(f"{path}: record {n} (key {r['key']}) lacks {', '.join(missing)}; "
                            "use a file written by grm collect")
    if not records:
        raise DataError(f"{path} holds no judgements; run `cpe-ray grm collect` first")
    return records


def prepare_grm(cfg: Config) -> tuple[StageJob, list[dict[str, Any]]]:
    """The stage's job and the held-out records, checked before any actor starts."""
    d = cfg.distill
    records = load_judgements(cfg)
    model_path = resolve_model_path(d.model_path)
    tokenizer = load_tokenizer(model_path, cfg.policy.trust_remote_code)
    template = load_grm_template(cfg.grm.template, cfg.grm.template_placeholders)
    train_idx, held_idx = heldout_split([r["key"] for r in records], d.eval_fraction,
                                        cfg.run.seed)
    verdicts = JudgementFilter(cfg, tokenizer).verdicts(records)

    def tokens(indices: list[int]):
        out = []
        for i in indices:
            r = records[i]
            if not verdicts[i].kept:
                continue
            messages = [*build_grm_messages(template, r["persona"], r["question"], r["answer"]),
                        {"role": "assistant", "content": r["output"]}]
            example = tokenize_conversation(tokenizer, messages, d.max_length,
                                            where=f"judgement {r['key']}")
            if example is not None:
                out.append(example)
        return out

    train, held = tokens(train_idx), tokens(held_idx)
    data = {"path": str(Path(d.output_path).expanduser()), "judgements": len(records),
            "teacher_unparsed": sum(not r["parsed"] for r in records),
            "dropped_too_long": sum(v.kept for v in verdicts) - len(train) - len(held),
            "filter": report(verdicts).as_dict()}
    job = StageJob("distill", d, "sft", model_path, GRM_DIR, train, held, data)
    return job, [records[i] for i in held_idx]


def parse_share(cfg: Config, model_dir: Path, heldout: list[dict[str, Any]]) -> dict[str, Any]:
    """The trained GRM judges each held-out prompt once; the share that parses."""
    from actors.grm import GRMJudge
    from cpe_ray.judges.base import JudgeRequest
    from cpe_ray.runtime.remote import actor_env, wait_all

    if not heldout:
        return {"parse_share": None, "parse_share_n": 0}
    g = dataclasses.replace(cfg.grm, backend=cfg.distill.eval_backend, model_path=str(model_dir),
                            max_retries=0, tensor_parallel_size=1)
    judge_cfg = dataclasses.replace(cfg, grm=g)
    actor = GRMJudge.options(
        num_cpus=cfg.cluster.cpus_per_bundle, num_gpus=1 if cfg.cluster.use_gpu else 0,
        runtime_env={"env_vars": actor_env(cfg, cfg.cluster.threads_per_actor)}).remote(judge_cfg)
    requests = [JudgeRequest(r["persona"], r["question"], r["answer"]) for r in heldout]
    try:
        outcomes = wait_all([actor.judge.remote(requests, "score", cfg.run.seed)],
                            ["GRM parse-share engine"], cfg.learner.dist_timeout_s,
                            "held-out generation")[0]
    finally:
        import ray

        ray.kill(actor)
    samples = [{"key": r["key"], "output": o.judgement.raw, "parsed": o.judgement.parsed,
                "warnings": list(o.judgement.warnings)} for r, o in zip(heldout, outcomes,
                                                                       strict=True)]
    parsed = sum(s["parsed"] for s in samples)
    result = {"parse_share": parsed / len(samples), "parse_share_n": len(samples),
              "parse_share_parsed": parsed, "samples": samples}
    path = run_dir_for(cfg, cfg.distill.name) / PARSE_SHARE
    path.write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n")
    return {k: v for k, v in result.items() if k != "samples"} | {"parse_share_file": str(path)}


def run_grm_train(cfg: Config, progress: bool = True) -> StageResult:
    job, heldout = prepare_grm(cfg)
    if progress:
        print(f"grm train: {filter_line(job.data['filter'])}", flush=True)
    return run_stage(cfg, job, after=lambda model_dir: parse_share(cfg, model_dir, heldout),
                     progress=progress)
