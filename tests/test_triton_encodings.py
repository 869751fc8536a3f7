"""Triton backend vs the reference: every encoding, forward and all gradients, causal and not, GQA."""
import pytest

import fused_posenc as fp
from helpers import make_qkv
from triton_cases import DEVICE, DTYPES, check_triton, needs_triton

pytestmark = needs_triton

ENCODINGS = {
    "none": lambda d, h, hkv: "none",
    "rope": lambda d, h, hkv: "rope",
    "hope": lambda d, h, hkv: fp.HoPE(train_len=64),  # short train length: some pairs are zeroed
    "fope": lambda d, h, hkv: "fope",
    "alibi": lambda d, h, hkv: "alibi",
    "tapa": lambda d, h, hkv: "tapa",
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", list(ENCODINGS))
def test_encoding_gqa(name, causal, dtype):
    b, lq, lk, h, hkv, d = 2, 37, 53, 4, 2, 64
    q, k, v = make_qkv(b, lq, lk, h, hkv, d, dtype, DEVICE, seed=11)
    check_triton(q, k, v, ENCODINGS[name](d, h, hkv), causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hc", ["heads", "kv_heads", "one"])
def test_fope_learnable_coefficients(hc, causal, dtype):
    b, lq, lk, h, hkv, d = 1, 29, 41, 4, 2, 48
    heads = {"heads": h, "kv_heads": hkv, "one": 1}[hc]
    enc = fp.FoPE(d, num_heads=heads, train_len=64, learnable=True, seed=5)
    q, k, v = make_qkv(b, lq, lk, h, hkv, d, dtype, DEVICE, seed=12)
    check_triton(q, k, v, enc, causal)
