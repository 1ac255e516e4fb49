"""The judge table: how each `grm.backend` builds its judge, and the checks before start-up.

Two halves of one row per backend, under the same names: where it judges and what the config
checks of it are `cpe_ray.config.choices.GRM_BACKENDS` (the schema, the config checks and
placement read them, and the config cannot import this package); how its judge is built and
what it is called is its `JudgeBuilder` in `JUDGES` here. `build_judge` is the one
constructor: training (`runtime/judging.py` in the driver, `actors/grm.py` in a GRM actor),
the judge server (`serve.py`) and evaluation (`evaluation/judges.py`) call it.

| grm.backend | where it judges |
| --- | --- |
| `rubric` | in the driver (the offline rubric judge) |
| `openai` | in the driver, on the `grm.api` endpoint (the paper served its GRM from vLLM) |
| `bt` | in the driver on CPUs; on GPUs one Bradley-Terry scorer actor per `grm.num_engines` |
| `hf`, `vllm` | GRM engine actors |

An engine-backed GRM (`GRM_BACKENDS[...].engine`) judges on a generation engine that the
process it runs in builds (with its own engine settings) and passes to `build_judge`.
`check_backend` runs the cheap checks (the endpoint's key variable, the templates, the
reward model's path) before any actor starts.

Adding a backend: its row in `GRM_BACKENDS`, one `JUDGES.register` call below (its builder
imports its module only when chosen), and its test in `tests/judges/test_registry.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cpe_ray.config import Config
from cpe_ray.config.choices import GRM_BACKENDS, Table
from cpe_ray.engines.base import GenerationEngine
from cpe_ray.judges.base import AnswerScorer, Judge


@dataclass(frozen=True)
class JudgeBuilder:
    """How one backend's judge is built in a process, and what reports call it."""

    build: Callable[[Config, GenerationEngine | None], Judge]  # the engine: engine backends
    describe: Callable[[Config], str]
    # a scalar model is a pointwise scorer itself (evaluation reads it so), given how many
    # prompt tokens it reads; None: evaluation scores with the judge's weighted reward
    scorer: Callable[[Config, int], AnswerScorer] | None = None
    check: Callable[[Config], None] | None = None  # a cheap check of its own before start-up


def check_backend(cfg: Config) -> None:
    """One-line errors for a judge that could not start (config checks are done already)."""
    g = cfg.grm
    own = JUDGES[g.backend].check
    if own is not None:
        own(cfg)
    if GRM_BACKENDS[g.backend].prompted:  # a bad prompt file fails here, not in an actor
        from cpe_ray.judges.grm import load_grm_templates

        load_grm_templates(g)
    if GRM_BACKENDS[g.backend].needs_model and g.model_path:
        from cpe_ray.models import resolve_model_path

        resolve_model_path(g.model_path)


def judge_in_driver(cfg: Config) -> bool:
    """Whether `grm.backend` judges in this process (no GRM actors)."""
    return GRM_BACKENDS[cfg.grm.backend].in_driver(cfg.cluster.use_gpu)


def build_judge(cfg: Config, engine: GenerationEngine | None = None) -> Judge:
    """The judge `grm.backend` names, in this process: on `engine` for an engine-backed GRM
    (which the caller builds where it lives), on nothing else for the others."""
    name = cfg.grm.backend
    if GRM_BACKENDS[name].engine != (engine is not None):
        need = "needs the generation engine it judges on" if engine is None else (
            "judges on no generation engine")
        raise ValueError(f"grm.backend={name} {need}")
    return JUDGES[name].build(cfg, engine)


def describe_judge(cfg: Config) -> str:
    """What reports and logs call the judge of `grm.backend`."""
    return JUDGES[cfg.grm.backend].describe(cfg)


def _rubric(cfg: Config, engine: GenerationEngine | None) -> Judge:
    from cpe_ray.judges.rubric import RubricJudge

    return RubricJudge(cfg.grm)


def _endpoint(cfg: Config, engine: GenerationEngine | None) -> Judge:
    from cpe_ray.judges.endpoint import EndpointGRMJudge

    return EndpointGRMJudge.from_config(cfg.grm)


def _endpoint_key(cfg: Config) -> None:
    """The endpoint's key variable is set."""
    from cpe_ray.judges.endpoint import EndpointSpec

    EndpointSpec.from_config(cfg.grm.api, "grm.api").api_key()


def _bt(cfg: Config, engine: GenerationEngine | None) -> Judge:
    from cpe_ray.judges.bt import make_bt_judge

    return make_bt_judge(cfg)


def _bt_scorer(cfg: Config, max_prompt_tokens: int) -> AnswerScorer:
    from cpe_ray.judges.bt import bt_scorer

    return bt_scorer(cfg, max_prompt_tokens)


def _on_engine(cfg: Config, engine: GenerationEngine | None) -> Judge:
    from cpe_ray.judges.engine import EngineJudge
    from cpe_ray.models import load_tokenizer

    assert engine is not None  # build_judge checks it
    tokenizer = load_tokenizer(engine.info().model_path, cfg.policy.trust_remote_code)
    return EngineJudge(engine, tokenizer, cfg.grm)


def _engine_label(cfg: Config) -> str:
    return f"GRM {cfg.grm.model_path} ({cfg.grm.backend})"


JUDGES: Table[JudgeBuilder] = Table("grm.backend")
JUDGES.register("rubric", JudgeBuilder(
    _rubric, lambda cfg: "rubric judge (offline GRM stand-in)"))
JUDGES.register("hf", JudgeBuilder(_on_engine, _engine_label))
JUDGES.register("vllm", JudgeBuilder(_on_engine, _engine_label))
JUDGES.register("openai", JudgeBuilder(
    _endpoint, lambda cfg: f"GRM endpoint {cfg.grm.api.model} at {cfg.grm.api.base_url}",
    check=_endpoint_key))
JUDGES.register("bt", JudgeBuilder(
    _bt, lambda cfg: f"Bradley-Terry reward model {cfg.grm.model_path}", scorer=_bt_scorer))
