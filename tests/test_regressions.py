"""Regression tests of bugs found in review (each failed before its fix).

* C++/CUDA ``tapa_omega`` (csrc/include/fused_posenc/encoding_math.h) computed ``pow(0, alpha)``: for
  ``alpha = 0`` that is 1, but the spec says ``|0|^alpha = 0`` (the diagonal score is the amplitude alone).
* Triton kernels compute positions in int32 and nothing rejected positions outside that range:
  positions >= 2^31 wrapped and the causal mask / biases came out silently wrong. Either the right
  answer or a ValueError is acceptable.
* The Triton backend cached its kernel plan per encoding object, so an option changed after a first
  call (``enc.alpha = 0.7``) was ignored.
"""
import pytest
import torch

import fused_posenc as fp
from fused_posenc.backends import get_backend
from helpers import check_against_reference, make_qkv
from triton_cases import DEVICE, needs_triton

_cpu_ok, _cpu_why = get_backend("cpu").available()


@pytest.mark.skipif(not _cpu_ok, reason=f"C++ extension not built: {_cpu_why}")
@pytest.mark.parametrize("causal", [False, True])
def test_native_tapa_alpha_zero(causal):
    q, k, v = make_qkv(1, 6, 6, 2, 1, 8, torch.float64, seed=41)

    def cpu_fn(q_, k_, v_, encoding, **kw):
        return fp.fused_attention(q_, k_, v_, encoding, backend="cpu", **kw)

    check_against_reference(cpu_fn, q, k, v, fp.TAPA(alpha=0.0), causal)


@needs_triton
@pytest.mark.parametrize("encoding", ["none", "alibi"])
def test_triton_positions_beyond_int32(encoding):
    q, k, v = make_qkv(1, 4, 8, 2, 2, 32, torch.float32, DEVICE, seed=42, requires_grad=False)
    k_pos = torch.arange(8, device=DEVICE) + (2**31 - 4)  # straddles 2^31
    q_pos = k_pos[4:]
    # the kernels compute positions in int32: such positions are refused (they used to wrap silently); on CUDA
    # the refusal is an asynchronous device assert (tests/test_triton_positions.py checks it in a subprocess)
    if DEVICE != "cpu":
        pytest.skip("on CUDA the refusal is a device assert: tests/test_triton_positions.py runs it in a subprocess")
    with pytest.raises(ValueError, match=r"positions \(backend='triton'\) must lie in \[-2\^30, 2\^30\)"):
        fp.fused_attention(q, k, v, encoding, causal=True, q_positions=q_pos, k_positions=k_pos, backend="triton")


@needs_triton
@pytest.mark.parametrize("make,change", [
    (lambda: fp.TAPA(), lambda e: setattr(e, "alpha", 0.7)),
    (lambda: fp.RoPE(), lambda e: setattr(e, "base", 500.0)),
    (lambda: fp.HoPE(train_len=64), lambda e: setattr(e, "train_len", 16)),
], ids=["tapa-alpha", "rope-base", "hope-train_len"])
def test_triton_sees_options_changed_after_a_call(make, change):
    enc = make()
    q, k, v = make_qkv(1, 12, 20, 2, 1, 32, torch.float32, DEVICE, seed=43, requires_grad=False)
    fp.fused_attention(q, k, v, enc, causal=True, backend="triton")
    change(enc)
    out = fp.fused_attention(q, k, v, enc, causal=True, backend="triton")
    ref = fp.reference_attention(q, k, v, enc, causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
