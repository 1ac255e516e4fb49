"""The RL loop: the controller's step (method.md section 3) and its schedule.

- `trainer.py`: `Trainer.step`, numbered as method.md 3.1-3.7 (answer, critique, rewrite,
  select, score, batch, learn) and sync; the loop's bookkeeping.
- `sampling.py`: 3.1-3.6 of a batch (`Sampler`), a pipeline over prompt chunks.
- `monitor.py`: the reward-hacking monitor (reward against length, persona terms repeated,
  the user named): `monitor/...` metrics each step, warnings, the run's summary.

The maths the step calls (advantages, losses, selection, the edit prompt) is `cpe_ray.algo`.
"""
