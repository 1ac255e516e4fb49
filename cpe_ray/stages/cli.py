"""`cpe-ray sft`, `cpe-ray grm collect | train`, `cpe-ray rm train`: the paper's first stages,
and `cpe-ray merge`.

Each takes `--config FILE` and `key=value` overrides like `cpe-ray train`, checks every input
(config, data files, records, models, the endpoint's key variable) before any actor starts,
and prints where its outputs are. Exit codes: 0 done, 1 `grm collect` could collect nothing,
2 bad input (one `cpe-ray: error: ...` line).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

EXIT_NOTHING_COLLECTED = 1


def _config(args: argparse.Namespace) -> Any:
    from cpe_ray.config import load_config

    return load_config(args.config, args.overrides)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _print_stage(result: Any, cfg: Any) -> None:
    run_dir = result.run_dir
    print(f"done: {result.steps} steps (resumed from step {result.resumed_from}); train loss "
          f"{_fmt(result.first.get('train/loss'))} -> {_fmt(result.last.get('train/loss'))}")
    for key, value in result.evaluation.items():
        print(f"  held-out {key:<22}{value:.4f}")
    print(f"  config        {run_dir}/config.yaml")
    print(f"  metrics       {run_dir}/metrics.jsonl")
    print(f"  summary       {run_dir}/summary.json")
    print(f"  checkpoint    {result.checkpoint} (HF model in {result.model_path.name}/, "
          "state/ for resume)")
    if cfg.logging.wandb_mode != "disabled":
        print(f"  wandb         {run_dir}/wandb ({cfg.logging.wandb_mode})")


def _cmd_sft(args: argparse.Namespace) -> int:
    from cpe_ray.stages.sft import run_sft

    cfg = _config(args)
    result = run_sft(cfg)
    _print_stage(result, cfg)
    print(f"  next          cpe-ray train policy.model_path={result.model_path}")
    return 0


def _cmd_grm_collect(args: argparse.Namespace) -> int:
    from cpe_ray.stages.distill import collect

    s = collect(_config(args))
    print(f"done: {s.collected} judgements collected ({s.unparsed} did not parse), "
          f"{s.already} already there, {s.failed} failed after retries ({s.seconds:.1f}s)")
    print(f"  judgements    {s.output}")
    print(f"  failures      {s.failures}")
    if s.failed:
        print(f"warning: {s.failed} requests failed; the failures file has the reasons and "
              "running the same command again retries them")
    return EXIT_NOTHING_COLLECTED if s.failed and not (s.collected or s.already) else 0


def _cmd_grm_train(args: argparse.Namespace) -> int:
    from cpe_ray.stages.grm_train import run_grm_train

    cfg = _config(args)
    result = run_grm_train(cfg)
    _print_stage(result, cfg)
    share = result.extra.get("parse_share")
    if share is not None:
        print(f"  parse share   {share:.3f} of {result.extra['parse_share_n']} held-out "
              f"prompts parse ({result.extra['parse_share_file']})")
    print(f"  next          cpe-ray train grm.backend=hf grm.model_path={result.model_path}")
    return 0


def _cmd_rm_train(args: argparse.Namespace) -> int:
    from cpe_ray.stages.rm import run_rm

    cfg = _config(args)
    result = run_rm(cfg)
    _print_stage(result, cfg)
    print(f"  next          cpe-ray train grm.backend=bt grm.model_path={result.model_path} "
          "post_edit.enabled=false")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from cpe_ray.stages.merge import MERGE_INFO, run_merge

    r = run_merge(_config(args))
    print(f"done: {r.method} merge (seed {r.seed}) in {r.seconds:.1f}s")
    print(f"  model         {r.path} (an HF model folder; {MERGE_INFO} says what was merged)")
    print(f"  next          cpe-ray train policy.model_path={r.path}")
    return 0


def _add(sub: Any, name: str, help_text: str, func: Callable[[argparse.Namespace], int]
         ) -> None:
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--config", default=None, help="YAML file on top of the defaults")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. sft.max_steps=2")
    p.set_defaults(func=func)


def add_stage_commands(subparsers: Any) -> None:
    """Register `sft`, `grm`, `rm` and `merge` on the main parser's subparsers."""
    _add(subparsers, "sft", "stage 1: supervised fine-tuning of the policy (loss on "
         "assistant turns)", _cmd_sft)
    grm = subparsers.add_parser("grm", help="stage 2: distil the GRM from a teacher")
    sub = grm.add_subparsers(dest="grm_command", required=True)
    _add(sub, "collect", "ask the teacher (distill.api) to judge distill.input_path",
         _cmd_grm_collect)
    _add(sub, "train", "fine-tune the GRM on the collected judgements", _cmd_grm_train)
    rm = subparsers.add_parser("rm", help="the Bradley-Terry reward model (a baseline)")
    sub = rm.add_subparsers(dest="rm_command", required=True)
    _add(sub, "train", "train a scalar reward model on chosen/rejected pairs", _cmd_rm_train)
    _add(subparsers, "merge", "merge models of one architecture (DARE-TIES, TIES, linear, "
         "SLERP) into one", _cmd_merge)
