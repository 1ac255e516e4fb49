"""What a step computes on the driver without Ray: the batch (3.4), the staleness correction,
the optimiser-step count, and the step's metrics and sample records. Tested on their own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cpe_ray.algo.advantages import DimensionScores, behaviour_weights
from cpe_ray.algo.experience import Experience, pad_response
from cpe_ray.algo.tensors import kl_estimate, masked_mean
from cpe_ray.config import Config
from cpe_ray.data import PromptRecord
from cpe_ray.judges.base import JudgeError
from cpe_ray.rl.monitor import Sample as MonitorSample
from cpe_ray.rl.sampling import Answer, Samples
from cpe_ray.weight_sync.group import SyncStats


@dataclass
class StepResult:
    metrics: dict[str, float]  # the step's metrics, as logged (metrics.jsonl, wandb)
    records: list[dict]  # its samples.jsonl rows


def experience(cfg: Config, prompt_ids: list[list[int]], answers: list[Answer],
               rewrites: list[Answer], pad_id: int) -> Experience:
    """3.4: originals, then rewrites on their ORIGINAL prompts with log pi_e; each row with
    the temperature it was sampled at, which the learner scores it at, and the originals with
    the engine's log-probs (the rollout correction's pi_engine)."""
    rows = answers + rewrites
    temps = ([cfg.rollout.temperature] * len(answers)
             + [cfg.post_edit.temperature] * len(rewrites))
    return Experience.from_tokens(
        [prompt_ids[a.prompt] for a in rows], [a.completion.token_ids for a in rows],
        pad_id, is_edited=[False] * len(answers) + [True] * len(rewrites),
        edit_logprobs=[[]] * len(answers) + [a.completion.logprobs for a in rewrites],
        temperature=temps,
        behaviour_logprobs=[a.completion.logprobs for a in answers] + [[]] * len(rewrites),
    )


def rewards_and_groups(s: Samples) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's scalar reward and its prompt (the group of GRPO / RLOO), originals first."""
    rows = s.answers.items + s.kept_rewrites()
    return (torch.tensor([a.reward for a in rows], dtype=torch.float32),
            torch.tensor([a.prompt for a in rows]))


def dimension_scores(cfg: Config, s: Samples) -> DimensionScores | None:
    """Each row's score in each weighted GRM dimension (rows as `rewards_and_groups`), for
    ppo.reward_aggregation=per_dimension; None under weighted_sum.

    A missing score counts as grm.on_missing says of the scalar reward: zero, 0; none, the
    row's every dimension 0 (its scalar reward is 0); renormalize, the mean of the dimension's
    present scores in the row's group (0 if none), so it moves its group's advantage by nothing.
    """
    if cfg.ppo.reward_aggregation != "per_dimension":
        return None
    g = cfg.grm
    names = tuple(d for d in g.dimensions if d in g.weights)
    rows = s.answers.items + s.kept_rewrites()
    found = [[a.judgement.judgement.scores.get(d) if a.judgement is not None else None
              for d in names] for a in rows]
    if g.on_missing == "none":
        found = [[0.0] * len(names) if None in row else row for row in found]
    present: dict[tuple[int, int], list[float]] = {}  # (prompt, dimension) -> scores
    if g.on_missing == "renormalize":
        for a, row in zip(rows, found, strict=True):
            for d, v in enumerate(row):
                if v is not None:
                    present.setdefault((a.prompt, d), []).append(v)
    fill = {key: sum(vals) / len(vals) for key, vals in present.items()}
    scores = [[fill.get((a.prompt, d), 0.0) if v is None else v for d, v in enumerate(row)]
              for a, row in zip(rows, found, strict=True)]
    return DimensionScores(torch.tensor(scores, dtype=torch.float32).reshape(len(rows), -1),
                           names, torch.tensor([g.weights[d] for d in names]))


