"""torch.autograd.gradcheck of the reference in float64, every encoding, causal or not, GQA, tiny sizes."""
import pytest
import torch
from torch.autograd import gradcheck

from fused_posenc import ALiBi, FoPE, HoPE, NoPE, RoPE, TAPA, reference_attention

ENCODINGS = {
    "none": lambda: NoPE(),
    "rope": lambda: RoPE(),
    "rope-interleaved-partial": lambda: RoPE(rotary_dim=4, interleaved=True),
    "rope-partial": lambda: RoPE(rotary_dim=6),
    "rope-yarn": lambda: RoPE(scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    "hope": lambda: HoPE(train_len=16),
    "alibi": lambda: ALiBi(),
    "alibi-batch-slopes": lambda: ALiBi(torch.tensor([[0.5, 0.1], [1.0, 0.3]])),
    "tapa": lambda: TAPA(),
    "tapa-opts": lambda: TAPA(theta_split=0.25, alpha=0.5, phase_scale=1.0),
}


def _inputs(H, Hkv, seed=0, dv=5):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, H, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 4, Hkv, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 4, Hkv, dv, generator=g, dtype=torch.float64, requires_grad=True)
    return q, k, v


# batch 0, query 0 (position -1) sees no key when causal: its zero output is gradchecked too
POS = {"q_positions": torch.tensor([[-1, 2, 5], [0, 3, 3]]), "k_positions": torch.tensor([[0, 1, 2, 6], [1, 0, 3, 2]])}


@pytest.mark.parametrize("name", sorted(ENCODINGS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("H,Hkv", [(2, 2), (2, 1)])
def test_gradcheck(name, causal, H, Hkv):
    enc = ENCODINGS[name]()
    q, k, v = _inputs(H, Hkv)

    def f(q_, k_, v_):
        return reference_attention(q_, k_, v_, enc, causal=causal, **POS)

    assert gradcheck(f, (q, k, v), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("hc", [2, 1, "kv"])
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_fope_learnable(hc, causal):
    H, Hkv = 2, 1
    hc = Hkv if hc == "kv" else hc
    enc = FoPE(8, num_heads=hc, train_len=64, sigma=0.5, learnable=True, seed=3).double()
    A, B = enc.cos_coef, enc.sin_coef
    assert A.dtype == torch.float64 and A.requires_grad and B.requires_grad
    q, k, v = _inputs(H, Hkv)

    def f(q_, k_, v_, a_, b_):
        # a_ / b_ are the module's own parameters: gradcheck perturbs them in place
        assert a_ is A and b_ is B
        return reference_attention(q_, k_, v_, enc, causal=causal, **POS)

    assert gradcheck(f, (q, k, v, A, B), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_fope_coefficient_gradients_flow():
    enc = FoPE(8, num_heads=2, train_len=64, learnable=True, seed=1)
    q, k, v = (t.detach().float().requires_grad_() for t in _inputs(2, 2))
    reference_attention(q, k, v, enc, causal=True).square().sum().backward()
    assert enc.cos_coef.grad is not None and enc.cos_coef.grad.abs().sum() > 0
    assert enc.sin_coef.grad is not None and enc.sin_coef.grad.abs().sum() > 0
    frozen = FoPE(8, num_heads=2, train_len=64, seed=1)
    reference_attention(q, k, v, frozen, causal=True).sum().backward()
    assert frozen.cos_coef.grad is None


@pytest.mark.parametrize("name", ["rope", "tapa", "alibi"])
def test_gradcheck_softmax_scale_and_headdim_v(name):
    enc = ENCODINGS[name]()
    q, k, v = _inputs(2, 1, seed=5, dv=3)
    assert gradcheck(lambda a, b, c: reference_attention(a, b, c, enc, causal=True, softmax_scale=0.7),
                     (q, k, v), eps=1e-6, atol=1e-6, rtol=1e-5)
