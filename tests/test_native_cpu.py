"""backend="cpu" (the C++ extension) against the float64 reference: forward and every gradient."""
import pytest
import torch

from fused_posenc import fused_attention
from fused_posenc.backends import get_backend
from fused_posenc.encodings.fope import FoPE
from fused_posenc.encodings import get_encoding

from helpers import assert_fa_close, check_against_reference, make_qkv

_ok, _why = get_backend("cpu").available()
pytestmark = pytest.mark.skipif(not _ok, reason=f"C++ extension not built: {_why}")

ENCODINGS = ["none", "rope", "hope", "fope", "alibi", "tapa"]


def cpu_fn(q, k, v, encoding, **kw):
    return fused_attention(q, k, v, encoding, backend="cpu", **kw)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_encodings_dtypes(encoding, causal, dtype):
    q, k, v = make_qkv(2, 37, 70, 4, 2, 32, dtype)
    check_against_reference(cpu_fn, q, k, v, encoding, causal)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("lq,lk", [(1, 1), (63, 63), (97, 97), (1, 97), (97, 63), (63, 130)])
@pytest.mark.parametrize("causal", [False, True])
def test_lengths(encoding, lq, lk, causal):
    q, k, v = make_qkv(1, lq, lk, 2, 1, 48, torch.float32, seed=lq + lk)
    check_against_reference(cpu_fn, q, k, v, encoding, causal)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("headdim", [32, 48, 64, 80])
def test_headdims(encoding, headdim):
    q, k, v = make_qkv(1, 40, 45, 4, 1, headdim, torch.float64, seed=headdim)
    check_against_reference(cpu_fn, q, k, v, encoding, True)


@pytest.mark.parametrize("hc", [4, 2, 1])
@pytest.mark.parametrize("causal", [False, True])
def test_fope_learnable_gqa(hc, causal):
    enc = FoPE(64, hc, train_len=256, learnable=True, seed=3)
    q, k, v = make_qkv(2, 33, 50, 4, 2, 64, torch.float64, seed=hc)
    check_against_reference(cpu_fn, q, k, v, enc, causal, params_fn=lambda: [enc.cos_coef, enc.sin_coef])


