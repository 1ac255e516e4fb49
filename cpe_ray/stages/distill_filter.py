"""Rejection sampling of collected judgements (`distill.filter`; MiCoTA, arXiv 2507.01887).

A judgement is kept when it passes three tests, in this order, and its `reject_reason` is the
first one it fails:
1. `unparsed`: `parse_judgement` could not read it (lifted by `distill.train_unparsed`);
2. `no_reference` / `disagrees`: with `filter.reference_path`, it must agree with the
   reference. `judge`: the reference's judgement of the same (persona, question, answer),
   the mean over its parsed records there (several people may have judged one answer), within
   `max_score_diff` on the weighted reward or on every dimension. `preference`: the
   pair's other answer must be judged in the same output, and the chosen answer must get the
   strictly higher weighted reward (a tie says nothing, so it disagrees);
3. `too_long`: its critique (the `<critique>` text; the whole output where that tag is
   missing) is over `max_critique_tokens` tokens of `distill.model_path`'s tokenizer.

The verdict is a pure function of the records, the reference and the settings: `grm collect`
marks every record in its output with it (`kept`, `reject_reason`, `critique_tokens`) and
`grm train` computes it again with its own settings, so a filter can be changed without
asking the teacher again. Every record stays in the output, kept or not.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cpe_ray.config import Config
from cpe_ray.data import load_pairwise
from cpe_ray.errors import DataError
from cpe_ray.judges.grm import Judgement, parse_judgement, weighted_reward
from cpe_ray.paths import resolve_path
from cpe_ray.stages.judgements import read_records

UNPARSED, NO_REFERENCE, DISAGREES, TOO_LONG = "unparsed", "no_reference", "disagrees", "too_long"
REJECT_REASONS = (UNPARSED, NO_REFERENCE, DISAGREES, TOO_LONG)
Triple = tuple[str, str, str]


def triple(record: dict[str, Any]) -> Triple:
    return record["persona"], record["question"], record["answer"]


@dataclass(frozen=True)
class Verdict:
    kept: bool
    reject_reason: str | None  # the first test failed (REJECT_REASONS); None when kept
    parsed: bool
    agrees: bool  # True without a reference
    within_length: bool  # True without a bound
    critique_tokens: int | None  # None without a tokenizer


@dataclass(frozen=True)
class FilterReport:
    """How many judgements pass each test on its own, and how many pass all three."""

    judgements: int
    parsed: int
    agrees: int
    within_length: int
    kept: int
    rejected: dict[str, int]  # by the first test failed

    def as_dict(self) -> dict[str, Any]:
        n = max(self.judgements, 1)
        shares = {k: getattr(self, k) / n for k in ("parsed", "agrees", "within_length", "kept")}
        return asdict(self) | {"shares": shares}

    def line(self) -> str:
        return filter_line(self.as_dict())


def filter_line(d: dict[str, Any]) -> str:
    """One line from `FilterReport.as_dict()` (as summary.json holds it)."""
    s = d["shares"]
    return (f"filter: {d['kept']} of {d['judgements']} kept ({s['kept']:.0%}); parsed "
            f"{s['parsed']:.0%}, agrees {s['agrees']:.0%}, within length "
            f"{s['within_length']:.0%}; rejected {d['rejected'] or 'none'}")


class JudgementFilter:
    """`distill.filter` with its reference and tokenizer loaded (see the module docstring)."""

    def __init__(self, cfg: Config, tokenizer: Any | None = None) -> None:
        f, g = cfg.distill.filter, cfg.grm
        self.cfg, self.settings = cfg, f
        if f.max_critique_tokens is not None and tokenizer is None:
            from cpe_ray.models import load_tokenizer, resolve_model_path

            tokenizer = load_tokenizer(resolve_model_path(cfg.distill.model_path),
                                       cfg.policy.trust_remote_code)
        self.tokenizer = tokenizer
        self._dims, self._range, self._aliases = g.dimensions, (g.score_min, g.score_max), \
            g.label_aliases
        self.judged: dict[Triple, dict[str, float | None]] = {}
        self.pairs: dict[Triple, list[tuple[Triple, bool]]] = {}  # answer -> (other, chosen?)
        if f.reference_path is None:
            return
        path = resolve_path(f.reference_path)
        if f.reference_kind == "judge":
            self.judged = self._read_reference(path)
        else:
            for p in load_pairwise(path, cfg.data.on_bad_record).records:
                chosen, rejected = (p.persona, p.question, p.chosen), \
                    (p.persona, p.question, p.rejected)
                self.pairs.setdefault(chosen, []).append((rejected, True))
                self.pairs.setdefault(rejected, []).append((chosen, False))

    def _read_reference(self, path: Path) -> dict[Triple, dict[str, float | None]]:
        """Mean scores per triple over the reference's parsed judgements."""
        if not path.is_file():
            raise DataError(f"distill.filter.reference_path {path} not found")
        by_triple: dict[Triple, list[dict[str, Any]]] = {}
        for n, r in enumerate(read_records(path, repair=False), start=1):
            missing = [k for k in ("persona", "question", "answer", "parsed", "scores")
                       if k not in r]
            if missing:
                raise DataError(f"{path}: record {n} lacks {', '.join(missing)}; a judge "
                                "reference is a file in grm collect's format")
            if r["parsed"]:
                by_triple.setdefault(triple(r), []).append(r["scores"])
        return {t: {d: _mean([s.get(d) for s in scores]) for d in self._dims}
                for t, scores in by_triple.items()}

    def reward(self, scores: dict[str, float | None]) -> float | None:
        g = self.cfg.grm
        j = Judgement(scores=dict(scores), critique="", raw="", parsed=True)
        return weighted_reward(j, g.weights, g.on_missing)  # type: ignore[arg-type]

    def _agreement(self, record: dict[str, Any], own: dict[Triple, dict[str, Any]]
                   ) -> bool | None:
        """True / False, or None where there is nothing to compare with."""
        f = self.settings
        if f.reference_path is None:
            return True
        scores = record.get("scores") or {}
        if f.reference_kind == "judge":
            ref = self.judged.get(triple(record))
            if ref is None:
                return None
            if f.score_diff_on == "dimensions":
                return all(scores.get(d) is not None and ref[d] is not None
                           and abs(scores[d] - ref[d]) <= f.max_score_diff for d in self._dims)
            mine, theirs = self.reward(scores), self.reward(ref)
            return (mine is not None and theirs is not None
                    and abs(mine - theirs) <= f.max_score_diff)
        verdicts = []
        for other, chosen in self.pairs.get(triple(record), []):
            partner = own.get(other)
            if partner is None or not partner["parsed"]:
                continue
            mine, theirs = self.reward(scores), self.reward(partner["scores"])
            verdicts.append(mine is not None and theirs is not None
                            and (mine > theirs if chosen else mine < theirs))
        return all(verdicts) if verdicts else None

    def critique_tokens(self, output: str) -> int | None:
        if self.tokenizer is None:
            return None
        j = parse_judgement(output, self._dims, self._range, self._aliases)
        text = j.critique if "no <critique> tag" not in j.warnings else output
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def verdicts(self, records: Sequence[dict[str, Any]]) -> list[Verdict]:
        own = {triple(r): r for r in records}  # a preference's partner: judged by the same file
        bound = self.settings.max_critique_tokens
        out = []
        for r in records:
            parsed = bool(r["parsed"])
            agreement = self._agreement(r, own)
            tokens = self.critique_tokens(r["output"])
            within = bound is None or (tokens is not None and tokens <= bound)
            reason = (UNPARSED if not (parsed or self.cfg.distill.train_unparsed)
                      else NO_REFERENCE if agreement is None
                      else DISAGREES if not agreement
                      else TOO_LONG if not within else None)
            out.append(Verdict(reason is None, reason, parsed, bool(agreement), within, tokens))
        return out


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def report(verdicts: Sequence[Verdict]) -> FilterReport:
    rejected = {reason: sum(v.reject_reason == reason for v in verdicts)
                for reason in REJECT_REASONS}
    return FilterReport(len(verdicts), sum(v.parsed for v in verdicts),
                        sum(v.agrees for v in verdicts), sum(v.within_length for v in verdicts),
                        sum(v.kept for v in verdicts),
                        {k: n for k, n in rejected.items() if n})


def mark_file(path: Path, jfilter: JudgementFilter) -> FilterReport:
    """Write each record of `path` back with its verdict (`kept`, `reject_reason`,
    `critique_tokens`), every other field as it was; replaced in one rename, so a crash
    leaves the old file whole."""
    records = read_records(path)
    verdicts = jfilter.verdicts(records)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r, v in zip(records, verdicts, strict=True):
            marks = {"kept": v.kept, "reject_reason": v.reject_reason,
                     "critique_tokens": v.critique_tokens}
            f.write(json.dumps(r | marks, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return report(verdicts)
