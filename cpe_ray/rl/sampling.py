"""3.1-3.6 of one batch, one method per phase: answer, critique, rewrite, score, select.

A batch's prompts are cut into chunks, chunk j on rollout engine j mod the engine count
(`trainer.chunks_per_engine` chunks an engine); each phase submits every chunk's work at once
(engines and GRM actors work in parallel) and returns when all of it is in. `random`
selection needs no rewards, so it is drawn before 3.2 and only the answers it keeps are
critiqued and rewritten: the same batch as rewriting all and discarding, at half the cost at
ratio 0.5. Every random choice draws from a sub-seed of (step seed, purpose, chunk), so a
batch is a pure function of its step's seed and the engines' weights, whatever finishes
first.

A batch sampled ahead of its step (`trainer.off_policy_steps`) is carried by checkpoints as
JSON (`Samples.to_json` / `from_json`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from cpe_ray.algo.experience import split_even
from cpe_ray.algo.post_edit import EditRequest, RewriteInfo, needs_rewards, select_rewrites
from cpe_ray.config import Config
from cpe_ray.data import PromptRecord
from cpe_ray.engines.base import Completion
from cpe_ray.judges.base import JudgeRequest
from cpe_ray.judges.grm import Judgement, JudgeOutcome, weighted_reward
from cpe_ray.runtime.judging import JudgeClient
from cpe_ray.runtime.pipeline import Pending, gather
from cpe_ray.runtime.start import Runtime

# Sub-seeds of a step: one independent stream per (purpose, chunk).
ANSWER, CRITIQUE, EDIT, SCORE, SCORE_REWRITE, SELECT = range(6)


def derive_seed(*keys: int) -> int:
    """A 31-bit seed that is a pure function of `keys` (non-negative ints)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0] >> 1)


class PhaseTimer:
    """Wall seconds per named phase (`with timer("generate"): ...`), summed over uses."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def finish(self) -> dict[str, float]:
        """The phases' seconds and, as "step", the seconds since the timer was made."""
        return self.seconds | {"step": time.perf_counter() - self.started}


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

    edit_shortened: int = 0  # edit prompts whose question, answer or critique was cut
    cut_left: int = 0  # prompts still too long, cut from the start (the persona is lost)
    questions_shortened: int = 0  # answer prompts whose question lost its middle

    def add(self, part: Any) -> None:
        self.edit_shortened += part.shortened
        self.cut_left += part.cut_left
        self.questions_shortened += part.questions_shortened

    def __add__(self, other: PromptFits) -> PromptFits:
        return PromptFits(self.edit_shortened + other.edit_shortened,
                          self.cut_left + other.cut_left,
                          self.questions_shortened + other.questions_shortened)


@dataclass
class Chunk:
    engine: int  # index into the runtime's rollout engines
    rows: list[int]  # the batch's prompt rows it holds
    answers: list[int] = field(default_factory=list)  # its answer indices, as generated


@dataclass
class Answers:
    """3.1's output: n answers a prompt, indexed prompt-major (answer k is sample k mod n of
    prompt k // n), with each prompt's token ids and the chunks that generated them."""

    prompt_ids: list[list[int]]
    items: list[Answer]
    chunks: list[Chunk]
    fits: PromptFits = field(default_factory=PromptFits)


@dataclass
class Rewrites:
    """3.3's output: one rewrite per critiqued answer, by answer index."""

    items: dict[int, Answer] = field(default_factory=dict)
    fits: PromptFits = field(default_factory=PromptFits)


