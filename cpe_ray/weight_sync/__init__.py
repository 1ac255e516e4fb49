"""Learner-to-engine weights, below everything that sends or receives them.

- `codec.py`: the bucket manifest, packing and unpacking, the sync group (gloo / NCCL over a
  `TCPStore`), bucketed broadcast and receive, CUDA IPC handles and GPU identities.
"""
