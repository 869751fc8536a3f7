"""Triton backend with every RoPE option, and both ways of rotating the streaming operand."""
import pytest
import torch

import fused_posenc as fp
from helpers import make_qkv
from triton_cases import DEVICE, check_triton, needs_triton

pytestmark = needs_triton

VARIANTS = {
    "interleaved": fp.RoPE(interleaved=True),
    "partial": fp.RoPE(rotary_dim=16),
    "partial_interleaved": fp.RoPE(rotary_dim=24, interleaved=True),
    "linear": fp.RoPE(scaling={"type": "linear", "factor": 4.0}),
    "ntk": fp.RoPE(scaling={"type": "ntk", "factor": 4.0}),
    "yarn": fp.RoPE(rotary_dim=32, scaling={"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64}),
    "llama3": fp.RoPE(base=5e5, scaling={"type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64}),
}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_rope_variant(name, causal):
    q, k, v = make_qkv(2, 33, 47, 4, 2, 48, torch.float16, DEVICE, seed=21)
    check_triton(q, k, v, VARIANTS[name], causal)


@pytest.mark.parametrize("mode", ["pre", "inline"])
@pytest.mark.parametrize("encoding", ["rope", VARIANTS["partial_interleaved"]], ids=["rope", "partial_interleaved"])
def test_stream_modes(encoding, mode, monkeypatch):
    monkeypatch.setenv("FUSED_POSENC_ROTATE_STREAM", mode)
    q, k, v = make_qkv(1, 40, 40, 2, 1, 48, torch.float32, DEVICE, seed=22)
    check_triton(q, k, v, encoding, True)


def test_bad_stream_mode(monkeypatch):
    monkeypatch.setenv("FUSED_POSENC_ROTATE_STREAM", "sideways")
    q, k, v = make_qkv(1, 4, 4, 1, 1, 16, torch.float32, DEVICE)
    with pytest.raises(ValueError, match="FUSED_POSENC_ROTATE_STREAM"):
        fp.fused_attention(q, k, v, "rope", backend="triton")
