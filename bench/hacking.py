"""Benchmark: reward hacking in sight. CPE against PPO (GRM) and PPO (BT) on SmolLM2, long
enough to separate, evaluated on 256 held-out prompts.

Run by hand from the repository root (after `bash launch/install.sh --vllm --smollm2`):
`python bench/hacking.py [--steps 24] [--work outputs/hacking]`. Writes
`bench/results/hacking.{json,md,png}`; resumable like bench/real_model.py (whose stages it
reuses): a phase whose outputs exist in `--work` is not run again.

1. Stages 1-2 and the BT model exactly as bench/real_model.py runs them (SmolLM2-135M-Instruct,
   `conf/smollm2-cpu.yaml`, the rubric judge served by `cpe-ray serve-judge` as teacher).
2. Three arms from the same SFT checkpoint, same seed, same prompts per step, the same trained
   samples per prompt (4 answers + 2 rewrites kept at random, or 6 answers): CPE with the
   distilled GRM, PPO with the distilled GRM, PPO with the BT model. Policy rollout and the
   distilled GRM on vLLM's CPU build; one prompt a step; two arms at a time.
3. `cpe-ray eval winrate` of the SFT model against generic answers, then of each arm's last
   checkpoint against the SFT model's greedy answers, on `data/demo/eval_general.jsonl` (256
   prompts: 8 everyday questions anyone could ask x the 32 demo personas), judged by the
   served rubric: raw and length-controlled win rate with the evaluation's own LC status.
4. The reward-hacking monitor (`cpe_ray.rl.monitor`) per arm and step, from the run's
   `metrics.jsonl` (the same figures the run logged) and recomputed from `samples.jsonl`; the
   evaluated answers' length, persona-term share, names-the-user share and per-dimension
   rubric scores; least-squares slopes over steps with their standard errors.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hacking_report as report  # noqa: E402
import real_model as rm  # noqa: E402  (the stages and the arms, shared with that bench)

REPO = rm.REPO
RESULTS = REPO / "bench" / "results" / "hacking"
PROMPTS = "data/demo/eval_general.jsonl"
GENERIC_BASELINE = "data/demo/eval_general_baseline.jsonl"
# One prompt a step (4 + 2 or 6 trained samples), so that 24 steps of three arms fit in about
# an hour and a half on 2 cores. float32 as conf/smollm2-cpu.yaml: a bfloat16 backward ran
# more than 10x slower than float32 on one thread of this CPU (19 s for 4 x 350 tokens).
STEP_OVERRIDES = ("trainer.rollout_batch_size=1", "ppo.mini_batch_size=1",
                  "rollout.backend=vllm")
# The distilled GRM on vLLM, with a KV cache that holds one float32 sequence of SmolLM2's
# 8,192 tokens (0.35 GiB; the CPU default of 256 MiB does not, and vLLM refuses to start)
GRM_ON_VLLM = ("grm.backend=vllm", f"grm.kv_cache_memory_bytes={512 * 1024**2}")
# Arms trained at once: one arm keeps about one core busy (its phases take turns, one thread
# per actor) and takes about 7 GB, so two share a 2-core, 24 GB box.
PARALLEL_ARMS = 2
EVAL_OVERRIDES = (f"eval.prompts_path={PROMPTS}", "eval.max_new_tokens=96",
                  "rollout.backend=vllm")


def arms(grm_model: str, bt_model: str) -> list[rm.Arm]:
    """real_model's arms on vLLM engines, one prompt a step; the distilled GRM on vLLM too."""
    out = []
    for a in rm.arms(grm_model, bt_model):
        extra = (*STEP_OVERRIDES, *(GRM_ON_VLLM if a.judge == "distilled GRM" else ()))
        out.append(rm.Arm(a.name, a.label, (*a.overrides, *extra), a.judge))
    return out


def winrate(b: rm.Bench, name: str, model: str, baseline: str) -> dict[str, Any]:
    out = b.work / "eval" / name
    results = out / "winrate" / "results.json"
    if not results.is_file():
        b.cpe_ray(f"eval-{name}", ["eval", "winrate"], [
            f"eval.model_path={model}", f"eval.model_name={name}", f"eval.output_dir={out}",
            "eval.judge=grm", "grm.backend=openai", *b.judge_overrides("grm.api"),
            f"eval.baseline_path={baseline}", *EVAL_OVERRIDES])
    r = rm.read_json(results)
    m = r["metrics"]
    return {"model": name, "baseline": r["baseline"], "n": r["n_prompts"],
            "win_rate": m["win_rate"], "win_rate_se": m["standard_error"],
            "lc_win_rate": m["lc_win_rate"], "lc_win_rate_se": m["lc_standard_error"],
            "lc_identified": m["lc_identified"], "lc_status": r.get("lc_status"),
            "theta": m["theta"], "C": m["C"], "wins": m["n_wins"], "losses": m["n_wins_base"],
            "draws": m["n_draws"], "length": r["mean_length"]["model"],
            "baseline_length": r["mean_length"]["baseline"],
            "reward": r.get("reward", {}).get("model_mean"),
            "model_outputs": str(out / "winrate" / "model_outputs.json")}


