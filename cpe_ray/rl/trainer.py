"""The controller loop: one step of Critique-Post-Edit PPO (method.md section 3) per batch.

    answers   = policy samples n answers per prompt                       (3.1)
    critiques = GRM critiques each answer to rewrite (critique mode, T=0.9) (3.2)
    rewrites  = policy rewrites it under the edit prompt, keeping log pi_e  (3.3)
    kept      = selection strategy over the rewrites                      (3.5)
    rewards   = GRM scores originals and rewrites (score mode, T = 0)     (3.6)
    batch     = originals + kept rewrites on their ORIGINAL prompts       (3.4)
    update    = advantages, PPO on originals + off-policy loss on rewrites (3.7)
    sync      = learner weights to the rollout engines

The first five are `rl/sampling.py`'s, a pipeline over prompt chunks; this module builds the
batch, starts the update, syncs, and runs the loop's bookkeeping (the batch schedule, the
batches sampled ahead with trainer.off_policy_steps, what a checkpoint carries besides the
learner). Plain PPO (post_edit.enabled=false) is the same loop without 3.2-3.5.
"""

from __future__ import annotations

import math
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cpe_ray.algo import algorithms as alg
from cpe_ray.algo.experience import Experience, pad_response
from cpe_ray.config import Config, PPOConfig
from cpe_ray.data import PromptRecord, batch_order

# PromptFits, unused here: checkpoints written before sampling.py split off pickled their
# batches in flight as cpe_ray.rl.trainer.{Samples,Answer,PromptFits}; these names keep them
# loadable
from cpe_ray.rl.sampling import (
    Answer,
    PromptFits,  # noqa: F401
    Sampler,
    Samples,
    derive_seed,
)
from cpe_ray.runtime.judging import JudgeClient
from cpe_ray.runtime.pipeline import Pending, Pipeline
from cpe_ray.runtime.remote import wait_all
from cpe_ray.runtime.start import Runtime
from cpe_ray.tracking import Tracker

INFLIGHT_FILE = "inflight.pkl"  # in a checkpoint: batches sampled ahead of their step


@dataclass
class Update:
    """One step's update in flight: its batch (advantages and the off-policy metrics filled
    in when it is submitted, which for a stale batch is inside a pipeline) and the learner's
    pending result."""

    exp: Experience
    staleness: int  # steps between the weights that sampled the originals and the learner's
    seconds: dict[str, float]
    off_policy: dict[str, float] = field(default_factory=dict)
    training: Pending | None = None
    submitted: float = 0.0  # perf_counter when the update was submitted


