"""The human report's statistics on hand-made ratings (tests/human/handmade.py), every figure
worked out by hand below, and Krippendorff's alpha and Fleiss' kappa on published examples."""

from __future__ import annotations

import math

import pytest

from cpe_ray.errors import DataError
from cpe_ray.human.agreement import analyse, collect_ratings, load_ratings
from cpe_ray.human.records import Judgement
from cpe_ray.human.stats import fleiss_kappa, krippendorff_alpha, mean_estimate, spearman
from tests.human import handmade

EXACT = 1e-9
DIMS = ("helpfulness", "personalization", "naturalness")
RANGE = (-5.0, 5.0)


@pytest.fixture(scope="module")
def results() -> dict:
    ratings = collect_ratings(handmade.tasks(), handmade.judgements(), RANGE, "test")
    return analyse(ratings, DIMS, seed=0)


def test_counts_keep_the_last_judgement_per_rater_and_task(results) -> None:
    c = results["counts"]
    assert (c["tasks"], c["pair_tasks"], c["single_tasks"], c["tasks_judged"]) == (5, 4, 1, 5)
    assert (c["judgements"], c["superseded"], c["critiques"], c["edits"]) == (15, 1, 3, 3)
    assert {r: v["judgements"] for r, v in c["raters"].items()} == {"A": 5, "B": 5, "C": 5}


def test_win_rates_count_ties_half(results) -> None:
    w = results["win_rates"]["model vs baseline"]
    # helpfulness, per task: t1 (1 + 1 + 0.5) / 3 = 5/6, t2 0, t3 (1 + 0.5 + 0) / 3 = 1/2,
    # t4 1; mean (5/6 + 0 + 1/2 + 1) / 4 = 7/12. Deviations 1/4, -7/12, -1/12, 5/12: squares
    # sum to 84/144 = 7/12, variance 7/36, s.e. sqrt(7/36) / 2 = sqrt(7) / 12.
    h = w["helpfulness"]
    assert h["value"] == pytest.approx(100 * 7 / 12, abs=EXACT)
    assert h["se"] == pytest.approx(100 * math.sqrt(7) / 12, abs=EXACT)
    assert (h["n"], h["n_ratings"]) == (4, 12)
    # overall: t1 1, t2 (0 + 1) / 2 = 1/2 (C left it out), t3 (0.5 + 0 + 0) / 3 = 1/6, t4 1;
    # mean 8/3 / 4 = 2/3. Deviations 1/3, -1/6, -1/2, 1/3: squares sum to 1/2, variance 1/6,
    # s.e. sqrt(1/6) / 2.
    o = w["overall"]
    assert o["value"] == pytest.approx(100 * 2 / 3, abs=EXACT)
    assert o["se"] == pytest.approx(100 * math.sqrt(1 / 6) / 2, abs=EXACT)
    assert (o["n"], o["n_ratings"]) == (4, 11)
    assert "personalization" not in w  # nobody gave that preference
    low, high = o["ci95"]
    assert 100 / 6 <= low <= o["value"] <= high <= 100  # inside the per-task means' range


def test_bootstrap_interval_is_seeded() -> None:
    values = [(i % 7) / 6 for i in range(0, 40, 3)]
    assert mean_estimate(values, 3) == mean_estimate(values, 3)
    assert mean_estimate(values, 3).ci95 != mean_estimate(values, 4).ci95
    assert mean_estimate([], 0).value is None and mean_estimate([0.5], 0).se is None


