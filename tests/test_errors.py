"""Every bad input raises a clear error that names the argument."""
import math

import pytest
import torch

from fused_posenc import (ALiBi, FoPE, HoPE, RoPE, TAPA, apply_rotary, fused_attention, get_encoding,
                          reference_attention)


def qkv(B=1, Lq=3, Lk=4, H=2, Hkv=2, D=8, Dv=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return r(B, Lq, H, D), r(B, Lk, Hkv, D), r(B, Lk, Hkv, D if Dv is None else Dv)


FNS = [reference_attention, lambda *a, **kw: fused_attention(*a, backend="torch", **kw)]
IDS = ["reference", "fused-torch"]


@pytest.fixture(params=FNS, ids=IDS)
def attn(request):
    return request.param


# --- tensors ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_wrong_rank(attn, which):
    t = dict(zip("qkv", qkv()))
    t[which] = t[which][0]  # 3 dims
    with pytest.raises(ValueError, match=rf"{which} must have 4 dims"):
        attn(t["q"], t["k"], t["v"], "rope")


def test_not_a_tensor(attn):
    q, k, v = qkv()
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        attn(q, k.tolist(), v, "rope")


def test_batch_mismatch(attn):
    q, _, _ = qkv(B=2)
    _, k, v = qkv(B=3)
    with pytest.raises(ValueError, match="batch"):
        attn(q, k, v, "rope")


def test_headdim_mismatch(attn):
    q, _, _ = qkv(D=8)
    _, k, v = qkv(D=16)
    with pytest.raises(ValueError, match="headdim"):
        attn(q, k, v, "rope")


def test_v_seqlen_mismatch(attn):
    q, k, _ = qkv(Lk=4)
    _, _, v = qkv(Lk=5)
    with pytest.raises(ValueError, match="v must have k's seqlen"):
        attn(q, k, v, "rope")


def test_v_heads_mismatch(attn):
    q, k, _ = qkv(Hkv=2)
    _, _, v = qkv(Hkv=1)
    with pytest.raises(ValueError, match="v must have k's seqlen and heads"):
        attn(q, k, v, "rope")


def test_heads_not_divisible(attn):
    q, k, v = qkv(H=3, Hkv=2)
    with pytest.raises(ValueError, match=r"nheads \(3\) must be divisible by nheads_kv \(2\)"):
        attn(q, k, v, "rope")


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_empty_tensors(attn, which):
    shapes = {"q": dict(Lq=0), "k": dict(Lk=0), "v": dict(Lk=0)}
    t = dict(zip("qkv", qkv()))
    t[which] = qkv(**shapes[which])["qkv".index(which)]
    with pytest.raises(ValueError, match=rf"{which} must not be empty"):
        attn(t["q"], t["k"], t["v"], "rope")


def test_dtype_mismatch(attn):
    q, k, v = qkv()
    with pytest.raises(TypeError, match="q, k, v must share a dtype"):
        attn(q, k.double(), v, "rope")
    with pytest.raises(TypeError, match="v=torch.float16"):
        attn(q, k, v.half(), "rope")


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64])
def test_non_float_q(attn, dtype):
    q, k, v = qkv()
    with pytest.raises(TypeError, match="q must be float16, bfloat16, float32 or float64"):
        attn(q.to(dtype), k.to(dtype), v.to(dtype), "rope")


def test_mixed_devices(attn):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="one device.*k=meta"):
        attn(q, k.to("meta"), v, "rope")


# --- positions ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["q_positions", "k_positions"])
def test_float_positions(attn, name):
    q, k, v = qkv()
    L = 3 if name == "q_positions" else 4
    with pytest.raises(TypeError, match=rf"{name} must be a signed integer tensor"):
        attn(q, k, v, "rope", **{name: torch.arange(L, dtype=torch.float32)})
    with pytest.raises(TypeError, match=rf"{name} must be a signed integer tensor"):
        attn(q, k, v, "rope", **{name: torch.ones(L, dtype=torch.bool)})


@pytest.mark.parametrize("name", ["q_positions", "k_positions"])
def test_positions_not_tensor(attn, name):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=rf"{name} must be an integer torch.Tensor"):
        attn(q, k, v, "rope", **{name: [0, 1, 2, 3]})


@pytest.mark.parametrize("name,bad", [
    ("q_positions", torch.arange(4)),          # wrong length
    ("k_positions", torch.arange(3)),
    ("q_positions", torch.zeros(3, 3, dtype=torch.long)),  # batch 3 != 2
    ("k_positions", torch.zeros(2, 4, 1, dtype=torch.long)),  # 3 dims
    ("q_positions", torch.tensor(1)),          # 0 dims
])
def test_positions_wrong_shape(attn, name, bad):
    q, k, v = qkv(B=2)
    with pytest.raises(ValueError, match=rf"{name} must have shape"):
        attn(q, k, v, "rope", **{name: bad})


