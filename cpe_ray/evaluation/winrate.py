"""`cpe-ray eval winrate`: the policy's answers against a baseline's, raw and LC win rates.

Steps: load the eval prompts and the baseline's answers (every prompt must have one) and
build the judge, all before any model loads; generate the policy's answers (or read them
from `eval.answers_path`); judge each pair in both orders; fit the length-controlled GLM;
write under `<eval.output_dir>/winrate/`:

- `results.json`: win rates, standard errors, GLM coefficients, the LC status
  (`cpe_ray/evaluation/lc_status.py`: identified, degenerate or not identified, why, and the
  prompts it would need), counts, position-bias statistics, every unjudged item with its
  reason;
- `judgements.jsonl`: per prompt, both answers, their lengths, each order's verdict and raw
  judge text, the averaged preference, and (with eval.score_answers) GRM rewards;
- `model_outputs.json`, `reference_outputs.json`: alpaca_eval's format (`instruction`,
  `output`, `generator`, `dataset`, plus our `id`), for
  `alpaca_eval --model_outputs model_outputs.json --reference_outputs reference_outputs.json`;
- `report.md` with `winrate.png`, `preference_vs_length.png`, `reward_vs_length.png`.

Answer files (baseline, or pre-generated answers) are a JSON list or JSONL of objects in
one of two formats:

- alpaca_eval's: `output` and either `id` (the eval prompt's id) or `instruction` (as
  written here in `model_outputs.json`), optionally `generator`: a previous run's
  `model_outputs.json` is a valid baseline;
- the paper release's `eval/generate_data_300/*.jsonl`: `response` with the `question` and
  the `persona` it answers (a JSON string or object), matched to the eval prompt with the
  same question and persona (personas compared as JSON when they are JSON, so the
  release's compact and indented forms agree). A question and persona that occur twice
  are matched in file order. The same file also loads as the eval prompts
  (`eval.prompts_path`), so the release's 300 prompts and GPT-4o baseline are one file.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cpe_ray.config import Config
from cpe_ray.data import PromptRecord, load_prompts
from cpe_ray.errors import ConfigError, DataError
from cpe_ray.evaluation import report
from cpe_ray.evaluation.lc_status import LCStatus, lc_status, status_line, status_markdown
from cpe_ray.evaluation.lc_winrate import lc_winrate
from cpe_ray.evaluation.pairwise import (
    ORDER_MODEL_FIRST,
    judge_against_baseline,
    position_stats,
)
from cpe_ray.judges.base import JudgeRequest
from cpe_ray.paths import resolve_path

INSTRUCTION_FORMAT = "User profile:\n{persona}\n\nQuestion:\n{question}"
DATASET_PREFIX = "cpe-ray"
CURVE_POINTS = 200
SHOWN_UNJUDGED = 10


def instruction(record: PromptRecord) -> str:
    """The alpaca_eval `instruction` of a persona prompt: profile and question together."""
    return INSTRUCTION_FORMAT.format(persona=record.persona, question=record.question)


def _read_records(path: Path) -> list[tuple[str, Any]]:
    """(where, value) for each record of a JSON list or a JSONL file."""
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); write a JSON list "
                            "of objects or one object per line") from None
        return [(f"{path}[{i}]", v) for i, v in enumerate(values)]
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                out.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}); write one object "
                                "per line") from None
    return out


ANSWER_FORMATS = ("an object with a string 'output' and 'id' or 'instruction' (alpaca_eval), "
                  "or with a string 'response', 'question' and 'persona' (the release's "
                  "generate_data_300)")


def _persona_key(persona: Any) -> str:
    """A persona's text for matching: JSON compared as JSON (key order and layout aside)."""
    value = persona
    if isinstance(persona, str):
        try:
            value = json.loads(persona)
        except json.JSONDecodeError:
            return " ".join(persona.split())
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    return " ".join(str(value).split())


def _release_key(question: str, persona: Any) -> tuple[str, str]:
    return " ".join(question.split()), _persona_key(persona)


