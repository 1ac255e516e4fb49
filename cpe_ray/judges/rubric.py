"""A small rule-based judge for offline and CPU runs: a labelled stand-in for the GRM.

It scores the three rubric dimensions from what is visible in the text and writes a
critique naming what to change, in the GRM's tagged format so the same parser reads it:
- personalization: 0 for a generic answer, plus points per persona content word the answer
  uses, minus the rubric's deductions for announcing it ("considering your background") and
  for calling the user by name (method.md 2). Of a 'Key: value' persona (`render_persona`)
  only the values count: labels ("Demographics", "Hobbies") say nothing about the user, and
  the name is what the rubric asks an answer not to use;
- helpfulness: 0 plus points per question content word the answer addresses;
- naturalness: how fluent the text is (the share of its words that are distinct, times the
  share of its whitespace-separated chunks that are words at all), minus repeated bigrams;
- the length rule of method.md 2, in words: one point off helpfulness and naturalness per
  `grm.rubric_words_per_point` words beyond `grm.rubric_max_words`, and off helpfulness per
  as many words short of `grm.rubric_min_words`.
Generic answers sit at 0, not at the floor, so that the length rule and fluency still
separate them: a policy that starts from noise (the tiny model) gets a reward it can climb.
It is not a model of preference; it only gives the CPU default a signal that a policy can
learn from and a critique a policy can follow.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from cpe_ray.config import GRMConfig
from cpe_ray.judges.base import JudgeRequest, check_mode
from cpe_ray.judges.grm import JudgeOutcome, parse_judgement

WORD = re.compile(r"[a-z][a-z']+")
# A whitespace-separated chunk that reads as a word: letters, maybe one closing punctuation.
WORDLIKE = re.compile(r"[A-Za-z][A-Za-z'-]*[.,;:!?]?")
STOPWORDS = frozenset((
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "can", "do", "for", "from", "has",
    "have", "how", "i", "in", "is", "it", "its", "me", "my", "of", "on", "or", "so", "that",
    "the", "their", "them", "they", "this", "to", "was", "what", "when", "which", "who", "why",
    "will", "with", "you", "your", "should", "would", "could", "about", "into", "than", "then",
    "there", "these", "those", "just", "also", "very", "more", "most", "some", "any", "all",
    "not", "no", "yes", "our", "we", "us", "he", "she", "his", "her", "who's", "i'm",
))
MIN_CONTENT_LEN = 4  # shorter words are too generic to count as persona or question terms
ANNOUNCE = re.compile(r"(considering|given|based on) your (background|persona|profile)")
ANNOUNCE_PENALTY = 2.0  # the rubric's deduction for announcing the personalization
NAME_PENALTY = 1.0  # the rubric's deduction for calling the user by name
# A rendered persona's 'Key: value' line; a key is one to three words ("Name", "Age")
PERSONA_FIELD = re.compile(r"^\s*([A-Za-z]+(?: [A-Za-z]+){0,2}):(.*)$")
NAME_FIELD = "name"
POINTS_PER_TERM = 2.0  # each distinct persona / question term used raises the score this much
NEUTRAL = 0.0  # helpfulness and personalization of an answer that uses no term at all
SHOWN_TERMS = 3  # terms named in a critique


def content_words(text: str) -> list[str]:
    return [w for w in WORD.findall(text.lower())
            if len(w) >= MIN_CONTENT_LEN and w not in STOPWORDS]


def persona_terms(persona: str) -> tuple[list[str], set[str]]:
    """(content words an answer may draw on, the user's name words) of a persona: of
    'Key: value' lines the values only, the Name line's words being the name; free text
    whole."""
    terms: list[str] = []
    name: set[str] = set()
    for line in persona.splitlines():
        field = PERSONA_FIELD.match(line)
        if field is None:
            terms += content_words(line)
        elif field.group(1).lower() == NAME_FIELD:
            name.update(WORD.findall(field.group(2).lower()))
        else:
            terms += content_words(field.group(2))
    return [t for t in dict.fromkeys(terms) if t not in name], name


def _points(hits: int, hi: float) -> float:
    return min(hi, NEUTRAL + POINTS_PER_TERM * hits)


def fluency(text: str) -> float:
    """In [0, 1]: distinct-word share times the share of chunks that are words at all."""
    words = WORD.findall(text.lower())
    chunks = text.split()
    if not words or not chunks:
        return 0.0
    wordlike = sum(bool(WORDLIKE.fullmatch(c)) for c in chunks) / len(chunks)
    return len(set(words)) / len(words) * wordlike


class RubricJudge:
    """A `Judge` without a model; deterministic, so seeds are unused."""

    def __init__(self, cfg: GRMConfig) -> None:
        self.cfg = cfg
        self.lo, self.hi = cfg.score_min, cfg.score_max

    def judge(self, requests: Sequence[JudgeRequest], mode: str, seed: int = 0
              ) -> list[JudgeOutcome]:
        check_mode(mode)
        out = []
        for req in requests:
            text = self.render(req)
            out.append(JudgeOutcome(parse_judgement(
                text, self.cfg.dimensions, (self.lo, self.hi)), attempts=1))
        return out

    def render(self, req: JudgeRequest) -> str:
        """The judgement as GRM-format text: <critique>...</critique><scores>...</scores>."""
        words = WORD.findall(req.answer.lower())
        used = set(content_words(req.answer))
        p_terms, name = persona_terms(req.persona)
        question_terms = list(dict.fromkeys(content_words(req.question)))
        p_hits = [t for t in p_terms if t in used]
        q_hits = [t for t in question_terms if t in used]
        notes: list[str] = []

        personalization = _points(len(p_hits), self.hi)
        if ANNOUNCE.search(req.answer.lower()):
            personalization -= ANNOUNCE_PENALTY
            notes.append("Do not announce that you considered the user's background; show it.")
        if name & set(words):
            personalization -= NAME_PENALTY
            notes.append("Do not call the user by name.")
        missing_p = [t for t in p_terms if t not in used][:SHOWN_TERMS]
        if missing_p and personalization < self.hi:
            notes.append("Tie the answer to the user: draw on " + ", ".join(missing_p) + ".")

        helpfulness = _points(len(q_hits), self.hi)
        missing_q = [t for t in question_terms if t not in used][:SHOWN_TERMS]
        if missing_q and helpfulness < self.hi:
            notes.append("Answer what was asked about " + ", ".join(missing_q) + ".")

        bigrams = list(zip(words, words[1:], strict=False))
        repeats = len(bigrams) - len(set(bigrams))
        fluent = fluency(req.answer)
        naturalness = self.lo + (self.hi - self.lo) * fluent - repeats
        if repeats or len(set(words)) < len(words):
            notes.append("Stop repeating yourself; say each thing once.")
        elif fluent < 1.0:
            notes.append("Write plain words and sentences; drop the stray symbols.")

        per = self.cfg.rubric_words_per_point
        if len(words) > self.cfg.rubric_max_words:
            over = -(-(len(words) - self.cfg.rubric_max_words) // per)  # ceil: any excess costs
            helpfulness -= over
            naturalness -= over
            notes.append(f"Cut about {len(words) - self.cfg.rubric_max_words} words.")
        elif len(words) < self.cfg.rubric_min_words:
            helpfulness -= -(-(self.cfg.rubric_min_words - len(words)) // per)
            notes.append("Say more: the answer is too short to help.")
        scores = {"helpfulness": helpfulness, "personalization": personalization,
                  "naturalness": naturalness}
        critique = " ".join(notes) or "Good answer; keep it as it is."
        lines = [f"{d.capitalize()}: {round(self._clamp(scores.get(d, 0.0)))}"
                 for d in self.cfg.dimensions]
        return f"<critique>{critique}</critique>\n<scores>\n" + "\n".join(lines) + "\n</scores>"

    def _clamp(self, value: float) -> float:
        return max(self.lo, min(self.hi, value))