@pytest.mark.parametrize("enc", [
    get_encoding("rope", interleaved=True), get_encoding("rope", rotary_dim=32),
    get_encoding("rope", scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    get_encoding("tapa", alpha=0.3, phase_scale=1.0)], ids=["interleaved", "partial", "yarn", "tapa-c1"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_variants(enc, dtype):
    q, k, v = make_qkv(2, 30, 41, 4, 2, 64, dtype, seed=7)
    check_against_reference(cpu_fn, q, k, v, enc, True)


def test_positions_and_strides():
    q, k, v = make_qkv(2, 50, 50, 4, 2, 64, torch.float64, requires_grad=False)
    # non-contiguous views, per-batch positions with gaps, some query rows that see no key
    qn = q.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    kn = k[:, :, :, :].detach().clone().requires_grad_()
    vn = v.detach().clone().requires_grad_()
    qp = torch.stack([torch.arange(50) * 2 - 10, torch.arange(50)])
    kp = torch.stack([torch.arange(50), torch.arange(50) + 5])
    for enc in ENCODINGS:
        check_against_reference(cpu_fn, qn, kn, vn, enc, True, q_positions=qp, k_positions=kp)
    # inputs are never modified
    q0 = qn.detach().clone()
    cpu_fn(qn, kn, vn, "rope", causal=True).sum().backward()
    assert torch.equal(q0, qn.detach())


def test_alibi_batch_slopes():
    slopes = torch.rand(2, 4) * 0.5
    enc = get_encoding("alibi", slopes=slopes)
    q, k, v = make_qkv(2, 30, 30, 4, 4, 32, torch.float64)
    check_against_reference(cpu_fn, q, k, v, enc, False)


def test_empty_rows_zero():
    q, k, v = make_qkv(1, 8, 8, 2, 2, 32, torch.float32)
    qp = torch.arange(8) - 100  # no key visible
    out = cpu_fn(q, k, v, "rope", causal=True, q_positions=qp, k_positions=torch.arange(8))
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q)) and torch.isfinite(k.grad).all()


def test_auto_prefers_cpu():
    from fused_posenc.backends import select_backend
    from fused_posenc.attention import prepare

    q, k, v = make_qkv(1, 4, 4, 2, 2, 32, torch.float32)
    assert select_backend("auto", prepare(q, k, v, "rope", False, None, None, None)).name == "cpu"


@pytest.mark.parametrize("encoding", ["rope", "fope", "alibi", "tapa"])
def test_long_sequence(encoding):
    # several query blocks and key tiles, a partial last tile, causal tiles skipped, masked and fully visible
    q, k, v = make_qkv(1, 1025, 1025, 2, 1, 64, torch.float32, seed=11)
    check_against_reference(cpu_fn, q, k, v, encoding, True)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("headdim", [128, 40, 2])
def test_headdims_padded(encoding, headdim):
    # 128: two register tiles of columns; 40 and 2: rows padded to whole vectors (TAPA: both halves padded)
    if headdim == 2 and encoding == "fope":
        pytest.skip("FoPE needs headdim >= 4")
    q, k, v = make_qkv(1, 70, 90, 2, 2, headdim, torch.float32, seed=headdim)
    check_against_reference(cpu_fn, q, k, v, encoding, True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_tapa_alpha_zero(dtype, causal):
    # |0|^alpha = 0 even for alpha = 0 (pow(0, 0) would be 1): the diagonal score is the amplitude alone
    enc = get_encoding("tapa", alpha=0.0)
    q, k, v = make_qkv(1, 80, 80, 2, 1, 32, dtype, seed=5)
    check_against_reference(cpu_fn, q, k, v, enc, causal)


@pytest.mark.parametrize("encoding", ["alibi", "tapa"])
@pytest.mark.parametrize("kind", ["gaps", "far"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_distance_paths(encoding, kind, dtype):
    # key positions that are not consecutive within a tile (TAPA's Omega gathered from the per-call table), or that
    # span a range far wider than the sequence (no table: Omega computed per score); ALiBi's nearest-key distances
    # by binary search (ascending keys) or by a scan (the second batch's keys of "gaps" do not ascend)
    q, k, v = make_qkv(2, 70, 70, 2, 1, 32, dtype, seed=9)
    if kind == "gaps":
        qp, kp = torch.arange(70) * 3, torch.stack([torch.arange(70) * 3, torch.arange(70) * 2 + 7])
    else:
        qp, kp = torch.arange(70) + 1_000_000, torch.cat([torch.arange(35), torch.arange(35) + 999_990])
    check_against_reference(cpu_fn, q, k, v, encoding, True, q_positions=qp, k_positions=kp)


@pytest.mark.parametrize("threads", [1, 3])
def test_key_tile_shares(threads):
    # one (batch, head) and several threads: the backward shares a head's key tiles among work items
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, k, v = make_qkv(1, 300, 300, 1, 1, 64, torch.float32, seed=3)
        check_against_reference(cpu_fn, q, k, v, "rope", True)
        q, k, v = make_qkv(1, 200, 260, 2, 1, 32, torch.float64, seed=4)
        check_against_reference(cpu_fn, q, k, v, "fope", False)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("encoding", ["rope", "alibi", "tapa"])
def test_shuffled_positions(encoding):
    # causal with positions that do not ascend within a block or tile (and ascending ones in the other batch):
    # no shortcut may assume sorted positions
    g = torch.Generator().manual_seed(2)
    qp = torch.stack([torch.randperm(150, generator=g), torch.arange(150)])
    kp = torch.stack([torch.arange(150), torch.randperm(150, generator=g)])
    q, k, v = make_qkv(2, 150, 150, 2, 1, 32, torch.float32, seed=12)
    check_against_reference(cpu_fn, q, k, v, encoding, True, q_positions=qp, k_positions=kp)



@pytest.mark.parametrize("causal", [False, True])
def test_row_max_every_lane(causal):
    # query i's largest score (by far more than exp overflows at) is key i's, so over the rows the row maximum sits
    # in every lane of a tile: the softmax's row max must see all of them (a missed one overflowed exp: NaN)
    from fused_posenc import reference_attention

    q, k, v = make_qkv(1, 64, 64, 1, 1, 64, torch.float32, seed=13, requires_grad=False)
    k = (torch.eye(64) + 0.01 * k[0, :, 0]).reshape(1, 64, 1, 64).requires_grad_()
    q = (1000 * torch.eye(64) + q[0, :, 0]).reshape(1, 64, 1, 64).requires_grad_()
    v.requires_grad_()
    out = cpu_fn(q, k, v, "none", causal=causal)
    ref = reference_attention(q.double(), k.double(), v.double(), "none", causal=causal)
    ref_lp = reference_attention(q, k, v, "none", causal=causal)
    assert_fa_close("out", out.detach(), ref.detach(), ref_lp.detach())
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    grads = torch.autograd.grad(out, (q, k, v), do)
    grads_ref = torch.autograd.grad(ref, (q, k, v), do.double())
    # dk = scale dS^T q: the float32 rounding of dS (~1e-6 here, exact dS = 0) times |q| = 1000
    for name, g, gr, atol in zip("qkv", grads, grads_ref, (1e-4, 1e-2, 1e-4)):
        assert torch.isfinite(g).all(), f"d{name}: non-finite values"
        err = (g.double() - gr).abs().max().item()
        assert err <= atol, f"d{name}: error {err:.3e} > {atol:.0e}"
