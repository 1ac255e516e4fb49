"""Fault recovery on a real runtime (local Ray, HF engines, a DeepSpeed gloo rank): a GRM engine
killed by PID is started again in its bundle and judges exactly as the dead one did; a rollout
engine killed before a weight sync is started again inside it and ends with the learner's
weights; the budget is counted and, once used up, a death is one line naming the actor."""

from __future__ import annotations

import os
import signal
import time

import pytest

from cpe_ray.config import load_config

pytestmark = [pytest.mark.usefixtures("local_ray"), pytest.mark.slow]

GRM_ON_TINY = [
    "trainer.rollout_batch_size=2", "ppo.mini_batch_size=1", "rollout.n_samples_per_prompt=2",
    "rollout.max_new_tokens=8", "post_edit.max_new_tokens=8", "learner.micro_batch_size=2",
    "grm.backend=hf", "grm.model_path=tiny", "grm.max_new_tokens=8", "grm.max_retries=0",
    "logging.wandb_mode=disabled",
]
# A sync whose engine died is redone with the engine started again well within this (the
# sync group's own timeout, learner.weight_sync_timeout_s, is 120 s)
SYNC_RECOVERY_LIMIT_S = 60


def _kill(actor_class: str) -> int:
    """SIGKILL the one process of Ray actor class `actor_class` under this test process."""
    from tests.runtime.test_chaos import descendants

    victims = [pid for pid, args in descendants(os.getpid())
               if args.startswith(f"ray::{actor_class}")]
    assert len(victims) == 1, descendants(os.getpid())
    os.kill(victims[0], signal.SIGKILL)
    return victims[0]


def test_dead_engines_come_back_in_their_bundles_and_work_as_before() -> None:
    import ray
    import torch

    from cpe_ray.judges.base import JudgeRequest
    from cpe_ray.runtime.judging import JudgeClient
    from cpe_ray.runtime.recovery import RestartLimitError, Supervisor
    from cpe_ray.runtime.remote import RemoteError
    from cpe_ray.runtime.start import start_runtime

    cfg = load_config(None, GRM_ON_TINY)
    rt = start_runtime(cfg)
    try:
        judge = JudgeClient(cfg, rt.grms, rt.grm_labels)
        lines: list[str] = []
        sup = Supervisor(rt, 2, judge.actors, log=lines.append)
        requests = [JudgeRequest("a cook in Lagos", "What lasts three night shifts?",
                                 "A big pot of jollof rice keeps for days.")]
        before = judge.submit(requests, "critique", 5).wait(120)
        old = rt.grms[0]
        pid = _kill("GRMJudge")
        with pytest.raises(RemoteError) as err:
            judge.submit(requests, "critique", 5).wait(120)
        assert sup.recoverable(err.value) and err.value.actor == "GRM engine 0"
        assert sup.recover(err.value, 3, time.perf_counter()) == 3  # the step is redone
        assert rt.grms[0] is not old and judge.actors[0] is rt.grms[0]
        after = judge.submit(requests, "critique", 5).wait(120)
        assert after[0].judgement.raw == before[0].judgement.raw  # same seed, same text
        assert len(lines) == 1 and lines[0].startswith(
            f"cpe-ray: restart 1/2: GRM engine 0 died at step 4 (ActorDiedError, pid {pid}: ")
        assert "; started again in its bundle, redoing step 4; " in lines[0]
        assert sup.metrics()["faults/restarts"] == 1.0
        assert sup.metrics()["faults/seconds_lost"] > 0
        # a rollout engine that dies in a weight sync: started again inside the sync, which
        # then reaches every engine (the learner's broadcast fails fast on the dead peer)
        sup.step = 6
        _kill("PolicyRollout")
        start = time.monotonic()
        stats = rt.learner.sync_weights()
        assert stats.bytes == rt.manifest.total_bytes
        assert time.monotonic() - start < SYNC_RECOVERY_LIMIT_S
        assert len(lines) == 2 and lines[1].startswith(
            "cpe-ray: restart 2/2: rollout engine 0 died at step 7 (ActorDiedError")
        assert "; started again in its bundle, syncing the weights again; " in lines[1]
        probe = [[1, 2, 3, 4]]
        engine_logits = ray.get(rt.rollouts[0].next_token_logits.remote(probe))
        assert torch.equal(engine_logits, rt.learner.next_token_logits(probe))
        _kill("GRMJudge")  # the budget of two is used: the next death is one line
        with pytest.raises(RemoteError) as err:
            judge.submit(requests, "critique", 5).wait(120)
        with pytest.raises(RestartLimitError, match=r"^GRM engine 0 died \(ActorDiedError, pid "
                                                    r"\d+: .*\) and trainer.max_restarts=2 "
                                                    r"restart\(s\) are used up$"):
            sup.recover(err.value, 5, time.perf_counter())
    finally:
        rt.shutdown()


def test_an_actor_that_dies_in_init_during_a_restart_is_named_by_what_init_raised() -> None:
    """Ray's text for it is the creation task's traceback ("... because of an error raised in
    its creation task, ray::..."); the restart line takes `wait_all`'s last line of it."""
    from ray.exceptions import ActorDiedError, RayTaskError

    from cpe_ray.runtime.recovery import _cause
    from cpe_ray.runtime.remote import RemoteError

    trace = ("Traceback (most recent call last):\n  File \"rollout.py\", line 9, in __init__\n"
             "cpe_ray.errors.TemplateError: prompt template 'x' not found")
    died = ActorDiedError(RayTaskError("PolicyRollout.__init__", trace, ValueError("x")))
    assert died.actor_init_failed
    err = RemoteError("engine restart: rollout engine 0 died during start-up: TemplateError: "
                      "prompt template 'x' not found", "rollout engine 0", died=True)
    err.__cause__ = died
    assert _cause(err) == "during start-up: TemplateError: prompt template 'x' not found"