class Trainer:
    def __init__(self, cfg: Config, runtime: Runtime, judge: JudgeClient,
                 records: list[PromptRecord], tracker: Tracker) -> None:
        self.cfg, self.rt, self.records, self.tracker = cfg, runtime, records, tracker
        self.sampler = Sampler(cfg, runtime, judge)
        # Batches sampled ahead of their step (trainer.off_policy_steps), by step; a
        # checkpoint carries them so a resume trains exactly what an unbroken run would
        self.inflight: dict[int, Samples] = {}
        self.built = time.perf_counter()
        self.pad_id = wait_all([runtime.rollouts[0].pad_token_id.remote()],
                               runtime.rollout_labels[:1], cfg.learner.dist_timeout_s,
                               "tokenizer")[0]

    # --- 3.4 and 3.7: the batch and the update ---------------------------------------------
    def step(self, step: int, batch: list[PromptRecord]) -> dict[str, float]:
        cfg = self.cfg
        start = time.perf_counter()
        timeout = cfg.learner.dist_timeout_s
        ahead = cfg.trainer.off_policy_steps and step + 1 < self.steps_of_data()
        s = self.inflight.pop(step, None)  # sampled during the previous step's update
        if s is None:
            s, update = self._fresh_update(step, batch)
            if ahead:
                t = time.perf_counter()
                self.inflight[step + 1] = self._sample_ahead(step + 1, Pipeline(timeout))
                update.seconds["generate_next"] = time.perf_counter() - t
        else:
            # The learner's weights now are the proximal policy of this update: its forward
            # over the stale batch runs while the engines, already synced, start the next one
            pipe = Pipeline(timeout)
            update = self._stale_update(step, s, pipe)
            if ahead:
                t = time.perf_counter()
                nxt = self._sample_ahead(step + 1, pipe)
                update.seconds["generate_next"] = time.perf_counter() - t
                update.seconds["learner_forward"] = nxt.seconds.pop("learner_forward")
                self.inflight[step + 1] = nxt
            else:
                pipe.run()
                update.seconds["learner_forward"] = pipe.spans()["learner_forward"]
        train_metrics = update.training.wait(timeout)
        seconds = update.seconds
        seconds["train"] = time.perf_counter() - update.submitted
        t = time.perf_counter()
        sync = self.rt.learner.sync_weights()
        seconds["weight_sync"] = time.perf_counter() - t
        seconds["step"] = time.perf_counter() - start
        exp = update.exp
        metrics = dict(train_metrics)
        if exp.ref_logprobs is not None:  # how far the policy is from the reference
            kl = alg.kl_estimate(exp.old_logprobs, exp.ref_logprobs, cfg.ppo.kl_estimator,
                                 exp.response_mask)
            metrics["policy/ref_kl"] = float(alg.masked_mean(kl, exp.response_mask))
        if not update.staleness:  # stale answers differ by a step of training, not by noise
            metrics["rollout/logprob_diff"] = logprob_diff(s.answers, exp.old_logprobs)
        metrics.update(update.off_policy)
        metrics.update(self._reward_metrics(s))
        metrics.update(self._prompt_fit_metrics(s))
        metrics.update({f"time/{k}": v for k, v in seconds.items()})
        metrics.update({"sync/seconds": sync.seconds, "sync/bytes": float(sync.bytes)})
        self._last_samples = self._samples(step, batch, s)
        return metrics

    def _fresh_update(self, step: int, batch: list[PromptRecord]) -> tuple[Samples, Update]:
        """3.1-3.6 on the engines' current weights, the learner's forward of the originals
        overlapping the rewrites; then the update is started (not waited for)."""
        pipe = Pipeline(self.cfg.learner.dist_timeout_s)
        originals: dict[str, torch.Tensor] = {}

        def forward_originals(prompt_ids, answers) -> None:  # while rewrites are generated
            exp = self._experience(prompt_ids, answers, [])
            for name, pending in self._submit_forward(exp).items():
                pipe.then(pending, "learner_forward",
                          lambda value, key=name: originals.__setitem__(key, value))

        seed = derive_seed(self.cfg.run.seed, step)
        s = self.sampler.collect(batch, seed, pipe, forward_originals)
        kept = s.kept_rewrites()
        exp = self._experience(s.prompt_ids, s.answers, kept)  # 3.4
        t = time.perf_counter()
        fields = self._with_rewrites(exp, originals, s.prompt_ids, kept)
        seconds = dict(s.seconds) | {"learner_forward_rewrites": time.perf_counter() - t}
        update = Update(exp, 0, seconds)
        self._submit_update(step, s, fields, update)
        return s, update

    def _stale_update(self, step: int, s: Samples, pipe: Pipeline) -> Update:
        """A batch sampled ahead: one learner forward over it (originals and kept rewrites)
        registered on `pipe`; the update is submitted from its callback, so it starts as soon
        as the forward is in, whatever else `pipe` is running. Fill `update.seconds
        ["learner_forward"]` from the pipe's spans once it has run."""
        kept = s.kept_rewrites()
        exp = self._experience(s.prompt_ids, s.answers, kept)  # 3.4
        pending = self._submit_forward(exp)
        fields: dict[str, torch.Tensor] = {}
        update = Update(exp, self.cfg.trainer.off_policy_steps, dict(s.seconds))

        def forwarded(name: str, value: torch.Tensor) -> None:
            fields[name] = value
            if len(fields) == len(pending):
                self._submit_update(step, s, fields, update)

        for name, p in pending.items():
            pipe.then(p, "learner_forward", lambda value, key=name: forwarded(key, value))
        return update

    def _submit_update(self, step: int, s: Samples, fields: dict[str, torch.Tensor],
                       update: Update) -> None:
        """3.7: advantages of `update.exp` from the learner's forward `fields` (and the
        staleness correction), then the learner's update, started on the learner and left
        un-waited in `update.training`."""
        cfg = self.cfg
        rows = s.answers + s.kept_rewrites()
        scores = torch.tensor([a.reward for a in rows], dtype=torch.float32)
        groups = torch.tensor([a.prompt for a in rows])
        exp = self.advantages(update.exp, fields, scores, groups)
        if cfg.trainer.off_policy_steps:
            exp, update.off_policy = self._correct_staleness(exp, s.answers, update.staleness)
        update.exp = exp
        update.submitted = time.perf_counter()
        update.training = self.rt.learner.submit_train(
            exp, num_mini_batches(cfg, len(exp)), derive_seed(cfg.run.seed, step))

    def _sample_ahead(self, step: int, pipe: Pipeline) -> Samples:
        """3.1-3.6 of batch `step` on the engines' current weights, while the learner trains;
        its weights reach the engines only after both are done. The schedule ignores
        trainer.max_steps, so a run stopped there and resumed with a higher one trains what
        an unbroken run would (at the cost of one batch sampled in vain)."""
        seed = derive_seed(self.cfg.run.seed, step)
        return self.sampler.collect(self.batch_for(step), seed, pipe, lambda *_: None)

    def _experience(self, prompt_ids: list[list[int]], answers: list[Answer],
                    rewrites: list[Answer]) -> Experience:
        """Originals, then rewrites on their ORIGINAL prompts with log pi_e (3.4); each row
        with the temperature it was sampled at, which the learner scores it at."""
        rows = answers + rewrites
        temps = ([self.cfg.rollout.temperature] * len(answers)
                 + [self.cfg.post_edit.temperature] * len(rewrites))
        return Experience.from_tokens(
            [prompt_ids[a.prompt] for a in rows], [a.completion.token_ids for a in rows],
            self.pad_id, is_edited=[False] * len(answers) + [True] * len(rewrites),
            edit_logprobs=[[]] * len(answers) + [a.completion.logprobs for a in rewrites],
            temperature=temps,
        )

    def _with_rewrites(self, exp: Experience, originals: dict[str, torch.Tensor],
                       prompt_ids: list[list[int]], kept: list[Answer]
                       ) -> dict[str, torch.Tensor]:
        """The learner's forward of the kept rewrites appended to that of the originals, both
        padded to the whole batch `exp`'s response width."""
        if not kept:
            return originals
        timeout = self.cfg.learner.dist_timeout_s
        pending = self._submit_forward(self._experience(prompt_ids, [], kept))
        width = exp.response_width
        return {name: torch.cat([pad_response(originals[name], width),
                                 pad_response(p.wait(timeout), width)])
                for name, p in pending.items()}

    def _correct_staleness(self, exp: Experience, answers: list[Answer], staleness: int
                           ) -> tuple[Experience, dict[str, float]]:
        """Off-policy originals: advantages times min(pi_prox / pi_behav, cap) per token, the
        behaviour policy's log-probs being the engine's (`alg.behaviour_weights`). Rewrites
        keep their own correction, the ratio against log pi_e, which is already taken against
        the distribution that sampled them; fresh batches (staleness 0) get weight 1."""
        metrics = {"off_policy/staleness": float(staleness)}
        if not staleness:
            return exp, metrics | {"off_policy/weight_mean": 1.0,
                                   "off_policy/weight_clipped_frac": 0.0}
        rows = len(answers)
        mask = exp.response_mask[:rows]
        behaviour = pad_response(torch.nn.utils.rnn.pad_sequence(
            [torch.tensor(a.completion.logprobs, dtype=torch.float32) for a in answers],
            batch_first=True), exp.response_width)
        bw = alg.behaviour_weights(exp.old_logprobs[:rows], behaviour, mask,
                                   self.cfg.trainer.behaviour_weight_cap)
        weights = torch.ones_like(exp.advantages)
        weights[:rows] = torch.where(mask.bool(), bw.weights, torch.ones_like(bw.weights))
        metrics |= {"off_policy/weight_mean": bw.mean,
                    "off_policy/weight_clipped_frac": bw.clipped_frac}
        return exp.with_fields(advantages=exp.advantages * weights), metrics

    def _submit_forward(self, exp: Experience) -> dict[str, Pending]:
        """The learner's per-token inputs to the update: old (and reference) log-probs, and
        values when the critic is used."""
        learner = self.rt.learner
        out = {"old_logprobs": learner.submit_per_row("compute_logprobs", exp)}
        if self.cfg.learner.use_reference:
            out["ref_logprobs"] = learner.submit_per_row("compute_ref_logprobs", exp)
        if self.cfg.ppo.advantage_estimator == "gae":
            out["old_values"] = learner.submit_per_row("compute_values", exp)
        return out

    def advantages(self, exp: Experience, forward: dict[str, torch.Tensor],
                   scores: torch.Tensor, groups: torch.Tensor) -> Experience:
        """3.7's targets from the learner's forward (`_submit_forward`'s fields) and rewards."""
        return compute_advantages(self.cfg.ppo, exp, forward, scores, groups)

    def _reward_metrics(self, s: Samples) -> dict[str, float]:
        out: dict[str, float] = {}
        kept = s.kept_rewrites()
        for name, items in (("original", s.answers), ("rewrite", kept)):
            if not items:
                continue
            out[f"reward/{name}/weighted"] = float(np.mean([a.reward for a in items]))
            for dim in self.cfg.grm.dimensions:
                vals = [a.judgement.judgement.scores.get(dim) for a in items]
                vals = [v for v in vals if v is not None]
                if vals:
                    out[f"reward/{name}/{dim}"] = float(np.mean(vals))
            out[f"length/{name}"] = float(np.mean([len(a.completion.token_ids) for a in items]))
        if self.cfg.post_edit.enabled:
            out["post_edit/kept_fraction"] = len(s.kept) / len(s.answers)
            out["post_edit/rewritten_fraction"] = len(s.rewrites) / len(s.answers)
        judged = [a.judgement for a in s.answers + list(s.rewrites.values())]
        judged += list(s.critiques.values())
        out["grm/parse_failures"] = float(sum(not o.judgement.parsed for o in judged))
        out["grm/retries"] = float(sum(o.attempts - 1 for o in judged))  # regenerations
        return out

    def _prompt_fit_metrics(self, s: Samples) -> dict[str, float]:
        """Prompts over rollout.max_prompt_length: edit prompts that lost the end of their
        answer / critique, and prompts cut from the start (the persona went with it)."""
        out = {"rollout/prompts_cut_left": float(s.prompt_fits.cut_left),
               "rollout/questions_shortened": float(s.prompt_fits.questions_shortened)}
        if self.cfg.post_edit.enabled:
            out["post_edit/truncated_prompts"] = float(s.prompt_fits.edit_shortened)
        return out

    def _samples(self, step: int, batch, s: Samples) -> list[dict]:
        kept = set(s.kept)
        out = []
        for k, a in enumerate(s.answers):
            rec, rw, crit = batch[a.prompt], s.rewrites.get(k), s.critiques.get(k)
            out.append({
                "step": step, "prompt_id": rec.id, "persona": rec.persona,
                "question": rec.question, "answer": a.completion.text,
                "critique": crit.judgement.critique if crit else None,
                "rewrite": rw.completion.text if rw else None,
                "answer_reward": a.reward,
                "rewrite_reward": rw.reward if rw is not None else None,
                "kept": k in kept,
            })
        return out

    # --- what a checkpoint carries besides the learner's state ---------------------------------
    def checkpoint_files(self) -> dict[str, bytes]:
        """The batches sampled ahead (off-policy): without them a resume would have to
        regenerate batch k with the weights of step k-1, which no checkpoint holds."""
        return {INFLIGHT_FILE: pickle.dumps(self.inflight)} if self.inflight else {}

    def restore_files(self, checkpoint: Path) -> None:
        path = checkpoint / INFLIGHT_FILE
        self.inflight = pickle.loads(path.read_bytes()) if path.exists() else {}

    # --- the loop ----------------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        return len(self.records) // self.cfg.trainer.rollout_batch_size

    def steps_of_data(self) -> int:
        """Steps in trainer.total_epochs passes over the prompts, whatever max_steps says."""
        return self.steps_per_epoch() * self.cfg.trainer.total_epochs

    def total_steps(self) -> int:
        total = self.steps_of_data()
        limit = self.cfg.trainer.max_steps
        return min(total, limit) if limit is not None else total

    def batch_for(self, step: int) -> list[PromptRecord]:
        """Step `step`'s prompts: a pure function of (seed, step), so a resume can rejoin."""
        per_epoch, size = self.steps_per_epoch(), self.cfg.trainer.rollout_batch_size
        epoch, index = divmod(step, per_epoch)
        order = batch_order(len(self.records), self.cfg.run.seed, epoch, self.cfg.data.shuffle)
        return [self.records[i] for i in order[index * size : (index + 1) * size]]

    def fit_one(self, step: int, extra: Callable[[], dict[str, float]] | None = None
                ) -> dict[str, float]:
        """Run and log one step (with `extra()`'s metrics: the run's fault counters)."""
        metrics = self.step(step, self.batch_for(step))
        # wall clock since this process's trainer was built: (T(10) - T(2)) / 8 is the wall
        # seconds a step, whatever overlaps whatever
        metrics["time/elapsed"] = time.perf_counter() - self.built
        if extra is not None:
            metrics.update(extra())
        self.tracker.log(step, metrics)
        self.tracker.log_samples(step, self._last_samples)
        return metrics


