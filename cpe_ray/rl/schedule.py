"""One-step off-policy training (`trainer.off_policy_steps=1`): the same calls as
`Trainer.step`, scheduled so that the engines sample batch k+1 while the learner trains on
batch k. Weights move between batches only: batch k+1 is sampled by the weights of step k-1
(staleness 1), and `compute.correct_staleness` weights its originals by pi_prox / pi_behav.

The batch sampled ahead is this schedule's state; a checkpoint carries it (`inflight.json`),
so a resume trains exactly what an unbroken run would.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cpe_ray.errors import CpeError
from cpe_ray.rl import compute
from cpe_ray.rl.compute import StepResult
from cpe_ray.rl.sampling import PhaseTimer, Samples

INFLIGHT_FILE = "inflight.json"  # in a checkpoint: the batch sampled ahead of its step
OLD_INFLIGHT_FILE = "inflight.pkl"  # what checkpoints before inflight.json held instead


class OneStepAhead:
    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer  # the `cpe_ray.rl.trainer.Trainer` whose calls it schedules
        self.ahead: dict[int, Samples] = {}  # batches sampled ahead of their step, by step

    def step(self, step: int) -> StepResult:
        """Batch `step` (sampled during the previous step, or now when none was) trained
        while the engines sample batch step+1 in a second thread; then the weight sync. The
        schedule ignores trainer.max_steps, so a run stopped there and resumed with a higher
        one trains what an unbroken run would (at the cost of one batch sampled in vain)."""
        tr, t = self.trainer, PhaseTimer()
        s = self.ahead.pop(step, None)
        staleness = int(s is not None)
        if s is None:  # the first step, or the first after a restart
            s = tr.sample(step, forward_originals=True)
        with ThreadPoolExecutor(1, thread_name_prefix="sample-ahead") as pool:
            nxt = (pool.submit(self._sample_ahead, step + 1)
                   if step + 1 < tr.steps_of_data() else None)
            with t("learner_forward"):
                exp = tr.batch(s)
            with t("train"):
                train = tr.update(step, s, exp, staleness)
            if nxt is not None:
                self.ahead[step + 1], t.seconds["generate_next"] = nxt.result()
        with t("weight_sync"):
            sync = tr.rt.learner.sync_weights()
        return tr.result(step, s, exp, train | compute.sync_metrics(sync),
                         s.seconds | t.finish(), staleness)

    def _sample_ahead(self, step: int) -> tuple[Samples, float]:
        start = time.perf_counter()
        s = self.trainer.sample(step, forward_originals=False)
        return s, time.perf_counter() - start

    def checkpoint_files(self) -> dict[str, bytes]:
        """The batches sampled ahead: without them a resume would have to regenerate batch k
        with the weights of step k-1, which no checkpoint holds."""
        if not self.ahead:
            return {}
        data = {str(k): s.to_json() for k, s in self.ahead.items()}
        return {INFLIGHT_FILE: json.dumps(data).encode()}

    def restore(self, checkpoint: Path | None) -> None:
        """The batches in flight at `checkpoint` (none at the start of the run)."""
        self.ahead = {}
        if checkpoint is None:
            return
        path = checkpoint / INFLIGHT_FILE
        if path.exists():
            data = json.loads(path.read_text())
            self.ahead = {int(k): Samples.from_json(v) for k, v in data.items()}
        elif (checkpoint / OLD_INFLIGHT_FILE).exists():
            raise CpeError(
                f"{checkpoint} holds its batch in flight as {OLD_INFLIGHT_FILE}, which this "
                "version no longer reads: resume it with the cpe-ray that wrote it, or resume "
                "from a checkpoint before trainer.off_policy_steps was set")
