"""The controller: one step of Critique-Post-Edit PPO (method.md section 3) per batch.

`Trainer.step` is the synchronous step, phase by phase; `sample` (3.1-3.6) sits below it.
With `trainer.off_policy_steps=1` the same calls run on the schedule of
`cpe_ray.rl.schedule.OneStepAhead` (the engines sample the next batch while the learner
trains). Plain PPO (post_edit.enabled=false) is the same step without 3.2-3.5.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cpe_ray.algo.advantages import ADVANTAGE_ESTIMATORS, compute_advantages, dimension_metrics
from cpe_ray.algo.experience import Experience, pad_response
from cpe_ray.config import Config
from cpe_ray.data import PromptRecord, batch_order
from cpe_ray.rl import compute
from cpe_ray.rl.compute import StepResult
from cpe_ray.rl.monitor import Monitor, MonitorState, step_measures
from cpe_ray.rl.sampling import PhaseTimer, Rewrites, Sampler, Samples, derive_seed
from cpe_ray.runs.layout import note
from cpe_ray.runtime.judging import JudgeClient
from cpe_ray.runtime.pipeline import Pending, gather
from cpe_ray.runtime.remote import wait_all
from cpe_ray.runtime.start import Runtime
from cpe_ray.tracking import Tracker

MONITOR_FILE = "monitor.json"  # in a checkpoint: the reward-hacking monitor's state


class Trainer:
    def __init__(self, cfg: Config, runtime: Runtime, judge: JudgeClient,
                 records: list[PromptRecord], tracker: Tracker) -> None:
        from cpe_ray.rl.schedule import OneStepAhead

        self.cfg, self.rt, self.records, self.tracker = cfg, runtime, records, tracker
        self.sampler = Sampler(cfg, runtime, judge)
        self.schedule = OneStepAhead(self) if cfg.trainer.off_policy_steps else None
        self.monitor = Monitor(cfg.monitor) if cfg.monitor.enabled else None
        self.built = time.perf_counter()
        self.pad_id = wait_all([runtime.rollouts[0].pad_token_id.remote()],
                               runtime.rollout_labels[:1], cfg.learner.dist_timeout_s,
                               "tokenizer")[0]

    # --- the step (method.md 3) --------------------------------------------------------------
    def step(self, step: int) -> StepResult:
        """One synchronous step: batch `step` sampled and judged, learnt from, synced."""
        t = PhaseTimer()
        s = self.sample(step, forward_originals=True)                         # 3.1-3.6
        with t("learner_forward"):
            exp = self.batch(s)                                               # 3.4
        with t("train"):
            train = self.update(step, s, exp, staleness=0)                    # 3.7
        with t("weight_sync"):
            sync = self.rt.learner.sync_weights()                             # sync
        return self.result(step, s, exp, train | compute.sync_metrics(sync),
                           s.seconds | t.finish(), staleness=0)

    def sample(self, step: int, forward_originals: bool) -> Samples:
        """3.1-3.6 of batch `step` on the engines' current weights. With `forward_originals`
        the learner scores the originals (3.4's pi_old and values) while the engines rewrite:
        only for a batch trained on the learner's current weights."""
        batch, seed, t = self.batch_for(step), derive_seed(self.cfg.run.seed, step), PhaseTimer()
        sampler = self.sampler
        with t("generate"):
            answers = sampler.answer(batch, seed)                             # 3.1
        originals = self.forward(compute.experience(
            self.cfg, answers.prompt_ids, answers.items, [], self.pad_id)) if (
            forward_originals) else {}
        critiques, rewrites = {}, Rewrites()
        if self.cfg.post_edit.enabled:
            with t("critique"):
                critiques = sampler.critique(batch, answers, seed)            # 3.2
            with t("post_edit"):
                rewrites = sampler.rewrite(batch, answers, critiques, seed)   # 3.3
        with t("score"):
            sampler.score(batch, answers, rewrites, seed)                     # 3.6
        with t("select"):
            kept = sampler.select(batch, answers, rewrites, seed)             # 3.5
        s = Samples(answers, critiques, rewrites, kept, t.seconds, originals)
        compute.check_scored(self.cfg, s)
        return s

    # --- 3.4, 3.7 and the step's record --------------------------------------------------------
    def batch(self, s: Samples) -> Experience:
        """3.4: originals and kept rewrites (on their original prompts), with the learner's
        forward: over the kept rewrites appended to the originals' (started by `sample`), or
        over the whole batch."""
        kept = s.kept_rewrites()
        exp = compute.experience(self.cfg, s.answers.prompt_ids, s.answers.items, kept,
                                 self.pad_id)
        if not s.originals_forward:
            return exp.with_fields(**self._wait(self.forward(exp)))
        fields = self._wait(s.originals_forward)
        if kept:
            width = exp.response_width
            rewrites = self._wait(self.forward(compute.experience(
                self.cfg, s.answers.prompt_ids, [], kept, self.pad_id)))
            fields = {name: torch.cat([pad_response(fields[name], width),
                                       pad_response(rewrites[name], width)])
                      for name in fields}
        return exp.with_fields(**fields)

    def update(self, step: int, s: Samples, exp: Experience, staleness: int
               ) -> dict[str, float]:
        """3.7: advantages from the rewards and the learner's forward (and the staleness
        correction when training off-policy), then the learner's PPO update."""
        cfg = self.cfg
        scores, groups = compute.rewards_and_groups(s)
        dims = compute.dimension_scores(cfg, s)  # None unless ppo.reward_aggregation=per_dimension
        exp = compute_advantages(cfg.ppo, exp, _forward_fields(exp), scores, groups, dims)
        metrics = dimension_metrics(cfg.ppo, dims, groups)
        if cfg.trainer.off_policy_steps:
            exp, stale = compute.correct_staleness(cfg, exp, s.answers.items, staleness)
            metrics |= stale
        train = self.rt.learner.train(exp, compute.num_mini_batches(cfg, len(exp)),
                                      derive_seed(cfg.run.seed, step))
        return train | metrics

    def result(self, step: int, s: Samples, exp: Experience, learner: dict[str, float],
               seconds: dict[str, float], staleness: int) -> StepResult:
        """The step's metrics (the learner's and sync's, the batch's, the phases' seconds)
        and its sample records."""
        cfg = self.cfg
        metrics = dict(learner)
        metrics |= compute.batch_metrics(cfg, exp, s, staleness)
        metrics |= compute.reward_metrics(cfg, s)
        metrics |= compute.prompt_fit_metrics(cfg, s)
        metrics |= {f"time/{k}": v for k, v in seconds.items()}
        batch = self.batch_for(step)
        if self.monitor is not None:
            metrics |= step_measures(*compute.monitor_samples(batch, s), cfg.grm.dimensions,
                                     cfg.monitor.persona_terms_min)
        return StepResult(metrics, compute.sample_records(step, batch, s))

    def forward(self, exp: Experience) -> dict[str, Pending]:
        """Start the learner's per-token inputs to the update: old (and reference)
        log-probs, and values when the critic is used."""
        learner = self.rt.learner
        out = {"old_logprobs": learner.submit_logprobs(exp)}
        if self.cfg.learner.use_reference:
            out["ref_logprobs"] = learner.submit_ref_logprobs(exp)
        if ADVANTAGE_ESTIMATORS[self.cfg.ppo.advantage_estimator].needs_critic:
            out["old_values"] = learner.submit_values(exp)
        return out

    def _wait(self, pending: dict[str, Pending]) -> dict[str, torch.Tensor]:
        values = gather(list(pending.values()), self.cfg.learner.dist_timeout_s)
        return dict(zip(pending, values, strict=True))

    # --- the loop ------------------------------------------------------------------------------
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
        result = self.schedule.step(step) if self.schedule is not None else self.step(step)
        metrics = result.metrics
        # wall clock since this process's trainer was built: (T(10) - T(2)) / 8 is the wall
        # seconds a step, whatever overlaps whatever
        metrics["time/elapsed"] = time.perf_counter() - self.built
        if extra is not None:
            metrics.update(extra())
        if self.monitor is not None:
            against_start, warnings = self.monitor.observe(step, metrics)
            metrics |= against_start
            replay = self.tracker.next_step is not None and step < self.tracker.next_step
            for line in warnings if not replay else ():  # a replay was warned about already
                note(line)
        self.tracker.log(step, metrics)
        self.tracker.log_samples(step, result.records)
        return metrics

    # --- what a checkpoint carries besides the learner's state ---------------------------------
    def checkpoint_files(self) -> dict[str, bytes]:
        files = self.schedule.checkpoint_files() if self.schedule is not None else {}
        if self.monitor is not None:
            files[MONITOR_FILE] = json.dumps(self.monitor.state.to_json()).encode()
        return files

    def restore(self, checkpoint: Path | None) -> None:
        """The controller's own state at `checkpoint` (None: the start of the run). A
        checkpoint from before the monitor restarts it: its baseline is then the steps after
        the resume."""
        if self.schedule is not None:
            self.schedule.restore(checkpoint)
        if self.monitor is not None:
            path = checkpoint / MONITOR_FILE if checkpoint is not None else None
            self.monitor.state = (MonitorState.from_json(json.loads(path.read_text()))
                                  if path is not None and path.exists() else MonitorState())


def _forward_fields(exp: Experience) -> dict[str, torch.Tensor]:
    return {name: getattr(exp, name) for name in ("old_logprobs", "ref_logprobs", "old_values")
            if getattr(exp, name) is not None}
