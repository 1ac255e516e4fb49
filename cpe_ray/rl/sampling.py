"""3.1-3.6 of one batch: answers, critiques, rewrites, selection and rewards (method.md 3).

They run as a pipeline over prompt chunks (`cpe_ray.runtime.pipeline`): a chunk's answers
are scored and critiqued as soon as its engine returns them, and its rewrites start as soon
as its critiques are back, while other chunks are still being generated. `random` selection
needs no rewards, so it is drawn before generation and only the answers it keeps are
critiqued and rewritten: the same batch as rewriting all and discarding, at half the cost
at ratio 0.5. Every random choice draws from a sub-seed of (step seed, purpose, chunk), so a
batch is a pure function of its step's seed and the engines' weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cpe_ray.algo.experience import split_even
from cpe_ray.algo.post_edit import EditRequest, RewriteInfo, needs_rewards, select_rewrites
from cpe_ray.config import Config
from cpe_ray.data import PromptRecord
from cpe_ray.engines.base import Completion
from cpe_ray.judges.base import JudgeRequest
from cpe_ray.judges.grm import JudgeOutcome, weighted_reward
from cpe_ray.runtime.judging import JudgeClient
from cpe_ray.runtime.pipeline import Pending, Pipeline
from cpe_ray.runtime.start import Runtime

# Sub-seeds of a step: one independent stream per (purpose, chunk).
ANSWER, CRITIQUE, EDIT, SCORE, SCORE_REWRITE, SELECT = range(6)


def derive_seed(*keys: int) -> int:
    """A 31-bit seed that is a pure function of `keys` (non-negative ints)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0] >> 1)


@dataclass
class Answer:
    prompt: int  # index into the step's batch
    completion: Completion
    judgement: JudgeOutcome | None = None
    reward: float = 0.0


@dataclass
class PromptFits:
    """How many of a step's prompts were over rollout.max_prompt_length, by what was cut
    (summed from the rollout engines' `GenerationBatch`es)."""

    edit_shortened: int = 0  # edit prompts whose answer / critique lost their end
    cut_left: int = 0  # prompts still too long, cut from the start (the persona is lost)
    questions_shortened: int = 0  # answer prompts whose question lost its middle

    def add(self, part) -> None:
        self.edit_shortened += part.shortened
        self.cut_left += part.cut_left
        self.questions_shortened += part.questions_shortened


@dataclass
class Samples:
    """One step's generated and judged samples, indexed by answer (prompt-major)."""

    prompt_ids: list[list[int]]
    answers: list[Answer]
    critiques: dict[int, JudgeOutcome]  # by answer index: the answers chosen for rewriting
    rewrites: dict[int, Answer]  # by answer index
    kept: list[int]  # answer indices whose rewrite joins the batch, ascending
    seconds: dict[str, float]
    prompt_fits: PromptFits = field(default_factory=PromptFits)

    def kept_rewrites(self) -> list[Answer]:
        """The rewrites that join the batch, in answer order (after the originals in 3.4)."""
        return [self.rewrites[k] for k in self.kept]


