"""The batch and the maths of the method, without Ray: what the learner and the loop share.

- `experience.py`: `Experience`, the batch that crosses from the controller to the learner.
- `tensors.py`: masked reductions, KL estimators, log-probs and entropy from logits.
- `advantages.py`: GAE, GRPO, RLOO (the table `ADVANTAGE_ESTIMATORS`), `compute_advantages`
  and the staleness weights of stale samples.
- `losses.py`: the policy losses (the table `POLICY_LOSSES`, one `PolicyLossInput`), value,
  SFT and Bradley-Terry losses.
- `post_edit.py`: the edit prompt (3.3) and the rewrite selection strategies (3.5, the table
  `SELECTION_STRATEGIES`).
- `algorithms.py`: TEMPORARY old names, until `rl/trainer.py` imports the modules above.

Each table is a `cpe_ray.config.choices.Table`; its module says how to add an entry.
"""
