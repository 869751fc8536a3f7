"""Train one tiny LM per (encoding, task, seed) at the training length and evaluate it at longer lengths.

Every model in a study has the same architecture, parameter count (FoPE's coefficients aside: a few hundred
numbers, frozen or learnable), optimiser, schedule, data and seeds; only the positional encoding differs.
Nothing is tuned per encoding.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch.nn import functional as F

from ..encodings import HoPE
from ..nn import TinyLM
from .tasks import METRIC, VOCAB, make_batch

# the study's encodings: a label -> (TinyLM encoding, fope_learnable)
ENCODINGS = ("none", "rope", "hope", "fope", "fope-learnable", "alibi", "tapa")


@dataclass
class StudyConfig:
    """Sizes of one study. ``quick()`` is the CI smoke test's (numbers not meant as results)."""
    train_len: int = 128
    eval_factors: tuple = (1, 2, 4, 8, 16)
    steps: int = 800
    batch: int = 16
    lr: float = 3e-3
    warmup: int = 50
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: float = 2.0
    eval_sequences: int = 64
    eval_batch_tokens: int = 16384  # sequences per evaluation batch: this many tokens over the length

    @classmethod
    def quick(cls) -> "StudyConfig":
        return cls(train_len=64, eval_factors=(1, 2, 4), steps=30, batch=8, warmup=5, d_model=32,
                   num_heads=2, eval_sequences=8)


def build_model(encoding: str, cfg: StudyConfig, backend: str = "auto") -> TinyLM:
    """The study's TinyLM for an encoding label of :data:`ENCODINGS`. HoPE and FoPE are told the training
    length (which pairs HoPE leaves unrotated, FoPE's floor frequency); the others have no such parameter."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {list(ENCODINGS)}, got {encoding!r}")
    enc = {"hope": HoPE(train_len=cfg.train_len), "fope-learnable": "fope"}.get(encoding, encoding)
    return TinyLM(VOCAB, d_model=cfg.d_model, num_layers=cfg.num_layers, num_heads=cfg.num_heads, encoding=enc,
                  mlp_ratio=cfg.mlp_ratio, fope_learnable=encoding == "fope-learnable",
                  fope_train_len=cfg.train_len, backend=backend)


def _scored_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)


def _lr_at(step: int, cfg: StudyConfig) -> float:
    """Linear warmup, then cosine decay to 10% of ``cfg.lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))


def train(model: TinyLM, task: str, cfg: StudyConfig, seed: int, device="cpu",
          on_step: Optional[Callable[[int, float], None]] = None) -> float:
    """Train ``model`` on ``task`` at ``cfg.train_len`` (fresh batches from a generator seeded by ``seed``);
    returns the mean training loss of the last 10% of steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(1000 + seed)
    tail: List[float] = []
    model.train()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        tokens, targets = make_batch(task, cfg.batch, cfg.train_len, gen, device)
        loss = _scored_loss(model(tokens), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = loss.item()
        if step >= cfg.steps - max(1, cfg.steps // 10):
            tail.append(value)
        if on_step is not None:
            on_step(step, value)
    return sum(tail) / len(tail)


@torch.no_grad()
def evaluate(model: TinyLM, task: str, length: int, cfg: StudyConfig, device="cpu") -> Dict[str, float]:
    """``{"loss", "accuracy"}`` of ``model`` on ``cfg.eval_sequences`` sequences of ``task`` at ``length``, the
    same sequences for every model (a fixed generator per task and length): mean cross-entropy and argmax
    accuracy over the scored positions."""
    model.eval()
    gen = torch.Generator().manual_seed(7_000_000 + length)
    per_batch = max(1, min(cfg.eval_sequences, cfg.eval_batch_tokens // length))
    loss_sum, correct, count, left = 0.0, 0, 0, cfg.eval_sequences
    while left > 0:
        n = min(per_batch, left)
        tokens, targets = make_batch(task, n, length, gen, device)
        logits = model(tokens)
        mask = targets != -100
        loss_sum += F.cross_entropy(logits[mask].float(), targets[mask], reduction="sum").item()
        correct += (logits[mask].argmax(-1) == targets[mask]).sum().item()
        count += mask.sum().item()
        left -= n
    model.train()
    return {"loss": loss_sum / count, "accuracy": correct / count}


def run_cell(encoding: str, task: str, seed: int, cfg: StudyConfig, device="cpu", backend: str = "auto",
             on_step: Optional[Callable[[int, float], None]] = None) -> Iterable[dict]:
    """Train one model and yield one result row per evaluation length (the CSV's columns)."""
    torch.manual_seed(seed)  # the model's initialisation (and FoPE's random coefficients)
    model = build_model(encoding, cfg, backend).to(device)
    t0 = time.perf_counter()
    train_loss = train(model, task, cfg, seed, device, on_step)
    train_s = time.perf_counter() - t0
    for factor in cfg.eval_factors:
        length = factor * cfg.train_len
        t1 = time.perf_counter()
        res = evaluate(model, task, length, cfg, device)
        yield {"encoding": encoding, "task": task, "seed": seed, "train_len": cfg.train_len,
               "eval_len": length, "factor": factor, "metric": METRIC[task], "value": res[METRIC[task]],
               "loss": res["loss"], "accuracy": res["accuracy"], "train_loss": train_loss,
               "params": sum(p.numel() for p in model.parameters()), "train_s": round(train_s, 2),
               "eval_s": round(time.perf_counter() - t1, 2)}


def config_dict(cfg: StudyConfig) -> dict:
    return asdict(cfg)