def correct_staleness(cfg: Config, exp: Experience, answers: list[Answer], staleness: int
                      ) -> tuple[Experience, dict[str, float]]:
    """Off-policy originals: advantages times min(pi_prox / pi_behav, cap) per token, the
    behaviour policy's log-probs being the engine's (`behaviour_weights`). Rewrites
    keep their own correction, the ratio against log pi_e, which is already taken against
    the distribution that sampled them; fresh batches (staleness 0) get weight 1.

    With ppo.rollout_correction on, the learner weighs every original, stale or fresh, by the
    same ratio (its old log-probs are pi_prox, the engine's pi_behav) and bounds it by that
    section's settings; weighting here too would count it twice (rollout_correction/*)."""
    metrics = {"off_policy/staleness": float(staleness)}
    if cfg.ppo.rollout_correction.mode != "none":
        return exp, metrics
    if not staleness:
        return exp, metrics | {"off_policy/weight_mean": 1.0,
                               "off_policy/weight_clipped_frac": 0.0}
    rows = len(answers)
    mask = exp.response_mask[:rows]
    behaviour = pad_response(torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(a.completion.logprobs, dtype=torch.float32) for a in answers],
        batch_first=True), exp.response_width)
    bw = behaviour_weights(exp.old_logprobs[:rows], behaviour, mask,
                               cfg.trainer.behaviour_weight_cap)
    weights = torch.ones_like(exp.advantages)
    weights[:rows] = torch.where(mask.bool(), bw.weights, torch.ones_like(bw.weights))
    metrics |= {"off_policy/weight_mean": bw.mean,
                "off_policy/weight_clipped_frac": bw.clipped_frac}
    return exp.with_fields(advantages=exp.advantages * weights), metrics


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


def batch_metrics(cfg: Config, exp: Experience, s: Samples, staleness: int
                  ) -> dict[str, float]:
    """How far the policy is from the reference and from the engines, per step."""
    out: dict[str, float] = {}
    if exp.ref_logprobs is not None:
        kl = kl_estimate(exp.old_logprobs, exp.ref_logprobs, cfg.ppo.kl_estimator,
                             exp.response_mask)
        out["policy/ref_kl"] = float(masked_mean(kl, exp.response_mask))
    if not staleness:  # stale answers differ by a step of training, not by noise
        out["rollout/logprob_diff"] = logprob_diff(s.answers.items, exp.old_logprobs)
    return out


def sync_metrics(sync: SyncStats) -> dict[str, float]:
    return {"sync/seconds": sync.seconds, "sync/bytes": float(sync.bytes)}


def reward_metrics(cfg: Config, s: Samples) -> dict[str, float]:
    """Rewards (weighted and per GRM dimension), lengths, the post-edit shares and the
    judge's parse failures and retries."""
    out: dict[str, float] = {}
    answers = s.answers.items
    for name, items in (("original", answers), ("rewrite", s.kept_rewrites())):
        if not items:
            continue
        out[f"reward/{name}/weighted"] = float(np.mean([a.reward for a in items]))
        for dim in cfg.grm.dimensions:
            vals = [a.judgement.judgement.scores.get(dim) for a in items]
            vals = [v for v in vals if v is not None]
            if vals:
                out[f"reward/{name}/{dim}"] = float(np.mean(vals))
        out[f"length/{name}"] = float(np.mean([len(a.completion.token_ids) for a in items]))
    if cfg.post_edit.enabled:
        out["post_edit/kept_fraction"] = len(s.kept) / len(answers)
        out["post_edit/rewritten_fraction"] = len(s.rewrites.items) / len(answers)
    judged = [a.judgement for a in answers + list(s.rewrites.items.values())]
    judged += list(s.critiques.values())
    failures = sum(not o.judgement.parsed for o in judged)
    out["grm/parse_failures"] = float(failures)
    out["grm/parse_failure_frac"] = failures / len(judged)
    out["grm/retries"] = float(sum(o.attempts - 1 for o in judged))  # regenerations
    return out


