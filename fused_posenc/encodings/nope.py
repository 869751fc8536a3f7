"""NoPE: no positional encoding, ``score = s * q . k``."""
from __future__ import annotations


from .base import Encoding, KernelParams


class NoPE(Encoding):
    """No positional encoding (``"none"``)."""

    name = "none"

    def kernel_params(self, head_dim, nheads, nheads_kv, batch, device) -> KernelParams:
        return KernelParams(kind="none")
