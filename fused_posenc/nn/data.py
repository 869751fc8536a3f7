"""Synthetic token tasks generated on the fly (no downloads), for examples and tests."""
from __future__ import annotations

from typing import Optional

import torch


def copy_task_batch(vocab_size: int, batch: int, half_len: int, generator: Optional[torch.Generator] = None,
                    device="cpu") -> torch.Tensor:
    """``(batch, 2 * half_len + 1)`` int64: ``[random tokens a] [separator 0] [a again]``.

    Tokens are drawn from ``1 .. vocab_size - 1``; the second half can only be predicted by attending back
    ``half_len + 1`` positions, so the task needs position and content.
    """
    if vocab_size < 3 or half_len < 1 or batch < 1:
        raise ValueError(f"need vocab_size >= 3, half_len >= 1, batch >= 1; got {vocab_size}, {half_len}, {batch}")
    a = torch.randint(1, vocab_size, (batch, half_len), generator=generator)
    sep = torch.zeros(batch, 1, dtype=torch.int64)
    return torch.cat([a, sep, a], 1).to(device)


def copy_task_loss(model, tokens: torch.Tensor, half_len: int) -> torch.Tensor:
    """Cross-entropy of ``model``'s predictions of the copied half of :func:`copy_task_batch` tokens (the random
    first half cannot be predicted, so it is left out)."""
    logits = model(tokens[:, :-1])[:, half_len:]  # predictions of tokens half_len + 1 ..
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                             tokens[:, half_len + 1:].reshape(-1))