def check_scored(cfg: Config, s: Samples) -> None:
    """A step whose scores all failed to parse has no reward to learn from: one line, before
    anything is trained on it (unless grm.max_parse_failure_frac=1 accepts every failure)."""
    if cfg.grm.max_parse_failure_frac >= 1:
        return
    scored = [a.judgement for a in s.answers.items + list(s.rewrites.items.values())]
    if scored and not any(o.judgement.parsed for o in scored):
        raw = " ".join(scored[0].judgement.raw.split())[:120]
        raise JudgeError(
            f"the judge's {len(scored)} scores of this step all failed to parse (the first "
            f"read {raw!r}); nothing was trained on it: check the GRM's output format "
            "(cpe-ray grm-parse) or its prompt")


def prompt_fit_metrics(cfg: Config, s: Samples) -> dict[str, float]:
    """Prompts over rollout.max_prompt_length: edit prompts that lost the end of their
    answer / critique, and prompts cut from the start (the persona went with it)."""
    fits = s.prompt_fits
    out = {"rollout/prompts_cut_left": float(fits.cut_left),
           "rollout/questions_shortened": float(fits.questions_shortened)}
    if cfg.post_edit.enabled:
        out["post_edit/truncated_prompts"] = float(fits.edit_shortened)
    return out


def sample_records(step: int, batch: list[PromptRecord], s: Samples) -> list[dict]:
    """`samples.jsonl`'s rows: one per answer, with its critique, rewrite and rewards."""
    kept = set(s.kept)
    out = []
    for k, a in enumerate(s.answers.items):
        rec, rw, crit = batch[a.prompt], s.rewrites.items.get(k), s.critiques.get(k)
        out.append({
            "step": step, "prompt_id": rec.id, "persona": rec.persona,
            "question": rec.question, "answer": a.completion.text,
            "critique": crit.judgement.critique if crit else None,
            "rewrite": rw.completion.text if rw else None,
            "answer_reward": a.reward,
            "rewrite_reward": rw.reward if rw is not None else None,
            "kept": k in kept,
            "answer_scores": _scores(a),
            "answer_tokens": len(a.completion.token_ids),
            "rewrite_scores": _scores(rw) if rw is not None else None,
            "rewrite_tokens": len(rw.completion.token_ids) if rw is not None else None,
        })
    return out


def _scores(a: Answer) -> dict[str, float | None] | None:
    """Its GRM score per dimension (None: missing); None when unjudged (a scalar judge's are
    empty)."""
    return dict(a.judgement.judgement.scores) if a.judgement is not None else None


def monitor_samples(batch: list[PromptRecord], s: Samples
                    ) -> tuple[list[MonitorSample], list[MonitorSample]]:
    """The step's answers and kept rewrites as the reward-hacking monitor reads them."""
    def view(a: Answer, original: int | None = None) -> MonitorSample:
        rec = batch[a.prompt]
        scores = {d: v for d, v in (_scores(a) or {}).items() if v is not None}
        return MonitorSample(a.completion.text, len(a.completion.token_ids), a.reward,
                             scores, rec.persona, rec.question, original)

    return ([view(a) for a in s.answers.items],
            [view(s.rewrites.items[k], k) for k in s.kept])


def step_summary(step: int, total: int, metrics: dict[str, float]) -> str:
    """One line per step: reward of originals (and kept rewrites) and seconds per phase."""
    reward = f"reward {metrics.get('reward/original/weighted', 0.0):+.3f}"
    if "reward/rewrite/weighted" in metrics:
        reward += f" (rewrites {metrics['reward/rewrite/weighted']:+.3f})"
    phases = ", ".join(f"{k[5:]} {v:.1f}s" for k, v in metrics.items()
                       if k.startswith("time/") and k not in ("time/step", "time/elapsed"))
    return (f"step {step + 1}/{total}  {reward}  {metrics.get('time/step', 0.0):.1f}s "
            f"[{phases}]")