def load_answers(path: str | Path, prompts: Sequence[PromptRecord], what: str
                 ) -> tuple[list[str], str | None]:
    """One answer per prompt, matched by `id`, `instruction` or (question, persona), and the
    file's generator (see the module docstring for the two formats)."""
    p = resolve_path(path)
    if not p.is_file():
        raise DataError(f"{what} file not found: {p}; give a JSON list or JSONL of "
                        "{\"id\" or \"instruction\", \"output\"} objects")
    by_id: dict[str, str] = {}
    by_instruction: dict[str, str] = {}
    by_question: dict[tuple[str, str], list[str]] = {}
    generators = set()
    for where, obj in _read_records(p):
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected {ANSWER_FORMATS}")
        if "output" in obj and "response" in obj:
            raise DataError(f"{where}: has both 'output' (alpaca_eval) and 'response' (the "
                            "release's generate_data_300); keep one of them")
        if "response" in obj:
            question, persona = obj.get("question"), obj.get("persona")
            if not (isinstance(obj["response"], str) and isinstance(question, str)
                    and isinstance(persona, str | dict)):
                raise DataError(f"{where}: a 'response' record needs a string 'response' and "
                                "'question' and a 'persona' (string or object), as the "
                                "release's generate_data_300 files have")
            by_question.setdefault(_release_key(question, persona), []).append(obj["response"])
            continue
        if not isinstance(obj.get("output"), str):
            raise DataError(f"{where}: expected {ANSWER_FORMATS}")
        if "id" in obj:
            by_id[str(obj["id"])] = obj["output"]
        elif isinstance(obj.get("instruction"), str):
            by_instruction[obj["instruction"]] = obj["output"]
        else:
            raise DataError(f"{where}: has neither 'id' nor 'instruction'; give the eval "
                            "prompt's id or its instruction text")
        if isinstance(obj.get("generator"), str):
            generators.add(obj["generator"])
    answers = []
    for r in prompts:
        answer = by_id.get(r.id, by_instruction.get(instruction(r)))
        queue = by_question.get(_release_key(r.question, r.persona))
        if answer is None and queue:
            answer = queue.pop(0)
        if answer is None:
            raise DataError(f"{p} has no {what} answer for prompt '{r.id}' (matched by 'id', "
                            "'instruction', or 'question' and 'persona'); every evaluated "
                            "prompt needs one")
        answers.append(answer)
    return answers, (generators.pop() if len(generators) == 1 else None)


def alpaca_records(prompts: Sequence[PromptRecord], outputs: Sequence[str], generator: str,
                   dataset: str) -> list[dict[str, str]]:
    return [{"instruction": instruction(r), "output": o, "generator": generator,
             "dataset": dataset, "id": r.id} for r, o in zip(prompts, outputs, strict=True)]


