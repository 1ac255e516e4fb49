"""`cpe-ray eval human` (the figures of a rating folder) and `cpe-ray rate-export` (its
critiques, scores and edits as training data).

Both read the folder `cpe-ray rate --out` wrote (`--ratings DIR`: `tasks.jsonl` +
`judgements.jsonl`) and take `--config FILE` and `key=value` overrides for grm.dimensions,
grm.score_min/max and run.seed (the bootstrap's). Bad input is one `cpe-ray: error: ...`
line and exit code 2; `eval human` exits 1 when the folder holds no judgement yet.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

EXIT_NOTHING_JUDGED = 1


def _config(args: argparse.Namespace, out_key: str | None = None) -> Any:
    """The config; `--out` sets eval.`out_key` when given."""
    from cpe_ray.config import load_config, validate

    cfg = load_config(args.config, args.overrides)
    if out_key is not None and args.out is not None:
        cfg = replace(cfg, eval=replace(cfg.eval, **{out_key: args.out}))
        validate(cfg)
    return cfg


def _cmd_eval_human(args: argparse.Namespace) -> int:
    from cpe_ray.human.report import run_human_report

    results = run_human_report(_config(args, "output_dir"), args.ratings)
    c = results["counts"]
    if not c["judgements"]:
        print(f"no judgements in {args.ratings} yet; see {results['files']['report']}")
        return EXIT_NOTHING_JUDGED
    print(f"{c['judgements']} judgements of {c['tasks_judged']} tasks by {len(c['raters'])} "
          f"raters ({c['superseded']} replaced by a later one)")
    for name, dims in results["win_rates"].items():
        w = dims.get("overall")
        if w is not None and w["value"] is not None:
            se = "" if w["se"] is None else f" ± {w['se']:.1f}"
            print(f"people's win rate, {name}, overall: {w['value']:.1f}{se} "
                  f"({w['n']} tasks)")
    for name, value in results["files"].items():
        print(f"  {name:<18}{value}")
    return 0


def _cmd_rate_export(args: argparse.Namespace) -> int:
    from cpe_ray.human.export import export_ratings

    s = export_ratings(_config(args), args.ratings, args.out)
    print(f"exported {s.grm} GRM judgements, {s.sft} SFT conversations, {s.pairwise} "
          "preference pairs")
    for reason, n in sorted(s.skipped.items()):
        print(f"  left out  {n:>4}  {reason}")
    print(f"  grm_distill   {s.files['grm_distill']}")
    print(f"  sft           {s.files['sft']}")
    print(f"  pairwise      {s.files['pairwise']}")
    print(f"  next          cpe-ray grm train distill.output_path={s.files['grm_distill']}")
    print(f"                cpe-ray sft sft.data_path={s.files['sft']}")
    print(f"                cpe-ray rm train rm.data_path={s.files['pairwise']}")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    # an option, not a positional: argparse takes no positional after an option, and the
    # overrides are positionals that may follow --out
    p.add_argument("--ratings", required=True, metavar="DIR",
                   help="the folder `cpe-ray rate --out` wrote (tasks.jsonl, judgements.jsonl)")
    p.add_argument("--config", default=None, help="YAML file on top of the defaults (grm.*)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run.seed=1")


def add_human_commands(subparsers: Any, eval_subparsers: Any) -> None:
    """Register `cpe-ray rate-export` on the main subparsers and `cpe-ray eval human` on the
    ones `add_eval_commands` returns."""
    p = eval_subparsers.add_parser("human", help="people's win rates, their agreement and "
                                                 "the automatic judges' agreement with them")
    p.add_argument("--out", help="output folder (eval.output_dir); the report goes to "
                                 "<out>/human/")
    _common(p)
    p.set_defaults(func=_cmd_eval_human)

    p = subparsers.add_parser("rate-export", help="people's critiques, scores and edits as "
                                                  "GRM, SFT and preference training data")
    p.add_argument("--out", required=True, help="folder for grm_distill.jsonl, sft.jsonl and "
                                                "pairwise.jsonl")
    _common(p)
    p.set_defaults(func=_cmd_rate_export)
