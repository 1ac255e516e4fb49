"""`cpe-ray eval winrate | personafeedback | personamem`: the evaluation subcommands.

Each takes `--config FILE` and `key=value` overrides like `cpe-ray train`, plus a few flags
for the keys set most often (a flag wins over the same key in an override). Input problems
(config, data files, baseline answers, the endpoint's key variable) are one
`cpe-ray: error: ...` line before any model loads. Exit code 0 when something could be
judged, 1 when nothing could (the report still lists why), 2 on bad input.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

EXIT_NOTHING_JUDGED = 1
PERCENT = 100.0
# flag -> eval key; the flags given make a new config from the loaded one, validated again
WINRATE_FLAGS = {"model": "model_path", "baseline": "baseline_path", "answers": "answers_path",
                 "prompts": "prompts_path", "out": "output_dir"}
PF_FLAGS = {"root": "personafeedback_path", "judge": "personafeedback_judge",
            "out": "output_dir"}
PM_FLAGS = {"questions": "personamem_questions_path", "contexts": "personamem_contexts_path",
            "model": "model_path", "answerer": "personamem_answerer", "out": "output_dir"}


def _config(args: argparse.Namespace, flags: dict[str, str]) -> Any:
    from dataclasses import replace

    from cpe_ray.config import load_config, validate

    cfg = load_config(args.config, args.overrides)
    given = {key: getattr(args, flag, None) for flag, key in {**flags, "limit": "limit"}.items()}
    cfg = replace(cfg, eval=replace(cfg.eval, **{k: v for k, v in given.items() if v is not None}))
    validate(cfg)
    return cfg


def _print_files(results: dict[str, Any]) -> None:
    for name, path in results["files"].items():
        print(f"  {name:<18}{path}")


def _cmd_winrate(args: argparse.Namespace) -> int:
    from cpe_ray.evaluation.winrate import run_winrate

    results = run_winrate(_config(args, WINRATE_FLAGS))
    m = results["metrics"]
    if not m["n_total"]:
        print(f"nothing could be judged ({m['n_unjudged']} unjudged); see "
              f"{results['files']['report']}")
        return EXIT_NOTHING_JUDGED
    print(f"win rate {m['win_rate']:.1f} ± {m['standard_error']:.1f}, LC win rate "
          f"{m['lc_win_rate']:.1f} ± {m['lc_standard_error']:.1f} "
          f"({m['n_total']} judged, {m['n_unjudged']} unjudged)")
    print(results["lc_status"]["summary"])
    if m["n_unjudged"]:
        print(f"warning: {m['n_unjudged']} of {results['n_prompts']} answers could not be "
              "judged; results.json lists them with the reason")
    _print_files(results)
    return 0


def _cmd_personafeedback(args: argparse.Namespace) -> int:
    from cpe_ray.evaluation.personafeedback import ALL, PARSE_FAILURE, run_personafeedback

    results = run_personafeedback(_config(args, PF_FLAGS))
    total = results["table"][f"{ALL}/{ALL}"]
    acc, se = PERCENT * total["accuracy"], PERCENT * total["standard_error"]
    print(f"accuracy {acc:.1f} ± {se:.1f} on "
          f"{total['n']} cases ({total['tie']} ties, {total[PARSE_FAILURE]} parse failures)")
    _print_files(results)
    return 0 if total["n"] > total[PARSE_FAILURE] else EXIT_NOTHING_JUDGED


def _cmd_personamem(args: argparse.Namespace) -> int:
    from cpe_ray.evaluation.personamem import ALL, PARSE_FAILURE, UNANSWERED, run_personamem

    results = run_personamem(_config(args, PM_FLAGS))
    total = results["table"][ALL]
    acc, se = PERCENT * total["accuracy"], PERCENT * total["standard_error"]
    print(f"accuracy {acc:.1f} ± {se:.1f} on "
          f"{total['n']} questions ({total[PARSE_FAILURE]} parse failures, "
          f"{total[UNANSWERED]} unanswered)")
    _print_files(results)
    return 0 if total["n"] > total[UNANSWERED] else EXIT_NOTHING_JUDGED


def _common(p: argparse.ArgumentParser, func: Callable[[argparse.Namespace], int]) -> None:
    p.add_argument("--config", default=None, help="YAML file on top of the defaults")
    p.add_argument("--limit", type=int, default=None, help="only the first N (eval.limit)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. eval.judge=openai")
    p.set_defaults(func=func)


def add_eval_commands(subparsers: Any) -> Any:
    """Register `cpe-ray eval ...` on the main parser's subparsers; return the `eval`
    parser's subparsers, for commands registered elsewhere (`eval human`)."""
    ev = subparsers.add_parser("eval", help="evaluate: LC win rate, PersonaFeedback, PersonaMem")
    sub = ev.add_subparsers(dest="eval_command", required=True)

    p = sub.add_parser("winrate", help="raw and length-controlled win rate against a baseline")
    p.add_argument("--model", help="policy to evaluate: HF dir, checkpoint dir or tiny "
                                   "(eval.model_path)")
    p.add_argument("--baseline", help="baseline answers, JSON list or JSONL (eval.baseline_path)")
    p.add_argument("--answers", help="judge these answers instead of generating "
                                     "(eval.answers_path)")
    p.add_argument("--prompts", help="eval prompts: JSONL or verl parquet (eval.prompts_path)")
    p.add_argument("--out", help="output folder (eval.output_dir)")
    _common(p, _cmd_winrate)

    p = sub.add_parser("personafeedback", help="a judge's accuracy on PersonaFeedback")
    p.add_argument("--root", help="PersonaFeedback folder, published or the release's "
                                  "eval/data (eval.personafeedback_path)")
    p.add_argument("--judge", choices=("grm", "pairwise"),
                   help="grm: grm.backend scores each answer; pairwise: eval.judge compares")
    p.add_argument("--out", help="output folder (eval.output_dir)")
    _common(p, _cmd_personafeedback)

    p = sub.add_parser("personamem", help="multiple-choice accuracy on PersonaMem")
    p.add_argument("--questions", help="questions CSV (eval.personamem_questions_path)")
    p.add_argument("--contexts", help="shared contexts JSONL (eval.personamem_contexts_path)")
    p.add_argument("--model", help="policy to evaluate (eval.model_path)")
    p.add_argument("--answerer", choices=("policy", "openai"),
                   help="who answers: the policy or the eval.api endpoint")
    p.add_argument("--out", help="output folder (eval.output_dir)")
    _common(p, _cmd_personamem)
    return sub
