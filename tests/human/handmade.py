"""Hand-made ratings: four pair tasks (model vs baseline) and one single answer, three raters
(A, B, C). test_agreement.py works out every figure of them by hand.

Helpfulness preferences (T model, R baseline, X tie), one column per rater A B C:
    t1  T T X      t2  R R R      t3  T X R      t4  T T T
Overall preferences:
    t1  T T T      t2  R T -      t3  X R R      t4  T T T     (C left t2's overall out)
Helpfulness scores (the other dimensions are scored too, but not worked out by hand):
    t1 model A 3, B 2; t1 baseline A 1, B 1; t2 model A -2; t5 answer A 0, B -1, C 0
A judged t2 twice: the first judgement (all "model") is replaced by the second.
"""

from __future__ import annotations

import json
from pathlib import Path

from cpe_ray.human.records import Answer, HumanTask, Judgement

PERSONA = {"Name": "Ada", "Job": "welder"}
QUESTION = "How do I start running?"
T1_MODEL, T1_BASELINE = "Start with three short runs a week.", "Running is good."
T5_ANSWER = "Walk first, then run."
A_EDIT = "Start with three short runs a week, after your shift when your back is loose."
C_EDIT = "Walk for a week, then add one minute of running each day."
A_CRITIQUE = "Concrete, but ignores the welder's shifts."
T5_CRITIQUES = {"A": "Good start; say how long to walk.", "B": "Too short to act on."}


def _hidden(h_model: float, h_base: float, reward: tuple[float, float],
            judge: float | None, lc: float | None) -> dict:
    return {"critique": None,
            "grm_scores": {"model": {"helpfulness": h_model, "personalization": 1.0,
                                     "naturalness": 0.0},
                           "baseline": {"helpfulness": h_base, "personalization": 0.0,
                                        "naturalness": 0.0}},
            "grm_reward": {"model": reward[0], "baseline": reward[1]},
            "judge_preference": judge, "lc_preference": lc}


def tasks() -> list[HumanTask]:
    def pair(i: int, model: str, baseline: str, hidden: dict) -> HumanTask:
        return HumanTask(f"t{i}", "pair", "winrate", f"p{i}", PERSONA, QUESTION,
                         (Answer("model", model), Answer("baseline", baseline)), hidden)

    # GRM helpfulness: t1 3 > 1, t2 0 < 2, t3 2 > 0, t4 2 = 2 (a tie); reward: t1 T, t2 R,
    # t3 T, t4 T. Pairwise judge: 0.8, 0.3, 0.6, 0.9; LC: 0.7, 0.4, 0.55, none.
    return [
        pair(1, T1_MODEL, T1_BASELINE, _hidden(3, 1, (2.0, 0.7), 0.8, 0.7)),
        pair(2, "Buy good shoes.", "Just run.", _hidden(0, 2, (0.5, 1.0), 0.3, 0.4)),
        pair(3, "Run slowly.", "Run fast.", _hidden(2, 0, (1.2, 1.1), 0.6, 0.55)),
        pair(4, "Join a club.", "Run alone.", _hidden(2, 2, (3.0, -0.5), 0.9, None)),
        HumanTask("t5", "single", "samples", "3:p5:0", "A welder who works night shifts.",
                  QUESTION, (Answer("answer", T5_ANSWER),),
                  {"critique": None, "grm_scores": {"answer": {"helpfulness": -1.0}},
                   "grm_reward": None, "judge_preference": None, "lc_preference": None}),
    ]


def _scores(h: int) -> dict[str, int]:
    return {"helpfulness": h, "personalization": 1, "naturalness": 2}


def _j(task: str, rater: str, at: float, preference: dict, scores: dict | None = None,
       critique: str = "", edit: Answer | None = None) -> Judgement:
    order = ("answer",) if task == "t5" else ("baseline", "model")
    return Judgement(task, rater, at, order, scores or {}, preference, critique, edit, 10.0 + at)


def _p(h: str, overall: str | None) -> dict[str, str]:
    names = {"T": "model", "R": "baseline", "X": "tie"}
    out = {"helpfulness": names[h]}
    if overall is not None:
        out["overall"] = names[overall]
    return out


def judgements() -> list[Judgement]:
    return [
        _j("t1", "A", 1, _p("T", "T"), {"model": _scores(3), "baseline": _scores(1)},
           A_CRITIQUE, Answer("model", A_EDIT)),
        _j("t1", "B", 2, _p("T", "T"), {"model": _scores(2), "baseline": _scores(1)}),
        _j("t1", "C", 3, _p("X", "T")),
        _j("t2", "A", 4, _p("T", "T"), {"model": _scores(5)}),  # replaced below
        _j("t2", "B", 5, _p("R", "T"), edit=Answer("baseline", "Just run.")),  # unchanged
        _j("t2", "C", 6, _p("R", None)),
        _j("t3", "A", 7, _p("T", "X")),
        _j("t3", "B", 8, _p("X", "R")),
        _j("t3", "C", 9, _p("R", "R")),
        _j("t4", "A", 10, _p("T", "T")),
        _j("t4", "B", 11, _p("T", "T")),
        _j("t4", "C", 12, _p("T", "T")),
        _j("t5", "A", 13, {}, {"answer": _scores(0)}, T5_CRITIQUES["A"]),
        _j("t5", "B", 14, {}, {"answer": _scores(-1)}, T5_CRITIQUES["B"]),
        _j("t5", "C", 15, {}, {"answer": _scores(0)}, "", Answer("answer", C_EDIT)),
        _j("t2", "A", 16, _p("R", "R"), {"model": _scores(-2)}),
    ]


def write(folder: Path) -> Path:
    """tasks.jsonl and judgements.jsonl in `folder`, as `cpe-ray rate` writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tasks.jsonl").write_text(
        "".join(json.dumps(t.to_json()) + "\n" for t in tasks()))
    (folder / "judgements.jsonl").write_text("".join(j.to_line() + "\n" for j in judgements()))
    return folder