def run(args: argparse.Namespace) -> dict[str, Any]:
    b = rm.Bench(Path(args.work).resolve())
    b.start_judge()
    try:
        s1 = rm.stage1(b, args.sft_epochs)
        s2 = rm.stage2(b, args.grm_epochs)
        bt = rm.bt_model(b, s1["model"], args.rm_epochs)
        with ThreadPoolExecutor(PARALLEL_ARMS) as pool:
            trained = [pool.submit(rm.train_arm, b, arm, s1["model"], args.steps)
                       for arm in arms(s2["model"], bt["model"])]
            sft = pool.submit(winrate, b, "sft", s1["model"], GENERIC_BASELINE)
            rows = [f.result() for f in trained]
            sft_eval = sft.result()
            evals = list(pool.map(lambda a: winrate(b, a["arm"], a["checkpoint"],
                                                    sft_eval["model_outputs"]), rows))
    finally:
        b.stop_judge()
    return {"stage1": s1, "stage2": s2, "bt": bt, "arms": rows, "sft_eval": sft_eval,
            "evals": evals, "phase_seconds": b.seconds, "seconds": sum(b.seconds.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="outputs/hacking", help="run directories (resumable)")
    ap.add_argument("--out", default=str(RESULTS), help="results prefix (.json, .md, .png)")
    ap.add_argument("--steps", type=int, default=24, help="RL steps per arm")
    ap.add_argument("--sft-epochs", type=int, default=2)
    ap.add_argument("--grm-epochs", type=int, default=1)
    ap.add_argument("--rm-epochs", type=int, default=1)
    args = ap.parse_args()
    start = time.perf_counter()
    result = run(args)
    result["settings"] = {"steps": args.steps, "step_overrides": list(STEP_OVERRIDES),
                          "eval_overrides": list(EVAL_OVERRIDES), "prompts": PROMPTS}
    result["seconds_this_invocation"] = time.perf_counter() - start
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    analyse(result, Path(args.work).resolve())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(report.markdown(result))
    report.plot(result, out.with_suffix(".png"))
    print(report.markdown(result))
    print(f"{out.with_suffix('.json')}, .md, .png")


def _diff(a: dict[str, float], b: dict[str, float], key: str = "mean") -> dict[str, float]:
    """a - b for independent estimates: the difference and the root of the summed variances."""
    return {"diff": a[key] - b[key], "se": (a["se"] ** 2 + b["se"] ** 2) ** 0.5}


def analyse(result: dict[str, Any], work: Path) -> None:
    """The monitor's curves per arm, the evaluated answers' profiles, the comparisons."""
    from cpe_ray.models import load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path("smollm2-135m"))
    steps = result["settings"]["steps"]
    result["curves"] = {a["arm"]: report.curves(work / a["arm"], steps) for a in result["arms"]}
    outputs = {"sft": result["sft_eval"]["model_outputs"]} | {
        e["model"]: e["model_outputs"] for e in result["evals"]}
    result["profiles"] = {name: report.answers_profile(Path(path), PROMPTS, rm.CONF, tok)
                          for name, path in outputs.items()}
    sl = {arm: c["slopes"] for arm, c in result["curves"].items()}
    pr, ev = result["profiles"], {e["model"]: e for e in result["evals"]}
    judged = {name: work / "eval" / name / "winrate" / "judgements.jsonl" for name in ev}
    cmp: dict[str, Any] = {}
    for other in ("ppo-bt", "ppo"):
        for key, label in (("monitor/length_mean", "training length slope (tokens/step)"),
                           ("monitor/persona_term_share", "training persona-term share slope")):
            cmp[f"{label}, {other} - cpe"] = report.diff_of_slopes(sl[other][key], sl["cpe"][key])
        cmp[f"evaluated tokens, {other} - cpe"] = _diff(pr[other]["tokens"], pr["cpe"]["tokens"])
        cmp[f"evaluated persona-term share, {other} - cpe"] = _diff(
            pr[other]["persona_term_share"], pr["cpe"]["persona_term_share"])
    cmp["win rate vs SFT, cpe - ppo (paired over prompts, points)"] = report.paired(
        judged["cpe"], judged["ppo"])
    cmp["LC win rate vs SFT, cpe - ppo (points)"] = {
        "diff": ev["cpe"]["lc_win_rate"] - ev["ppo"]["lc_win_rate"],
        "se": (ev["cpe"]["lc_win_rate_se"] ** 2 + ev["ppo"]["lc_win_rate_se"] ** 2) ** 0.5}
    result["comparisons"] = cmp


if __name__ == "__main__":
    main()