@dataclass
class Samples:
    """One step's generated and judged samples: 3.1-3.6 of its batch."""

    answers: Answers
    critiques: dict[int, JudgeOutcome]  # by answer index: the answers chosen for rewriting
    rewrites: Rewrites
    kept: list[int]  # answer indices whose rewrite joins the batch, ascending
    seconds: dict[str, float]  # the sampling phases' wall seconds
    # the learner's forward of the originals, when started during sampling (in-process only)
    originals_forward: dict[str, Pending] = field(default_factory=dict)

    @property
    def prompt_fits(self) -> PromptFits:
        return self.answers.fits + self.rewrites.fits

    def kept_rewrites(self) -> list[Answer]:
        """The rewrites that join the batch, in answer order (after the originals in 3.4)."""
        return [self.rewrites.items[k] for k in self.kept]

    def to_json(self) -> dict[str, Any]:
        """Plain data (lists, dicts, numbers, strings) that `from_json` rebuilds exactly;
        a forward in flight is not carried."""
        return asdict(replace(self, originals_forward={}))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Samples:
        a, r = data["answers"], data["rewrites"]
        answers = Answers(a["prompt_ids"], [_answer(x) for x in a["items"]],
                          [Chunk(**c) for c in a["chunks"]], PromptFits(**a["fits"]))
        rewrites = Rewrites({int(k): _answer(x) for k, x in r["items"].items()},
                            PromptFits(**r["fits"]))
        critiques = {int(k): _outcome(x) for k, x in data["critiques"].items()}
        return cls(answers, critiques, rewrites, list(data["kept"]), dict(data["seconds"]))


def _outcome(data: dict[str, Any]) -> JudgeOutcome:
    j = dict(data["judgement"])
    j["warnings"] = tuple(j.get("warnings", ()))
    return JudgeOutcome(Judgement(**j), data["attempts"], data["reward"])


def _answer(data: dict[str, Any]) -> Answer:
    outcome = data["judgement"]
    return Answer(data["prompt"], Completion(**data["completion"]),
                  _outcome(outcome) if outcome is not None else None, data["reward"])