def test_positions_on_another_device(attn):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="k_positions is on meta"):
        attn(q, k, v, "rope", k_positions=torch.arange(4, device="meta"))


# --- encodings ----------------------------------------------------------------------------------------

def test_unknown_encoding_name(attn):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="unknown encoding 'xpos'"):
        attn(q, k, v, "xpos")
    with pytest.raises(ValueError, match="unknown encoding 'xpos'"):
        get_encoding("xpos")


def test_encoding_wrong_type(attn):
    q, k, v = qkv()
    with pytest.raises(TypeError, match="encoding must be a name or an Encoding instance"):
        attn(q, k, v, 3)


@pytest.mark.parametrize("name", ["rope", "hope", "alibi", "tapa", "none"])
def test_unknown_option(name):
    with pytest.raises(TypeError, match=rf"bad option for encoding '{name}'.*foo"):
        get_encoding(name, foo=1)


def test_options_with_instance():
    with pytest.raises(ValueError, match="options"):
        get_encoding(RoPE(), base=10.0)


def test_unknown_scaling_option_and_type():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['foo'\] for yarn"):
        RoPE(scaling={"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16, "foo": 1})
    with pytest.raises(ValueError, match="scaling type must be one of"):
        RoPE(scaling={"type": "xpos", "factor": 2.0})
    with pytest.raises(ValueError, match="needs 'original_max_position_embeddings'"):
        RoPE(scaling={"type": "llama3", "factor": 2.0})
    with pytest.raises(ValueError, match=r"scaling\['factor'\]"):
        RoPE(scaling={"type": "linear", "factor": -2.0})


@pytest.mark.parametrize("rd", [3, 7, 0, -2])
def test_rotary_dim_odd_or_not_positive(rd):
    with pytest.raises(ValueError, match="rotary_dim must be a positive even int"):
        RoPE(rotary_dim=rd)


def test_rotary_dim_not_int():
    with pytest.raises(TypeError, match="rotary_dim must be an int"):
        RoPE(rotary_dim=4.0)


def test_rotary_dim_larger_than_headdim(attn):
    q, k, v = qkv(D=8)
    with pytest.raises(ValueError, match=r"rotary_dim=10 must be <= headdim=8"):
        attn(q, k, v, RoPE(rotary_dim=10))
    with pytest.raises(ValueError, match=r"rotary_dim=10 must be <= headdim=8"):
        apply_rotary(q, RoPE(rotary_dim=10))


@pytest.mark.parametrize("enc", ["rope", "hope"])
def test_rotation_odd_headdim(attn, enc):
    q, k, v = qkv(D=7)
    with pytest.raises(ValueError, match="headdim=7"):
        attn(q, k, v, enc)


def test_fope_headdim(attn):
    q, k, v = qkv(D=2)
    with pytest.raises(ValueError, match="fope needs an even headdim >= 4"):
        attn(q, k, v, "fope")
    with pytest.raises(ValueError, match="head_dim"):
        FoPE(6 + 1)
    q, k, v = qkv(D=16)
    with pytest.raises(ValueError, match="built for headdim=8, got headdim=16"):
        attn(q, k, v, FoPE(8, num_heads=2, train_len=64))


def test_fope_num_heads(attn):
    q, k, v = qkv(H=4, Hkv=2, D=8)
    with pytest.raises(ValueError, match="FoPE num_heads=3 must equal nheads=4, nheads_kv=2 or 1"):
        attn(q, k, v, FoPE(8, num_heads=3, train_len=64))


def test_fope_bad_coefficients():
    shape = FoPE(8, num_heads=2, train_len=64).cos_coef.shape
    with pytest.raises(ValueError, match=r"cos_coef must have shape \(num_heads, Dk, Dout\)"):
        FoPE(8, num_heads=2, train_len=64, cos_coef=torch.zeros(1, *shape[1:]), sin_coef=torch.zeros(shape))
    with pytest.raises(ValueError, match="pass both cos_coef and sin_coef"):
        FoPE(8, num_heads=2, train_len=64, cos_coef=torch.zeros(shape))
    with pytest.raises(TypeError, match="sin_coef must be floating point"):
        FoPE(8, num_heads=2, train_len=64, cos_coef=torch.zeros(shape), sin_coef=torch.zeros(shape, dtype=torch.long))
    with pytest.raises(ValueError, match="fope keeps no frequency"):
        FoPE(8, train_len=2)
    with pytest.raises(ValueError, match="sigma"):
        FoPE(8, sigma=-1.0)
    with pytest.raises(TypeError, match="learnable must be a bool"):
        FoPE(8, learnable=1)


def test_hope_bad_options():
    with pytest.raises(ValueError, match="train_len must be a positive int"):
        HoPE(train_len=0)
    with pytest.raises(ValueError, match="min_cycles"):
        HoPE(min_cycles=-1.0)
    with pytest.raises(ValueError, match="base must be"):
        HoPE(base=1.0)


def test_tapa_headdim_one(attn):
    q, k, v = qkv(D=1)
    with pytest.raises(ValueError, match="tapa needs headdim >= 2.*headdim=1"):
        attn(q, k, v, "tapa")


@pytest.mark.parametrize("opts,match", [
    ({"theta_split": 0.0}, "theta_split"), ({"theta_split": 1.0}, "theta_split"),
    ({"alpha": -0.1}, "alpha"), ({"phase_scale": float("nan")}, "phase_scale"), ({"phase_scale": "1"}, "phase_scale"),
])
def test_tapa_bad_options(opts, match):
    with pytest.raises((ValueError, TypeError), match=match):
        TAPA(**opts)


def test_alibi_bad_slopes(attn):
    q, k, v = qkv(B=2, H=4, Hkv=2)
    with pytest.raises(ValueError, match=r"slopes must have shape \(4,\) or \(2, 4\)"):
        attn(q, k, v, ALiBi(torch.ones(3)))
    with pytest.raises(ValueError, match=r"slopes must have shape \(4,\) or \(2, 4\)"):
        attn(q, k, v, ALiBi(torch.ones(3, 4)))
    with pytest.raises(TypeError, match="slopes must be float32"):
        ALiBi(torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="slopes must have shape"):
        ALiBi(torch.ones(1, 2, 4))


def test_apply_rotary_bad_inputs():
    with pytest.raises(ValueError, match="x must be a non-empty"):
        apply_rotary(torch.randn(3, 8))
    with pytest.raises(TypeError, match="x must be floating point"):
        apply_rotary(torch.ones(1, 2, 2, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="positions must be a signed integer"):
        apply_rotary(torch.randn(1, 2, 2, 8), positions=torch.zeros(2))
    with pytest.raises(ValueError, match="positions must have shape"):
        apply_rotary(torch.randn(1, 2, 2, 8), positions=torch.arange(3))


# --- scalars ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_softmax_scale_value(attn, scale):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="softmax_scale must be a finite positive number"):
        attn(q, k, v, "rope", softmax_scale=scale)


@pytest.mark.parametrize("scale", ["0.1", True, torch.tensor(0.1)])
def test_bad_softmax_scale_type(attn, scale):
    q, k, v = qkv()
    with pytest.raises(TypeError, match="softmax_scale must be a real number or None"):
        attn(q, k, v, "rope", softmax_scale=scale)


def test_bad_causal(attn):
    q, k, v = qkv()
    with pytest.raises(TypeError, match="causal must be a bool"):
        attn(q, k, v, "rope", causal=1)


# --- backends -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["bogus", "CUDA", "", None])
def test_bad_backend_name(name):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_attention(q, k, v, "rope", backend=name)


def test_cuda_backend_on_cpu_tensors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="backend='cuda'"):
        fused_attention(q, k, v, "rope", backend="cuda")


def test_bad_backend_env(monkeypatch):
    q, k, v = qkv()
    monkeypatch.setenv("FUSED_POSENC_BACKEND", "nope-backend")
    with pytest.raises(ValueError, match="FUSED_POSENC_BACKEND"):
        fused_attention(q, k, v, "rope")


def test_error_before_any_work_is_value_error_not_assert():
    # sanity: a rotary_dim error is raised from validation, not from inside the math
    q, k, v = qkv(D=4)
    with pytest.raises(ValueError):
        reference_attention(q, k, v, RoPE(rotary_dim=6))
    assert math.isfinite(reference_attention(q, k, v, RoPE(rotary_dim=4)).sum().item())


def test_hugging_face_scaling_keys():
    # transformers configs carry both 'type' and 'rope_type'; they must agree
    cfg = {"type": "yarn", "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16}
    assert RoPE(scaling=cfg).scaling["type"] == "yarn"
    assert RoPE(scaling={"rope_type": "linear", "factor": 2.0}).scaling["type"] == "linear"
    with pytest.raises(ValueError, match="disagree"):
        RoPE(scaling={"type": "linear", "rope_type": "ntk", "factor": 2.0})
    with pytest.raises(ValueError, match="'dynamic'.*is not one RoPE"):
        RoPE(scaling={"rope_type": "dynamic", "factor": 2.0})


def test_device_other_than_cpu_or_cuda():
    q = torch.randn(1, 4, 2, 8, device="meta")
    with pytest.raises(ValueError, match="must be CPU or CUDA tensors"):
        fused_attention(q, q, q, "rope")


def test_softmax_scale_accepts_numpy_scalars():
    import numpy as np
    q = torch.randn(1, 4, 2, 8, dtype=torch.float64)
    out = fused_attention(q, q, q, "rope", softmax_scale=np.float32(0.25), backend="torch")
    ref = fused_attention(q, q, q, "rope", softmax_scale=float(np.float32(0.25)), backend="torch")
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