class Sampler:
    """Samples and judges batches on the rollout engines and the judge."""

    def __init__(self, cfg: Config, runtime: Runtime, judge: JudgeClient) -> None:
        self.cfg, self.rt, self.judge = cfg, runtime, judge

    def collect(self, batch: list[PromptRecord], seed: int, pipe: Pipeline,
                answered_all: Callable[[list[list[int]], list[Answer]], None]) -> Samples:
        """3.1-3.6 on `pipe`; `answered_all(prompt_ids, answers)` runs once every answer is
        in (the caller starts work on the originals there, overlapping the rewrites)."""
        cfg, n = self.cfg, self.cfg.rollout.n_samples_per_prompt
        engines, labels = self.rt.rollouts, self.rt.rollout_labels
        strategy = cfg.post_edit.strategy
        num_answers = len(batch) * n
        to_rewrite = set(range(num_answers)) if cfg.post_edit.enabled else set()
        if to_rewrite and not needs_rewards(strategy):  # 3.5 before 3.2: random needs nothing
            to_rewrite = set(self._select(batch, {}, range(num_answers), seed))
        prompt_ids: list[list[int]] = [[] for _ in batch]
        answers: list[Answer | None] = [None] * num_answers
        critiques: dict[int, JudgeOutcome] = {}
        rewrites: dict[int, Answer] = {}
        chunks = self._chunks(len(batch))
        unanswered = [len(chunks)]
        fits = PromptFits()

        def requests(items: list[int], source: dict[int, Answer] | list) -> list[JudgeRequest]:
            return [JudgeRequest(batch[k // n].persona, batch[k // n].question,
                                 source[k].completion.text) for k in items]

        def score(items: list[int], source, phase: str, key: int, chunk: int) -> None:
            def done(outcomes: list[JudgeOutcome]) -> None:
                for k, outcome in zip(items, outcomes, strict=True):
                    source[k].judgement, source[k].reward = outcome, self._reward(outcome)
            pipe.then(self.judge.submit(requests(items, source), "score",
                                        derive_seed(seed, key, chunk)), phase, done)

        def answered(chunk: int, engine: int, rows: list[int], part) -> None:  # 3.1 done
            fits.add(part)
            items = []
            for r, ids in zip(rows, part.prompt_ids, strict=True):
                prompt_ids[r] = ids
            for c in part.completions:
                k = rows[c.prompt_index] * n + c.sample_index
                answers[k] = Answer(rows[c.prompt_index], c)
                items.append(k)
            score(items, answers, "score", SCORE, chunk)  # 3.6 for the originals
            unanswered[0] -= 1
            if not unanswered[0]:
                answered_all(prompt_ids, answers)
            chosen = [k for k in items if k in to_rewrite]
            if chosen:  # 3.2
                pipe.then(self.judge.submit(requests(chosen, answers), "critique",
                                            derive_seed(seed, CRITIQUE, chunk)), "critique",
                          lambda outcomes: critiqued(chunk, engine, chosen, outcomes))

        def critiqued(chunk: int, engine: int, items: list[int], outcomes) -> None:  # 3.3
            reqs = []
            for k, outcome in zip(items, outcomes, strict=True):
                critiques[k] = outcome
                rec = batch[k // n]
                reqs.append(EditRequest(rec.persona, rec.question, answers[k].completion.text,
                                        outcome.judgement.critique))
            ref = engines[engine].post_edit.remote(reqs, derive_seed(seed, EDIT, chunk))
            pipe.then(Pending.one(ref, labels[engine], "post-edit"), "post_edit",
                      lambda part: rewritten(chunk, items, part))

        def rewritten(chunk: int, items: list[int], part) -> None:
            fits.add(part)
            for k, c in zip(items, part.completions, strict=True):
                rewrites[k] = Answer(k // n, c)
            score(items, rewrites, "score_rewrites", SCORE_REWRITE, chunk)  # 3.6

        for chunk, (engine, rows) in enumerate(chunks):
            ref = engines[engine].answer.remote([(batch[r].persona, batch[r].question)
                                                 for r in rows], derive_seed(seed, ANSWER, chunk))
            pipe.then(Pending.one(ref, labels[engine], "generation"), "generate",
                      lambda part, c=chunk, e=engine, rs=rows: answered(c, e, rs, part))
        pipe.run()
        kept = sorted(rewrites) if not needs_rewards(strategy) else self._select(
            batch, rewrites, sorted(rewrites), seed, answers)
        return Samples(prompt_ids, answers, critiques, rewrites, kept, pipe.spans(), fits)

    def _chunks(self, num_prompts: int) -> list[tuple[int, list[int]]]:
        """(engine, prompt rows) per chunk; chunk j goes to engine j mod the engine count."""
        engines = len(self.rt.rollouts)
        parts = split_even(num_prompts, engines * self.cfg.trainer.chunks_per_engine)
        return [(j % engines, rows) for j, rows in enumerate(parts) if rows]

    def _select(self, batch, rewrites: dict[int, Answer], items, seed: int,
                answers: list[Answer] | None = None) -> list[int]:
        """3.5: answer indices whose rewrite is kept (rewards only for ranking strategies)."""
        n = self.cfg.rollout.n_samples_per_prompt
        items = list(items)
        infos = [RewriteInfo(batch[k // n].id, k,
                             rewrites[k].reward if k in rewrites else None,
                             answers[k].reward if answers is not None else None)
                 for k in items]
        pe = self.cfg.post_edit
        chosen = select_rewrites(pe.strategy, infos, pe.ratio, derive_seed(seed, SELECT),
                                 pe.kept_multiple)
        return [items[i] for i in chosen]

    def _reward(self, outcome: JudgeOutcome) -> float:
        if outcome.reward is not None:  # a scalar judge (grm.backend=bt)
            return outcome.reward
        value = weighted_reward(outcome.judgement, self.cfg.grm.weights, self.cfg.grm.on_missing)
        return 0.0 if value is None else value
