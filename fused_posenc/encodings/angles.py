"""Exact rotation angles: ``pos * theta`` reduced in whole turns, so the error does not grow with the position.

Why: the textbook ``float32(pos) * float32(theta)`` carries a relative error of ~2^-24 of the angle, i.e.
an absolute error that grows with the position (about 4e-3 relative output error at position 10^6, pure
noise from 2^24 on). Every backend here forms the angle instead as

    angle = 2 pi * frac(pos * f),        f = theta / (2 pi) in turns per position,

where only ``frac(f)`` matters (``pos`` is an integer) and ``frac(f)`` is stored as a 128-bit fixed-point
number ``F = round(frac(f) * 2^128)``, computed once per frequency with exact rational arithmetic from
the float64 frequency (``theta`` is taken as the float64 number it is; 2 pi to 100 digits). Then
``pos * F mod 2^128`` is exact integer arithmetic, and its top bits are the turn fraction: the angle's
error is ``|pos| * 2^-129`` turns from the rounding of ``F`` plus the final rounding to the working
precision, for any ``|pos| < 2^62``. The reduced angle lies in ``[-pi, pi)``, where float32 and float64
``cos``/``sin`` are accurate to a few ulp.

* Reference / ``apply_rotary`` (PyTorch, any device): 16-bit limbs in int64 tensors (:func:`exact_angles`),
  float64 result; tables are then rounded to float32 (float64 for float64 inputs).
* C++ / CUDA (``encoding_math.h``, ``turn_angle``): the 128-bit product with 64-bit words.
* Triton (float32 kernels, positions in ``[-2^30, 2^30)``): the top 64 bits ``F64`` (:func:`turns64`),
  ``pos * F64 mod 2^64`` in wrapping int64 arithmetic, its top 32 bits as a signed fraction of a turn:
  error ``<= 2^-35 + 2^-32`` turns (~1e-8 rad) at any position.

Difference from Hugging Face: ``transformers`` forms ``inv_freq`` in float32 and ``position * inv_freq``
in float32, so its angles drift from the exact ones by ~``pos * 6e-8`` rad (2.4e-4 rad at 4096, 0.06 at
10^6). This package computes the exact angle of the float64 frequency; it does not reproduce HF's rounding.
"""
from __future__ import annotations

import functools
from fractions import Fraction

import torch

# 2 pi to 100 significant digits (relative error < 1e-99: far below the 2^-129 turn quantum times 2^62)
_TWO_PI = Fraction("6.283185307179586476925286766559005768394338798750211641949889184615632812572417997256069650684234136")
_ONE = 1 << 128
_LIMB = 16
_MASK = (1 << _LIMB) - 1

POSITION_LIMIT = 2**62  # positions must lie in [-2^62, 2^62): distances |m - n| stay exact in int64


def _signed64(x: int) -> int:
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


@functools.lru_cache(maxsize=256)
def _fixed_point(freqs: tuple) -> tuple:
    """128-bit turn fractions ``F`` (Python ints) of float64 frequencies given in radians per position."""
    out = []
    for theta in freqs:
        f = Fraction(theta) / _TWO_PI
        f -= f.numerator // f.denominator  # frac(f) in [0, 1)
        out.append(round(f * _ONE) % _ONE)
    return tuple(out)


def _as_tuple(freqs) -> tuple:
    if isinstance(freqs, torch.Tensor):
        return tuple(float(x) for x in freqs.detach().to("cpu", torch.float64).tolist())
    return tuple(float(x) for x in freqs)


def turns128(freqs) -> torch.Tensor:
    """``(n, 2)`` int64: the high and low 64-bit words of ``F`` (two's-complement storage), for the C++/CUDA
    kernels. ``freqs``: float64 radians per position (any sequence or CPU tensor)."""
    words = [(_signed64(f >> 64), _signed64(f)) for f in _fixed_point(_as_tuple(freqs))]
    return torch.tensor(words, dtype=torch.int64).reshape(-1, 2)


def turns64(freqs) -> torch.Tensor:
    """``(n,)`` int64: ``F`` rounded to its top 64 bits (``round(frac(f) * 2^64) mod 2^64``), for Triton."""
    return torch.tensor([_signed64((f + (1 << 63)) >> 64) for f in _fixed_point(_as_tuple(freqs))],
                        dtype=torch.int64)


