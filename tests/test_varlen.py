"""fused_attention_varlen: packed sequences equal each sequence run alone (the float64 reference per sequence),
forward, lse and every gradient (FoPE coefficients and ALiBi slopes included), on every backend that runs here;
every encoding, causal and not, Lq != Lk per sequence, sequences of length 0 and 1, GQA, per-token positions;
cu_seqlens_from_position_ids; bad input."""
import pytest
import torch

import skips
from fused_posenc import ALiBi, FoPE, HoPE, RoPE, TAPA, reference_attention
from fused_posenc import cu_seqlens_from_position_ids, fused_attention_varlen
from fused_posenc.backends import get_backend

from helpers import assert_fa_close
from triton_cases import DEVICE as TRITON_DEVICE  # CUDA on a GPU machine, else the interpreter's CPU

ENCODINGS = {
    "none": lambda: "none",
    "rope": lambda: RoPE(),
    "hope": lambda: HoPE(train_len=64),
    "fope": lambda: FoPE(head_dim=16, num_heads=4, train_len=64, seed=3, learnable=True),
    "alibi": lambda: ALiBi(slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625], requires_grad=True)),
    "tapa": lambda: TAPA(),
}
LQ = [3, 1, 5, 0, 2]  # a sequence with no queries, one with a single query, one with more queries than keys
LK = [4, 1, 5, 3, 1]
SMALL = ([3, 0, 2], [4, 2, 1])  # the Triton interpreter's cases (it simulates every program in numpy)
H, HKV, D = 4, 2, 16


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def _packed(dtype, seed, lq=LQ, lk=LK, device="cpu"):
    g = torch.Generator().manual_seed(seed)

    def r(n, h):
        return torch.randn(n, h, D, generator=g).to(device, dtype).requires_grad_()

    return r(sum(lq), H), r(sum(lk), HKV), r(sum(lk), HKV)


def _params(enc):
    if isinstance(enc, FoPE):
        return [enc.cos_coef, enc.sin_coef]
    if isinstance(enc, ALiBi):
        return [enc._slopes]
    return []


def per_sequence(q, k, v, enc, causal, q_pos=None, k_pos=None, lq=LQ, lk=LK):
    """Each sequence alone through reference_attention, concatenated: ``(out (total_q, H, D), lse (H, total_q))``."""
    cq, ck = _cu(lq).tolist(), _cu(lk).tolist()
    outs, lses = [], []
    for i in range(len(lq)):
        a, b, c, d = cq[i], cq[i + 1], ck[i], ck[i + 1]
        if b == a:
            continue
        if d == c:  # no keys: zeros, lse -inf
            outs.append(q[a:b] * 0)
            lses.append(torch.full((H, b - a), float("-inf"), device=q.device,
                                   dtype=torch.float64 if q.dtype == torch.float64 else torch.float32))
            continue
        kw = {}
        if q_pos is not None:
            kw = dict(q_positions=q_pos[a:b], k_positions=k_pos[c:d])
        o, l = reference_attention(q[None, a:b], k[None, c:d], v[None, c:d], enc, causal=causal, return_lse=True,
                                   **kw)
        outs.append(o[0])
        lses.append(l[0])
    return torch.cat(outs), torch.cat(lses, 1)


def _backends():
    out = [pytest.param("torch", torch.float32, id="torch-fp32")]
    ok, why = get_backend("cpu").available()
    for dt, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        out.append(pytest.param("cpu", dt, id=f"cpu-{name}", marks=pytest.mark.skipif(not ok, reason=why)))
    return out


