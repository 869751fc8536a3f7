"""The ``"torch"`` backend: the materialised reference, differentiable through PyTorch autograd."""
from __future__ import annotations


class TorchBackend:
    name = "torch"

    def available(self):
        return True, ""

    def supports(self, problem):
        return True, ""

    def run(self, p):
        from ..reference import attention_math

        return attention_math(p.q, p.k, p.v, p.encoding, p.causal, p.softmax_scale, p.q_pos, p.k_pos,
                              return_lse=p.return_lse, k_lengths=p.k_lengths, k_padding_left=p.k_padding_left,
                              window=p.window, softcap=p.softcap)
