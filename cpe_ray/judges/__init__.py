"""Judges: everything that turns (persona, question, answer) into a reward.

- `base.py`: the one interface (`Judge`, `JudgeRequest`, the `critique` / `score` modes) and
  the pointwise `AnswerScorer` view used by evaluation.
- `grm.py`: the GRM's text side (rubric template, output parser, weighted reward, retries).
- backends: `engine.py` (a GRM on a generation engine), `endpoint.py` (an OpenAI-compatible
  endpoint and its client), `bt.py` (a Bradley-Terry scalar model), `rubric.py` (the offline
  rule-based stand-in).
- `serve.py`: any of them served as an OpenAI-compatible endpoint (`cpe-ray serve-judge`).
- `registry.py`: which judge a `grm.backend` is, where it runs, and its start-up checks.

Adding a backend: write a class with `judge(requests, mode, seed)`, then add a row to
`cpe_ray.config.choices.GRM_BACKENDS` and its builder to `registry.LOCAL_JUDGES`. Nothing
here imports vllm, deepspeed or openai at import time.
"""
