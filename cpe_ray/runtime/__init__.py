"""The distributed runtime: where actors go and how work and weights move between them.

- `placement.py`: config to placement groups, with a fail-fast feasibility check.
- `start.py`: `start_runtime(cfg)`: placement, engine actors, the learner group, the
  weight-sync group; each engine and the learner group can be started again in its bundles.
- `recovery.py`: `Supervisor`: dead engines and learners restarted in-run, bounded, counted.
- `weight_sync.py`: learner-to-engine weights (bucket manifest, broadcast, CUDA IPC).
- `remote.py`: bounded waits on Ray futures with one-line errors; actor environments.
- `pipeline.py`: `Pending` and `Pipeline`, which overlap one step's dependent remote work.
"""
