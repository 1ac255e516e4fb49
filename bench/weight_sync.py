"""Benchmark: bucketed weight sync vs one raw broadcast (the ceiling) vs a per-parameter RPC loop.

Run by hand: `python bench/weight_sync.py [--out bench/results/weight_sync.json]`.

A sender actor (the learner's rank 0) and `--receivers` receiver actors (engine ranks) join
one gloo `SyncGroup` on this machine. The weights are a Qwen2.5-0.5B-shaped set of bf16
tensors (shapes from a `Qwen2Config` built on the meta device, values random): a transfer
benchmark needs the real sizes and names, not a forward pass. Five ways move them:
- ceiling: one broadcast of a single preallocated buffer of the same total size;
- zero_copy: both ends' parameters adopted into bucket buffers (`adopt_buckets`), each bucket
  broadcast from and into them: the CPU default (ZeRO-0 float32 learner, HF engines);
- in_place: the sender packs each bucket (a ZeRO-3 or bf16 learner), receivers' parameters
  are the bucket buffers (HF engines);
- bucketed: the sender packs, receivers unpack and `copy_` into their parameters (what vLLM's
  `load_weights` does, on a GPU);
- per_param: what OpenRLHF-style peers do, per parameter one RPC to every receiver (name,
  dtype, shape), one broadcast of that tensor, and a load on the receiver.
Every way but per_param is one RPC per actor per sync.
Each is timed on the driver around the whole sync, `--repeats` times; ratios use medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import ray
import torch

from cpe_ray.weight_sync.codec import dtype_from_name, plan_manifest
from cpe_ray.weight_sync.group import (
    GroupSpec,
    SyncGroup,
    adopt_buckets,
    free_port,
    receive_buckets,
    receive_into,
    send_buckets,
)

TARGET_CEILING_RATIO = 0.8
TARGET_SPEEDUP = 3.0
MB = 1 << 20


def model_shapes(hidden: int, layers: int, vocab: int) -> list[tuple[str, tuple[int, ...], str]]:
    """Parameter names and shapes of a Qwen2.5-0.5B-like model, from transformers itself."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=14,
        num_key_value_heads=2, intermediate_size=4864, vocab_size=vocab,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    return [(n, tuple(p.shape), "bfloat16") for n, p in model.named_parameters()]


