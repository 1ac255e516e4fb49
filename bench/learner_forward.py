"""Benchmark: the learner's forward with shared prompts against one plain forward of every row.

Run by hand: `python bench/learner_forward.py [--repeats 5]` writes
`bench/results/learner_forward.json`.

The batch has the CPU default's shape: 8 demo prompts (persona and question under the tiny
model's chat template, about 400 tokens each), 4 answers a prompt and 2 kept rewrites a
prompt on the same prompt, every response 48 random tokens (`rollout.max_new_tokens`). In one
process, on one thread (a learner rank's `cluster.cpus_per_bundle`), it times
`ResponseForward` with `share_prompts` on and off, in micro-batches as the learner cuts them
(`--micro` rows each, a prompt's rows side by side; the default config's
`learner.micro_batch_size` is 4), without gradients (the old log-probs) and with a backward
(a training step's work): the best of `--repeats` of each, their ratio, and the largest
difference between the two paths' outputs. Sharing grows with the micro-batch: a micro-batch
of 4 rows holds about 1.5 prompts, one of 48 the whole batch's 8.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from cpe_ray.algo.experience import Experience, split_even
from cpe_ray.chat import apply_chat_template, build_policy_messages
from cpe_ray.config import load_config
from cpe_ray.data import load_prompts
from cpe_ray.learners.forward import ResponseForward, micro_order
from cpe_ray.models import load_causal_lm, load_tokenizer, resolve_model_path
from cpe_ray.paths import resolve_path

PROMPTS, ANSWERS, REWRITES = 8, 4, 2  # the CPU default: 8 prompts x 4, random 0.5 keeps 2


def batch(cfg, tokenizer) -> Experience:
    records = load_prompts(resolve_path(cfg.data.train_path)).records[:PROMPTS]
    prompts = [apply_chat_template(tokenizer, build_policy_messages(r.persona, r.question))
               for r in records]
    gen = torch.Generator().manual_seed(0)
    width = cfg.rollout.max_new_tokens
    rows = [p for p in prompts for _ in range(ANSWERS)] + [
        p for p in prompts for _ in range(REWRITES)]
    responses = torch.randint(3, tokenizer.vocab_size, (len(rows), width), generator=gen)
    return Experience.from_tokens(rows, responses.tolist(), int(tokenizer.pad_token_id),
                                  temperature=1.0)


def run(model, exp: Experience, share: bool, micro: int, backward: bool) -> torch.Tensor:
    forward = ResponseForward(model, share_prompts=share)
    ordered = exp.select(micro_order(exp))
    outs = []
    for rows in split_even(len(ordered), max(1, -(-len(ordered) // micro))):
        small, _, _ = ordered.select(rows).trimmed()
        if backward:
            logits = forward(small)
            logp = torch.log_softmax(logits, -1).gather(-1, small.responses[..., None])[..., 0]
            (logp * small.response_mask).sum().backward()
            outs.append(logp.detach())
        else:
            with torch.no_grad():
                outs.append(forward(small))
    return outs[0]


def best_of(repeats: int, fn) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--micro", type=int, nargs="+", default=[4, 8, 16, 48],
                        help="micro-batch sizes (rows) to time; the default config's first")
    parser.add_argument("--out", default="bench/results/learner_forward.json")
    args = parser.parse_args()
    cfg = load_config(None, [])
    torch.set_num_threads(max(1, int(cfg.cluster.cpus_per_bundle)))
    path = resolve_model_path(cfg.policy.model_path)
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, cfg.policy.dtype, "cpu", False)
    exp = batch(cfg, tokenizer)
    result: dict = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "threads": torch.get_num_threads()},
        "batch": {"rows": len(exp), "prompt_tokens_mean": float(
            exp.attention_mask[:, : exp.prompt_width].sum(1).float().mean()),
            "response_tokens": exp.response_width,
            "default_micro_batch_size": cfg.learner.micro_batch_size},
        "by_micro_batch_size": {},
    }
    for micro in args.micro:
        timed = result["by_micro_batch_size"][str(micro)] = {}
        for name, backward in (("forward", False), ("forward_backward", True)):
            model.train(backward)
            seconds = {share: best_of(args.repeats, lambda s=share, b=backward, m=micro: (
                model.zero_grad(), run(model, exp, s, m, b))) for share in (False, True)}
            timed[name] = {"plain_s": seconds[False], "shared_s": seconds[True],
                           "speedup": seconds[False] / seconds[True]}
    model.eval()
    with torch.no_grad():
        plain = ResponseForward(model, share_prompts=False)(exp)
        shared = ResponseForward(model, share_prompts=True)(exp)
    result["max_abs_diff_on_responses"] = float(
        (plain - shared).abs()[exp.response_mask.bool()].max())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
