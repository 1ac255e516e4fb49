"""The RL loop: the controller's step (method.md section 3) and what it computes.

- `trainer.py`: `Trainer.step`, numbered as method.md 3.1-3.7 (answer, critique, rewrite,
  select, score, learn), and the loop with checkpoints and metrics.
- `experience.py`: the batch that crosses from the controller to the learner.
- `algorithms.py`: advantages (GAE, GRPO, RLOO), PPO clip loss, the off-policy rewrite loss,
  value loss, KL estimators and loss aggregation.
- `post_edit.py`: the edit prompt and the rewrite selection strategies.
"""
