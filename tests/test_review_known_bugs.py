"""Known bugs found in review, pinned as strict xfails: each test states the spec's answer and fails
(XPASS -> error) once the bug is fixed, so that the marker is removed with the fix.

* C++/CUDA ``tapa_omega`` (csrc/include/fused_posenc/encoding_math.h) computes ``pow(0, alpha)``: for
  ``alpha = 0`` that is 1, but the spec says ``|0|^alpha = 0`` (the diagonal score is the amplitude alone).
* Triton kernels read positions as int32 (ops/triton/hooks.py ``positions``) and nothing rejects
  positions outside int32: positions >= 2^31 wrap and the causal mask / biases come out silently wrong.
  Either the right answer or a ValueError is acceptable.
"""
import pytest
import torch

import fused_posenc as fp
from fused_posenc.backends import get_backend
from helpers import check_against_reference, make_qkv
from triton_cases import DEVICE, needs_triton

_cpu_ok, _cpu_why = get_backend("cpu").available()


@pytest.mark.skipif(not _cpu_ok, reason=f"C++ extension not built: {_cpu_why}")
@pytest.mark.xfail(strict=True, reason="encoding_math.h tapa_omega: pow(0, 0) = 1, the spec's |0|^alpha is 0")
@pytest.mark.parametrize("causal", [False, True])
def test_native_tapa_alpha_zero(causal):
    q, k, v = make_qkv(1, 6, 6, 2, 1, 8, torch.float64, seed=41)

    def cpu_fn(q_, k_, v_, encoding, **kw):
        return fp.fused_attention(q_, k_, v_, encoding, backend="cpu", **kw)

    check_against_reference(cpu_fn, q, k, v, fp.TAPA(alpha=0.0), causal)


@needs_triton
@pytest.mark.xfail(strict=True, reason="Triton kernels truncate positions to int32; positions >= 2^31 are not rejected")
@pytest.mark.parametrize("encoding", ["none", "alibi"])
def test_triton_positions_beyond_int32(encoding):
    q, k, v = make_qkv(1, 4, 8, 2, 2, 32, torch.float32, DEVICE, seed=42, requires_grad=False)
    k_pos = torch.arange(8, device=DEVICE) + (2**31 - 4)  # straddles 2^31
    q_pos = k_pos[4:]
    try:
        out = fp.fused_attention(q, k, v, encoding, causal=True, q_positions=q_pos, k_positions=k_pos, backend="triton")
    except ValueError:
        return  # rejecting such positions is fine too
    ref = fp.reference_attention(q, k, v, encoding, causal=True, q_positions=q_pos, k_positions=k_pos)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
