"""The DeepSpeed rank cores, free of Ray: one process's share of training.

- `ppo.py`: the PPO rank (policy, critic, optional reference): log-probs, values, updates,
  state save / load, HF export, and the sender side of weight sync.
- `supervised.py`: the supervised rank (`sft`: masked token cross-entropy; `bt`:
  Bradley-Terry on a scalar head) used by the stages.
- `ds_config.py`: the DeepSpeed configs built from `learner.*`.
- `lora.py`: LoRA (`policy.lora`): the peft wrapping, the adapter-only state, the merged
  export with the adapter beside it.
The Ray actors that host them are in `actors/`.
"""
