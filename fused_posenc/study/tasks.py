"""Synthetic tasks for the length-generalisation study, generated on the fly (no downloads).

Every task makes ``(tokens, targets)``: ``tokens (B, T)`` int64 is the model's input and ``targets (B, T)``
the token each position must predict, ``-100`` where nothing is scored. The same generator makes training
batches at the training length and evaluation batches at any longer length; what changes with the length is
only how far apart the things the model must connect are (the task stays the same task).

One vocabulary serves all tasks (``VOCAB`` tokens):

    0 PAD   1 MARK (passkey follows)   2 QUERY (answer follows)   3 SEP (sentence end)
    4 .. 13 digits (passkeys)
    14 .. 45 keys (associative recall)
    46 .. 77 values (associative recall)
    78 .. 127 words (filler text, the LM corpus)

Tasks:

``passkey``: filler text (one fixed 10-word sentence repeated, the papers' "the grass is green ..." made of
    tokens), with ``MARK d1 .. d5`` (a random 5-digit passkey) at a uniformly random depth, and
    ``QUERY d1 .. d5`` at the end. Scored: the five answer digits (each predicted from the tokens before it).
``recall``: associative recall over distance: 8 key-value pairs (distinct random keys, random values) at
    random places in the same filler text, anywhere before the last 24 tokens, which hold the 8 keys again in a
    random order as ``QUERY key value`` triples; scored: each queried value. The pairs move farther from their
    queries as the sequence grows.
``lm``: language modelling on documents with long-range structure: each document draws a pool of 8
    sentences (8 random words and ``SEP``), then is a random sequence of pool sentences; every position is
    scored (next-token cross-entropy). A sentence's first occurrence is unpredictable, its later occurrences
    are predictable after their first word by recalling the earlier one, anywhere in the context.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

PAD, MARK, QUERY, SEP = 0, 1, 2, 3
DIGITS = range(4, 14)
KEYS = range(14, 46)
VALUES = range(46, 78)
WORDS = range(78, 128)
VOCAB = 128

PASSKEY_DIGITS = 5
RECALL_PAIRS = 8
LM_POOL, LM_SENTENCE = 8, 8

_FILLER_SENTENCE = torch.tensor([78, 79, 80, 81, 82, 83, 84, 85, 86, 87])  # "the grass is green ..." as tokens

TASKS = ("passkey", "recall", "lm")
METRIC = {"passkey": "accuracy", "recall": "accuracy", "lm": "loss"}  # what each task's evaluation reports


def _randint(low: int, high: int, shape, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(low, high, shape, generator=generator)


def passkey_batch(batch: int, length: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Passkey retrieval in repeated filler text (see the module docstring); ``length >= 16``."""
    n = PASSKEY_DIGITS
    if length < 3 * n + 1:
        raise ValueError(f"passkey needs length >= {3 * n + 1}, got {length}")
    reps = -(-length // len(_FILLER_SENTENCE))
    filler = _FILLER_SENTENCE.repeat(reps)[:length]
    tokens = filler.repeat(batch, 1)  # [B, T]
    targets = torch.full((batch, length), -100, dtype=torch.int64)
    keys = _randint(DIGITS.start, DIGITS.stop, (batch, n), generator)  # [B, n]
    answer_at = length - n - 1  # QUERY here, the digits after it
    depth = _randint(0, answer_at - n, (batch,), generator)  # MARK's position: anywhere before the answer
    rows = torch.arange(batch)
    tokens[rows, depth] = MARK
    for j in range(n):
        tokens[rows, depth + 1 + j] = keys[:, j]
    tokens[:, answer_at] = QUERY
    tokens[:, answer_at + 1:] = keys
    targets[:, answer_at:answer_at + n] = keys  # position t predicts token t + 1
    return tokens, targets


def recall_batch(batch: int, length: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Associative recall over distance (see the module docstring); ``length >= 64``."""
    n = RECALL_PAIRS
    if length < 64:
        raise ValueError(f"recall needs length >= 64, got {length}")
    reps = -(-length // len(_FILLER_SENTENCE))
    tokens = _FILLER_SENTENCE.repeat(reps)[:length].repeat(batch, 1)  # [B, T] the filler text
    targets = torch.full((batch, length), -100, dtype=torch.int64)
    query_len = 3 * n
    context = length - query_len  # pairs live in tokens[:context]
    keys = torch.argsort(torch.rand(batch, len(KEYS), generator=generator), dim=1)[:, :n] + KEYS.start  # distinct
    values = _randint(VALUES.start, VALUES.stop, (batch, n), generator)
    # pair slots: n distinct even offsets in [0, context - 2), so pairs never overlap
    slots = torch.argsort(torch.rand(batch, context // 2 - 1, generator=generator), dim=1)[:, :n] * 2  # [B, n]
    rows = torch.arange(batch)[:, None]
    tokens[rows, slots] = keys
    tokens[rows, slots + 1] = values
    order = torch.argsort(torch.rand(batch, n, generator=generator), dim=1)  # query order
    q_keys, q_values = keys.gather(1, order), values.gather(1, order)
    base = context + 3 * torch.arange(n)  # QUERY at base, key at base + 1, value at base + 2
    tokens[:, base] = QUERY
    tokens[:, base + 1] = q_keys
    tokens[:, base + 2] = q_values
    targets[:, base + 1] = q_values  # the key's position predicts the value
    return tokens, targets


def lm_batch(batch: int, length: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Documents of repeated pool sentences (see the module docstring); every next token is scored."""
    s = LM_SENTENCE + 1
    pool = _randint(WORDS.start, WORDS.stop, (batch, LM_POOL, s), generator)  # [B, P, s]
    pool[:, :, -1] = SEP
    n_sent = -(-(length + 1) // s)
    pick = _randint(0, LM_POOL, (batch, n_sent), generator)  # [B, S]
    doc = pool.gather(1, pick[:, :, None].expand(-1, -1, s)).reshape(batch, -1)[:, :length + 1]
    return doc[:, :-1].contiguous(), doc[:, 1:].contiguous()


_MAKERS = {"passkey": passkey_batch, "recall": recall_batch, "lm": lm_batch}


def make_batch(task: str, batch: int, length: int, generator: Optional[torch.Generator] = None,
               device="cpu") -> Tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, targets)`` of ``task`` (one of :data:`TASKS`), both ``(batch, length)`` int64 on ``device``."""
    if task not in _MAKERS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    tokens, targets = _MAKERS[task](batch, length, generator)
    return tokens.to(device), targets.to(device)