def _check(backend, dtype, enc_name, causal, positions=False, seed=0, lq=LQ, lk=LK):
    dev = TRITON_DEVICE if backend == "triton" else "cpu"
    enc = ENCODINGS[enc_name]()
    if not isinstance(enc, str):
        enc = enc.to(dev) if isinstance(enc, torch.nn.Module) else enc
    q, k, v = _packed(dtype, seed, lq, lk, dev)
    q_pos = k_pos = None
    if positions:  # per-token positions far from 0, not restarting, ascending within a sequence
        q_pos = 5000 + torch.cat([torch.arange(n) * 3 + 7 * i for i, n in enumerate(lq)]).to(dev)
        k_pos = 5000 + torch.cat([torch.arange(n) * 3 + 7 * i - 2 for i, n in enumerate(lk)]).to(dev)
    params = _params(enc)
    g = torch.Generator().manual_seed(seed + 99)
    do = torch.randn(sum(lq), H, D, generator=g).to(dev, dtype)
    dl = torch.randn(H, sum(lq), generator=g).to(dev)

    def run(fn, q_, k_, v_, do_, dl_):
        out, lse = fn(q_, k_, v_)
        fin = torch.isfinite(lse)
        loss = (out.float() * do_.float()).sum() + (torch.where(fin, lse, 0) * dl_.to(lse.dtype)).sum()
        grads = torch.autograd.grad(loss, [q_, k_, v_] + params)
        return out.detach(), lse.detach(), [x.detach() for x in grads]

    def varlen(q_, k_, v_):
        return fused_attention_varlen(q_, k_, v_, _cu(lq).to(dev), _cu(lk).to(dev), max(lq), max(lk), enc, causal=causal,
                                      q_positions=q_pos, k_positions=k_pos, return_lse=True, backend=backend)

    def ref(q_, k_, v_):
        return per_sequence(q_, k_, v_, enc, causal, q_pos, k_pos, lq, lk)

    out, lse, grads = run(varlen, q, k, v, do, dl)
    out_lp, lse_lp, grads_lp = run(ref, q, k, v, do, dl)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64, lse64, grads64 = run(ref, q64, k64, v64, do.double(), dl.double())
    assert torch.equal(torch.isinf(lse), torch.isinf(lse64)), "rows that see no key differ"
    assert_fa_close("out", out, out64, out_lp)
    fin = torch.isfinite(lse64)
    assert_fa_close("lse", lse[fin], lse64[fin], lse_lp[fin].float())
    names = ["dq", "dk", "dv"] + [f"dparam{i}" for i in range(len(params))]
    for name, a, b, c in zip(names, grads, grads64, grads_lp):
        assert_fa_close(name, a, b, c)


@pytest.mark.parametrize("backend,dtype", _backends())
@pytest.mark.parametrize("enc_name", list(ENCODINGS))
def test_varlen_equals_each_sequence_alone(backend, dtype, enc_name):
    for causal in (False, True):
        _check(backend, dtype, enc_name, causal)


# Triton (a GPU, or the interpreter on CPU tensors): fewer, smaller cases, every encoding once; the padded batch
# runs with per-row key lengths (the kernels' HAS_KLEN path)
TRITON_CASES = [("none", False, torch.float32, False), ("rope", True, torch.float32, False),
                ("hope", False, torch.float32, False), ("fope", True, torch.float32, False),
                ("alibi", False, torch.float32, False), ("tapa", True, torch.float32, False),
                ("rope", False, torch.float16, False), ("tapa", True, torch.float32, True)]


@skips.skip_unless_triton()
@pytest.mark.parametrize("enc_name,causal,dtype,positions", TRITON_CASES)
def test_varlen_triton(enc_name, causal, dtype, positions):
    _check("triton", dtype, enc_name, causal, positions=positions, seed=2, lq=SMALL[0], lk=SMALL[1])


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("enc_name", ["rope", "alibi", "tapa"])
def test_varlen_positions_per_token(backend, enc_name):
    if backend == "cpu" and not get_backend("cpu").available()[0]:
        pytest.skip(get_backend("cpu").available()[1])
    _check(backend, torch.float32, enc_name, True, positions=True, seed=5)


def test_varlen_does_not_mutate_inputs():
    q, k, v = (t.detach() for t in _packed(torch.float32, 1))
    copies = [t.clone() for t in (q, k, v)]
    fused_attention_varlen(q, k, v, _cu(LQ), _cu(LK), max(LQ), max(LK), "rope", causal=True, backend="torch")
    for a, b in zip((q, k, v), copies):
        assert torch.equal(a, b)


def test_cu_seqlens_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1, 2, 3]])
    cu, mx = cu_seqlens_from_position_ids(pos)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 6, 10] and mx == 4
    with pytest.raises(ValueError, match="start at 0"):
        cu_seqlens_from_position_ids(torch.tensor([1, 2, 0]))
    with pytest.raises(TypeError, match="position_ids"):
        cu_seqlens_from_position_ids(torch.tensor([0.0, 1.0]))


