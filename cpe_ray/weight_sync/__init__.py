"""Learner-to-engine weights, below everything that sends or receives them.

- `codec.py`: the bucket manifest, packing and unpacking, bucket views, inline tensors.
- `group.py`: the sync group (gloo / NCCL over a `TCPStore`), bucketed broadcast and receive.
- `cuda.py`: CUDA IPC handles, GPU identities, device synchronisation.
- `sender.py`: `WeightSender`, the learner rank's side (owned by the PPO learner core).
"""