def _rewards(scorer: Any, prompts: Sequence[PromptRecord], answers: Sequence[str]
             ) -> list[float | None]:
    scores = scorer.score([JudgeRequest(r.persona, r.question, a)
                           for r, a in zip(prompts, answers, strict=True)])
    return [s.reward for s in scores]


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def run_winrate(cfg: Config, say: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole command; returns the results written to results.json."""
    from cpe_ray.evaluation.generate import PolicyAnswerer, eval_model_path, model_label
    from cpe_ray.evaluation.judges import make_answer_scorer, make_pairwise_judge
    from cpe_ray.evaluation.scorers import ScorerPairwiseJudge

    e = cfg.eval
    prompts = load_prompts(e.prompts_path, cfg.data.on_bad_record).records[:e.limit]
    if not e.baseline_path:
        raise ConfigError("eval.baseline_path is not set; give a file of baseline answers "
                          "(see cpe_ray/evaluation/winrate.py for the format)")
    baseline, baseline_gen = load_answers(e.baseline_path, prompts, "baseline")
    given = load_answers(e.answers_path, prompts, "model") if e.answers_path else None
    judge = make_pairwise_judge(cfg)
    scorer = None
    if e.score_answers:
        scorer = judge.scorer if isinstance(judge, ScorerPairwiseJudge) else (
            make_answer_scorer(cfg))
    if given is not None:
        answers, label = given[0], e.model_name or given[1] or Path(e.answers_path or "").stem
        source = str(e.answers_path)
    else:
        answerer = PolicyAnswerer(cfg)
        say(f"generating {len(prompts)} answers with {answerer.describe()}")
        answers = answerer.answer([(r.persona, r.question) for r in prompts])
        label, source = model_label(cfg), eval_model_path(cfg)
    baseline_label = baseline_gen or Path(e.baseline_path).stem
    say(f"judging {len(prompts)} pairs with {judge.describe()}")
    comparisons = judge_against_baseline(
        judge, [(r.persona, r.question, a, b) for r, a, b in zip(prompts, answers, baseline,
                                                                  strict=True)], e.both_orders)
    m_len, b_len = [len(a) for a in answers], [len(b) for b in baseline]
    result = lc_winrate([c.preference for c in comparisons], m_len, b_len)
    status = lc_status(result, e.lc_target_se)
    rewards = None
    if scorer is not None and isinstance(judge, ScorerPairwiseJudge):
        # the judge scored every answer already (model as A): no second pass of the GRM
        pairs = [c.verdicts[ORDER_MODEL_FIRST].rewards or (None, None) for c in comparisons]
        rewards = {"model": [a for a, _ in pairs], "baseline": [b for _, b in pairs]}
    elif scorer is not None:
        rewards = {"model": _rewards(scorer, prompts, answers),
                   "baseline": _rewards(scorer, prompts, baseline)}

    out = Path(e.output_dir) / "winrate"
    dataset = f"{DATASET_PREFIX}/{Path(e.prompts_path).stem}"
    files = {
        "model_outputs": report.write_json(out / "model_outputs.json",
                                           alpaca_records(prompts, answers, label, dataset)),
        "reference_outputs": report.write_json(
            out / "reference_outputs.json",
            alpaca_records(prompts, baseline, baseline_label, dataset)),
    }
    rows = []
    for i, (r, c) in enumerate(zip(prompts, comparisons, strict=True)):
        rows.append({
            "id": r.id, "persona": r.persona, "question": r.question,
            "model_answer": answers[i], "baseline_answer": baseline[i],
            "model_length": m_len[i], "baseline_length": b_len[i],
            "preference": c.preference, "unjudged_reason": c.reason,
            "verdicts": {o: {"verdict": v.verdict, "error": v.error, "attempts": v.attempts,
                             "raw": v.raw} for o, v in c.verdicts.items()},
            **({"model_reward": rewards["model"][i], "baseline_reward": rewards["baseline"][i]}
               if rewards else {}),
        })
    files["judgements"] = report.write_jsonl(out / "judgements.jsonl", rows)
    unjudged = [{"id": r.id, "reason": c.reason} for r, c in zip(prompts, comparisons,
                                                                 strict=True) if not c.judged]
    results: dict[str, Any] = {
        "command": "winrate", "model": label, "model_source": source,
        "baseline": baseline_label, "baseline_path": str(e.baseline_path),
        "prompts_path": str(e.prompts_path), "n_prompts": len(prompts),
        "judge": judge.describe(), "orders": 2 if e.both_orders and not judge.order_free else 1,
        "order_free_judge": judge.order_free,
        "metrics": result.as_dict(),
        "lc_status": {**status.as_dict(), "summary": status_line(status, result.lc_win_rate)},
        "position": position_stats(comparisons),
        "mean_length": {"model": float(np.mean(m_len)), "baseline": float(np.mean(b_len))},
        "unjudged": unjudged,
    }
    if rewards is not None:
        results["reward"] = {
            "scorer": scorer.describe() if scorer else None,
            "model_mean": _mean(rewards["model"]), "baseline_mean": _mean(rewards["baseline"]),
            "parse_failures": sum(v is None for vs in rewards.values() for v in vs)}
    files.update(_plots(out, results, comparisons, m_len, b_len, rewards))
    files["report"] = out / "report.md"
    results["files"] = {k: str(v) for k, v in files.items()}
    report.write_markdown(out / "report.md", _markdown(results, status))
    report.write_json(out / "results.json", results)
    return results


def _plots(out: Path, results: dict[str, Any], comparisons: Sequence[Any], m_len: list[int],
           b_len: list[int], rewards: dict[str, list[float | None]] | None) -> dict[str, Path]:
    m = results["metrics"]
    files = {"winrate_plot": report.plot_winrates(
        out / "winrate.png", m["win_rate"], m["standard_error"], m["lc_win_rate"],
        m["lc_standard_error"], f"{results['model']} vs {results['baseline']}")}
    diff = [a - b for a, b in zip(m_len, b_len, strict=True)]
    curve = None
    if m["n_total"] and m["length_scale"] > 0:
        xs = np.linspace(min(diff), max(diff), CURVE_POINTS)
        z = m["theta"] + m["phi"] * np.tanh(-xs / m["length_scale"])
        curve = (xs.tolist(), (1 / (1 + np.exp(-z))).tolist())
    files["preference_plot"] = report.plot_scatter(
        out / "preference_vs_length.png", {"judged pairs": (diff, [c.preference
                                                                   for c in comparisons])},
        "len(model) - len(baseline), characters", "P(model better)",
        "preference against length difference", curve, report.PROBABILITY_LIMITS)
    if rewards is not None:
        files["reward_plot"] = report.plot_scatter(
            out / "reward_vs_length.png",
            {"model": (m_len, rewards["model"]), "baseline": (b_len, rewards["baseline"])},
            "answer length, characters", "reward", "reward against length")
    return files


def _markdown(results: dict[str, Any], status: LCStatus) -> list[str]:
    m, pos, f = results["metrics"], results["position"], results["files"]
    lines = [f"# Win rate: {results['model']} vs {results['baseline']}", "",
             f"Judge: {results['judge']}; orders judged per pair: {results['orders']}"
             f"{' (the judge scores each answer alone)' if results['order_free_judge'] else ''}"
             f"; prompts: {results['prompts_path']} ({results['n_prompts']}).", ""]
    lines += report.markdown_table(
        ["", "percent", "s.e."],
        [["win rate", report.fmt(m["win_rate"]), report.fmt(m["standard_error"])],
         ["LC win rate", report.fmt(m["lc_win_rate"]), report.fmt(m["lc_standard_error"])],
         ["discrete win rate", report.fmt(m["discrete_win_rate"]), ""]])
    lines += ["", *status_markdown(status, m["lc_win_rate"])]
    unjudged = f"; **{m['n_unjudged']} could not be judged**" if m["n_unjudged"] else ""
    lines += ["", f"Judged {m['n_total']} of {results['n_prompts']}: {m['n_wins']} wins, "
              f"{m['n_wins_base']} losses, {m['n_draws']} draws{unjudged}.",
              f"Mean length: model {results['mean_length']['model']:.0f}, baseline "
              f"{results['mean_length']['baseline']:.0f} characters. GLM: theta "
              f"{report.fmt(m['theta'], 3)}, phi {report.fmt(m['phi'], 3)} (on "
              f"tanh((len(baseline) - len(model)) / {report.fmt(m['length_scale'], 0)})), C "
              f"{report.fmt(m['C'], 4)}.",
              f"Position: first answer won {report.fmt(pos['first_position_win_rate'], 2)} of "
              f"decided verdicts; orders agreed on {report.fmt(pos['order_agreement'], 2)} "
              "of items.", ""]
    if "reward" in results:
        r = results["reward"]
        lines += [f"Reward ({r['scorer']}): model {report.fmt(r['model_mean'], 2)}, baseline "
                  f"{report.fmt(r['baseline_mean'], 2)}, parse failures {r['parse_failures']}.",
                  ""]
    for key, caption in (("winrate_plot", "win rates"), ("preference_plot", "preference"),
                         ("reward_plot", "reward against length")):
        if key in f:
            lines.append(f"![{caption}]({Path(f[key]).name})")
    if results["unjudged"]:
        lines += ["", "Unjudged:", ""]
        lines += [f"- {u['id']}: {u['reason']}" for u in results["unjudged"][:SHOWN_UNJUDGED]]
        if len(results["unjudged"]) > SHOWN_UNJUDGED:
            lines.append(f"- ... {len(results['unjudged']) - SHOWN_UNJUDGED} more in "
                         "results.json")
    lines += ["", "To score the same answers with alpaca_eval itself: `alpaca_eval "
              "--model_outputs model_outputs.json --reference_outputs reference_outputs.json "
              "--metric_kwargs \"{'glm_name':'length_controlled_minimal'}\"`."]
    return lines
