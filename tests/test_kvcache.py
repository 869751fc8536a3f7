"""fused_attention_with_kvcache: decoding token by token (and a few tokens at a time) through the cache equals the
full causal forward of the float64 reference, every encoding, every backend that runs here (Triton with its key
splits, flash-decoding); the cache write is exactly the new keys and values at the right rows and nothing else;
non-causal rows of different cache lengths attend to their own prefix; the lse; bad input."""
import pytest
import torch

import skips
from fused_posenc import fused_attention_with_kvcache, reference_attention
from fused_posenc.backends import get_backend

from helpers import assert_fa_close, encoding_factories
from triton_cases import DEVICE as TRITON_DEVICE  # CUDA on a GPU machine, else the interpreter's CPU

ENCODINGS = encoding_factories(fope_seed=4)
B, H, HKV, D, CACHE = 2, 4, 2, 16, 24


def _inputs(t, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, t, H, D, generator=g).to(device, dtype)
    k = torch.randn(B, t, HKV, D, generator=g).to(device, dtype)
    v = torch.randn(B, t, HKV, D, generator=g).to(device, dtype)
    return q, k, v


def _setup(backend, enc_name):
    dev = TRITON_DEVICE if backend == "triton" else "cpu"
    enc = ENCODINGS[enc_name]()
    return dev, (enc.to(dev) if isinstance(enc, torch.nn.Module) else enc)


def _backends():
    out = [pytest.param("torch", torch.float32, 0, id="torch")]
    ok, why = get_backend("cpu").available()
    out.append(pytest.param("cpu", torch.float32, 0, id="cpu", marks=pytest.mark.skipif(not ok, reason=why)))
    why = skips.triton_skip_reason()
    mark = pytest.mark.skipif(why is not None, reason=why or "")
    out.append(pytest.param("triton", torch.float32, 1, id="triton-nosplit", marks=mark))
    out.append(pytest.param("triton", torch.float32, 3, id="triton-3splits", marks=mark))
    return out


@pytest.mark.parametrize("backend,dtype,splits", _backends())
@pytest.mark.parametrize("enc_name", list(ENCODINGS))
def test_decoding_equals_full_causal_forward(backend, dtype, splits, enc_name):
    steps = (3, 1, 2, 1)  # a prefill of 3, then single tokens and a pair
    t = sum(steps)
    dev, enc = _setup(backend, enc_name)
    q, k, v = _inputs(t, dtype, device=dev)
    g = torch.Generator().manual_seed(1)
    k_cache = torch.randn(B, CACHE, HKV, D, generator=g).to(dev, dtype)  # garbage past the valid rows
    v_cache = torch.randn(B, CACHE, HKV, D, generator=g).to(dev, dtype)
    before = (k_cache.clone(), v_cache.clone())
    outs, lses, n = [], [], 0
    with torch.no_grad():
        for s in steps:
            o, l = fused_attention_with_kvcache(q[:, n:n + s], k_cache, v_cache, n, k[:, n:n + s], v[:, n:n + s],
                                                enc, return_lse=True, num_splits=splits, backend=backend)
            outs.append(o)
            lses.append(l)
            n += s
    out, lse = torch.cat(outs, 1), torch.cat(lses, 2)
    # the write: exactly the new rows, the rest untouched
    assert torch.equal(k_cache[:, :t], k) and torch.equal(v_cache[:, :t], v)
    assert torch.equal(k_cache[:, t:], before[0][:, t:]) and torch.equal(v_cache[:, t:], before[1][:, t:])
    ref64, lse64 = reference_attention(q.double(), k.double(), v.double(), enc, causal=True, return_lse=True)
    ref_lp, lse_lp = reference_attention(q, k, v, enc, causal=True, return_lse=True)
    assert_fa_close("out", out, ref64, ref_lp)
    assert_fa_close("lse", lse, lse64, lse_lp)


@pytest.mark.parametrize("backend,dtype,splits", _backends())
@pytest.mark.parametrize("enc_name", ["rope", "alibi", "tapa"])
def test_non_causal_rows_of_different_lengths(backend, dtype, splits, enc_name):
    dev, enc = _setup(backend, enc_name)
    g = torch.Generator().manual_seed(2)
    k_cache = torch.randn(B, CACHE, HKV, D, generator=g).to(dev)
    v_cache = torch.randn(B, CACHE, HKV, D, generator=g).to(dev)
    q = torch.randn(B, 2, H, D, generator=g).to(dev)
    lens = torch.tensor([5, 17], dtype=torch.int32, device=dev)
    with torch.no_grad():
        out = fused_attention_with_kvcache(q, k_cache, v_cache, lens, encoding=enc, causal=False, num_splits=splits,
                                           backend=backend)
    for b, n in enumerate(lens.tolist()):
        ref64 = reference_attention(q[b:b + 1].double(), k_cache[b:b + 1, :n].double(),
                                    v_cache[b:b + 1, :n].double(), enc)
        ref_lp = reference_attention(q[b:b + 1], k_cache[b:b + 1, :n], v_cache[b:b + 1, :n], enc)
        assert_fa_close(f"row {b}", out[b:b + 1], ref64, ref_lp)


