"""`cpe-ray train`: check everything cheap first, then start Ray, the runtime and the loop.

Order: config (already validated), data records (skipped ones listed), what the actors
would need (templates, judge backend, vLLM if named, model paths; the tiny model is built here
if needed: `check_startup`) - each failing with one line before Ray starts - then the run
directory (refused if it holds another run), Ray, the placement and actors, an optional
resume (logs cut back to the checkpoint's step), the loop, checkpoints (by steps and by
minutes, each whole or absent), and a summary of where everything is.

The loop survives its actors: an engine that dies is started again and the step redone; a
learner that dies is started again from the newest whole checkpoint and the steps since are
replayed without being logged again (`cpe_ray.runtime.recovery`). Ctrl-C and SIGTERM stop
the run within seconds with one line; Ray's processes go with it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from cpe_ray.config import Config
from cpe_ray.data import load_prompts
from cpe_ray.errors import (
    ConfigError,
    CpeError,
    RunIOError,
    describe_os_error,
    install_stop_handlers,
    quiet_stop_signals,
    stop_signals,
)
from cpe_ray.judges.base import JudgeError
from cpe_ray.models import resolve_model_path
from cpe_ray.paths import resolve_path
from cpe_ray.runs.checkpoints import (
    SavePolicy,
    checkpoints,
    read_trainer_state,
    restore,
    write_checkpoint,
)
from cpe_ray.runs.layout import POLICY_DIR, note
from cpe_ray.runs.ownership import TRAIN_RUN_KEYS, open_run, release_run
from cpe_ray.runs.ray_join import check_cluster, init_ray, progress_bar
from cpe_ray.runtime.judging import JudgeClient
from cpe_ray.runtime.start import check_startup

SHOWN_PROBLEMS = 3  # skipped data records listed by file:line (the rest counted)
# Tokens a chat template may add around the system and user turns (role markers, a date
# line). With them the system prompt's UTF-8 bytes bound its tokens from above (a token is at
# least one byte): a rollout.max_prompt_length over that fits without loading the tokenizer.
CHAT_TEMPLATE_ALLOWANCE = 128
# Metrics that count prompts over rollout.max_prompt_length (warned about once a run)
TRUNCATION_METRICS = ("rollout/questions_shortened", "rollout/prompts_cut_left",
                      "post_edit/truncated_prompts")
MONITOR_SUMMARY = "monitor_summary.json"  # in the run directory, written at the end of a run


def _load_records(cfg: Config) -> list:
    path = resolve_path(cfg.data.train_path)
    loaded = load_prompts(path, cfg.data.on_bad_record, cfg.data.max_record_bytes)
    if loaded.skipped:
        shown = "; ".join(loaded.problems[:SHOWN_PROBLEMS])
        more = f"; {loaded.skipped - SHOWN_PROBLEMS} more" if (
            loaded.skipped > SHOWN_PROBLEMS) else ""
        note(f"data.on_bad_record=skip: skipped {loaded.skipped} bad record(s) of {path} "
             f"({len(loaded.records)} loaded): {shown}{more}")
    return loaded.records


def train(cfg: Config, progress: bool = True) -> dict:
    with stop_signals():
        check_cluster(cfg)  # first: a wrong address is the cheapest mistake to report
        records = _load_records(cfg)
        if len(records) < cfg.trainer.rollout_batch_size:
            raise ConfigError(f"{cfg.data.train_path} has {len(records)} prompts, fewer than "
                              f"trainer.rollout_batch_size ({cfg.trainer.rollout_batch_size})")
        check_startup(cfg)
        _check_prompt_room(cfg, records)
        run_dir, resume = open_run(cfg, None, cfg.trainer.resume, "trainer.resume",
                                   TRAIN_RUN_KEYS, cfg.trainer.resume_override)
        try:
            return _train_on_ray(cfg, records, run_dir, resume, progress)
        finally:
            release_run(run_dir)


def _check_prompt_room(cfg: Config, records: list) -> None:
    """rollout.max_prompt_length must hold the policy's prompt before its question: the
    system turn with the longest persona (in characters) in the chat template. A shorter
    limit would cut every such prompt from its start, persona and all."""
    from cpe_ray.chat import (
        apply_chat_template,
        build_policy_messages,
        load_policy_system_template,
        system_prompt,
    )
    from cpe_ray.models import load_tokenizer

    template = load_policy_system_template(cfg.policy.system_template)
    persona = max((r.persona for r in records), key=len)
    most = len(system_prompt(template, persona).encode("utf-8")) + CHAT_TEMPLATE_ALLOWANCE
    if cfg.rollout.max_prompt_length >= most:
        return
    tokenizer = load_tokenizer(resolve_model_path(cfg.policy.model_path),
                               cfg.policy.trust_remote_code)
    need = len(apply_chat_template(tokenizer, build_policy_messages(persona, "", template)))
    if cfg.rollout.max_prompt_length < need:
        raise ConfigError(
            f"rollout.max_prompt_length={cfg.rollout.max_prompt_length} cannot hold the "
            f"policy's prompt before its question: {need} tokens (policy.system_template with "
            f"the longest persona of {cfg.data.train_path}, in the chat template); set it to "
            f"at least {need}, plus room for the questions")


def _train_on_ray(cfg: Config, records: list, run_dir: Path, resume: Path | None,
                  progress: bool) -> dict:
    import ray

    from cpe_ray.rl.trainer import Trainer
    from cpe_ray.runtime.recovery import Restorable, Supervisor
    from cpe_ray.runtime.start import start_runtime
    from cpe_ray.tracking import Tracker

    started_ray = False
    rt = tracker = None
    try:
        started_ray = init_ray(cfg)
        install_stop_handlers()  # ray.init replaced the SIGTERM handler
        rt = start_runtime(cfg)
        start, run_id, carried = 0, None, {}
        if resume is not None:
            start, run_id = restore(rt.learner, resume, run_dir)
            carried = read_trainer_state(resume).get("faults") or {}
            rt.learner.sync_weights()  # engines must sample from the restored policy
        tracker = Tracker(cfg, run_dir, run_id, start_step=start)
        if tracker.dropped:
            note(f"cut metrics.jsonl and samples.jsonl back to the checkpoint of step {start} "
                 f"({tracker.dropped} row(s) of later steps dropped)")
        judge = JudgeClient(cfg, rt.grms, rt.grm_labels)
        trainer = Trainer(cfg, rt, judge, records, tracker)
        trainer.restore(resume)
        supervisor = Supervisor(
            rt, cfg.trainer.max_restarts, judge.actors, log=lambda line: print(line, flush=True),
            restarts=int(carried.get("restarts", 0)),
            seconds_lost=float(carried.get("seconds_lost", 0.0)),
            restore_point=Restorable(resume, start),
            rewind_on_engine_fault=cfg.trainer.off_policy_steps > 0,
            on_rewind=trainer.restore)
        loop = Loop(cfg, run_dir, trainer, tracker, supervisor, progress)
        return loop.run(start, resume)
    finally:
        quiet_stop_signals()
        if tracker is not None:
            tracker.finish()
        if rt is not None:
            rt.shutdown()
        if started_ray:
            ray.shutdown()


class Loop:
    """The steps of one `cpe-ray train` process, with checkpoints and fault recovery."""

    def __init__(self, cfg: Config, run_dir: Path, trainer: Any, tracker: Any,
                 supervisor: Any, progress: bool) -> None:
        self.cfg, self.run_dir, self.trainer, self.tracker = cfg, run_dir, trainer, tracker
        self.supervisor, self.progress = supervisor, progress
        self.saver = SavePolicy(cfg.trainer.save_every, cfg.trainer.save_every_minutes)
        self.whole: dict[int, Path] = {}  # checkpoints written (or resumed from), by step
        self.warned_truncation = False
        self.unparsed_steps = 0  # steps in a row over grm.max_parse_failure_frac

    def run(self, start: int, resume: Path | None) -> dict:
        from cpe_ray.rl.compute import step_summary

        if resume is not None:
            self.whole[start] = resume
        total = self.trainer.total_steps()
        bar = progress_bar(total, start, self.cfg.run.name, self.progress)
        last: dict = {}
        step = start
        try:
            while step < total:
                metrics, step = self._one(step, total)
                if metrics is None:
                    continue
                last = metrics
                self._warn_truncation(metrics)
                self._watch_parses(step, metrics)
                if self.progress:
                    bar.write(step_summary(step - 1, total, last))
                    bar.set_postfix(reward=f"{last.get('reward/original/weighted', 0.0):+.3f}")
                bar.update(1)
        except CpeError as exc:  # one line, with where the run can go on from
            exc.args = (self._context(exc, step, total),)
            raise
        finally:
            bar.close()
        newest = self.whole[max(self.whole)] if self.whole else None
        return {"run_dir": str(self.run_dir), "steps": total, "resumed_from": start,
                "last": last, "checkpoint": str(newest) if newest else None,
                "checkpoints": [str(p) for p in checkpoints(self.run_dir)],
                "faults": self.supervisor.metrics(), "monitor": self._sum_up_monitor()}

    def _sum_up_monitor(self) -> str | None:
        """The reward-hacking monitor's summary: `monitor_summary.json` (atomic) and one
        line (None with monitor.enabled=false)."""
        monitor = self.trainer.monitor
        if monitor is None:
            return None
        path = self.run_dir / MONITOR_SUMMARY
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(json.dumps(monitor.summary(), indent=2) + "\n")
            os.replace(tmp, path)
        except OSError as exc:
            raise RunIOError(describe_os_error(exc, "writing", path)) from None
        return monitor.summary_line()

    def _one(self, step: int, total: int) -> tuple[dict | None, int]:
        """Step `step` with its log and checkpoint: (its metrics, the next step); (None, the
        step to go on from) when it was a replay or a fault interrupted it."""
        sup = self.supervisor
        began = time.perf_counter()
        sup.step = step
        replay = self.tracker.next_step is not None and step < self.tracker.next_step
        try:
            metrics = self.trainer.fit_one(step, sup.metrics)
            done = step + 1
            if self.saver.due(done, total) and done not in self.whole:
                self._save(done)
        except CpeError as err:
            if not sup.recoverable(err):
                raise
            return None, sup.recover(err, step, began)
        if replay:
            sup.lose(time.perf_counter() - began)
            return None, step + 1
        return metrics, step + 1

    def _save(self, done: int) -> None:
        sup = self.supervisor
        path = write_checkpoint(
            self.trainer.rt.learner, self.run_dir, done, POLICY_DIR, self.tracker.run_id,
            self.cfg.run.checkpoint_checksums,
            extra={"faults": {"restarts": sup.restarts, "seconds_lost": sup.seconds_lost}},
            files=self.trainer.checkpoint_files())
        from cpe_ray.runtime.recovery import Restorable

        self.whole[done] = path
        sup.restore_point = Restorable(path, done)
        self.saver.saved()

    def _watch_parses(self, done: int, metrics: dict[str, float]) -> None:
        """Warn about a step whose judgements failed to parse past grm.max_parse_failure_frac;
        stop after grm.parse_failure_patience such steps in a row."""
        g = self.cfg.grm
        frac = metrics.get("grm/parse_failure_frac", 0.0)
        self.unparsed_steps = self.unparsed_steps + 1 if frac > g.max_parse_failure_frac else 0
        if not self.unparsed_steps:
            return
        if self.unparsed_steps >= g.parse_failure_patience:
            raise JudgeError(
                f"the judge failed to parse over grm.max_parse_failure_frac="
                f"{g.max_parse_failure_frac:g} of its judgements in steps "
                f"{done - self.unparsed_steps + 1}-{done} (grm.parse_failure_patience="
                f"{g.parse_failure_patience}); check its output format (cpe-ray grm-parse) "
                "or its prompt")
        note(f"warning: step {done}: the judge failed to parse {frac:.0%} of its judgements "
             f"(over grm.max_parse_failure_frac={g.max_parse_failure_frac:g}); the run stops "
             f"after {g.parse_failure_patience} such steps in a row")

    def _warn_truncation(self, metrics: dict[str, float]) -> None:
        counts = {k: int(metrics.get(k, 0)) for k in TRUNCATION_METRICS if metrics.get(k)}
        if counts and not self.warned_truncation:
            self.warned_truncation = True
            what = ", ".join(f"{k} {v}" for k, v in counts.items())
            note(f"warning: prompts over rollout.max_prompt_length="
                 f"{self.cfg.rollout.max_prompt_length} tokens were shortened ({what} in this "
                 "step; counted in those metrics every step, warned about once)")

    def _context(self, exc: BaseException, step: int, total: int) -> str:
        newest = self.whole[max(self.whole)] if self.whole else None
        where = (f"the newest whole checkpoint is {newest}" if newest is not None
                 else "no checkpoint was written yet")
        if newest is not None and "resume with" not in str(exc):
            where += ": resume with trainer.resume=auto"
        return f"{exc} (at step {min(step, total - 1) + 1}/{total}; {where})"
