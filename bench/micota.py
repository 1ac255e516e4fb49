"""Benchmark: MiCoTA for the GRM (a teacher assistant between teacher and student), on a CPU.

Run by hand from the repository root (after `bash launch/install.sh --smollm2`):
`python bench/micota.py [--work outputs/micota]`. Writes `bench/results/micota.{json,png}`;
resumable: every phase is a `cpe-ray` command that resumes, and one whose outputs exist in
`--work` is not run again.

Teacher: the rubric judge served by `cpe-ray serve-judge`. Assistant and student:
SmolLM2-135M-Instruct (`conf/smollm2-cpu.yaml`). Triples: data/demo/grm_inputs.jsonl split by
a seed into the assistant's training triples (A) and the test triples (E); the student's
training triples (S) pair data/demo/train.jsonl questions with answers from
data/demo/pairwise.jsonl (same persona where one exists), so no model has seen them.
1. `grm collect` from the teacher on A, S and E (kept: parsed, critique <= --teacher-tokens).
2. The assistant: `grm train` on the teacher's kept judgements of A.
3. The assistant served (`serve-judge grm.backend=vllm`, no retries) judges S by `grm collect`,
   kept when it parses, agrees with the teacher's judgement of the same triple (weighted
   reward within --max-diff) and its critique is <= --assistant-tokens (mid-length).
4. Two students, the same number of training examples (steps x batch): direct (on the
   teacher's kept judgements of S) and assistant route (on the assistant's kept ones).
5. Each GRM served judges E: parse share, Spearman of its weighted reward with the teacher's,
   critique tokens; standard errors by bootstrap over E's triples.
6. Each student as the GRM of `cpe-ray train` (grm.backend=vllm) for --cpe-steps steps: the
   GRM's seconds a step (time/critique + time/score in metrics.jsonl), SE over steps.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import secrets
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf" / "smollm2-cpu.yaml"
RESULTS = REPO / "bench" / "results" / "micota"
# Every SmolLM2 GRM (assistant, students) generates on vLLM's CPU build: several times the HF
# engine's speed here. Its KV cache holds one float32 sequence of SmolLM2's 8,192 tokens
# (0.35 GiB; vLLM refuses to start with the CPU default of 256 MiB).
GRM_ENGINE = ("grm.backend=vllm", f"grm.kv_cache_memory_bytes={512 * 1024**2}")
KEY_ENV = "CPE_RAY_BENCH_JUDGE_KEY"
BATCH = 4  # distill.batch_size of every GRM trained here (the config's)
TEST_TRIPLES = 16
SAVE_EVERY = 2  # GRM training steps between checkpoints: a stopped bench loses at most one
BOOTSTRAP = 2000
LOG_TAIL = 3000


class Runner:
    """`cpe-ray` subprocesses with logs, summed seconds per phase, and served judges."""

    def __init__(self, work: Path) -> None:
        self.work, self.logs = work, work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, KEY_ENV: os.environ.get(KEY_ENV) or secrets.token_hex(16),
                    "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.times_file = work / "phase_seconds.json"
        self.seconds = (json.loads(self.times_file.read_text())
                        if self.times_file.is_file() else {})
        self.common = [f"run.output_dir={work}", "logging.wandb_mode=disabled"]

    def run(self, phase: str, words: list[str], overrides: list[str]) -> None:
        cmd = [sys.executable, "-m", "cpe_ray", *words, "--config", str(CONF), *overrides,
               *self.common]
        print(f"[{phase}] cpe-ray {' '.join(words)}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True)
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start
        self.times_file.write_text(json.dumps(self.seconds, indent=2) + "\n")
        (self.logs / f"{phase}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise SystemExit(f"[{phase}] exit {proc.returncode}:\n"
                             f"{(proc.stdout + proc.stderr)[-LOG_TAIL:]}")
        print(f"[{phase}] {self.seconds[phase]:.0f} s", flush=True)

    def serve(self, name: str, overrides: list[str]) -> tuple[subprocess.Popen[str], list[str]]:
        """`cpe-ray serve-judge` on a free port; the `distill.api.*` overrides to reach it."""
        cmd = [sys.executable, "-m", "cpe_ray", "serve-judge", "--config", str(CONF),
               "serve.port=0", f"serve.model={name}", f"serve.api_key_env={KEY_ENV}",
               # collect sends its 16 requests at once: wait for them to share one batch
               "serve.max_batch=16", "serve.batch_wait_s=2", *overrides]
        proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, text=True, stdout=subprocess.PIPE,
                                stderr=(self.logs / f"serve-{name}.log").open("w"))
        assert proc.stdout is not None
        line = proc.stdout.readline()
        while line and not line.startswith("serving"):  # vLLM logs to stdout before it
            line = proc.stdout.readline()
        if not line.startswith("serving"):
            raise SystemExit(f"serve-judge {name} did not start: {line!r}; see {self.logs}")
        url = line.rsplit(" ", 1)[-1].strip()
        return proc, [f"distill.api.base_url={url}", f"distill.api.model={name}",
                      f"distill.api.api_key_env={KEY_ENV}", "distill.api.timeout_s=1800",
                      "distill.api.max_concurrency=16"]


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def write_triples(work: Path, seed: int) -> dict[str, Path]:
    """A, S and E (see the module docstring) as grm collect inputs."""
    demo = REPO / "data" / "demo"
    inputs = read_jsonl(demo / "grm_inputs.jsonl")
    random.Random(seed).shuffle(inputs)
    pairs = read_jsonl(demo / "pairwise.jsonl")
    by_persona: dict[str, list[str]] = {}
    for p in pairs:
        by_persona.setdefault(json.dumps(p["persona"], sort_keys=True), []).extend(
            [p["chosen"], p.get("rejected") or p["reject"]])
    answers = [a for p in pairs for a in (p["chosen"], p.get("rejected") or p["reject"])]
    rng = random.Random(seed + 1)
    student = []
    for q in read_jsonl(demo / "train.jsonl")[: len(inputs) - TEST_TRIPLES]:
        pool = by_persona.get(json.dumps(q["persona"], sort_keys=True)) or answers
        student.append({"id": f"s-{q['id']}", "persona": q["persona"],
                        "question": q["question"], "answer": rng.choice(pool)})
    sets = {"A": inputs[TEST_TRIPLES:], "E": inputs[:TEST_TRIPLES], "S": student}
    paths = {}
    for name, rows in sets.items():
        paths[name] = work / f"triples-{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return paths


def collect(r: Runner, phase: str, api: list[str], triples: Path, out: Path,
            filt: list[str]) -> list[dict[str, Any]]:
    """`grm collect` of `triples` into `out`, skipped when `out` holds them all (collect
    marks its filter verdicts when it ends, so a complete file is a finished one)."""
    if not out.is_file() or len(read_jsonl(out)) < len(read_jsonl(triples)):
        r.run(phase, ["grm", "collect"], [f"distill.input_path={triples}",
                                          f"distill.output_path={out}", *api, *filt])
    return read_jsonl(out)


def grm_train(r: Runner, name: str, judgements: Path, steps: int, filt: list[str]) -> str:
    run = r.work / name
    if not (run / "summary.json").is_file():
        r.run(f"train-{name}", ["grm", "train"], [
            f"distill.name={name}", f"distill.output_path={judgements}",
            f"distill.max_steps={steps}", "distill.epochs=100", "distill.eval_fraction=0",
            f"distill.batch_size={BATCH}", f"distill.save_every={SAVE_EVERY}",
            "distill.resume=auto", *filt])
    return json.loads((run / "summary.json").read_text())


def served_collect(r: Runner, name: str, model: str, triples: Path, out: Path,
                   filt: list[str]) -> list[dict[str, Any]]:
    """The GRM at `model` served, no retries, judges `triples` (skipped when all are in)."""
    if out.is_file() and len(read_jsonl(out)) >= len(read_jsonl(triples)):
        return read_jsonl(out)
    proc, api = r.serve(name, [*GRM_ENGINE, f"grm.model_path={model}", "grm.max_retries=0"])
    try:
        return collect(r, f"collect-{name}", api, triples, out, filt)
    finally:
        stop(proc)


@functools.cache
def _weights() -> tuple[tuple[str, float], ...]:
    from cpe_ray.config import load_config

    return tuple(load_config(CONF).grm.weights.items())


def weighted(scores: dict[str, float | None]) -> float | None:
    from cpe_ray.judges.grm import Judgement, weighted_reward

    return weighted_reward(Judgement(dict(scores), "", "", True), dict(_weights()), "none")


def spearman(xs: list[float], ys: list[float]) -> float | None:
    from scipy.stats import spearmanr

    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    return float(spearmanr(xs, ys).statistic)


def measures(rows: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, float | None]:
    """Parse share, Spearman with the teacher, mean critique tokens, agreement share."""
    both = [(weighted(t["scores"]), weighted(m["scores"])) for t, m in rows
            if t["parsed"] and m["parsed"]]
    both = [(a, b) for a, b in both if a is not None and b is not None]
    return {"parse_share": statistics.fmean(m["parsed"] for _, m in rows),
            "spearman": spearman([a for a, _ in both], [b for _, b in both]),
            "critique_tokens": statistics.fmean(m["critique_tokens"] for _, m in rows),
            "agrees": statistics.fmean(m["reject_reason"] not in ("disagrees", "no_reference",
                                                                 "unparsed") for _, m in rows)}


def evaluate(teacher: list[dict[str, Any]], judged: list[dict[str, Any]], seed: int
             ) -> dict[str, Any]:
    """`measures` on E and its bootstrap standard errors (resampling E's triples)."""
    ref = {(t["persona"], t["question"], t["answer"]): t for t in teacher}
    rows = [(ref[(m["persona"], m["question"], m["answer"])], m) for m in judged]
    point = measures(rows)
    rng = random.Random(seed)
    draws: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(BOOTSTRAP):
        for k, v in measures([rng.choice(rows) for _ in rows]).items():
            if v is not None:
                draws[k].append(v)
    return {"n": len(rows), "parsed_n": sum(m["parsed"] for _, m in rows)} | {
        k: {"value": v, "se": statistics.stdev(draws[k]) if len(draws[k]) > 1 else None}
        for k, v in point.items()}


def cpe_steps(r: Runner, name: str, grm_model: str, steps: int) -> dict[str, Any]:
    run = r.work / f"cpe-{name}"
    if not (run / "checkpoints" / f"step-{steps}").is_dir():
        r.run(f"cpe-{name}", ["train"], [
            f"run.name=cpe-{name}", *GRM_ENGINE, f"grm.model_path={grm_model}",
            f"trainer.max_steps={steps}", "trainer.resume=auto", "cluster.cpus_per_bundle=0.5"])
    rows = read_jsonl(run / "metrics.jsonl")[-steps:]
    grm = [m.get("time/critique", 0.0) + m.get("time/score", 0.0) for m in rows]
    return {"steps": len(rows), "grm_seconds": grm, "step_seconds": [m["time/step"] for m in rows],
            "grm_seconds_mean": statistics.fmean(grm),
            "grm_seconds_se": statistics.stdev(grm) / len(grm) ** 0.5 if len(grm) > 1 else None,
            "parse_failures": sum(m.get("grm/parse_failures", 0) for m in rows)}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = result["eval"]
    names = list(arms)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for ax, key, title in zip(axes[:3], ("parse_share", "spearman", "critique_tokens"),
                              ("held-out parse share", "Spearman with the teacher",
                               "critique tokens (SmolLM2)"), strict=True):
        vals = [arms[n][key]["value"] or 0.0 for n in names]
        errs = [arms[n][key]["se"] or 0.0 for n in names]
        ax.bar(names, vals, yerr=errs, capsize=3, color="tab:blue")
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=8, rotation=15)
    cpe = result["cpe"]
    axes[3].bar(list(cpe), [c["grm_seconds_mean"] for c in cpe.values()],
                yerr=[c["grm_seconds_se"] or 0.0 for c in cpe.values()], capsize=3,
                color="tab:orange")
    axes[3].set_title("GRM seconds per CPE step", fontsize=10)
    fig.suptitle(f"MiCoTA for the GRM: students trained on {result['student_examples']} "
                 "examples each (SE: bootstrap over 16 test triples; over steps)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="outputs/micota")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--assistant-steps", type=int, default=8)
    ap.add_argument("--student-steps", type=int, default=6)
    ap.add_argument("--teacher-tokens", type=int, default=128,
                    help="max critique tokens of a kept teacher judgement")
    ap.add_argument("--assistant-tokens", type=int, default=64,
                    help="max critique tokens of a kept assistant judgement (mid-length)")
    ap.add_argument("--max-diff", type=float, default=1.0,
                    help="max |weighted reward - the teacher's| of a kept assistant judgement")
    ap.add_argument("--cpe-steps", type=int, default=2)
    args = ap.parse_args()
    work, out = Path(args.work).resolve(), Path(args.out)
    r = Runner(work)
    start = time.perf_counter()
    triples = write_triples(work, args.seed)
    teacher_filter = [f"distill.filter.max_critique_tokens={args.teacher_tokens}"]
    judged: dict[str, dict[str, Any]] = {}
    proc, api = r.serve("rubric-teacher", [])
    try:
        for name in "ASE":
            judged[f"teacher-{name}"] = collect(r, f"collect-teacher-{name}", api,
                                                triples[name], work / f"teacher-{name}.jsonl",
                                                teacher_filter)
    finally:
        stop(proc)
    assistant = grm_train(r, "assistant", work / "teacher-A.jsonl", args.assistant_steps,
                          teacher_filter)
    mid = [f"distill.filter.max_critique_tokens={args.assistant_tokens}",
           f"distill.filter.reference_path={work / 'teacher-S.jsonl'}",
           "distill.filter.reference_kind=judge", f"distill.filter.max_score_diff={args.max_diff}",
           "distill.filter.score_diff_on=reward"]
    judged["assistant-S"] = served_collect(r, "assistant", assistant["model"], triples["S"],
                                           work / "assistant-S.jsonl", mid)
    steps = args.student_steps
    students = {"student-direct": grm_train(r, "student-direct", work / "teacher-S.jsonl",
                                            steps, teacher_filter),
                "student-assistant": grm_train(r, "student-assistant",
                                               work / "assistant-S.jsonl", steps, mid)}
    on_e = [f"distill.filter.reference_path={work / 'teacher-E.jsonl'}",
            f"distill.filter.max_score_diff={args.max_diff}",
            f"distill.filter.max_critique_tokens={args.assistant_tokens}"]
    evals = {"teacher": evaluate(judged["teacher-E"], judged["teacher-E"], args.seed)}
    for name, summary in {"assistant": assistant, **students}.items():
        rows = served_collect(r, name, summary["model"], triples["E"],
                              work / f"eval-{name}.jsonl", on_e)
        evals[name] = evaluate(judged["teacher-E"], rows, args.seed)
    cpe = {name: cpe_steps(r, name, s["model"], args.cpe_steps) for name, s in students.items()}
    result = {
        "settings": vars(args) | {"config": str(CONF.relative_to(REPO)), "batch": BATCH,
                                  "test_triples": TEST_TRIPLES, "bootstrap": BOOTSTRAP},
        "student_examples": steps * BATCH,
        "filters": {"teacher-A": assistant["data"]["filter"],
                    "student-direct": students["student-direct"]["data"]["filter"],
                    "student-assistant": students["student-assistant"]["data"]["filter"]},
        "train": {n: {k: s[k] for k in ("steps", "train_examples", "first_train_loss",
                                        "last_train_loss", "model")}
                  for n, s in {"assistant": assistant, **students}.items()},
        "eval": evals, "cpe": cpe, "phase_seconds": r.seconds,
        "seconds": sum(r.seconds.values()),
        "seconds_this_invocation": time.perf_counter() - start,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    for name, e in evals.items():
        print(f"{name:<18} parse {e['parse_share']['value']:.2f}  spearman "
              f"{e['spearman']['value']}  tokens {e['critique_tokens']['value']:.1f}")
    print(f"{out.with_suffix('.json')}, .png")


if __name__ == "__main__":
    main()