def test_varlen_with_hf_style_positions_matches_default():
    """Packed HF position_ids (restarting per document) -> cu_seqlens; passing them as per-token positions equals
    the default per-sequence positions (self-attention, Lq = Lk)."""
    lens = [3, 1, 4]
    pos = torch.cat([torch.arange(n) for n in lens])
    cu, mx = cu_seqlens_from_position_ids(pos)
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(8, H, D, generator=g) for _ in range(3))
    a = fused_attention_varlen(q, k, v, cu, cu, mx, mx, "rope", causal=True, backend="torch")
    b = fused_attention_varlen(q, k, v, cu, cu, mx, mx, "rope", causal=True, q_positions=pos, k_positions=pos,
                               backend="torch")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("bad,match", [
    (dict(cu_seqlens_q=torch.tensor([0, 3, 2, 11], dtype=torch.int32)), "cu_seqlens_q must start at 0, not decrease"),
    (dict(cu_seqlens_q=torch.tensor([1, 4, 11], dtype=torch.int32)), "cu_seqlens_q must start at 0"),
    (dict(cu_seqlens_q=torch.tensor([0, 4, 10], dtype=torch.int32)), "end at the token count"),
    (dict(cu_seqlens_k=torch.tensor([0, 14], dtype=torch.int32)), "cu_seqlens_k has 1 sequences"),
    (dict(cu_seqlens_q=torch.tensor([0, 4, 11], dtype=torch.float32)), "cu_seqlens_q must be an int32"),
    (dict(cu_seqlens_q=torch.tensor([[0, 4, 11]], dtype=torch.int32)), r"cu_seqlens_q must have shape"),
    (dict(max_seqlen_q=3), "no sequence longer than max_seqlen"),
    (dict(max_seqlen_k=0), "max_seqlen_k must be >= 1"),
    (dict(max_seqlen_q=7.0), "max_seqlen_q must be a Python int"),
    (dict(q=torch.randn(11, 4, 16)[None]), "q must have 3 dims"),
    (dict(v=torch.randn(13, 2, 16)), "v must have k's token count"),
    (dict(q_positions=torch.arange(10)), r"q_positions must have shape \(11,\)"),
    (dict(q_positions=torch.arange(11.0)), "q_positions must be a signed integer"),
])
def test_varlen_bad_input(bad, match):
    args = dict(q=torch.randn(11, 4, 16), k=torch.randn(14, 2, 16), v=torch.randn(14, 2, 16),
                cu_seqlens_q=torch.tensor([0, 4, 11], dtype=torch.int32),
                cu_seqlens_k=torch.tensor([0, 6, 14], dtype=torch.int32), max_seqlen_q=7, max_seqlen_k=8)
    args.update(bad)
    kw = {n: args.pop(n) for n in ("q_positions",) if n in args}
    with pytest.raises((ValueError, TypeError), match=match):
        fused_attention_varlen(*args.values(), "rope", backend="torch", **kw)


def test_varlen_mismatched_devices():
    q, k, v = torch.randn(11, 4, 16), torch.randn(14, 2, 16), torch.randn(14, 2, 16)
    cu_k = torch.tensor([0, 6, 14], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens_q is on meta"):
        fused_attention_varlen(q, k, v, torch.tensor([0, 4, 11], dtype=torch.int32, device="meta"), cu_k, 7, 8)
    with pytest.raises(ValueError, match="one device"):
        fused_attention_varlen(q, k.to("meta"), v, cu_k, cu_k, 7, 8)


@skips.skip_unless_triton()
@pytest.mark.parametrize("enc_name,causal", [("alibi", False), ("fope", True), ("tapa", False)])
def test_triton_key_lengths_with_live_padding(enc_name, causal):
    """The kernels' key lengths on their own, with padding keys that are not zeros (varlen zero-pads, which hides
    some mistakes): out, lse and every gradient equal the masked float64 reference, and the padding keys get
    exactly zero dk and dv."""
    import dataclasses

    from fused_posenc.attention import prepare
    from fused_posenc.backends import select_backend

    dev = TRITON_DEVICE
    enc = ENCODINGS[enc_name]()
    enc = enc.to(dev) if isinstance(enc, torch.nn.Module) else enc
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, n, hh, D, generator=g).to(dev).requires_grad_() for n, hh in ((5, H), (9, HKV), (9, HKV)))
    lengths = torch.tensor([4, 9], dtype=torch.int32, device=dev)
    params = _params(enc)
    do, dl = torch.randn(2, 5, H, D, generator=g).to(dev), torch.randn(2, H, 5, generator=g).to(dev)

    def run(backend, q_, k_, v_):
        p = prepare(q_, k_, v_, enc, causal, None, None, None)
        p = dataclasses.replace(p, k_lengths=lengths, default_positions=False, return_lse=True)
        out, lse = select_backend(backend, p).run(p)
        loss = (out * do.to(out.dtype)).sum() + (lse * dl.to(lse.dtype)).sum()
        return [out.detach(), lse.detach(), *torch.autograd.grad(loss, [q_, k_, v_, *params])]

    got = run("triton", q, k, v)
    lp = run("torch", q, k, v)
    ref = run("torch", *(t.detach().double().requires_grad_() for t in (q, k, v)))
    assert torch.equal(got[3][0, 4:], torch.zeros_like(got[3][0, 4:])), "padding keys got a dk"
    assert torch.equal(got[4][0, 4:], torch.zeros_like(got[4][0, 4:])), "padding keys got a dv"
    for name, a, b, c in zip(["out", "lse", "dq", "dk", "dv", "dparam0", "dparam1"], got, ref, lp):
        assert_fa_close(name, a, b, c)