def test_rater_agreement_on_preferences(results) -> None:
    h = results["agreement"]["preference"]["helpfulness"]
    # Fleiss, categories (T, R, X) per task: t1 (2, 0, 1), t2 (0, 3, 0), t3 (1, 1, 1),
    # t4 (3, 0, 0); m = 3. P_i = (sum n^2 - 3) / 6: 1/3, 1, 0, 1; mean 7/12. Shares 6/12,
    # 4/12, 2/12: P_e = 1/4 + 1/9 + 1/36 = 7/18. kappa = (7/12 - 7/18) / (11/18) = 7/22.
    assert h["fleiss_kappa"]["value"] == pytest.approx(7 / 22, abs=EXACT)
    assert (h["fleiss_kappa"]["n_units"], h["fleiss_kappa"]["raters"]) == (4, 3)
    # Krippendorff nominal: each unit of 3 adds 1/2 per ordered pair. t1 TTX: o_TT 1,
    # o_TX = o_XT 1; t2 RRR: o_RR 3; t3 TRX: 1/2 on each of the 6 off-diagonal cells; t4 TTT:
    # o_TT 3. n_T = 4 + 1/2 + 3/2 = 6, n_R = 4, n_X = 2, n = 12. Off-diagonal o sums to 5:
    # D_o = 5/12; D_e = 2 (6*4 + 6*2 + 4*2) / (12 * 11) = 2/3; alpha = 1 - 5/8 = 3/8.
    assert h["alpha_nominal"]["value"] == pytest.approx(3 / 8, abs=EXACT)
    assert (h["alpha_nominal"]["n_units"], h["alpha_nominal"]["n_values"]) == (4, 12)
    o = results["agreement"]["preference"]["overall"]
    # Fleiss needs the same raters per task: t2 has two.
    assert o["fleiss_kappa"]["value"] is None
    assert o["fleiss_kappa"]["note"] == "raters per task differ (2 to 3)"
    # t1 TTT: o_TT 3; t2 RT (m = 2, weight 1): o_RT = o_TR 1; t3 XRR: o_RR 1, o_XR = o_RX 1;
    # t4 TTT: o_TT 3. n_T 7, n_R 3, n_X 1, n 11; D_o = 4/11; D_e = 2 (21 + 7 + 3) / 110
    # = 31/55; alpha = 1 - (4/11) (55/31) = 11/31.
    assert o["alpha_nominal"]["value"] == pytest.approx(11 / 31, abs=EXACT)
    assert o["alpha_nominal"]["n_values"] == 11
    assert results["agreement"]["preference"]["naturalness"]["alpha_nominal"]["value"] is None


def test_rater_agreement_on_scores(results) -> None:
    # Helpfulness units: t1 model {3, 2}, t1 baseline {1, 1}, t5 {0, -1, 0} (t2 model has
    # one score: not pairable). o(3,2) = o(2,3) = 1; o(1,1) = 2; t5 (weight 1/2):
    # o(0,0) = o(0,-1) = o(-1,0) = 1. D_o = 4/7 (four off-diagonal cells at distance 1).
    # n: -1 1, 0 2, 1 2, 2 1, 3 1; sum over c < k of n_c n_k (c-k)^2 = 2 + 8 + 9 + 16 + 4 +
    # 8 + 18 + 2 + 8 + 1 = 76, so D_e = 152 / 42; alpha = 1 - (4/7) (42/152) = 16/19.
    a = results["agreement"]["scores"]["helpfulness"]["alpha_interval"]
    assert a["value"] == pytest.approx(16 / 19, abs=EXACT)
    assert (a["n_units"], a["n_values"]) == (3, 7)
    # personalization is 1 everywhere: no variation, alpha undefined
    assert results["agreement"]["scores"]["personalization"]["alpha_interval"]["value"] is None


def test_judges_against_people(results) -> None:
    j = results["judges"]
    # Overall majority: t1 T, t2 tie (R vs T), t3 R (mean 1/6), t4 T. Pairwise judge 0.8 T,
    # 0.6 T, 0.9 T on t1, t3, t4: right, wrong, right.
    acc = j["pairwise"]["overall"]["accuracy"]
    assert acc["value"] == pytest.approx(2 / 3, abs=EXACT)
    assert (acc["n"], acc["people_ties"], acc["judge_ties"], acc["missing"]) == (3, 1, 0, 0)
    assert "helpfulness" not in j["pairwise"]  # one number per pair: overall only
    # LC: t4 has none; t1 right, t3 wrong.
    lc = j["lc"]["overall"]["accuracy"]
    assert (lc["value"], lc["n"], lc["people_ties"], lc["missing"]) == (0.5, 2, 1, 1)
    # GRM reward: t1 2.0 > 0.7 right, t3 1.2 > 1.1 wrong, t4 3.0 > -0.5 right.
    assert j["grm"]["overall"]["accuracy"]["value"] == pytest.approx(2 / 3, abs=EXACT)
    # GRM helpfulness: majority t1 T, t2 R, t3 tie, t4 T; GRM t1 3 > 1 right, t2 0 < 2 right,
    # t4 2 = 2 a tie, counting half: (1 + 1 + 0.5) / 3 = 5/6.
    gh = j["grm"]["helpfulness"]["accuracy"]
    assert gh["value"] == pytest.approx(5 / 6, abs=EXACT)
    assert (gh["n"], gh["people_ties"], gh["judge_ties"]) == (3, 1, 1)
    assert gh["se"] == pytest.approx(math.sqrt(5 / 6 * 1 / 6 / 3), abs=EXACT)


