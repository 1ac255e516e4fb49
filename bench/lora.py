"""Benchmark: LoRA adapter-only weight sync against the full sync, into vLLM on the CPU.

Run by hand: `python bench/lora.py [--rank 16] [--models tiny smollm2-135m] [--steps 6]`
(needs `launch/install.sh --vllm`; smollm2-135m also `--smollm2`).

Sync, per model of `--models`: a policy of that model, sent by `WeightSender` from a thread
over a gloo sync group into a `VLLMEngine` on this CPU, `--repeats` syncs in a row: the whole
model into an engine without LoRA (bucketed broadcast + vLLM's layerwise reload), and a peft
adapter of rank `--rank` on every linear projection into an engine serving LoRA (broadcast,
the adapter written to /dev/shm, `add_lora`). Bytes are the manifest's; seconds the wall time
of the sender's and the engine's side together, median of the repeats (the first dropped:
first-touch costs). Each arm runs in a process of its own (one vLLM engine per process).

Steps: `cpe-ray train` on the tiny model with `rollout.backend=vllm` for `--steps` steps, full
and with `policy.lora.rank=--rank`, one after the other: the median of `time/step`,
`time/weight_sync` and `sync/bytes` over the steps after the first, and the largest
`rollout/logprob_diff` (the engine serving the adapter must sample what the learner scores).

Writes `bench/results/lora.json` and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MB = 1024**2
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CPU_KV_BYTES = 64 * MB
TARGET_BYTES_RATIO, TARGET_SECONDS_RATIO = 20.0, 5.0  # issue #23 (on SmolLM2, r=16)


def sync_arm(model: str, arm: str, rank: int, repeats: int) -> dict:
    """One arm in this process: (bytes, seconds of each sync)."""
    import torch

    from cpe_ray.engines.vllm import VLLMEngine
    from cpe_ray.models import load_causal_lm, resolve_model_path
    from cpe_ray.weight_sync.codec import Manifest
    from cpe_ray.weight_sync.group import GroupSpec, free_port
    from cpe_ray.weight_sync.sender import WeightSender

    path = resolve_model_path(model)
    policy = load_causal_lm(path, "float32", "cpu")
    if arm == "adapter":
        import peft

        config = peft.LoraConfig(r=rank, lora_alpha=2.0 * rank, target_modules=TARGETS,
                                 task_type="CAUSAL_LM")
        policy = peft.get_peft_model(policy, config)
        with torch.no_grad():  # peft starts B at zero; any values move the same bytes
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 1e-3)
    engine = VLLMEngine(model_path=path, dtype="float32", max_model_len=1024, seed=0,
                        use_gpu=False, kv_cache_memory_bytes=CPU_KV_BYTES,
                        lora_rank=rank if arm == "adapter" else 0, adapter_versions=2)
    sender = WeightSender(policy, rank=0, world=1, device=torch.device("cpu"), zero3=False,
                          bucket_bytes=64 * MB, adopt=False)
    planned = sender.manifest()
    spec = GroupSpec("gloo", "127.0.0.1", free_port("127.0.0.1"), 2, 120.0)
    with ThreadPoolExecutor(2) as pool:
        for f in [pool.submit(sender.join, spec, planned),
                  pool.submit(engine.join_weight_group, spec, 1)]:
            f.result()
        seconds = []
        for version in range(1, repeats + 2):
            manifest = Manifest(planned.buckets, planned.adapter, version)
            start = time.perf_counter()
            for f in [pool.submit(sender.broadcast, manifest),
                      pool.submit(engine.receive_weights, manifest)]:
                f.result()
            seconds.append(time.perf_counter() - start)
    return {"bytes": planned.total_bytes, "tensors": planned.num_tensors,
            "seconds": seconds[1:], "seconds_median": statistics.median(seconds[1:])}


def run_child(model: str, arm: str, rank: int, repeats: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", model, arm, "--rank", str(rank),
         "--repeats", str(repeats)],
        check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": "."})
    return json.loads(out.stdout.strip().splitlines()[-1])


def train_arm(name: str, out_dir: Path, steps: int, overrides: list[str]) -> dict:
    from cpe_ray.config import load_config
    from cpe_ray.run import train

    cfg = load_config(None, [f"run.output_dir={out_dir}", f"run.name={name}",
                             f"trainer.max_steps={steps}", "rollout.backend=vllm",
                             "logging.wandb_mode=disabled", *overrides])
    summary = train(cfg, progress=False)
    rows = [json.loads(line) for line in
            (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    later = rows[1:] or rows

    def median(key: str) -> float:
        return statistics.median(float(r[key]) for r in later)

    return {"step_seconds": median("time/step"), "sync_seconds": median("time/weight_sync"),
            "sync_bytes": median("sync/bytes"),
            "logprob_diff_max": max(float(r.get("rollout/logprob_diff", 0.0)) for r in rows),
            "steps": len(rows)}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["sync"])
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    panels = [("bytes", "MB per sync", 1 / MB), ("seconds_median", "seconds per sync", 1.0)]
    for ax, (key, label, scale) in zip(axes[:2], panels, strict=True):
        for i, arm in enumerate(("full", "adapter")):
            values = [result["sync"][m][arm][key] * scale for m in models]
            ax.bar([j + 0.4 * i for j in range(len(models))], values, width=0.4, label=arm)
        ax.set_xticks([j + 0.2 for j in range(len(models))], models)
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.legend()
    steps = result["steps"]
    if steps:
        arms = list(steps)
        axes[2].bar(arms, [steps[a]["step_seconds"] for a in arms])
        axes[2].set_ylabel("seconds per step (tiny, vLLM)")
    fig.suptitle(f"LoRA r={result['rank']} adapter-only sync vs full sync, vLLM on a CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/lora.json")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2-135m"])
    ap.add_argument("--repeats", type=int, default=3, help="syncs timed per arm")
    ap.add_argument("--steps", type=int, default=6, help="training steps per arm (0: none)")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "ARM"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(sync_arm(*args.child, args.rank, args.repeats)))
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sync = {}
    for model in args.models:
        arms = {arm: run_child(model, arm, args.rank, args.repeats)
                for arm in ("full", "adapter")}
        arms["bytes_ratio"] = arms["full"]["bytes"] / arms["adapter"]["bytes"]
        arms["seconds_ratio"] = (arms["full"]["seconds_median"]
                                 / arms["adapter"]["seconds_median"])
        sync[model] = arms
        print(f"{model}: full {arms['full']['bytes'] / MB:.2f} MB in "
              f"{arms['full']['seconds_median']:.3f} s, adapter "
              f"{arms['adapter']['bytes'] / MB:.3f} MB in "
              f"{arms['adapter']['seconds_median']:.3f} s: {arms['bytes_ratio']:.1f}x fewer "
              f"bytes, {arms['seconds_ratio']:.1f}x less time", flush=True)
    steps = {}
    if args.steps:
        small = ["trainer.rollout_batch_size=2", "ppo.mini_batch_size=1",
                 "rollout.n_samples_per_prompt=2", "rollout.max_new_tokens=8",
                 "post_edit.max_new_tokens=8", "learner.micro_batch_size=2"]
        with tempfile.TemporaryDirectory() as tmp:
            steps = {"full": train_arm("full", Path(tmp), args.steps, small),
                     "adapter": train_arm("adapter", Path(tmp), args.steps,
                                          [*small, f"policy.lora.rank={args.rank}"])}
        for arm, s in steps.items():
            print(f"tiny train {arm}: {s['step_seconds']:.2f} s/step, sync "
                  f"{s['sync_seconds']:.3f} s, {s['sync_bytes'] / MB:.3f} MB, "
                  f"logprob_diff <= {s['logprob_diff_max']:.1e}", flush=True)
    result = {"rank": args.rank, "targets": TARGETS, "sync": sync, "steps": steps,
              "goals": {"bytes_ratio": TARGET_BYTES_RATIO, "seconds_ratio": TARGET_SECONDS_RATIO},
              "adapter_folder": "/dev/shm (tmpfs)",
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"{out}, {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
