"""The batch and the maths of the method, without Ray: what the learner and the loop share.

- `experience.py`: `Experience`, the batch that crosses from the controller to the learner.
- `algorithms.py`: advantages (GAE, GRPO, RLOO), the PPO clip loss, the off-policy rewrite
  loss, value loss, KL estimators and loss aggregation.
- `post_edit.py`: the edit prompt (3.3) and the rewrite selection strategies (3.5).
"""
