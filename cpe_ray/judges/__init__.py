"""Judges: everything that turns (persona, question, answer) into a reward.

- `base.py`: the one interface (`Judge`, `JudgeRequest`, the `critique` / `score` modes) and
  the pointwise `AnswerScorer` view used by evaluation.
- `grm.py`: the GRM's text side (rubric template, output parser, weighted reward, retries).
- backends: `engine.py` (a GRM on a generation engine), `endpoint.py` (an OpenAI-compatible
  endpoint and its client), `bt.py` (a Bradley-Terry scalar model), `rubric.py` (the offline
  rule-based stand-in).
- `serve.py`: any of them served as an OpenAI-compatible endpoint (`cpe-ray serve-judge`).
- `client.py`: the controller's view, the table of `grm.backend` values and where each runs
  (driver, driver thread, GRM actors); the one place a backend is chosen.

Adding a backend: write a class with `judge(requests, mode, seed)`, then add a row to
`client.BACKENDS`. Nothing here imports vllm, deepspeed or openai at import time.
"""
