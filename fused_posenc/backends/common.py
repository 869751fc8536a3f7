"""Checks several backends share."""
from __future__ import annotations

import torch


def learnable_slopes(problem) -> bool:
    """Whether the call must return a gradient for caller-given ALiBi slopes."""
    s = getattr(problem.encoding, "_slopes", None)
    return problem.encoding.name == "alibi" and s is not None and s.requires_grad and torch.is_grad_enabled()
