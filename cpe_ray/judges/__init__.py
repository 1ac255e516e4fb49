"""Judges: everything that turns (persona, question, answer) into a reward.

- `base.py`: the one interface (`Judge`, `JudgeRequest`, the `critique` / `score` modes) and
  the pointwise `AnswerScorer` view used by evaluation.
- `grm.py`: the GRM's text side (rubric template, output parser, weighted reward, retries).
- backends: `engine.py` (a GRM on a generation engine), `endpoint.py` (an OpenAI-compatible
  endpoint and its client), `bt.py` (a Bradley-Terry scalar model), `rubric.py` (the offline
  rule-based stand-in).
- `serve.py`: any of them served as an OpenAI-compatible endpoint (`cpe-ray serve-judge`).
- `registry.py`: the judge table (`JUDGES`: how each `grm.backend` builds its judge and what
  it is called), `build_judge` (the one constructor, used by training, the judge server and
  evaluation) and the checks before start-up.

Adding a backend: write a class with `judge(requests, mode, seed)`; give it a row in
`cpe_ray.config.choices.GRM_BACKENDS` (where it judges, what the config checks of it), one
`registry.JUDGES.register` call (its builder and label), and its test in
`tests/judges/test_registry.py`. Nothing here imports vllm, deepspeed or openai at import time.
"""
