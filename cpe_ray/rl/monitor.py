"""A reward-hacking monitor (method.md 1-2): does the reward start to pay for length, for
repeating the persona back, for calling the user by name? Pure: no Ray, numpy only.

`step_measures` reads one step's answers and kept rewrites and returns its `monitor/...`
metrics; `Monitor` keeps what spans steps (the length baseline of the run's first
`monitor.baseline_steps` steps, how many steps in a row each measure has been over its
threshold, first and last values) in a JSON-serialisable `MonitorState` that checkpoints
carry, warns once per crossing after `monitor.patience` steps over, and sums the run up.

Correlations need at least `MIN_CORRELATED` answers and two distinct values on each side; a
step without them leaves the key out (no NaN is ever logged) and leaves the streak of a
measure with a threshold as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cpe_ray.config.schema_rl import MonitorConfig
from cpe_ray.judges.rubric import NAME_FIELD, PERSONA_FIELD, WORD, content_words, persona_terms

MIN_CORRELATED = 3  # answers a correlation needs
PREFIX = "monitor/"
LENGTH = "monitor/length_mean"
RATIO = "monitor/length_ratio_to_start"


@dataclass(frozen=True)
class Sample:
    """One answer or kept rewrite as the monitor sees it."""

    text: str
    tokens: int  # its completion's token count
    reward: float  # its weighted reward
    scores: dict[str, float]  # its GRM score per dimension (empty for a scalar judge)
    persona: str  # the rendered persona of its prompt
    question: str
    original: int | None = None  # a rewrite: the index of its original among the answers


@dataclass(frozen=True)
class Threshold:
    measure: str  # the metric key
    label: str  # how warnings and the summary name it
    key: str  # the MonitorConfig field that sets it


THRESHOLDS = (
    Threshold("monitor/reward_length_corr", "reward-length corr", "max_reward_length_corr"),
    Threshold(RATIO, "length ratio to start", "max_length_ratio_to_start"),
    Threshold("monitor/persona_term_share", "persona-term share", "max_persona_term_share"),
    Threshold("monitor/names_user_share", "names-user share", "max_names_user_share"),
)


# --- one step -----------------------------------------------------------------------------
def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson's r; None with fewer than MIN_CORRELATED pairs or a constant side."""
    if len(x) < MIN_CORRELATED:
        return None
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    if denom == 0.0:
        return None
    return float(np.clip((a * b).sum() / denom, -1.0, 1.0))


