"""ppo.micro_batch_weighting on hand-computed numbers: a token's weight in a mini-batch of two
micro-batches, ours (tokens) and verl's (rows)."""

from __future__ import annotations

import pytest
import torch

from cpe_ray.algo.losses import aggregate_loss, rows_normalizer
from cpe_ray.algo.tensors import masked_mean

# One rank, a mini-batch of 4 rows in 2 micro-batches of 2 rows: answers of 1 and 3 tokens
# (4 tokens), then of 2 and 6 tokens (8 tokens); 12 tokens in all.
MASKS = [torch.tensor([[1.0, 0, 0], [1, 1, 1]]),
         torch.tensor([[1.0, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])]
ROWS, TOKENS = 4, 12


def token_weights(normalizers: list[float], mode: str = "token_mean") -> list[torch.Tensor]:
    """d(mini-batch loss) / d(token loss): each token's weight in the mini-batch's loss."""
    losses = [torch.zeros(m.shape, requires_grad=True) for m in MASKS]
    total = sum(aggregate_loss(loss, m, mode, n)
                for loss, m, n in zip(losses, MASKS, normalizers, strict=True))
    total.backward()
    return [loss.grad for loss in losses]


def test_a_tokens_weight_under_each_option() -> None:
    ours = token_weights([TOKENS / 1] * 2)  # the learner's `_normalizer`: 12 tokens, 1 rank
    verl = token_weights([rows_normalizer("token_mean", m, ROWS, world=1) for m in MASKS])
    for weights, mask in zip(ours, MASKS, strict=True):  # every token 1/12
        torch.testing.assert_close(weights, mask / 12)
    # verl: a micro-batch's mean x its rows / the mini-batch's rows, 2/4 each:
    # (2/4) / 4 tokens = 1/8 in the first, (2/4) / 8 tokens = 1/16 in the second
    torch.testing.assert_close(verl[0], MASKS[0] / 8)
    torch.testing.assert_close(verl[1], MASKS[1] / 16)
    # 1.5x and 0.75x ours; both weigh the mini-batch's tokens to 1 in all
    assert (verl[0].max() / ours[0].max()).item() == pytest.approx(1.5)
    assert (verl[1].max() / ours[1].max()).item() == pytest.approx(0.75)
    assert sum(w.sum() for w in verl).item() == pytest.approx(1.0)


def test_rows_is_verls_mean_times_rows_share() -> None:
    gen = torch.Generator().manual_seed(0)
    losses = [torch.randn(m.shape, generator=gen) for m in MASKS]
    ours = sum(aggregate_loss(x, m, "token_mean", rows_normalizer("token_mean", m, ROWS, 1))
               for x, m in zip(losses, MASKS, strict=True))
    verl = sum(masked_mean(x, m) * (m.shape[0] / ROWS) for x, m in zip(losses, MASKS, strict=True))
    torch.testing.assert_close(ours, verl)
    # on 2 ranks each rank's divisor halves: DeepSpeed's mean over ranks restores it
    assert rows_normalizer("token_mean", MASKS[0], ROWS, world=2) == 4.0
    assert rows_normalizer("token_mean", MASKS[0], ROWS, world=1) == 8.0


def test_sequence_means_weigh_alike_under_both() -> None:
    """Per sequence, each micro-batch's mean over its 2 sequences x 2/4 = 1/4 a sequence: the
    same as the mini-batch's mean over its 4."""
    ours = token_weights([float(ROWS)] * 2, "seq_mean_token_mean")
    verl = token_weights([rows_normalizer("seq_mean_token_mean", m, ROWS, 1) for m in MASKS],
                         "seq_mean_token_mean")
    for a, b in zip(ours, verl, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(ours[0][1], torch.full((3,), 1 / 12))  # 1/4 over 3 tokens


def test_unknown_aggregation_is_refused() -> None:
    with pytest.raises(ValueError, match="loss aggregation"):
        rows_normalizer("sum", MASKS[0], ROWS, 1)
