"""The batch that travels from rollout to learner, and how it is cut into shards and micro-batches.

Each row is one sample: a prompt left-padded to `prompt_width` followed by its response
right-padded to the response width, so that response token t of every row sits in the same
column. Rewrites (method.md 3.4) are rows like any other, on their *original* prompt, with
`is_edited` set and `edit_logprobs` holding log pi_e from the edit prompt. Each row carries
the temperature it was sampled at (`rollout.temperature` for answers,
`post_edit.temperature` for rewrites): the learner scores every row at its own, so the
ratios compare like with like. Fields the learner fills later (old log-probs, values,
advantages...) start as None.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

ROW_FIELDS = (
    "sequences",
    "attention_mask",
    "response_mask",
    "is_edited",
    "temperature",
    "edit_logprobs",
    "behaviour_logprobs",
    "old_logprobs",
    "ref_logprobs",
    "old_values",
    "advantages",
    "returns",
    "correction_weights",
)


@dataclass
class Experience:
    sequences: Tensor  # [B, P + R] long
    attention_mask: Tensor  # [B, P + R] long
    response_mask: Tensor  # [B, R] float, 1 on response tokens
    prompt_width: int  # P
    is_edited: Tensor  # [B] bool
    # [B] float: the sampling temperature of each row (0: greedy); None: not given, and the
    # learner refuses to score the rows rather than guess
    temperature: Tensor | None = None
    edit_logprobs: Tensor | None = None  # [B, R]; log pi_e on rewrite rows, 0 elsewhere
    # [B, R]; the engine's log-probs of the originals as sampled (rollout correction's
    # pi_engine), 0 on rewrite rows, whose behaviour log-probs are edit_logprobs
    behaviour_logprobs: Tensor | None = None
    old_logprobs: Tensor | None = None  # [B, R]
    ref_logprobs: Tensor | None = None  # [B, R]
    old_values: Tensor | None = None  # [B, R]
    advantages: Tensor | None = None  # [B, R]
    returns: Tensor | None = None  # [B, R]
    # [B, R]; the learner's rollout-correction factors on the token losses (algo/correction.py)
    correction_weights: Tensor | None = None

    def __len__(self) -> int:
        return int(self.sequences.shape[0])

    @property
    def response_width(self) -> int:
        return int(self.response_mask.shape[1])

    @property
    def responses(self) -> Tensor:
        return self.sequences[:, self.prompt_width :]

    def num_tokens(self) -> int:
        return int(self.response_mask.sum())

    def num_nonempty(self) -> int:
        return int((self.response_mask.sum(-1) > 0).sum())

    @classmethod
    def from_tokens(
        cls,
        prompts: Sequence[Sequence[int]],
        responses: Sequence[Sequence[int]],
        pad_id: int,
        is_edited: Sequence[bool] | None = None,
        edit_logprobs: Sequence[Sequence[float]] | None = None,
        temperature: float | Sequence[float] | None = None,
        behaviour_logprobs: Sequence[Sequence[float]] | None = None,
    ) -> Experience:
        """Rows from token ids; `temperature` is one for all rows or one per row.
        `edit_logprobs` / `behaviour_logprobs`: per row, empty for 0s (other rows')."""
        if len(prompts) != len(responses) or not prompts:
            raise ValueError("need as many prompts as responses, at least one")
        width_p = max(len(p) for p in prompts)
        width_r = max(1, max(len(r) for r in responses))
        batch = len(prompts)
        seq = torch.full((batch, width_p + width_r), pad_id, dtype=torch.long)
        attn = torch.zeros_like(seq)
        resp_mask = torch.zeros((batch, width_r), dtype=torch.float32)
        edit_lp = torch.zeros((batch, width_r), dtype=torch.float32)
        behav_lp = torch.zeros((batch, width_r), dtype=torch.float32)
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            seq[i, width_p - len(p) : width_p] = torch.tensor(list(p), dtype=torch.long)
            seq[i, width_p : width_p + len(r)] = torch.tensor(list(r), dtype=torch.long)
            attn[i, width_p - len(p) : width_p + len(r)] = 1
            resp_mask[i, : len(r)] = 1
            if edit_logprobs is not None and edit_logprobs[i]:
                edit_lp[i, : len(r)] = torch.tensor(list(edit_logprobs[i]), dtype=torch.float32)
            if behaviour_logprobs is not None and behaviour_logprobs[i]:
                behav_lp[i, : len(r)] = torch.tensor(list(behaviour_logprobs[i]),
                                                     dtype=torch.float32)
        flags = torch.tensor(list(is_edited) if is_edited is not None else [False] * batch)
        temps = None
        if temperature is not None:
            per_row = [temperature] * batch if isinstance(temperature, int | float) else list(
                temperature)
            if len(per_row) != batch:
                raise ValueError(f"{len(per_row)} temperatures for {batch} rows")
            # float64: the learner divides by exactly the config's value (0.9, not 0.8999999762)
            temps = torch.tensor(per_row, dtype=torch.float64)
        return cls(seq, attn, resp_mask, width_p, flags.bool(), temps, edit_lp,
                   behav_lp if behaviour_logprobs is not None else None)

    def select(self, index: Tensor | Sequence[int]) -> Experience:
        idx = torch.as_tensor(index, dtype=torch.long)
        changes = {}
        for name in ROW_FIELDS:
            value = getattr(self, name)
            changes[name] = None if value is None else value[idx]
        return replace(self, **changes)

    def with_fields(self, **values: Tensor) -> Experience:
        return replace(self, **values)

    def trimmed(self) -> tuple[Experience, int, int]:
        """Drop columns that are padding in every row: (experience, left cut, response width).

        Results computed on the trimmed batch go back to full width with `pad_response`.
        """
        attn_cols = self.attention_mask.any(dim=0).nonzero()
        left = int(attn_cols.min()) if len(attn_cols) else self.prompt_width - 1
        left = min(left, self.prompt_width - 1)  # keep the token that predicts response[0]
        resp_cols = self.response_mask.any(dim=0).nonzero()
        width_r = int(resp_cols.max()) + 1 if len(resp_cols) else 1
        end = self.prompt_width + width_r
        changes = {
            "sequences": self.sequences[:, left:end],
            "attention_mask": self.attention_mask[:, left:end],
            "prompt_width": self.prompt_width - left,
        }
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ROW_FIELDS and value is not None and value.dim() == 2 and (
                f.name not in ("sequences", "attention_mask")
            ):
                changes[f.name] = value[:, :width_r]
        return replace(self, **changes), left, width_r

    def to(self, device: torch.device | str) -> Experience:
        changes = {}
        for name in ROW_FIELDS:
            value = getattr(self, name)
            changes[name] = None if value is None else value.to(device)
        return replace(self, **changes)


def pad_response(values: Tensor, width: int) -> Tensor:
    """Right-pad a [B, r] result with zeros to [B, width]."""
    if values.shape[1] == width:
        return values
    return torch.nn.functional.pad(values, (0, width - values.shape[1]))


def concat(parts: Sequence[Experience]) -> Experience:
    """Rows of several experiences with the same prompt and response widths."""
    first = parts[0]
    if any(p.prompt_width != first.prompt_width or p.response_width != first.response_width
           for p in parts):
        raise ValueError("concat needs equal prompt and response widths")
    changes = {}
    for name in ROW_FIELDS:
        values = [getattr(p, name) for p in parts]
        changes[name] = None if any(v is None for v in values) else torch.cat(values)
    return replace(first, **changes)


def split_even(num_rows: int, parts: int) -> list[list[int]]:
    """Row indices cut into `parts` contiguous runs whose sizes differ by at most one."""
    base, extra = divmod(num_rows, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out