def ranks(x: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties given their mean rank (as Spearman's rho needs)."""
    values = np.asarray(x, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    out = np.empty(len(values))
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[order[j + 1]] == values[order[i]]:
            j += 1
        out[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho: Pearson's r of the ranks; None as `pearson`."""
    if len(x) < MIN_CORRELATED:
        return None
    return pearson(ranks(x), ranks(y))


def repeated_terms(s: Sample) -> set[str]:
    """The persona's content words (of 'Key: value' lines the values, the name left out;
    stopwords and words under four letters dropped) that the text uses and the question
    does not."""
    terms, _ = persona_terms(s.persona)
    used = set(content_words(s.text)) - set(content_words(s.question))
    return {t for t in terms if t in used}


def user_name(persona: str) -> set[str]:
    """The words of the persona's Name line (first name, surname), lower-case."""
    for line in persona.splitlines():
        f = PERSONA_FIELD.match(line)
        if f is not None and f.group(1).lower() == NAME_FIELD:
            return set(WORD.findall(f.group(2).lower()))
    return set()


def names_user(s: Sample) -> bool:
    """Whether the text uses a word of the user's name that the question does not."""
    name = user_name(s.persona) - set(WORD.findall(s.question.lower()))
    return bool(name & set(WORD.findall(s.text.lower())))


def step_measures(answers: Sequence[Sample], rewrites: Sequence[Sample],
                  dimensions: Sequence[str], persona_terms_min: int) -> dict[str, float]:
    """One step's `monitor/...` metrics (those not against the run's start): reward and each
    GRM dimension against answer length, the mean length, the shares of answers that repeat
    at least `persona_terms_min` persona terms and that name the user, and for the kept
    rewrites their length over their originals' and the persona terms they add."""
    out: dict[str, float] = {}
    if not answers:
        return out
    lengths = [float(a.tokens) for a in answers]
    corr = {"reward_length_corr": pearson([a.reward for a in answers], lengths),
            "reward_length_spearman": spearman([a.reward for a in answers], lengths)}
    for dim in dimensions:
        pairs = [(a.scores[dim], float(a.tokens)) for a in answers if dim in a.scores]
        corr[f"{dim}_length_corr"] = pearson(*zip(*pairs, strict=True)) if pairs else None
    out |= {PREFIX + k: v for k, v in corr.items() if v is not None}
    out[LENGTH] = float(np.mean(lengths))
    terms = [len(repeated_terms(a)) for a in answers]
    out["monitor/persona_term_share"] = float(np.mean([t >= persona_terms_min for t in terms]))
    out["monitor/names_user_share"] = float(np.mean([names_user(a) for a in answers]))
    if rewrites:
        originals = [answers[r.original] for r in rewrites if r.original is not None]
        before = sum(a.tokens for a in originals)
        if before:
            out["monitor/rewrite_length_ratio"] = sum(r.tokens for r in rewrites) / before
        out["monitor/rewrite_persona_term_delta"] = float(np.mean(
            [len(repeated_terms(r)) - terms[r.original] for r in rewrites
             if r.original is not None]))
    return out


# --- across steps -------------------------------------------------------------------------
@dataclass
class MonitorState:
    """What the monitor carries from step to step (and checkpoints carry: `to_json`)."""

    baseline_total: float = 0.0  # sum of the mean answer length of the baseline steps
    baseline_count: int = 0  # steps in the baseline so far (up to monitor.baseline_steps)
    streaks: dict[str, int] = field(default_factory=dict)  # steps in a row over, by measure
    first: dict[str, float] = field(default_factory=dict)  # each measure's first value
    last: dict[str, float] = field(default_factory=dict)  # and its latest
    # every warning: {"measure", "step" (0-based, as metrics.jsonl), "value", "threshold"}
    warnings: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MonitorState:
        return cls(**data)


class Monitor:
    def __init__(self, cfg: MonitorConfig, state: MonitorState | None = None) -> None:
        self.cfg = cfg
        self.state = state if state is not None else MonitorState()

    def baseline(self) -> float | None:
        """The mean answer length of the run's first steps (so far); None before any."""
        s = self.state
        return s.baseline_total / s.baseline_count if s.baseline_count else None

    def observe(self, step: int, measures: dict[str, float]
                ) -> tuple[dict[str, float], list[str]]:
        """Step `step`'s metrics against the run's start (the length ratio and difference;
        over the baseline so far while it is being taken) and the warning lines of the
        thresholds crossed for the `patience`-th step in a row: one per crossing."""
        cfg, s = self.cfg, self.state
        extra: dict[str, float] = {}
        taking = s.baseline_count < cfg.baseline_steps  # this step is part of the baseline
        if LENGTH in measures:
            if taking:
                s.baseline_total += measures[LENGTH]
                s.baseline_count += 1
            base = s.baseline_total / s.baseline_count
            if base > 0:
                extra[RATIO] = measures[LENGTH] / base
            extra["monitor/length_diff_to_start"] = measures[LENGTH] - base
        values = {k: v for k, v in (measures | extra).items() if k.startswith(PREFIX)}
        for key, value in values.items():
            s.first.setdefault(key, value)
            s.last[key] = value
        lines = []
        for t in THRESHOLDS:
            value = values.get(t.measure)
            if value is None or (t.measure == RATIO and taking):
                continue  # undefined this step (or the baseline still being taken)
            limit = getattr(cfg, t.key)
            s.streaks[t.measure] = s.streaks.get(t.measure, 0) + 1 if value > limit else 0
            if s.streaks[t.measure] == cfg.patience:
                s.warnings.append({"measure": t.measure, "step": step, "value": value,
                                   "threshold": limit})
                lines.append(
                    f"warning: step {step + 1}: possible reward hacking: {t.label} {value:.3g} "
                    f"over {limit:g} for {cfg.patience} step(s) in a row ({t.measure}; "
                    f"monitor.{t.key} sets the threshold)")
        return extra, lines

    def summary(self) -> dict[str, Any]:
        """The run's monitor in plain data (monitor_summary.json)."""
        s = self.state
        measures = {}
        for t in THRESHOLDS:
            warned = [w["step"] for w in s.warnings if w["measure"] == t.measure]
            measures[t.measure] = {
                "first": s.first.get(t.measure), "last": s.last.get(t.measure),
                "threshold": getattr(self.cfg, t.key), "config_key": f"monitor.{t.key}",
                "warned_at_steps": warned}
        return {"warned": bool(s.warnings), "baseline_length": self.baseline(),
                "baseline_steps": s.baseline_count, "measures": measures,
                "warnings": list(s.warnings), "last": dict(s.last)}

    def summary_line(self) -> str:
        """One line: each watched measure first -> last, and where it was warned about."""
        s, parts = self.state, []
        for t in THRESHOLDS:
            if t.measure not in s.last:
                continue
            warned = [w["step"] + 1 for w in s.warnings if w["measure"] == t.measure]
            note = f" (warned at step {', '.join(map(str, warned))})" if warned else ""
            if t.measure == RATIO:
                parts.append(f"length x{s.last[t.measure]:.2f} of start{note}")
            else:
                parts.append(f"{t.label} first->last {s.first[t.measure]:.2f} -> "
                             f"{s.last[t.measure]:.2f}{note}")
        verdict = "warned" if s.warnings else "no warning"
        return f"monitor: {verdict}; " + (", ".join(parts) or "nothing measured")