@ray.remote(num_cpus=1)
class Peer:
    def __init__(self, shapes, rank: int) -> None:
        torch.set_num_threads(1)
        gen = torch.Generator().manual_seed(rank)
        self.rank = rank
        self.params = {
            n: (torch.randn(s, generator=gen) if rank == 0 else torch.zeros(s)).to(
                dtype_from_name(d)) for n, s, d in shapes
        }
        # the sender's parameters again, adopted into bucket buffers at the first zero_copy
        self.source = {n: t.clone() for n, t in self.params.items()} if rank == 0 else None
        self.source_adopted = False
        self.group: SyncGroup | None = None
        self.flat: torch.Tensor | None = None
        self.adopted: list[torch.Tensor] | None = None

    def join(self, spec: GroupSpec) -> None:
        self.group = SyncGroup(spec, self.rank)
        total = sum(t.numel() * t.element_size() for t in self.params.values())
        self.flat = torch.empty(total, dtype=torch.uint8)

    def ceiling(self) -> None:
        self.group.wait(self.group.broadcast_async(self.flat, "raw buffer"), "raw buffer")

    def bucketed(self, manifest) -> None:
        if self.rank == 0:
            send_buckets(self.group, manifest, lambda b: nullcontext(self.params))
        else:
            receive_buckets(self.group, manifest, self._load)

    def in_place(self, manifest) -> None:
        """The HF engine's path: parameters adopted into bucket buffers, received in place."""
        if self.rank == 0:
            send_buckets(self.group, manifest, lambda b: nullcontext(self.params))
            return
        self._receive_in_place(manifest)

    def zero_copy(self, manifest) -> None:
        """Both ends adopted: the sender broadcasts its parameters' own buffers."""
        if self.rank == 0:
            if not self.source_adopted:
                self.source_adopted = adopt_buckets(self.source, manifest) is not None
            send_buckets(self.group, manifest, lambda b: nullcontext(self.source),
                         persistent=True)
            return
        self._receive_in_place(manifest)

    def _receive_in_place(self, manifest) -> None:
        if self.adopted is None:
            self.adopted = adopt_buckets(self.params, manifest)
        receive_into(self.group, manifest, self.adopted)

    def sent_without_packing(self) -> bool:
        return self.source_adopted

    def _load(self, named) -> None:
        for name, tensor in named:
            self.params[name].copy_(tensor)

    def one(self, name: str, dtype: str, shape: tuple[int, ...]) -> None:
        if self.rank == 0:
            tensor = self.params[name]
        else:
            tensor = torch.empty(shape, dtype=dtype_from_name(dtype))
        self.group.wait(self.group.broadcast_async(tensor, name), name)
        if self.rank != 0:
            self.params[name].copy_(tensor)

    def checksum(self) -> float:
        return float(sum(t.float().sum() for t in self.params.values()))

    def clear(self) -> None:
        """Receivers forget what they got (in place: adopted buffers stay adopted)."""
        if self.rank != 0:
            for t in self.params.values():
                t.zero_()


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/weight_sync.json")
    ap.add_argument("--bucket-mb", type=float, default=64.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--receivers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=151936)
    args = ap.parse_args()

    shapes = model_shapes(args.hidden, args.layers, args.vocab)
    manifest = plan_manifest([(n, s, d) for n, s, d in shapes], int(args.bucket_mb * MB))
    ray.init(address="local", num_cpus=1 + args.receivers, include_dashboard=False,
             log_to_driver=False)
    peers = [Peer.remote(shapes, r) for r in range(1 + args.receivers)]
    spec = GroupSpec("gloo", "127.0.0.1", free_port("127.0.0.1"), len(peers), timeout_s=300)
    ray.get([p.join.remote(spec) for p in peers])

    def ceiling():
        ray.get([p.ceiling.remote() for p in peers])

    def bucketed():
        ray.get([p.bucketed.remote(manifest) for p in peers])

    def in_place():
        ray.get([p.in_place.remote(manifest) for p in peers])

    def zero_copy():
        ray.get([p.zero_copy.remote(manifest) for p in peers])

    def per_param():
        for name, shape, dtype in shapes:
            ray.get([p.one.remote(name, dtype, shape) for p in peers])

    methods = {"ceiling": ceiling, "zero_copy": zero_copy, "in_place": in_place,
               "bucketed": bucketed, "per_param": per_param}
    ours = ("zero_copy", "in_place", "bucketed")
    samples: dict[str, list[float]] = {k: [] for k in methods}
    ceiling()  # warm the connections once
    zero_copy()  # and adopt the parameters into bucket buffers (once per engine / learner)
    for _ in range(args.repeats):
        for name, fn in methods.items():
            samples[name].append(_timed(fn))
    # untimed: each way, from receivers holding zeros, must deliver the sender's weights
    matches = {}
    for name in ours + ("per_param",):
        ray.get([p.clear.remote() for p in peers])
        methods[name]()
        sums = ray.get([p.checksum.remote() for p in peers])
        matches[name] = all(abs(s - sums[0]) < 1e-3 * max(1.0, abs(sums[0])) for s in sums[1:])
    median = {k: statistics.median(v) for k, v in samples.items()}
    total = manifest.total_bytes
    result = {
        "model": {"params": sum(torch.Size(s).numel() for _, s, _ in shapes),
                  "tensors": len(shapes), "dtype": "bfloat16", "bytes": total,
                  "hidden": args.hidden, "layers": args.layers, "vocab": args.vocab},
        "sync": {"backend": "gloo", "receivers": args.receivers, "bucket_mb": args.bucket_mb,
                 "buckets": len(manifest.buckets)},
        "seconds_median": median,
        "seconds_samples": samples,
        "gb_per_s": {k: total / v / 1e9 for k, v in median.items()},
        # zero_copy: CPU default; in_place: packing learner to HF engines; bucketed: vLLM's
        "ratio_of_ceiling": {k: median["ceiling"] / median[k] for k in ours},
        "speedup_vs_per_param": {k: median["per_param"] / median[k] for k in ours},
        "sender_sent_without_packing": ray.get(peers[0].sent_without_packing.remote()),
        "targets": {"ratio_of_ceiling": TARGET_CEILING_RATIO,
                    "speedup_vs_per_param": TARGET_SPEEDUP},
        "receivers_match_sender": matches,
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "notes": "weights are random bf16 tensors with Qwen2.5-0.5B's names and shapes; "
                 "every method runs over the same gloo group between Ray actors on one host",
    }
    result["pass"] = {
        f"{metric}/{k}": v >= target
        for metric, target in (("ratio_of_ceiling", TARGET_CEILING_RATIO),
                               ("speedup_vs_per_param", TARGET_SPEEDUP))
        for k, v in result[metric].items()
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['model']['params'] / 1e6:.0f}M params, {total / 1e9:.2f} GB, "
          f"{len(manifest.buckets)} buckets, {len(shapes)} tensors")
    for k, v in median.items():
        print(f"  {k:10s} {v:7.3f} s  {total / v / 1e9:6.2f} GB/s")
    for k in ours:
        print(f"  {k}: {result['ratio_of_ceiling'][k]:.2f} of the ceiling (target "
              f"{TARGET_CEILING_RATIO}), {result['speedup_vs_per_param'][k]:.2f}x the "
              f"per-parameter loop (target {TARGET_SPEEDUP}x)")
    print(f"  -> {args.out}")
    ray.shutdown()


if __name__ == "__main__":
    main()
