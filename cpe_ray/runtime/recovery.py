"""Fault recovery inside a run: dead engine and learner actors come back, bounded and counted.

A rollout or GRM engine that dies is started again in its own bundle; a rollout engine then
rejoins the weight-sync group (a new group, every engine with it) and receives the learner's
current weights, so it samples exactly what the dead one would have, and the controller redoes
the step from its seeds. A learner rank that dies takes its DeepSpeed group with it: the
whole group is started again in its bundles, loads the newest whole checkpoint of the run (or
the initial weights when there is none) and syncs the engines; the controller then replays
the steps since that checkpoint without logging them again (`cpe_ray.run`). Every step is a
pure function of (weights, seed, step), so redone work produces what the first attempt would
have: the run ends on the weights of a run that never failed. With `trainer.off_policy_steps`
a step spans two batches (the learner trains on one while the engines sample the next), so an
engine fault there rewinds the learner too, and the steps since its checkpoint are replayed.

`Supervisor` bounds restarts (`trainer.max_restarts`); past it, one line names the actor, the
cause and the checkpoint to resume from. Each restart prints one line and is counted in the
metrics `faults/restarts` and `faults/seconds_lost`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpe_ray.errors import CpeError
from cpe_ray.runtime.remote import RemoteError
from cpe_ray.runtime.start import ROLLOUT, Runtime

CAUSE_CHARS = 120  # of Ray's exit detail, in a restart line


class RestartLimitError(CpeError):
    """An actor died after `trainer.max_restarts` restarts were used up."""


@dataclass(frozen=True)
class Fault:
    step: int  # 0-based step during which the actor died
    actor: str
    cause: str
    seconds_lost: float  # the failed attempt and the restart (a learner's replay comes later)


@dataclass(frozen=True)
class Restorable:
    """Where a restarted learner starts: a whole checkpoint and its step (None, 0: the
    initial weights, which a fresh learner rebuilds exactly from its seed)."""

    checkpoint: Path | None = None
    step: int = 0


@dataclass
class Supervisor:
    """Restarts the dead actors of `rt` within `max_restarts`; `log(line)` prints a line."""

    rt: Runtime
    max_restarts: int
    judge_actors: list[Any] | None = None  # the judge client's GRM handles, kept current
    log: Callable[[str], None] = print
    restarts: int = 0  # carried over from the checkpoint resumed from, for the metrics
    seconds_lost: float = 0.0
    faults: list[Fault] = field(default_factory=list)  # this process's; the budget counts them
    restore_point: Restorable = field(default_factory=Restorable)
    step: int = 0  # the step in progress, for faults met inside a weight sync
    # With trainer.off_policy_steps a step spans two batches (the learner trains on one while
    # the engines sample the next), so no point inside it is consistent: an engine fault
    # then also rewinds the learner to the restore point and the steps since are replayed.
    rewind_on_engine_fault: bool = False
    # Called with the restore point's checkpoint (None: the start) once the learner is back,
    # to restore what the controller keeps beside the weights (batches sampled ahead).
    on_rewind: Callable[[Path | None], None] | None = None

    def __post_init__(self) -> None:
        if self.rt.learner is not None:
            self.rt.learner.engine_recovery = self._sync_fault

    def metrics(self) -> dict[str, float]:
        return {"faults/restarts": float(self.restarts),
                "faults/seconds_lost": float(self.seconds_lost)}

    def lose(self, seconds: float) -> None:
        """Time spent redoing work after a restart (a learner's replayed steps)."""
        self.seconds_lost += seconds

    def recoverable(self, err: BaseException) -> bool:
        return isinstance(err, RemoteError) and err.died and (
            self._is_engine(err.actor) or self._is_learner(err.actor))

    def recover(self, err: RemoteError, step: int, began: float) -> int:
        """Restart what `err` says died during `step` (which began at perf_counter `began`);
        the step to go on from: `step` itself after an engine, the restore point's step after
        the learner. Past the budget, or for anything else, one line (raised)."""
        self._charge(err, step)
        engine = self._is_engine(err.actor)
        if engine:
            self._restart_engine(err.actor, sync=not self.rewind_on_engine_fault)
        if engine and not self.rewind_on_engine_fault:
            what, resume = f"started again in its bundle, redoing step {step + 1}", step
        else:
            resume = self._restart_learner()
            where = (f"from {self.restore_point.checkpoint.name}"
                     if self.restore_point.checkpoint is not None else "from its initial weights")
            what = "started again in its bundle; " if engine else ""
            what += f"learner restarted {where}"
            if resume + 1 == step:
                what += f", replaying step {step}"
            elif resume < step:
                what += f", replaying steps {resume + 1}-{step}"
        self._record(Fault(step, err.actor, _cause(err), time.perf_counter() - began), what)
        return resume

    # --- internals ---------------------------------------------------------------------------
    def _is_engine(self, label: str | None) -> bool:
        return label is not None and label in self.rt.slots

    def _is_learner(self, label: str | None) -> bool:
        return (label is not None and self.rt.learner is not None
                and label in self.rt.learner.labels)

    def _charge(self, err: RemoteError, step: int) -> None:
        if len(self.faults) < self.max_restarts:
            return
        raise RestartLimitError(
            f"{err.actor} died ({_cause(err)}) and trainer.max_restarts={self.max_restarts} "
            f"restart(s) are used up") from err

    def _record(self, fault: Fault, what: str) -> None:
        self.faults.append(fault)
        self.restarts += 1
        self.seconds_lost += fault.seconds_lost
        self.log(f"cpe-ray: restart {len(self.faults)}/{self.max_restarts}: {fault.actor} died "
                 f"at step {fault.step + 1} ({fault.cause}); {what}; "
                 f"{fault.seconds_lost:.1f} s lost")

    def _restart_engine(self, label: str, sync: bool = True) -> None:
        """Engine `label` again in its bundle; a rollout engine rejoins weight sync with every
        other engine and (with `sync`) gets the learner's current weights."""
        slot = self.rt.slots[label]
        handle = self.rt.restart_engine(label)
        if slot.kind == ROLLOUT:
            self.rt.manifest = self.rt.learner.connect_engines(self.rt.rollouts,
                                                               self.rt.rollout_labels)
            if sync:
                self.rt.learner.sync_weights()
        elif self.judge_actors is not None:
            self.judge_actors[slot.index] = handle

    def _restart_learner(self) -> int:
        from cpe_ray.runs.checkpoints import restore

        self.rt.start_learner()
        self.rt.learner.engine_recovery = self._sync_fault
        step = 0
        if self.restore_point.checkpoint is not None:
            step, _ = restore(self.rt.learner, self.restore_point.checkpoint)
        self.rt.manifest = self.rt.learner.connect_engines(self.rt.rollouts,
                                                           self.rt.rollout_labels)
        self.rt.learner.sync_weights()
        if self.on_rewind is not None:
            self.on_rewind(self.restore_point.checkpoint)
        return step

    def _sync_fault(self, err: RemoteError) -> None:
        """An engine died inside a weight sync (the learner already updated): restart it; the
        learner group then redoes the sync."""
        began = time.perf_counter()
        self._charge(err, self.step)
        self._restart_engine(err.actor, sync=False)  # the group redoes the sync
        self._record(Fault(self.step, err.actor, _cause(err), time.perf_counter() - began),
                     "started again in its bundle, syncing the weights again")


def _cause(err: RemoteError) -> str:
    """What ended the actor, in a few words: Ray's error type, the process id and its exit
    ("ActorDiedError, pid 123: SYSTEM_ERROR, Worker unexpectedly exits with ..."); for one
    that died in `__init__` (a restart that failed), what `__init__` raised, from `err`'s own
    message ("during start-up: TemplateError: ...")."""
    cause = err.__cause__
    if cause is None:
        return "died"
    # Ray's text for these is the creation task's whole traceback; `wait_all` has its last line
    _, found, raised = str(err).partition(f"{err.actor} died during start-up: ")
    if found:
        return f"during start-up: {raised}"
    text = " ".join(str(cause).split())
    parts = [type(cause).__name__]
    pid = re.search(r"\bpid: (\d+)", text)
    if pid:
        parts[0] += f", pid {pid.group(1)}"
    exit_ = re.search(r"Worker exit type: (\w+) Worker exit detail: ([^.]*)", text)
    if exit_:
        return f"{parts[0]}: {exit_.group(1)}, {exit_.group(2)[:CAUSE_CHARS]}"
    reason = re.search(r"The actor (?:is dead|died) because ([^.]*)", text)
    return f"{parts[0]}: {reason.group(1)[:CAUSE_CHARS]}" if reason else parts[0]
