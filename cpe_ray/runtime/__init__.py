"""The distributed runtime: where actors go and how work and weights move between them.

- `placement.py`: config to placement groups, with a fail-fast feasibility check.
- `start.py`: `start_runtime(cfg)`: placement, engine actors, the learner group, the
  weight-sync group; each engine and the learner group can be started again in its bundles.
- `recovery.py`: `Supervisor`: dead engines and learners restarted in-run, bounded, counted.
- `groups.py`, `learner_group.py`: the driver's handles on DeepSpeed rank groups (supervised
  and PPO), typed methods over bounded waits; the learner group runs weight syncs.
- `judging.py`: `JudgeClient`, the controller's view of the judge (in process or GRM actors).
- `remote.py`: bounded waits on Ray futures with one-line errors; actor environments.
- `pipeline.py`: `Pending` and `Pipeline`, which overlap one step's dependent remote work.
"""
