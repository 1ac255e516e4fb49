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
from cpe_ray.evaluation.pairwise import (
    EnginePairwiseJudge,
    LengthPairwiseJudge,
    PairwiseJudge,
    load_pairwise_template,
)
from cpe_ray.evaluation.scorers import GRMScorer, ScorerPairwiseJudge
from cpe_ray.judges.base import AnswerScorer
from cpe_ray.judges.bt import bt_scorer


def _engine_and_tokenizer(cfg: Config, backend: str, model_path: str):
    from cpe_ray.engines.factory import make_engine
    from cpe_ray.models import load_tokenizer

    engine = make_engine(
        backend, model_path, dtype=cfg.policy.dtype, seed=cfg.run.seed,
        use_gpu=cfg.cluster.use_gpu, gpu_memory_utilization=cfg.grm.gpu_memory_utilization,
        max_model_len=cfg.eval.max_prompt_tokens + cfg.eval.judge_max_new_tokens,
        max_batch_rows=cfg.rollout.max_batch_rows, trust_remote_code=cfg.policy.trust_remote_code,
    )
    return engine, load_tokenizer(engine.info().model_path, cfg.policy.trust_remote_code)


def make_answer_scorer(cfg: Config) -> AnswerScorer:
    """The GRM of `grm.backend` as a pointwise scorer."""
    g = cfg.grm
    if g.backend == "rubric":
        from cpe_ray.judges.rubric import RubricJudge

        return GRMScorer(RubricJudge(g), g, "rubric judge (offline GRM stand-in)", cfg.run.seed)
    if g.backend == "openai":
        from cpe_ray.judges.endpoint import EndpointGRMJudge

        judge = EndpointGRMJudge.from_config(g)
        return GRMScorer(judge, g, judge.describe(), cfg.run.seed)
    assert g.model_path is not None  # config validation requires it for hf, vllm and bt
    if g.backend == "bt":
        return bt_scorer(cfg, cfg.eval.max_prompt_tokens)
    from cpe_ray.judges.engine import EngineJudge

    engine, tokenizer = _engine_and_tokenizer(cfg, g.backend, g.model_path)
    return GRMScorer(EngineJudge(engine, tokenizer, g), g, f"GRM {g.model_path} ({g.backend})",
                     cfg.run.seed)


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
