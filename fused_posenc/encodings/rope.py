"""RoPE and its frequency rescalings (linear, NTK, YaRN, Llama 3.1).

Derivation notes (the spec is the project's ``encodings.md``, kept beside this repository in ``../shared/spec/``):

* ``theta_i = base^(-2i/d)`` over the rotated width ``d`` (HF's partial-rotary convention).
* Each pair ``(x1, x2)`` at position ``p`` becomes ``(x1 cos - x2 sin, x2 cos + x1 sin)`` with
  angle ``p * theta_i``. For a query at ``m`` and key at ``n``,
  ``q'.k' = sum_i Re[(q1 + i q2) conj(k1 + i k2) e^{i (m - n) theta_i}]``: a function of ``m - n``.
* A rescaling only changes the vector ``theta`` (plus YaRN's logit factor ``0.1 ln(f) + 1`` on
  cos and sin, i.e. its square on the logits of the rotated part).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .angles import exact_angles, turn_limbs, turns64, turns128
from .base import Encoding, KernelParams, check_positive, half_pairs, is_contiguous_split

_SCALING_KEYS = {
    "linear": {"factor"},
    "ntk": {"factor"},
    "yarn": {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor"},
    "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"},
}
_ALIASES = {"ntk-aware": "ntk", "llama-3": "llama3", "llama3.1": "llama3"}


def _normalise_scaling(scaling) -> Optional[dict]:
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise TypeError(f"scaling must be None or a dict like {{'type': 'yarn', 'factor': 4.0}}, got {type(scaling).__name__}")
    s = dict(scaling)
    kinds = set()
    for key in ("type", "rope_type"):  # transformers configs carry both
        if key in s:
            name = str(s.pop(key)).lower()
            kinds.add(_ALIASES.get(name, name))
    if not kinds:
        raise ValueError("scaling needs a 'type': one of 'linear', 'ntk', 'yarn', 'llama3'")
    if len(kinds) > 1:
        raise ValueError(f"scaling['type'] and scaling['rope_type'] disagree: {sorted(kinds)}")
    (kind,) = kinds
    if kind == "dynamic":
        raise ValueError("scaling type 'dynamic' (Hugging Face's dynamic NTK, which changes the frequencies only "
                         "past max_position_embeddings) is not one RoPE: 'ntk' is the static NTK-aware scaling; an HF model with "
                         "dynamic (or longrope) scaling is followed call by call by integrations.transformers")
    if kind not in _SCALING_KEYS:
        raise ValueError(f"scaling type must be one of 'linear', 'ntk', 'yarn', 'llama3', got {kind!r}")
    unknown = set(s) - _SCALING_KEYS[kind]
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for {kind} scaling; expected {sorted(_SCALING_KEYS[kind])}")
    if "factor" not in s:
        raise ValueError(f"{kind} scaling needs 'factor'")
    s["factor"] = check_positive("scaling['factor']", s["factor"])
    if kind in ("yarn", "llama3") and "original_max_position_embeddings" not in s:
        raise ValueError(f"{kind} scaling needs 'original_max_position_embeddings'")
    for key in s:
        if key != "factor" and s[key] is not None:
            s[key] = check_positive(f"scaling[{key!r}]", s[key])
    s["type"] = kind
    return s


def rope_frequencies(rotary_dim: int, base: float, scaling: Optional[dict]) -> tuple[torch.Tensor, float]:
    """``(theta (d/2,) float64, logit factor)`` for RoPE with an optional rescaling."""
    d = rotary_dim
    i = torch.arange(d // 2, dtype=torch.float64)
    if scaling is None:
        return base ** (-2.0 * i / d), 1.0
    kind, factor = scaling["type"], scaling["factor"]
    if kind == "ntk":
        base = base * factor ** (d / (d - 2)) if d > 2 else base
        return base ** (-2.0 * i / d), 1.0
    theta = base ** (-2.0 * i / d)
    if kind == "linear":
        return theta / factor, 1.0
    L0 = scaling["original_max_position_embeddings"]
    if kind == "yarn":
        beta_fast = scaling.get("beta_fast") or 32.0
        beta_slow = scaling.get("beta_slow") or 1.0

        def corr(rot):
            return d * math.log(L0 / (rot * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(corr(beta_fast)), 0)
        high = min(math.ceil(corr(beta_slow)), d - 1)
        if low == high:
            high += 0.001
        r = ((i - low) / (high - low)).clamp(0, 1)
        theta = theta * (1 - r) + (theta / factor) * r
        att = scaling.get("attention_factor")
        att = att if att is not None else (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
        return theta, float(att)
    # llama3
    low_ff = scaling.get("low_freq_factor") or 1.0
    high_ff = scaling.get("high_freq_factor") or 4.0
    if high_ff <= low_ff:
        raise ValueError(f"llama3 scaling needs high_freq_factor > low_freq_factor, got {high_ff} <= {low_ff}")
    wavelen = 2 * math.pi / theta
    g = (L0 / wavelen - low_ff) / (high_ff - low_ff)
    mid = (1 - g) * theta / factor + g * theta
    out = torch.where(wavelen > L0 / low_ff, theta / factor, torch.where(wavelen < L0 / high_ff, theta, mid))
    return out, 1.0


class RoPE(Encoding):
    """Rotary position embedding (``"rope"``).

    Args:
        base: frequency base ``b``; ``theta_i = b^(-2i/d)``.
        rotary_dim: rotated width ``d`` (even, ``<= headdim``); ``None`` rotates the whole head.
        interleaved: pair ``(2i, 2i+1)`` (GPT-J) instead of ``(i, i + d/2)`` (GPT-NeoX/Llama).
        scaling: ``None`` or a dict with ``type`` in ``linear | ntk | yarn | llama3`` and its
            options (``factor``; YaRN: ``original_max_position_embeddings``, ``beta_fast=32``,
            ``beta_slow=1``, ``attention_factor``; Llama 3: ``original_max_position_embeddings``,
            ``low_freq_factor=1``, ``high_freq_factor=4``).
        inv_freq: instead of ``base`` and ``scaling``, the frequencies themselves: ``(rotary_dim / 2,)`` radians
            per position (e.g. a Hugging Face model's ``rotary_emb.inv_freq``, whatever its rope type); taken
            as exact numbers (their float64 values), the angle ``pos * inv_freq[i]`` reduced exactly.
        attention_factor: with ``inv_freq``, the factor on cos and sin (HF's ``attention_scaling``; 1 default).
    """

    name = "rope"
    is_rotation = True

    def __init__(self, base: float = 10000.0, rotary_dim: Optional[int] = None, interleaved: bool = False,
                 scaling: Optional[dict] = None, inv_freq=None, attention_factor: Optional[float] = None):
        self.base = check_positive("base", base)
        if self.base == 1.0:
            raise ValueError("base must be != 1")
        if rotary_dim is not None:
            if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int):
                raise TypeError(f"rotary_dim must be an int or None, got {type(rotary_dim).__name__}")
            if rotary_dim <= 0 or rotary_dim % 2:
                raise ValueError(f"rotary_dim must be a positive even int, got {rotary_dim}")
        self.rotary_dim = rotary_dim
        if not isinstance(interleaved, bool):
            raise TypeError(f"interleaved must be a bool, got {type(interleaved).__name__}")
        self.interleaved = interleaved
        self.scaling = _normalise_scaling(scaling)
        self.inv_freq = None
        self.attention_factor = 1.0
        if inv_freq is not None:
            if scaling is not None:
                raise ValueError("give either scaling or inv_freq, not both")
            f = torch.as_tensor(inv_freq).detach().to("cpu", torch.float64).flatten()
            if f.numel() == 0 or not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
                raise ValueError("inv_freq must be a non-empty vector of finite, non-negative frequencies")
            if rotary_dim is not None and rotary_dim != 2 * f.numel():
                raise ValueError(f"rotary_dim={rotary_dim} but inv_freq has {f.numel()} frequencies (2x must match)")
            self.inv_freq = tuple(f.tolist())
            self.rotary_dim = 2 * f.numel()
        if attention_factor is not None:
            if inv_freq is None:
                raise ValueError("attention_factor goes with inv_freq (YaRN's own comes from scaling)")
            self.attention_factor = check_positive("attention_factor", attention_factor)

    def _d(self, head_dim: int) -> int:
        return head_dim if self.rotary_dim is None else self.rotary_dim

    def validate(self, head_dim, nheads, nheads_kv, batch):
        if head_dim % 2:
            raise ValueError(f"{self.name} needs an even head dim, got headdim={head_dim}")
        if self._d(head_dim) > head_dim:
            raise ValueError(f"rotary_dim={self.rotary_dim} must be <= headdim={head_dim}")

    def frequencies(self, head_dim: int) -> tuple[torch.Tensor, float]:
        """``(theta (P,) float64 over all P = headdim/2 pairs, zeros for pass-through, logit factor)``."""
        d = self._d(head_dim)
        if self.inv_freq is not None:
            theta, att = torch.tensor(self.inv_freq, dtype=torch.float64), self.attention_factor
        else:
            theta, att = rope_frequencies(d, self.base, self.scaling)
        full = torch.zeros(head_dim // 2, dtype=torch.float64)
        full[: d // 2] = theta
        return full, att

    def pairs(self, head_dim):
        return half_pairs(head_dim, self._d(head_dim), self.interleaved)

    def tables(self, positions, head_dim, nheads, nheads_kv, dtype):
        limbs, scale = self.device_cached(("tables", head_dim), positions.device,
                                          lambda: self._table_operands(head_dim, positions.device))
        # exact angles (encodings/angles.py): pos * theta reduced in turns, in float64, for any position
        ang = exact_angles(positions, limbs)  # (Bp, T, P) float64 in [-pi, pi)
        cos, sin = (torch.cos(ang) * scale).to(dtype), (torch.sin(ang) * scale).to(dtype)
        return cos[:, :, None, :], sin[:, :, None, :]

    def pair_scale(self, head_dim: int) -> torch.Tensor:
        """``(P,)`` float64 multiplying cos and sin: YaRN's attention factor on the rotated pairs, 1 elsewhere."""
        _, att = self.frequencies(head_dim)
        scale = torch.ones(head_dim // 2, dtype=torch.float64)
        scale[: self._d(head_dim) // 2] = att
        return scale

    def _table_operands(self, head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(turn limbs (P, 8) int64, cos/sin scale (P,) float64)`` on ``device``."""
        theta, _ = self.frequencies(head_dim)
        return turn_limbs(theta).to(device), self.pair_scale(head_dim).to(device)

    def kernel_params(self, head_dim, nheads, nheads_kv, batch, device) -> KernelParams:
        idx1, idx2 = self.pairs(head_dim)
        theta, _ = self.frequencies(head_dim)
        scale = self.pair_scale(head_dim)
        return KernelParams(kind="rotary", idx1=idx1.to(device), idx2=idx2.to(device),
                            contiguous=is_contiguous_split(idx1, idx2), pair_freqs=theta.to(device),
                            pair_turns=turns128(theta).to(device), pair_turns64=turns64(theta).to(device),
                            pair_scale=scale.to(device))

    def __repr__(self):
        if self.inv_freq is not None:  # every frequency: the repr is the cache key (Encoding.cache_key)
            return (f"{type(self).__name__}(inv_freq={self.inv_freq}, attention_factor={self.attention_factor}, "
                    f"interleaved={self.interleaved})")
        return (f"{type(self).__name__}(base={self.base}, rotary_dim={self.rotary_dim}, "
                f"interleaved={self.interleaved}, scaling={self.scaling})")
