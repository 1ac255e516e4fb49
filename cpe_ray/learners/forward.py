"""The learner's forward pass over a batch: outputs at the positions that predict responses.

Two savings over one plain `model(sequences)` call, neither of which changes a result beyond
float rounding (tests/learners/test_forward.py holds them to 1e-5):

* **Shared prompts.** The rows of one prompt (its n answers and their rewrites, which are
  trained on the ORIGINAL prompt, method.md 3.4) repeat the same prompt tokens, which on the
  CPU default are 90% of a row (about 400 prompt tokens to 48 answer tokens). Each distinct
  prompt of a micro-batch runs once; its keys and values are then handed to each of its rows
  (a `DynamicCache` indexed by row), and only the responses run per row. Gradients flow back
  through the shared prompt pass exactly as through n copies of it. On the CPU default's
  batch a forward and backward is 1.7x faster in micro-batches of 4 rows, 3.7x in one of 48
  (`bench/learner_forward.py`).
* **Logits only where they are used.** A causal LM's head runs on the response positions
  only (`logits_to_keep`), not on the prompt's: at a 152k vocabulary that is most of a
  forward's memory.

`micro_order` sorts rows so that a micro-batch holds whole prompts where it can; the row
order inside an optimiser step changes nothing but rounding, since losses are sums
normalised by the step's token count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cpe_ray.algo.experience import Experience
from cpe_ray.models import accepts, position_ids, unwrap


@dataclass(frozen=True)
class PromptGroups:
    """Rows that share a prompt: `index[row]` is the row's group, `first[group]` one of its
    rows (the prompt pass runs on those)."""

    index: Tensor  # [B] long
    first: Tensor  # [G] long

    def __len__(self) -> int:
        return int(self.first.shape[0])


def prompt_groups(exp: Experience) -> PromptGroups:
    """Groups of rows whose prompts are the same tokens (padding aside), in first-seen order;
    the indices on the batch's device."""
    width = exp.prompt_width
    # one copy to the host for the whole batch, not one per row (on a GPU, one sync)
    prompts = exp.sequences[:, :width].tolist()
    mask = exp.attention_mask[:, :width].tolist()
    seen: dict[tuple[int, ...], int] = {}
    index, first = [], []
    for row, (ids, keep) in enumerate(zip(prompts, mask, strict=True)):
        key = tuple(t for t, k in zip(ids, keep, strict=True) if k)
        if key not in seen:
            seen[key] = len(first)
            first.append(row)
        index.append(seen[key])
    device = exp.sequences.device
    return PromptGroups(torch.tensor(index, dtype=torch.long, device=device),
                        torch.tensor(first, dtype=torch.long, device=device))


def micro_order(exp: Experience) -> Tensor:
    """A permutation of the rows that puts the rows of each prompt next to each other
    (groups in first-seen order, rows in their order within a group)."""
    index = prompt_groups(exp).index.cpu()
    return torch.sort(index, stable=True).indices


class ResponseForward:
    """Outputs of `model` at the positions that predict each response token: [B, R, ...].

    `share_prompts` runs each distinct prompt once (see the module docstring), even where
    every row has its own prompt: under ZeRO-3 each forward call gathers the parameters
    collectively, so every rank must make the same calls whatever its rows. It is off where
    the model cannot take it: a module without `past_key_values`, or one training under
    gradient checkpointing, which Hugging Face runs without a cache.
    """

    def __init__(self, model: torch.nn.Module, share_prompts: bool) -> None:
        self.model = model
        self.keep_logits = accepts(model, "logits_to_keep")
        self.share = share_prompts and accepts(model, "past_key_values")

    def __call__(self, exp: Experience) -> Tensor:
        module = unwrap(self.model)
        share = self.share and not (
            module.training and getattr(module, "is_gradient_checkpointing", False))
        return self._shared(exp, prompt_groups(exp)) if share else self._plain(exp)

    def _plain(self, exp: Experience) -> Tensor:
        p, r = exp.prompt_width, exp.response_width
        extra = {"logits_to_keep": r + 1} if self.keep_logits else {}
        out = self.model(input_ids=exp.sequences, attention_mask=exp.attention_mask,
                         position_ids=position_ids(exp.attention_mask), use_cache=False,
                         **extra).logits
        if self.keep_logits:  # the last r + 1 positions: p - 1 ... p + r - 1
            return out[:, :r]
        return out[:, p - 1 : p - 1 + r]

    def _shared(self, exp: Experience, groups: PromptGroups) -> Tensor:
        from transformers import DynamicCache

        p = exp.prompt_width
        positions = position_ids(exp.attention_mask)
        cache = DynamicCache()
        extra = {"logits_to_keep": 1} if self.keep_logits else {}
        # Prompts are left-padded to one width, so a group's last column is its last token:
        # the one that predicts response token 0
        head = self.model(input_ids=exp.sequences[groups.first, :p],
                          attention_mask=exp.attention_mask[groups.first, :p],
                          position_ids=positions[groups.first, :p], past_key_values=cache,
                          use_cache=True, **extra).logits[:, -1:]
        cache.batch_select_indices(groups.index)
        rest = self.model(input_ids=exp.sequences[:, p:], attention_mask=exp.attention_mask,
                          position_ids=positions[:, p:], past_key_values=cache,
                          use_cache=True).logits
        return torch.cat([head[groups.index], rest[:, :-1]], dim=1)
