"""GPU only: long sequences in bf16 (angles and TAPA phases must be formed in float32) and
O(seqlen) extra memory at 16k for TAPA and FoPE."""
import pytest
import torch

import fused_posenc as fp
from helpers import assert_fa_close, forward_backward, make_qkv
from skips import skip_unless_triton

pytestmark = [pytest.mark.gpu, skip_unless_triton(gpu_only=True)]


def _check_long(encoding, lk, causal, dtype=torch.bfloat16, lq=64):
    # the last `lq` queries of a `lk`-token context: positions up to lk - 1 (default bottom-right)
    q, k, v = make_qkv(1, lq, lk, 2, 1, 128, dtype, "cuda", seed=lk)
    do = torch.randn(1, lq, 2, 128, device="cuda", dtype=dtype)
    out, grads = forward_backward(lambda a, b, c: fp.fused_attention(a, b, c, encoding, causal=causal,
                                                                     backend="triton"), q, k, v, do)
    ref = lambda a, b, c: fp.reference_attention(a, b, c, encoding, causal=causal)  # noqa: E731
    out_lp, grads_lp = forward_backward(ref, q, k, v, do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64, grads64 = forward_backward(ref, q64, k64, v64, do.double())
    assert_fa_close("out", out, out64, out_lp)
    for name, g, glp, g64 in zip(("dq", "dk", "dv"), grads, grads_lp, grads64):
        assert_fa_close(name, g, g64, glp)
    return out, out64


@pytest.mark.parametrize("lk", [4096, 8192, 16384])
@pytest.mark.parametrize("encoding", ["rope", "hope", "fope", "tapa", "alibi"])
def test_long_sequence_bf16(encoding, lk):
    _check_long(encoding, lk, causal=True)


def test_long_sequence_detects_bf16_angles():
    """The check above can fail: RoPE with angles formed in bf16 is off by whole radians at 16k."""
    lk = 16384
    out, out64 = _check_long("rope", lk, causal=True)
    q, k, v = make_qkv(1, 64, lk, 2, 1, 128, torch.bfloat16, "cuda", seed=lk, requires_grad=False)
    theta = 10000.0 ** (-torch.arange(64, device="cuda", dtype=torch.float64) / 64)

    def rotate_bf16_angles(x, pos):
        ang = (pos.to(torch.bfloat16)[:, None] * theta.to(torch.bfloat16)).float()  # the mistake
        c, s = torch.cos(ang)[None, :, None], torch.sin(ang)[None, :, None]
        x1, x2 = x[..., :64].float(), x[..., 64:].float()
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1).to(x.dtype)

    pos_k = torch.arange(lk, device="cuda")
    qr, kr = rotate_bf16_angles(q, pos_k[-64:]), rotate_bf16_angles(k, pos_k)
    bad = fp.reference_attention(qr, kr, v, "none", causal=True)
    err_ok = (out.double() - out64).abs().max().item()
    err_bad = (bad.double() - out64).abs().max().item()
    assert err_bad > 5 * err_ok, (err_bad, err_ok)


@pytest.mark.parametrize("encoding", ["tapa", "fope"])
def test_memory_linear_in_seqlen_16k(encoding):
    b, l, h, d = 1, 16384, 4, 128
    q, k, v = make_qkv(b, l, l, h, h, d, torch.bfloat16, "cuda", seed=1)
    do = torch.randn_like(q)
    fp.fused_attention(q, k, v, encoding, causal=True, backend="triton").backward(do)  # compile, autotune
    q.grad = k.grad = v.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fp.fused_attention(q, k, v, encoding, causal=True, backend="triton")
    out.backward(do)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    per_tensor = b * l * h * d * 2  # one bf16 (B, L, H, D) tensor
    # out + dq/dk/dv + rotated copies + fp32 row stats: a handful of tensors, never an L x L matrix
    assert extra <= 12 * per_tensor, f"extra memory {extra / 2**20:.1f} MiB > {12 * per_tensor / 2**20:.1f} MiB"
    assert extra < b * h * l * l * 2 / 8, "extra memory is a sizeable fraction of one bf16 L x L score matrix"
