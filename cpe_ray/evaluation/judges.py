"""Build the configured judges: pairwise (`eval.judge`) and pointwise (`grm.backend`).

Everything cheap is checked here before any model loads: templates, the endpoint's key
variable, and paths. Judges that hold a model load it on construction.

| eval.judge | pairwise judge |
| --- | --- |
| `grm` | the configured GRM (`grm.backend`) scores each answer; the higher reward wins |
| `openai` | `conf/prompts/pairwise_en.txt` on the `eval.api` endpoint |
| `hf` | the same prompt on a local judge model (`eval.judge_model_path`) |
| `length` | the longer answer wins: a labelled heuristic for sanity checks |

| grm.backend | pointwise scorer |
| --- | --- |
| `rubric` | the offline rubric judge (`cpe_ray/rubric.py`) |
| `hf`, `vllm` | the GRM checkpoint `grm.model_path` on an engine in this process |
| `openai` | the GRM prompt on the `grm.api` endpoint |
| `bt` | a Bradley-Terry reward model at `grm.model_path` |
"""

from __future__ import annotations

from cpe_ray.config import Config
from cpe_ray.config.choices import GRM_BACKENDS
from cpe_ray.evaluation.pairwise import (
    EnginePairwiseJudge,
    LengthPairwiseJudge,
    PairwiseJudge,
    load_pairwise_template,
)
from cpe_ray.evaluation.scorers import GRMScorer, ScorerPairwiseJudge
from cpe_ray.judges.base import AnswerScorer
from cpe_ray.judges.registry import JUDGES, build_judge, describe_judge


def _engine_and_tokenizer(cfg: Config, backend: str, model_path: str):
    from cpe_ray.engines.factory import make_engine
    from cpe_ray.engines.spec import EngineSpec
    from cpe_ray.models import load_tokenizer

    engine = make_engine(EngineSpec.for_eval_judge(cfg, backend, model_path))
    return engine, load_tokenizer(engine.info().model_path, cfg.policy.trust_remote_code)


def make_answer_scorer(cfg: Config) -> AnswerScorer:
    """The GRM of `grm.backend` as a pointwise scorer: its judge's weighted reward, or a
    scalar model's own score of each chat's last eval.max_prompt_tokens tokens."""
    g = cfg.grm
    scalar = JUDGES[g.backend].scorer
    if scalar is not None:
        return scalar(cfg, cfg.eval.max_prompt_tokens)
    engine = None
    if GRM_BACKENDS[g.backend].engine:
        assert g.model_path is not None  # config validation requires it for hf and vllm
        engine, _ = _engine_and_tokenizer(cfg, g.backend, g.model_path)
    return GRMScorer(build_judge(cfg, engine), g, describe_judge(cfg), cfg.run.seed)


def make_pairwise_judge(cfg: Config) -> PairwiseJudge:
    """The judge of `eval.judge` (see the table above)."""
    e = cfg.eval
    if e.judge == "length":
        return LengthPairwiseJudge()
    if e.judge == "grm":
        return ScorerPairwiseJudge(make_answer_scorer(cfg))
    template = load_pairwise_template(e.judge_template)
    if e.judge == "openai":
        from cpe_ray.evaluation.endpoint import EndpointPairwiseJudge
        from cpe_ray.judges.endpoint import EndpointClient, EndpointSpec

        client = EndpointClient(EndpointSpec.from_config(e.api, "eval.api"))
        return EndpointPairwiseJudge(client, template, e.judge_max_new_tokens,
                                     e.judge_temperature, e.max_parse_retries)
    assert e.judge == "hf" and e.judge_model_path is not None  # checked by the config
    engine, tokenizer = _engine_and_tokenizer(cfg, cfg.rollout.backend, e.judge_model_path)
    return EnginePairwiseJudge(engine, tokenizer, template, e.judge_max_new_tokens,
                               e.judge_temperature, e.max_parse_retries, e.max_prompt_tokens,
                               cfg.run.seed)
