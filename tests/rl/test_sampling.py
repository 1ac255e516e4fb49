"""3.1-3.6 (`Sampler`) on in-process fakes: phase order, what each phase sends where, under
which sub-seed, and selection; the batch in flight as JSON."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import ray

from actors.rollout import GenerationBatch
from cpe_ray.config import load_config
from cpe_ray.data import PromptRecord
from cpe_ray.engines.base import Completion
from cpe_ray.judges.grm import Judgement, JudgeOutcome
from cpe_ray.rl.sampling import (
    ANSWER,
    CRITIQUE,
    EDIT,
    SCORE,
    SCORE_REWRITE,
    Sampler,
    Samples,
    derive_seed,
)
from cpe_ray.runtime.pipeline import Pending

SEED = 1234


class FakeEngine:
    """A rollout engine whose calls return `ray.put` results and are logged in `calls`."""

    def __init__(self, index: int, n: int, calls: list) -> None:
        self.index, self.n, self.calls = index, n, calls
        self.answer = SimpleNamespace(remote=self._answer)
        self.post_edit = SimpleNamespace(remote=self._post_edit)

    def _answer(self, prompts, seed):
        self.calls.append(("answer", self.index, len(prompts), seed))
        completions = [Completion(p, j, [10 + p, 20 + j], [-0.5, -0.25],
                                  f"e{self.index} {q} #{j}" + "!" * j, "stop")
                       for p, (_, q) in enumerate(prompts) for j in range(self.n)]
        return ray.put(GenerationBatch([[1, p] for p in range(len(prompts))], completions))

    def _post_edit(self, requests, seed):
        self.calls.append(("post_edit", self.index, len(requests), seed))
        completions = [Completion(i, 0, [7], [-1.0], f"better: {r.answer}", "stop")
                       for i, r in enumerate(requests)]
        return ray.put(GenerationBatch([[2]] * len(requests), completions, shortened=1))


class FakeJudge:
    """Scores an answer by its number of '!' (rewrites by that plus 10 times their index in
    the request list); logs (mode, number of requests, seed)."""

    def __init__(self, calls: list) -> None:
        self.calls = calls

    def submit(self, requests, mode, seed) -> Pending:
        self.calls.append((mode, len(requests), seed))
        out = []
        for i, r in enumerate(requests):
            score = r.answer.count("!") + (10 * i if r.answer.startswith("better") else 0)
            out.append(JudgeOutcome(Judgement({"helpfulness": score, "personalization": 0,
                                               "naturalness": 0}, f"critique of {r.answer}",
                                              "", True), 1))
        return Pending.done(out, f"judge {mode}")


def make(local_ray, *overrides: str, engines: int = 1):
    cfg = load_config(None, ["rollout.n_samples_per_prompt=2", *overrides])
    calls: list = []
    runtime = SimpleNamespace(
        rollouts=[FakeEngine(e, 2, calls) for e in range(engines)],
        rollout_labels=[f"rollout engine {e}" for e in range(engines)])
    batch = [PromptRecord(f"q{i}", f"persona {i}", f"question {i}") for i in range(3)]
    return Sampler(cfg, runtime, FakeJudge(calls)), batch, calls


def run_phases(sampler, batch):
    answers = sampler.answer(batch, SEED)
    critiques = sampler.critique(batch, answers, SEED)
    rewrites = sampler.rewrite(batch, answers, critiques, SEED)
    sampler.score(batch, answers, rewrites, SEED)
    kept = sampler.select(batch, answers, rewrites, SEED)
    return Samples(answers, critiques, rewrites, kept, {"generate": 0.25})


def test_random_selection_draws_before_the_critiques(local_ray) -> None:
    sampler, batch, calls = make(local_ray, "post_edit.strategy=random", "post_edit.ratio=0.5")
    s = run_phases(sampler, batch)
    # 3 prompts x 2 answers, prompt-major
    assert [a.prompt for a in s.answers.items] == [0, 0, 1, 1, 2, 2]
    assert [a.completion.sample_index for a in s.answers.items] == [0, 1] * 3
    # ratio 0.5 of 6: 3 answers critiqued, rewritten, scored and kept; no others
    assert len(s.critiques) == 3 and sorted(s.rewrites.items) == s.kept == sorted(s.critiques)
    assert calls == [
        ("answer", 0, 3, derive_seed(SEED, ANSWER, 0)),
        ("critique", 3, derive_seed(SEED, CRITIQUE, 0)),
        ("post_edit", 0, 3, derive_seed(SEED, EDIT, 0)),
        ("score", 6, derive_seed(SEED, SCORE, 0)),
        ("score", 3, derive_seed(SEED, SCORE_REWRITE, 0)),
    ]
    # each rewrite is attached to its original's prompt; rewards are the judge's weighted sum
    for k, rw in s.rewrites.items.items():
        assert rw.prompt == k // 2 and rw.completion.text.startswith("better: ")
    assert [a.reward for a in s.answers.items] == pytest.approx([0.0, 0.35] * 3)
    assert s.prompt_fits.edit_shortened == 1


def test_reward_selection_ranks_rewrites_after_scoring_all(local_ray) -> None:
    sampler, batch, calls = make(local_ray, "post_edit.strategy=batch_reward",
                                 "post_edit.ratio=0.5", "post_edit.kept_multiple=1")
    s = run_phases(sampler, batch)
    assert len(s.critiques) == len(s.rewrites.items) == 6  # every answer rewritten
    # rewrite i of the request list scores 10 i (+ its original's '!'): the last 3 win
    assert s.kept == [3, 4, 5]
    assert [c[0] for c in calls] == ["answer", "critique", "post_edit", "score", "score"]


def test_chunks_go_round_robin_over_engines(local_ray) -> None:
    sampler, batch, calls = make(local_ray, "trainer.chunks_per_engine=2", engines=2)
    s = sampler.answer(batch, SEED)
    # 3 prompts in 4 chunks: the empty one is dropped; chunk j on engine j mod 2
    assert [(c.engine, c.rows) for c in s.chunks] == [(0, [0]), (1, [1]), (0, [2])]
    assert [(name, e, seed) for name, e, _, seed in calls] == [
        ("answer", 0, derive_seed(SEED, ANSWER, 0)), ("answer", 1, derive_seed(SEED, ANSWER, 1)),
        ("answer", 0, derive_seed(SEED, ANSWER, 2))]
    assert [a.completion.text.split()[0] for a in s.items] == ["e0", "e0", "e1", "e1", "e0", "e0"]


def test_a_batch_in_flight_round_trips_through_json(local_ray) -> None:
    sampler, batch, _ = make(local_ray, "post_edit.strategy=reward")
    s = run_phases(sampler, batch)
    back = Samples.from_json(json.loads(json.dumps(s.to_json())))
    assert back == s
    assert back.rewrites.items[1].judgement.judgement.scores["helpfulness"] == (
        s.rewrites.items[1].judgement.judgement.scores["helpfulness"])