def turn_limbs(freqs) -> torch.Tensor:
    """``(n, 8)`` int64: ``F`` in 16-bit limbs, least significant first (the PyTorch path's operand)."""
    return torch.tensor([[(f >> (_LIMB * j)) & _MASK for j in range(8)] for f in _fixed_point(_as_tuple(freqs))],
                        dtype=torch.int64).reshape(-1, 8)


def exact_angles(positions: torch.Tensor, limbs: torch.Tensor) -> torch.Tensor:
    """``2 pi frac(pos * f)`` in ``[-pi, pi)``, float64 ``(..., n)`` for integer ``positions (...)`` with
    ``|pos| < 2^62`` and ``limbs (n, 8)`` from :func:`turn_limbs` (on the positions' device).

    ``|pos| * F mod 2^128`` is formed column by column from 16-bit limbs (every partial sum < 2^35, so
    int64 never overflows), carried, and its top 64 bits give the turn fraction; a negative position
    negates the angle."""
    pos = positions.to(torch.int64)
    a = pos.abs()[..., None]  # (..., 1)
    fl = limbs.to(pos.device)  # (n, 8)
    pa = [(a >> (_LIMB * i)) & _MASK for i in range(4)]  # |pos| < 2^62: four limbs
    carry = torch.zeros((), dtype=torch.int64, device=pos.device)
    cols = []
    for col in range(8):  # columns >= 8 are multiples of 2^128: they vanish mod 2^128
        c = carry
        for i in range(max(0, col - 7), min(3, col) + 1):
            c = c + pa[i] * fl[:, col - i]
        carry = c >> _LIMB
        cols.append(c & _MASK)
    t = ((cols[7].double() * 2.0**-16 + cols[6].double() * 2.0**-32) + cols[5].double() * 2.0**-48) \
        + cols[4].double() * 2.0**-64  # turns in [0, 1)
    t = torch.where(t >= 0.5, t - 1.0, t)
    ang = t * (2 * torch.pi)
    return torch.where(pos[..., None] < 0, -ang, ang)


def check_positions_range(name: str, pos: torch.Tensor, lo: int = -POSITION_LIMIT, hi: int = POSITION_LIMIT,
                          why: str = "distances |m - n| must be exact") -> None:
    """Raise ``ValueError`` naming ``name`` unless every position is in ``[lo, hi)`` (default ``[-2^62, 2^62)``).

    No host-device sync: the test is ``torch._assert_async``, which on a CUDA tensor is a device-side assert
    (it fails the stream asynchronously with the message; the CUDA context is then unusable, as after any
    device assert) and on a CPU tensor raises at once, as a ``ValueError`` with the values here.
    """
    if pos.numel() == 0 or (pos.dtype in _SMALL_INTS and -(2**31) >= lo and 2**31 <= hi):
        return  # cannot leave the range
    def got():
        mn, mx = torch.aminmax(pos.to(torch.int64))
        return f" ({why}), got values in [{int(mn)}, {int(mx)}]"

    assert_values(((pos >= lo) & (pos < hi)).all(), f"{name} must lie in {_range_str(lo, hi)}", got)


def assert_values(ok: torch.Tensor, what: str, detail=lambda: "") -> None:
    """Check a value condition without a host-device sync: ``ok`` (a bool tensor) must be true, else ``what``.

    On a CUDA tensor the test is ``torch._assert_async``, a device-side assert (it fails the stream
    asynchronously with the message; the CUDA context is then unusable, as after any device assert); on a CPU
    tensor it raises at once, a ``ValueError`` of ``what`` plus ``detail()`` (read only on this error path).
    """
    try:
        torch._assert_async(ok, f"fused_posenc: {what}")
    except RuntimeError:  # CPU: raised now
        raise ValueError(what + detail()) from None


_SMALL_INTS = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.uint16, torch.uint32)


def _range_str(lo: int, hi: int) -> str:
    def p2(x):
        if x != 0 and abs(x) & (abs(x) - 1) == 0:
            return f"{'-' if x < 0 else ''}2^{abs(x).bit_length() - 1}"
        return str(x)

    return f"[{p2(lo)}, {p2(hi)})"
