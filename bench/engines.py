"""Benchmark: generation throughput of the HF and vLLM engines, and a weight update into vLLM.

Run by hand: `python bench/engines.py [--out bench/results/engines.json]` (needs
`launch/install.sh --vllm`).

Both engines serve the same model on this CPU, one after the other in this process, at the
CPU default's batch (`trainer.rollout_batch_size` prompts x `rollout.n_samples_per_prompt`
samples of up to `rollout.max_new_tokens` tokens) and at `--scale` times as many prompts.
Tokens/s counts the completion tokens the engine returned over the wall seconds of the
`generate` call, median of `--repeats`. The model is a randomly initialised Qwen2 built
offline with the tiny model's tokenizer (`--hidden`, `--layers`: about 70M parameters by
default, so the weight update moves a few hundred MB; the tiny model's 0.5 MB would measure
only RPC overhead). Random weights rarely sample EOS, so answers run to the length cap and
both engines generate the same number of tokens.

The weight update is one `receive_weights` of the whole model into the vLLM engine over a
gloo sync group from a sender thread (bucketed broadcast, then vLLM's layerwise reload and the
prefix-cache reset), against one raw broadcast of a buffer of the same bytes between two
threads over another gloo group: `update_over_raw` = t_update / t_raw, from medians of the
same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import torch

from cpe_ray.config import load_config
from cpe_ray.engines.base import SamplingParams
from cpe_ray.engines.factory import make_engine
from cpe_ray.engines.spec import EngineSpec
from cpe_ray.tiny import TinyModelSpec, ensure_tiny_model
from cpe_ray.weight_sync import codec
from cpe_ray.weight_sync import group as sync

MB = 1 << 20
PROMPT_TOKENS = 64  # a persona and a question in the tiny tokenizer are about this long
GROUP_TIMEOUT_S = 300.0
KV_CACHE_BYTES = 512 * MB


def build_model(out: Path, hidden: int, layers: int) -> Path:
    spec = TinyModelSpec(hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256,
                         intermediate_size=hidden * 4, vocab_size=1024)
    return ensure_tiny_model(out, spec)


def prompts(count: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(300, 1000, (count, PROMPT_TOKENS), generator=gen).tolist()


def throughput(engine, batch: list[list[int]], params: SamplingParams, repeats: int) -> dict:
    engine.generate(batch[:2], params)  # warm-up: first-call allocations
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = engine.generate(batch, params)
        seconds = time.perf_counter() - start
        runs.append({"seconds": seconds, "tokens": sum(len(c.token_ids) for c in out)})
    median = statistics.median(r["tokens"] / r["seconds"] for r in runs)
    return {"tokens_per_s": median, "runs": runs}


def run_together(*fns):
    with ThreadPoolExecutor(len(fns)) as pool:
        return [f.result() for f in [pool.submit(fn) for fn in fns]]


def raw_broadcast_seconds(nbytes: int, repeats: int) -> list[float]:
    spec = sync.GroupSpec("gloo", "127.0.0.1", sync.free_port("127.0.0.1"), 2, GROUP_TIMEOUT_S)
    groups = run_together(lambda: sync.SyncGroup(spec, 0), lambda: sync.SyncGroup(spec, 1))
    bufs = [torch.ones(nbytes, dtype=torch.uint8), torch.zeros(nbytes, dtype=torch.uint8)]
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_together(*[lambda g=g, b=b: g.wait(g.broadcast_async(b, "raw"), "raw")
                       for g, b in zip(groups, bufs, strict=True)])
        out.append(time.perf_counter() - start)
    assert torch.equal(bufs[1], bufs[0])
    return out


def update_seconds(engine, model_path: Path, bucket_mb: int, repeats: int
                   ) -> tuple[list[float], int, bool]:
    from transformers import AutoModelForCausalLM

    weights = {n: p.detach().mul(1.5) for n, p in
               AutoModelForCausalLM.from_pretrained(model_path).named_parameters()}
    manifest = codec.manifest_for(weights.items(), bucket_mb * MB)
    spec = sync.GroupSpec("gloo", "127.0.0.1", sync.free_port("127.0.0.1"), 2, GROUP_TIMEOUT_S)
    _, group = run_together(lambda: engine.join_weight_group(spec, 1),
                            lambda: sync.SyncGroup(spec, 0))
    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    before = engine.generate(prompts(1, 0), greedy)[0].token_ids
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_together(lambda: engine.receive_weights(manifest),
                     lambda: sync.send_buckets(group, manifest, lambda b: nullcontext(weights)))
        out.append(time.perf_counter() - start)
    changed = engine.generate(prompts(1, 0), greedy)[0].token_ids != before
    return out, manifest.total_bytes, changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results/engines.json")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bucket-mb", type=int, default=64)
    args = parser.parse_args()

    cfg = load_config(None, [])
    r = cfg.rollout
    params = SamplingParams(n=r.n_samples_per_prompt, temperature=r.temperature,
                            max_new_tokens=r.max_new_tokens, seed=cfg.run.seed)
    batches = {"default": prompts(cfg.trainer.rollout_batch_size, 1),
               f"x{args.scale}": prompts(cfg.trainer.rollout_batch_size * args.scale, 2)}
    result: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "torch": torch.__version__},
                    "settings": vars(args) | {"n": params.n, "max_new_tokens": r.max_new_tokens,
                                              "prompt_tokens": PROMPT_TOKENS}}
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "model", args.hidden, args.layers)
        from transformers import AutoModelForCausalLM

        result["model"] = {"hidden": args.hidden, "layers": args.layers, "parameters": sum(
            p.numel() for p in AutoModelForCausalLM.from_pretrained(model).parameters())}
        gen: dict = {}
        hf = make_engine(EngineSpec("hf", str(model), dtype="float32", seed=0, use_gpu=False,
                                    max_batch_rows=r.max_batch_rows))
        gen["hf"] = {name: throughput(hf, b, params, args.repeats) for name, b in batches.items()}
        del hf
        vllm = make_engine(EngineSpec("vllm", str(model), dtype="float32", seed=0, use_gpu=False,
                                      max_model_len=PROMPT_TOKENS + r.max_new_tokens,
                                      kv_cache_memory_bytes=KV_CACHE_BYTES))
        gen["vllm"] = {name: throughput(vllm, b, params, args.repeats)
                       for name, b in batches.items()}
        result["generation"] = gen
        result["vllm_over_hf"] = {name: gen["vllm"][name]["tokens_per_s"]
                                  / gen["hf"][name]["tokens_per_s"] for name in batches}
        upd, nbytes, changed = update_seconds(vllm, model, args.bucket_mb, args.repeats)
        raw = raw_broadcast_seconds(nbytes, args.repeats)
        result["weight_update"] = {
            "bytes": nbytes, "update_seconds": upd, "raw_broadcast_seconds": raw,
            "update_over_raw": statistics.median(upd) / statistics.median(raw),
            "engine_output_changed": changed,
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("vllm_over_hf",)}
                     | {"tokens_per_s": {e: {b: round(v["tokens_per_s"], 1) for b, v in d.items()}
                                         for e, d in result["generation"].items()},
                        "weight_update": {k: v for k, v in result["weight_update"].items()
                                          if not isinstance(v, list)}}, indent=2))


if __name__ == "__main__":
    main()