class Sampler:
    """The phases 3.1-3.6 on the rollout engines and the judge."""

    def __init__(self, cfg: Config, runtime: Runtime, judge: JudgeClient) -> None:
        self.cfg, self.rt, self.judge = cfg, runtime, judge
        self.n = cfg.rollout.n_samples_per_prompt
        self.timeout = cfg.learner.dist_timeout_s

    def answer(self, batch: list[PromptRecord], seed: int) -> Answers:
        """3.1: n answers per prompt from the policy."""
        engines, labels = self.rt.rollouts, self.rt.rollout_labels
        chunks = self._chunks(len(batch))
        parts = gather([Pending.one(engines[c.engine].answer.remote(
            [(batch[r].persona, batch[r].question) for r in c.rows],
            derive_seed(seed, ANSWER, j)), labels[c.engine], "generation")
            for j, c in enumerate(chunks)], self.timeout)
        out = Answers([[] for _ in batch], [None] * (len(batch) * self.n), chunks)  # type: ignore[list-item]
        for chunk, part in zip(chunks, parts, strict=True):
            out.fits.add(part)
            for r, ids in zip(chunk.rows, part.prompt_ids, strict=True):
                out.prompt_ids[r] = ids
            for c in part.completions:
                k = chunk.rows[c.prompt_index] * self.n + c.sample_index
                out.items[k] = Answer(chunk.rows[c.prompt_index], c)
                chunk.answers.append(k)
        return out

    def critique(self, batch: list[PromptRecord], answers: Answers, seed: int
                 ) -> dict[int, JudgeOutcome]:
        """3.2: the GRM's critiques (critique mode) of the answers to rewrite: all of them,
        or under `random` selection only those it draws now (3.5 needs no rewards there)."""
        num = len(answers.items)
        chosen = set(range(num))
        if not needs_rewards(self.cfg.post_edit.strategy):
            chosen = set(self._select(batch, {}, range(num), seed))
        per_chunk = [(j, [k for k in c.answers if k in chosen])
                     for j, c in enumerate(answers.chunks)]
        per_chunk = [(j, items) for j, items in per_chunk if items]
        outcomes = self._judged([self.judge.submit(
            self._requests(batch, items, answers.items), "critique",
            derive_seed(seed, CRITIQUE, j)) for j, items in per_chunk])
        return {k: o for (_, items), part in zip(per_chunk, outcomes, strict=True)
                for k, o in zip(items, part, strict=True)}

    def rewrite(self, batch: list[PromptRecord], answers: Answers,
                critiques: dict[int, JudgeOutcome], seed: int) -> Rewrites:
        """3.3: each critiqued answer rewritten by the policy under the edit prompt, on the
        engine that wrote it; the completion keeps its log pi_e."""
        engines, labels = self.rt.rollouts, self.rt.rollout_labels
        per_chunk = [(j, c, [k for k in c.answers if k in critiques])
                     for j, c in enumerate(answers.chunks)]
        per_chunk = [item for item in per_chunk if item[2]]
        requests = [[EditRequest(batch[k // self.n].persona, batch[k // self.n].question,
                                 answers.items[k].completion.text,
                                 critiques[k].judgement.critique) for k in items]
                    for _, _, items in per_chunk]
        parts = gather([Pending.one(engines[c.engine].post_edit.remote(
            reqs, derive_seed(seed, EDIT, j)), labels[c.engine], "post-edit")
            for (j, c, _), reqs in zip(per_chunk, requests, strict=True)], self.timeout)
        out = Rewrites()
        for (_, _, items), part in zip(per_chunk, parts, strict=True):
            out.fits.add(part)
            for k, c in zip(items, part.completions, strict=True):
                out.items[k] = Answer(k // self.n, c)
        return out

    def score(self, batch: list[PromptRecord], answers: Answers, rewrites: Rewrites,
              seed: int) -> None:
        """3.6: the GRM's scores (score mode, T = 0) of every answer and every rewrite, and
        the weighted reward of each, set on the `Answer`s."""
        jobs: list[tuple[list[int], dict[int, Answer] | list[Answer], Pending]] = []
        for j, chunk in enumerate(answers.chunks):
            for items, source, key in (
                    (chunk.answers, answers.items, SCORE),
                    ([k for k in chunk.answers if k in rewrites.items], rewrites.items,
                     SCORE_REWRITE)):
                if items:
                    jobs.append((items, source, self.judge.submit(
                        self._requests(batch, items, source), "score",
                        derive_seed(seed, key, j))))
        outcomes = self._judged([p for _, _, p in jobs])
        for (items, source, _), part in zip(jobs, outcomes, strict=True):
            for k, outcome in zip(items, part, strict=True):
                source[k].judgement, source[k].reward = outcome, self._reward(outcome)

    def select(self, batch: list[PromptRecord], answers: Answers, rewrites: Rewrites,
               seed: int) -> list[int]:
        """3.5: the answer indices whose rewrite joins the batch. `random` drew its choice
        before 3.2 and keeps every rewrite; the ranking strategies rank by 3.6's rewards."""
        done = sorted(rewrites.items)
        if not needs_rewards(self.cfg.post_edit.strategy):
            return done
        return self._select(batch, rewrites.items, done, seed, answers.items)

    def _judged(self, pendings: list[Pending]) -> list[list[JudgeOutcome]]:
        """The judge's outcomes: a judge that answers nothing within grm.judge_timeout_s
        stops the run."""
        return gather(pendings, self.cfg.grm.judge_timeout_s, "grm.judge_timeout_s")

    def _requests(self, batch: list[PromptRecord], items: list[int],
                  source: dict[int, Answer] | list[Answer]) -> list[JudgeRequest]:
        return [JudgeRequest(batch[k // self.n].persona, batch[k // self.n].question,
                             source[k].completion.text) for k in items]

    def _chunks(self, num_prompts: int) -> list[Chunk]:
        """Chunk j goes to engine j mod the engine count."""
        engines = len(self.rt.rollouts)
        parts = split_even(num_prompts, engines * self.cfg.trainer.chunks_per_engine)
        return [Chunk(j % engines, rows) for j, rows in enumerate(parts) if rows]

    def _select(self, batch: list[PromptRecord], rewrites: dict[int, Answer], items,
                seed: int, answers: list[Answer] | None = None) -> list[int]:
        """The selection strategy over `items` (rewards only for ranking strategies)."""
        items = list(items)
        infos = [RewriteInfo(batch[k // self.n].id, k,
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