def num_mini_batches(cfg: Config, num_rows: int) -> int:
    """Optimiser steps (equal mini-batches) for a step's batch of `num_rows` rows.

    ppo.mini_batch_unit=prompts: rollout_batch_size / mini_batch_size, rewrites or not.
    rows: mini_batch_size x n rows a step, verl's accounting and the release's, so kept
    rewrites add steps: 512 answers + 256 rewrites at 64 x 4 rows a step make 3. verl cuts
    the last step short (512 + 48 rows: 256, 256, 48); equal steps (187, 187, 186) are as many
    and weigh every row alike.
    """
    ppo = cfg.ppo
    if ppo.mini_batch_unit == "prompts":
        return cfg.trainer.rollout_batch_size // ppo.mini_batch_size
    return math.ceil(num_rows / (ppo.mini_batch_size * cfg.rollout.n_samples_per_prompt))


def compute_advantages(ppo: PPOConfig, exp: Experience, forward: dict[str, torch.Tensor],
                       scores: torch.Tensor, groups: torch.Tensor) -> Experience:
    """3.7's targets: advantages and returns from the learner's forward and the rewards.

    `ppo.whiten_advantages` whitens GAE's advantages over the batch's tokens. GRPO / RLOO
    advantages are left as their group made them: whitening them over tokens weights each
    answer by its length, so with lengths [40, 2, 3, 4] and rewards [2, 0.6, 0, -0.4] the
    0.6 answer (above its group's mean) would get -1.25 instead of +0.05.
    """
    mask = exp.response_mask
    fields = dict(forward)
    kl = None
    if "ref_logprobs" in fields:
        kl = alg.kl_estimate(fields["old_logprobs"], fields["ref_logprobs"], ppo.kl_estimator,
                             mask)
    kl_coef = ppo.kl_coef if ppo.kl_in_reward else 0.0
    if ppo.advantage_estimator == "gae":
        rewards = alg.token_level_rewards(scores, mask, kl, kl_coef)
        adv, returns = alg.gae(rewards, fields["old_values"], mask, ppo.gamma, ppo.lam)
        fields["returns"] = returns
        if ppo.whiten_advantages:
            adv = alg.masked_whiten(adv, mask)
    else:
        fn = alg.grpo_advantages if ppo.advantage_estimator == "grpo" else alg.rloo_advantages
        adv = alg.expand_to_tokens(fn(scores, groups), mask)
        if kl is not None and kl_coef > 0:
            adv = adv - kl_coef * kl * mask
        fields["returns"] = adv
    fields["advantages"] = adv * mask
    return exp.with_fields(**fields)


