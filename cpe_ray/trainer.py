"""The controller loop: one step of Critique-Post-Edit PPO (method.md section 3) per batch.

    answers   = policy samples n answers per prompt                       (3.1)
    critiques = GRM critiques each answer (critique mode, T = 0.9)        (3.2)
    rewrites  = policy rewrites each answer under the edit prompt, log pi_e (3.3)
    kept      = selection strategy over the rewrites                      (3.5)
    rewards   = GRM scores originals and kept rewrites (score mode)       (3.6)
    batch     = originals + kept rewrites on their ORIGINAL prompts       (3.4)
    update    = advantages, PPO on originals + off-policy loss on rewrites (3.7)
    sync      = learner weights to the rollout engines

Plain PPO (post_edit.enabled=false) is the same loop without critiques and rewrites.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from cpe_ray import algorithms as alg
from cpe_ray.config import Config
from cpe_ray.data import PromptRecord
from cpe_ray.engines.base import Completion
from cpe_ray.experience import Experience, split_even
from cpe_ray.grm import JudgeOutcome, weighted_reward
from cpe_ray.judge import JudgeRequest
from cpe_ray.judge_client import JudgeClient
from cpe_ray.post_edit import EditRequest, RewriteInfo, needs_rewards, select_rewrites
from cpe_ray.remote import wait_all
from cpe_ray.runtime import Runtime
from cpe_ray.tracking import Tracker

SEED_STRIDE = 1_000_003  # separates the seeds of consecutive steps


class PhaseTimer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start


@dataclass
class Answer:
    prompt: int  # index into the step's batch
    completion: Completion
    judgement: JudgeOutcome | None = None
    reward: float = 0.0


def batch_order(num_records: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(num_records))
    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(num_records)]


class Trainer:
    def __init__(self, cfg: Config, runtime: Runtime, judge: JudgeClient,
                 records: list[PromptRecord], tracker: Tracker) -> None:
        self.cfg, self.rt, self.judge, self.records, self.tracker = (
            cfg, runtime, judge, records, tracker)
        self.pad_id = wait_all([runtime.rollouts[0].pad_token_id.remote()],
                               runtime.rollout_labels[:1], cfg.learner.dist_timeout_s,
                               "tokenizer")[0]

    # --- the method's steps --------------------------------------------------------------
    def _over_engines(self, method: str, items: list, seed: int) -> list:
        engines = self.rt.rollouts
        parts = split_even(len(items), len(engines))
        futures = [getattr(e, method).remote([items[i] for i in rows], seed + k)
                   for k, (e, rows) in enumerate(zip(engines, parts, strict=True)) if rows]
        labels = [lbl for lbl, rows in zip(self.rt.rollout_labels, parts, strict=True) if rows]
        return wait_all(futures, labels, self.cfg.learner.dist_timeout_s, method)

    def generate(self, batch: list[PromptRecord], seed: int) -> tuple[list[list[int]],
                                                                      list[Answer]]:
        prompt_ids: list[list[int]] = []
        answers: list[Answer] = []
        for part in self._over_engines("answer", [(r.persona, r.question) for r in batch], seed):
            base = len(prompt_ids)
            prompt_ids.extend(part.prompt_ids)
            answers.extend(Answer(base + c.prompt_index, c) for c in part.completions)
        return prompt_ids, answers

    def rewrite(self, requests: list[EditRequest], seed: int) -> list[Completion]:
        return [c for part in self._over_engines("post_edit", requests, seed)
                for c in part.completions]

    def _reward(self, outcome: JudgeOutcome) -> float:
        value = weighted_reward(outcome.judgement, self.cfg.grm.weights, self.cfg.grm.on_missing)
        return 0.0 if value is None else value

    def _score(self, batch, items: list[Answer], seed: int) -> None:
        reqs = [JudgeRequest(batch[a.prompt].persona, batch[a.prompt].question,
                             a.completion.text) for a in items]
        for a, outcome in zip(items, self.judge.judge(reqs, "score", seed), strict=True):
            a.judgement, a.reward = outcome, self._reward(outcome)

    def step(self, step: int, batch: list[PromptRecord]) -> dict[str, float]:
        cfg, timer = self.cfg, PhaseTimer()
        seed = cfg.run.seed * SEED_STRIDE + step
        with timer("generate"):
            prompt_ids, answers = self.generate(batch, seed)
        rewrites: list[Answer] = []
        critiques: list[JudgeOutcome] = []
        kept: list[int] = []
        if cfg.post_edit.enabled:
            with timer("critique"):
                critiques = self.judge.judge(
                    [JudgeRequest(batch[a.prompt].persona, batch[a.prompt].question,
                                  a.completion.text) for a in answers], "critique", seed)
            with timer("post_edit"):
                reqs = [EditRequest(batch[a.prompt].persona, batch[a.prompt].question,
                                    a.completion.text, c.judgement.critique)
                        for a, c in zip(answers, critiques, strict=True)]
                rewrites = [Answer(a.prompt, c) for a, c in
                            zip(answers, self.rewrite(reqs, seed), strict=True)]
        strategy = cfg.post_edit.strategy
        with timer("score"):
            early = rewrites if rewrites and needs_rewards(strategy) else []
            self._score(batch, answers + early, seed)
            infos = [RewriteInfo(batch[r.prompt].id, k, r.reward if early else None,
                                 answers[k].reward) for k, r in enumerate(rewrites)]
            kept = select_rewrites(strategy, infos, cfg.post_edit.ratio, seed) if rewrites else []
            if rewrites and not early:
                self._score(batch, [rewrites[k] for k in kept], seed + 1)
        rows = answers + [rewrites[k] for k in kept]
        exp = Experience.from_tokens(
            [prompt_ids[a.prompt] for a in rows], [a.completion.token_ids for a in rows],
            self.pad_id, is_edited=[False] * len(answers) + [True] * len(kept),
            edit_logprobs=[[]] * len(answers) + [rewrites[k].completion.logprobs for k in kept],
        )
        scores = torch.tensor([a.reward for a in rows], dtype=torch.float32)
        groups = torch.tensor([a.prompt for a in rows])
        with timer("learner_forward"):
            exp = self.advantages(exp, scores, groups)
        with timer("train"):
            num_mini = cfg.trainer.rollout_batch_size // cfg.ppo.mini_batch_size
            train_metrics = self.rt.learner.train(exp, num_mini, seed)
        with timer("weight_sync"):
            sync = self.rt.learner.sync_weights()
        metrics = dict(train_metrics)
        metrics.update(self._reward_metrics(answers, [rewrites[k] for k in kept], rewrites,
                                            critiques))
        metrics.update({f"time/{k}": v for k, v in timer.seconds.items()})
        metrics.update({"sync/seconds": sync.seconds, "sync/bytes": float(sync.bytes)})
        self._last_samples = self._samples(step, batch, answers, critiques, rewrites, kept)
        return metrics

    def advantages(self, exp: Experience, scores: torch.Tensor, groups: torch.Tensor
                   ) -> Experience:
        ppo, learner = self.cfg.ppo, self.rt.learner
        mask = exp.response_mask
        old = learner.compute_logprobs(exp)
        fields: dict[str, torch.Tensor] = {"old_logprobs": old}
        kl = None
        if self.cfg.learner.use_reference:
            ref = learner.compute_ref_logprobs(exp)
            fields["ref_logprobs"] = ref
            kl = alg.kl_estimate(old, ref, ppo.kl_estimator, mask)
        kl_coef = ppo.kl_coef if ppo.kl_in_reward else 0.0
        if ppo.advantage_estimator == "gae":
            values = learner.compute_values(exp)
            rewards = alg.token_level_rewards(scores, mask, kl, kl_coef)
            adv, returns = alg.gae(rewards, values, mask, ppo.gamma, ppo.lam)
            fields.update(old_values=values, returns=returns)
        else:
            fn = alg.grpo_advantages if ppo.advantage_estimator == "grpo" else (
                alg.rloo_advantages)
            adv = alg.expand_to_tokens(fn(scores, groups), mask)
            if kl is not None and kl_coef > 0:
                adv = adv - kl_coef * kl * mask
            fields["returns"] = adv
        if ppo.whiten_advantages:
            adv = alg.masked_whiten(adv, mask)
        fields["advantages"] = adv * mask
        return exp.with_fields(**fields)

    def _reward_metrics(self, answers, kept, rewrites, critiques) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, items in (("original", answers), ("rewrite", kept)):
            if not items:
                continue
            out[f"reward/{name}/weighted"] = float(np.mean([a.reward for a in items]))
            for dim in self.cfg.grm.dimensions:
                vals = [a.judgement.judgement.scores.get(dim) for a in items]
                vals = [v for v in vals if v is not None]
                if vals:
                    out[f"reward/{name}/{dim}"] = float(np.mean(vals))
            out[f"length/{name}"] = float(np.mean([len(a.completion.token_ids) for a in items]))
        if rewrites:
            out["post_edit/kept_fraction"] = len(kept) / len(rewrites)
        judged = [a.judgement for a in answers + kept] + list(critiques)
        out["grm/parse_failures"] = float(sum(not o.judgement.parsed for o in judged))
        return out

    def _samples(self, step, batch, answers, critiques, rewrites, kept) -> list[dict]:
        kept_set = set(kept)
        out = []
        for k, a in enumerate(answers):
            rec = batch[a.prompt]
            rw = rewrites[k] if rewrites else None
            out.append({
                "step": step, "prompt_id": rec.id, "persona": rec.persona,
                "question": rec.question, "answer": a.completion.text,
                "critique": critiques[k].judgement.critique if critiques else None,
                "rewrite": rw.completion.text if rw else None,
                "answer_reward": a.reward,
                "rewrite_reward": rw.reward if rw is not None and k in kept_set else None,
                "kept": k in kept_set,
            })
        return out

    # --- the loop ----------------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        return len(self.records) // self.cfg.trainer.rollout_batch_size

    def total_steps(self) -> int:
        total = self.steps_per_epoch() * self.cfg.trainer.total_epochs
        limit = self.cfg.trainer.max_steps
        return min(total, limit) if limit is not None else total

    def batch_for(self, step: int) -> list[PromptRecord]:
        """Step `step`'s prompts: a pure function of (seed, step), so a resume can rejoin."""
        per_epoch, size = self.steps_per_epoch(), self.cfg.trainer.rollout_batch_size
        epoch, index = divmod(step, per_epoch)
        order = batch_order(len(self.records), self.cfg.run.seed, epoch, self.cfg.data.shuffle)
        return [self.records[i] for i in order[index * size : (index + 1) * size]]

    def fit_one(self, step: int, progress: bool = True) -> dict[str, float]:
        """Run, log and report one step."""
        metrics = self.step(step, self.batch_for(step))
        self.tracker.log(step, metrics)
        self.tracker.log_samples(step, self._last_samples)
        if progress:
            phases = ", ".join(f"{k[5:]} {v:.1f}s" for k, v in metrics.items()
                               if k.startswith("time/"))
            print(f"step {step + 1}/{self.total_steps()}  reward "
                  f"{metrics.get('reward/original/weighted', 0.0):+.3f}  [{phases}]", flush=True)
        return metrics
