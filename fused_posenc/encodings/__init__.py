"""Positional encodings as data: each one's parameters, defaults and naive math."""
from __future__ import annotations

import inspect

from .alibi import ALiBi, alibi_slopes
from .base import Encoding, KernelParams
from .fope import FoPE
from .hope import HoPE
from .nope import NoPE
from .rope import RoPE
from .tapa import TAPA

_BY_NAME = {"none": NoPE, "nope": NoPE, "rope": RoPE, "hope": HoPE, "fope": FoPE, "alibi": ALiBi, "tapa": TAPA}
NAMES = ("none", "rope", "hope", "fope", "alibi", "tapa")
FOPE_DEFAULT_SEED = 0


def get_encoding(name, **options) -> Encoding:
    """Resolve an encoding name (``"none"``, ``"rope"``, ``"hope"``, ``"fope"``, ``"alibi"``, ``"tapa"``)
    to an instance built with ``options``; an :class:`Encoding` instance is returned unchanged.

    ``"fope"`` needs ``head_dim`` (and usually ``num_heads``); ``fused_attention`` supplies them from
    ``q``. Without a ``seed`` it uses a fixed one, so two calls build the same coefficients.
    """
    if isinstance(name, Encoding):
        if options:
            raise ValueError(f"options {sorted(options)} given with an encoding instance; pass them to its constructor")
        return name
    if not isinstance(name, str):
        raise TypeError(f"encoding must be a name or an Encoding instance, got {type(name).__name__}")
    key = name.lower()
    if key not in _BY_NAME:
        raise ValueError(f"unknown encoding {name!r}; expected one of {list(NAMES)}")
    cls = _BY_NAME[key]
    if cls is FoPE:
        options.setdefault("seed", FOPE_DEFAULT_SEED)
    params = inspect.signature(cls.__init__).parameters.values() if cls.__init__ is not object.__init__ else []
    known = [p.name for p in params if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"bad option for encoding {name!r}: unknown option(s) {unknown}; expected some of {known}")
    try:
        return cls(**options)
    except TypeError as e:
        raise TypeError(f"bad option for encoding {name!r}: {e}") from None


__all__ = ["Encoding", "KernelParams", "NoPE", "RoPE", "HoPE", "FoPE", "ALiBi", "TAPA", "get_encoding",
           "alibi_slopes", "NAMES"]
