"""The run directory that every training job shares: joining Ray, ownership, checkpoints.

`cpe-ray train`, `sft`, `grm train` and `rm train` all open their run directory here before
Ray starts, write whole checkpoints into it and resume from them. Import the module you need;
this file imports nothing.

- `layout.py`: the names inside a run directory (`checkpoints/step-N/`, `manifest.json`,
  `policy/`, ...), `note` (our informational lines)
- `ray_join.py`: where the cluster is, probing its address before `ray.init`, joining Ray so
  that a stop ends it cleanly; the driver's step counter
- `ownership.py`: `open_run`: the directory's lock, refusing another run's directory, the
  resume check against the run's config and the kept `config.<n>.yaml`
- `checkpoints.py`: writing a checkpoint whole (manifest last, renamed into place),
  verifying one, choosing the one to resume from, restoring it; `SavePolicy`
"""
