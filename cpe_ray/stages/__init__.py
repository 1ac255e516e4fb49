"""The supervised stages around the RL loop (method.md section 4): stage 1, stage 2, baselines.

- `loop.py`: the shared stage loop (placement, resume, seeded epochs, held-out
  evaluation, checkpoints, `summary.json`); `data.py`: conversations and pairs tokenized
  with labels on assistant tokens, seeded held-out splits.
- `sft.py` (`cpe-ray sft`), `distill.py` (`cpe-ray grm collect`), `grm_train.py`
  (`cpe-ray grm train`), `rm.py` (`cpe-ray rm train`, the Bradley-Terry model), `merge.py`
  (`cpe-ray merge`: DARE-TIES, TIES, linear, SLERP on mergekit).
- `cli.py`: those commands' argument parsing.
"""