def test_spearman_of_judges_with_people(results) -> None:
    # With n = 4 the t statistic has 2 degrees of freedom, whose two-sided p is 1 - |rho|.
    # Pairwise judge margins 0.3, -0.2, 0.1, 0.4 (ranks 3, 1, 2, 4) against people's means
    # 1, 1/2, 1/6, 1 (ranks 3.5, 2, 1, 3.5): centred ranks (0.5, -1.5, -0.5, 1.5) and
    # (1, -0.5, -1.5, 1) give 3.5 / sqrt(5 * 4.5) = 7 / sqrt(90).
    s = results["judges"]["pairwise"]["overall"]["spearman"]
    rho = 7 / math.sqrt(90)
    assert s["rho"] == pytest.approx(rho, abs=EXACT)
    assert s["p"] == pytest.approx(1 - rho, abs=EXACT)
    assert s["n"] == 4
    # GRM helpfulness margins 2, -2, 2, 0 (ranks 3.5, 1, 3.5, 2) against 5/6, 0, 1/2, 1
    # (ranks 3, 1, 2, 4): 1.5 / sqrt(4.5 * 5) = 1 / sqrt(10).
    s = results["judges"]["grm"]["helpfulness"]["spearman"]
    assert s["rho"] == pytest.approx(1 / math.sqrt(10), abs=EXACT)
    assert s["p"] == pytest.approx(1 - 1 / math.sqrt(10), abs=EXACT)
    # GRM scores per answer against people's mean scores: t1 model (3, 2.5), t1 baseline
    # (1, 1), t2 model (0, -2), t5 (-1, -1/3): ranks (4, 3, 2, 1) and (4, 3, 1, 2), sum of
    # squared rank differences 2: rho = 1 - 6 * 2 / (4 * 15) = 0.8, p = 0.2.
    s = results["judges"]["grm_scores"]["helpfulness"]["spearman"]
    assert (s["rho"], s["n"]) == (pytest.approx(0.8, abs=EXACT), 4)
    assert s["p"] == pytest.approx(0.2, abs=EXACT)
    # LC's margins t1 0.2, t2 -0.1, t3 0.05 against people's 1, 1/2, 1/6: ranks (3, 1, 2)
    # and (3, 2, 1): rho = 1 - 6 * 2 / (3 * 8) = 1/2.
    assert results["judges"]["lc"]["overall"]["spearman"]["rho"] == pytest.approx(0.5,
                                                                                   abs=EXACT)
    assert spearman([1.0, 2.0], [2.0, 1.0]).rho is None  # too few points
    assert spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]).rho is None  # constant


def test_krippendorff_2011_reliability_data() -> None:
    # Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: four
    # observers, twelve units, missing values; published alpha 0.743 nominal, 0.849 interval.
    n = None
    rows = [[1, 2, 3, 3, 2, 1, 4, 1, 2, n, n, n],
            [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, n, 3],
            [n, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, n],
            [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, n]]
    units = [[v for v in unit if v is not None] for unit in zip(*rows, strict=True)]
    nominal = krippendorff_alpha(units, "nominal")
    assert nominal.value == pytest.approx(0.743, abs=5e-4)
    assert (nominal.n_units, nominal.n_values) == (11, 40)  # unit 12 has one value
    assert krippendorff_alpha(units, "interval").value == pytest.approx(0.849, abs=5e-4)
    assert krippendorff_alpha([[1, 1], [2, 2]], "nominal").value == 1.0
    with pytest.raises(ValueError, match="level 'ordinal'"):
        krippendorff_alpha(units, "ordinal")


def test_fleiss_1971_example() -> None:
    # Fleiss' kappa's usual worked example (Wikipedia, "Fleiss' kappa"): 10 subjects, 14
    # raters, 5 categories; P = 0.378, P_e = 0.213, kappa = 0.210.
    counts = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0],
              [2, 2, 8, 1, 1], [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2],
              [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    units = [[str(c) for c, k in enumerate(row) for _ in range(k)] for row in counts]
    assert fleiss_kappa(units).value == pytest.approx(0.210, abs=5e-4)
    assert fleiss_kappa([["a"], ["b"]]).note == "one rater per task"


def test_bad_ratings_are_one_line(tmp_path) -> None:
    tasks = handmade.tasks()
    stray = Judgement("t9", "A", 1.0, ("model", "baseline"), {}, {})
    with pytest.raises(DataError, match="names task 't9', which is not in tasks.jsonl"):
        collect_ratings(tasks, [stray], RANGE, "j.jsonl")
    wrong = Judgement("t5", "A", 1.0, ("model", "baseline"), {}, {})
    with pytest.raises(DataError, match=r"task 't5' has answers \['answer'\]"):
        collect_ratings(tasks, [wrong], RANGE, "j.jsonl")
    high = Judgement("t5", "A", 1.0, ("answer",), {"answer": {"helpfulness": 7}}, {})
    with pytest.raises(DataError, match=r"answer.helpfulness=7 is outside \[-5, 5\]"):
        collect_ratings(tasks, [high], RANGE, "j.jsonl")
    with pytest.raises(DataError, match="tasks.jsonl not found"):
        load_ratings(tmp_path, RANGE)