def logprob_diff(answers: list[Answer], old_logprobs: torch.Tensor) -> float:
    """Mean |engine log-prob - learner log-prob| over the originals' tokens (the first rows of
    `old_logprobs`, response-aligned). Both score the same tokens with the weights the
    engines were synced to, so this sits at the numerical noise of the two implementations
    (about 1e-6 for the HF engine, 1e-4 for vLLM on a CPU); a jump means a sync went wrong.
    With rollout.top_p < 1 it also holds the nucleus's renormalisation, which the engine's
    log-probs include and the learner's do not (at most -log top_p a token: 0.105 at 0.9)."""
    total, count = 0.0, 0
    for row, a in enumerate(answers):
        engine = torch.tensor(a.completion.logprobs, dtype=torch.float32)
        total += float((engine - old_logprobs[row, : len(engine)].float()).abs().sum())
        count += len(engine)
    return total / max(count, 1)


def step_summary(step: int, total: int, metrics: dict[str, float]) -> str:
    """One line per step: reward of originals (and kept rewrites) and seconds per phase."""
    reward = f"reward {metrics.get('reward/original/weighted', 0.0):+.3f}"
    if "reward/rewrite/weighted" in metrics:
        reward += f" (rewrites {metrics['reward/rewrite/weighted']:+.3f})"
    phases = ", ".join(f"{k[5:]} {v:.1f}s" for k, v in metrics.items()
                       if k.startswith("time/") and k not in ("time/step", "time/elapsed"))
    return (f"step {step + 1}/{total}  {reward}  {metrics.get('time/step', 0.0):.1f}s "
            f"[{phases}]")