def test_rows_with_different_cache_lengths_and_a_write():
    """Each batch row writes at its own length; the queries sit at the rows' ends (bottom-right aligned)."""
    g = torch.Generator().manual_seed(3)
    k_cache, v_cache = torch.randn(B, CACHE, HKV, D, generator=g), torch.randn(B, CACHE, HKV, D, generator=g)
    kc0, vc0 = k_cache.clone(), v_cache.clone()
    q, k, v = (torch.randn(B, 2, h, D, generator=g) for h in (H, HKV, HKV))
    lens = torch.tensor([4, 11], dtype=torch.int32)
    with torch.no_grad():
        out = fused_attention_with_kvcache(q, k_cache, v_cache, lens, k, v, "rope", backend="torch")
    for b, n in enumerate(lens.tolist()):
        assert torch.equal(k_cache[b, n:n + 2], k[b]) and torch.equal(v_cache[b, n:n + 2], v[b])
        keep = torch.ones(CACHE, dtype=torch.bool)
        keep[n:n + 2] = False
        assert torch.equal(k_cache[b, keep], kc0[b, keep])
        kk = torch.cat([kc0[b:b + 1, :n], k[b:b + 1]], 1)
        vv = torch.cat([vc0[b:b + 1, :n], v[b:b + 1]], 1)
        ref = reference_attention(q[b:b + 1], kk, vv, "rope", causal=True)
        torch.testing.assert_close(out[b:b + 1], ref, rtol=1e-5, atol=1e-5)


def test_bad_input():
    q = torch.randn(B, 1, H, D)
    kc, vc = torch.zeros(B, 8, HKV, D), torch.zeros(B, 8, HKV, D)
    k1, v1 = torch.randn(B, 1, HKV, D), torch.randn(B, 1, HKV, D)
    with torch.no_grad():
        with pytest.raises(ValueError, match="cache is too small"):
            fused_attention_with_kvcache(q, kc, vc, 8, k1, v1)
        with pytest.raises(ValueError, match="cache is too small"):
            fused_attention_with_kvcache(q, kc, vc, torch.tensor([2, 9], dtype=torch.int32))
        with pytest.raises(ValueError, match=r"cache_seqlens must have shape \(2,\)"):
            fused_attention_with_kvcache(q, kc, vc, torch.tensor([2], dtype=torch.int32))
        with pytest.raises(TypeError, match="cache_seqlens must be a signed integer tensor"):
            fused_attention_with_kvcache(q, kc, vc, torch.tensor([2.0, 3.0]))
        with pytest.raises(ValueError, match="k and v must be given together"):
            fused_attention_with_kvcache(q, kc, vc, 2, k1)
        with pytest.raises(ValueError, match="k must have shape"):
            fused_attention_with_kvcache(q, kc, vc, 2, torch.randn(B, 1, H, D), v1)
        with pytest.raises(TypeError, match="v_cache must have q's dtype"):
            fused_attention_with_kvcache(q, kc, vc.double(), 2)
        with pytest.raises(ValueError, match="k_cache is on meta but q is on cpu"):
            fused_attention_with_kvcache(q, kc.to("meta"), vc, 2)
        with pytest.raises(ValueError, match="cache_seqlens is on meta"):
            fused_attention_with_kvcache(q, kc, vc, torch.tensor([1, 2], device="meta"))
        with pytest.raises(ValueError, match="num_splits must be >= 0"):
            fused_attention_with_kvcache(q, kc, vc, 2, num_splits=-1)
        # refused after the cache checks: the new k/v must not have been written
        with pytest.raises(ValueError, match="softcap must be a positive finite number"):
            fused_attention_with_kvcache(q, kc, vc, 2, k1, v1, "rope", softcap=-1.0)
        with pytest.raises(TypeError, match="encoding is required"):
            fused_attention_with_kvcache(q, kc, vc, 2, k1, v1)
    with pytest.raises(ValueError, match="for inference"):
        fused_attention_with_kvcache(q.requires_grad_(), kc, vc, 2)
    assert not kc.any(), "a refused call wrote into the cache"
