"""torch.compile on the ``cpu`` backend: no graph break (fullgraph=True), the same numbers as eager (forward and every
gradient, FoPE coefficients and ALiBi slopes included), and torch.library.opcheck on the custom ops.

The extension's calls are the custom ops ``fused_posenc::native_forward`` / ``native_backward``
(``fused_posenc/ops/native.py``); the encoding's kernel parameters are built inside them, so even the first call of
a fresh encoding (a cold cache) traces without a break. Most tests compile with ``backend="aot_eager"`` (Dynamo +
AOTAutograd with the fake implementations, the part that breaks or not; Inductor's C++ codegen takes minutes on this
machine); one compiles the tiny LM with Inductor itself.
"""
import pytest
import torch

from fused_posenc import ALiBi, FoPE, HoPE, NoPE, RoPE, TAPA, fused_attention
from fused_posenc.backends import get_backend
from fused_posenc.nn import PositionalAttention, TinyLM

_ok, _why = get_backend("cpu").available()
pytestmark = pytest.mark.skipif(not _ok, reason=f"C++ extension not built: {_why}")


def _fresh_encoding(name):
    """A new instance per test, so that its kernel parameters are not cached yet (the cold path)."""
    return {
        "none": lambda: NoPE(),
        "rope": lambda: RoPE(scaling={"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16}),
        "hope": lambda: HoPE(train_len=64),
        "fope": lambda: FoPE(head_dim=16, num_heads=4, train_len=64, seed=3),
        "fope-learnable": lambda: FoPE(head_dim=16, num_heads=4, train_len=64, learnable=True, seed=3),
        "alibi": lambda: ALiBi(),
        "alibi-learnable": lambda: ALiBi(slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625], requires_grad=True)),
        "tapa": lambda: TAPA(),
    }[name]()


NAMES = ["none", "rope", "hope", "fope", "fope-learnable", "alibi", "alibi-learnable", "tapa"]


def _params(enc):
    if isinstance(enc, FoPE) and enc.learnable:
        return [enc.cos_coef, enc.sin_coef]
    if isinstance(enc, ALiBi) and enc._slopes is not None:
        return [enc._slopes]
    return []


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 13, 4, 16, generator=g, requires_grad=True)
    k = torch.randn(2, 19, 2, 16, generator=g, requires_grad=True)
    v = torch.randn(2, 19, 2, 16, generator=g, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize("name", NAMES)
def test_no_graph_break_on_a_cold_encoding(name):
    enc = _fresh_encoding(name)
    q, k, v = _inputs()
    pos = torch.arange(19) * 2

    def f(q, k, v, pos):
        return fused_attention(q, k, v, enc, causal=True, q_positions=pos[-13:], k_positions=pos, backend="cpu")

    torch._dynamo.reset()
    e = torch._dynamo.explain(f)(q, k, v, pos)
    assert e.graph_break_count == 0, [r.reason for r in e.break_reasons]
    assert e.graph_count == 1


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_compiled_equals_eager(name, causal):
    enc = _fresh_encoding(name)
    params = _params(enc)
    q, k, v = _inputs(1)
    do = torch.randn(2, 13, 4, 16, generator=torch.Generator().manual_seed(2))

    def f(q, k, v):
        return fused_attention(q, k, v, enc, causal=causal, backend="cpu")

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (f, compiled):
        out = fn(q, k, v)
        grads = torch.autograd.grad(out, [q, k, v, *params], do)
        results.append([out, *grads])
    for name_, a, b in zip(["out", "dq", "dk", "dv"] + [f"dparam{i}" for i in range(len(params))], *results):
        assert a.abs().max() > 0 or name_ == "dq", name_  # (a parameter gradient of zero would prove nothing)
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=f"{name_}: compiled != eager")


def _opcheck_samples():
    from fused_posenc.attention import prepare

    for name in ("rope", "fope-learnable", "alibi-learnable", "tapa"):
        enc = _fresh_encoding(name)
        q, k, v = (t.detach() for t in _inputs(3))
        p = prepare(q, k, v, enc, True, None, None, None)
        empty = [torch.empty(0) for _ in range(3)]
        coef = empty[:2]
        if name == "fope-learnable":
            a, b = (c.detach() for c in enc.coef_per_query_head(4, 2))
            pad = torch.zeros(4, a.shape[1], 8 - a.shape[2])
            coef = [torch.cat([a, pad], -1), torch.cat([b, pad], -1)]
        slopes = enc.slopes(4, 2, q.device).detach().clone() if name == "alibi-learnable" else empty[2]
        scale = float(enc.score_scale(16, None))
        yield name, enc, p, coef, slopes, scale


@pytest.mark.parametrize("sample", list(_opcheck_samples()), ids=lambda s: s[0])
def test_opcheck(sample):
    from fused_posenc.ops.native import native_backward, native_forward

    name, enc, p, coef, slopes, scale = sample
    opts = (-1, -1, 0.0) if name == "rope" else (5, -1, 4.0)  # window_left, window_right, softcap
    fwd_args = (p.q, p.k, p.v, p.q_pos.contiguous(), p.k_pos.contiguous(), *coef, slopes, id(enc), True, *opts,
                scale)
    torch.library.opcheck(native_forward, fwd_args)
    out, lse = native_forward(*fwd_args)
    do = torch.randn_like(out)
    bwd_args = (do, p.q, p.k, p.v, out, lse, p.q_pos.contiguous(), p.k_pos.contiguous(), *coef, slopes, id(enc),
                True, *opts, scale, coef[0].numel() > 0, slopes.numel() > 0)
    torch.library.opcheck(native_backward, bwd_args)


def test_layer_fullgraph_parameter_gradients():
    # the layer with learnable FoPE, compiled whole: the coefficients' gradients flow through the graph
    torch.manual_seed(0)
    layer = PositionalAttention(32, num_heads=4, num_kv_heads=2, head_dim=8, encoding="fope", fope_learnable=True,
                                fope_train_len=32, backend="cpu")
    x = torch.randn(2, 11, 32, generator=torch.Generator().manual_seed(4))
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (layer, compiled):
        layer.zero_grad()
        fn(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in layer.named_parameters()})
    assert any("cos_coef" in n for n in grads[0])
    for n in grads[0]:
        assert grads[0][n].abs().max() > 0, n
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6, msg=n)


def test_tiny_lm_inductor_fullgraph():
    # Inductor itself (C++ codegen for everything around the custom ops), one training step
    torch.manual_seed(0)
    model = TinyLM(17, d_model=32, num_layers=1, num_heads=2, head_dim=16, encoding="rope", backend="cpu")
    tokens = torch.randint(0, 17, (2, 12), generator=torch.Generator().manual_seed(5))
    torch._dynamo.reset()
    compiled = torch.compile(model.loss, fullgraph=True)
    losses, grads = [], []
    for fn in (model.loss, compiled):
        model.zero_grad()
        loss = fn(tokens)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_one_positions_tensor_for_queries_and_keys():
    # self-attention with explicit positions passes one tensor as both (autograd.Function inputs may not repeat
    # under Dynamo: the call would break the graph)
    _, k, v = _inputs()
    q = torch.randn(2, 19, 4, 16, requires_grad=True)
    pos = torch.arange(19) * 3

    def f(q, k, v, pos):
        return fused_attention(q, k, v, "rope", causal=True, q_positions=pos, k_positions=pos, backend="cpu")

    torch._dynamo.reset()
    e = torch._dynamo.explain(f)(q, k, v, pos)
    assert e.graph_break_count == 0, [r.reason for r in e.break_reasons]


def _assert_same_outputs_and_grads(f, compiled, wrt, do, tol):
    """``f(q, k, v)`` and ``compiled(q, k, v)`` (``wrt[:3]``) give the same output and gradients w.r.t. ``wrt``."""
    results = []
    for fn in (f, compiled):
        out = fn(*wrt[:3])
        results.append([out, *torch.autograd.grad(out, wrt, do)])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["rope", "fope-learnable", "alibi-learnable"])
def test_triton_backend_compiles_fullgraph(name):
    # the Triton launches are custom ops too (ops/triton/autograd.py): on a GPU or, here, the Triton interpreter
    import skips

    why = skips.triton_skip_reason()
    if why is not None:
        pytest.skip(why)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU, else the interpreter (CPU tensors)
    enc = _fresh_encoding(name).to(dev) if name.startswith("fope") else _fresh_encoding(name)
    if name == "alibi-learnable":
        enc = ALiBi(slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625], device=dev, requires_grad=True))
    params = _params(enc)
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 9, 4 if i == 0 else 2, 16, generator=g).to(dev).requires_grad_() for i in range(3))

    def f(q, k, v):
        return fused_attention(q, k, v, enc, causal=True, backend="triton")

    torch._dynamo.reset()
    e = torch._dynamo.explain(f)(q, k, v)
    assert e.graph_break_count == 0, [r.reason for r in e.break_reasons]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    do = torch.randn(1, 9, 4, 16, generator=g).to(dev)
    _assert_same_outputs_and_grads(f, compiled, [q, k, v, *params], do, 1e-6)


@pytest.mark.parametrize("name", ["rope", "fope-learnable", "alibi-learnable", "tapa"])
def test_triton_inductor_on_gpu_equals_eager(name):
    """Inductor itself compiles the Triton kernels it traced through the triton_ops (tests/test_triton_op_trace.py
    checks the trace without a GPU): the compiled forward and every gradient equal eager, over two optimizer-like
    updates of the learnable tensors (a value frozen into the graph at trace time would go stale)."""
    import skips

    why = skips.triton_skip_reason(gpu_only=True)
    if why is not None:
        pytest.skip(why)
    enc = _fresh_encoding(name)
    if name == "alibi-learnable":
        enc = ALiBi(slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625], device="cuda", requires_grad=True))
    enc = enc.to("cuda") if isinstance(enc, torch.nn.Module) else enc
    params = _params(enc)
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 77, 4 if i == 0 else 2, 16, generator=g).cuda().requires_grad_() for i in range(3))
    pos = (torch.arange(77) * 3).cuda()

    def f(q, k, v):
        return fused_attention(q, k, v, enc, causal=True, q_positions=pos, k_positions=pos, backend="triton")

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    do = torch.randn(2, 77, 4, 16, generator=g).cuda()
    for _ in range(2):
        _assert_same_outputs_and_grads(f, compiled, [q, k, v, *params], do, 1e-4)
        with torch.no_grad():
            for t in params:
                t.mul_(0.9)


def test_triton_opcheck():
    import skips

    why = skips.triton_skip_reason()
    if why is not None:
        pytest.skip(why)
    from fused_posenc.attention import prepare
    from fused_posenc.ops.triton.autograd import triton_backward, triton_forward

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU, else the interpreter (CPU tensors)
    enc = _fresh_encoding("rope")
    q, k, v = (t.detach().to(dev) for t in _inputs(7))
    p = prepare(q, k, v, enc, True, None, None, None)
    none = [torch.empty(0, device=dev) for _ in range(4)]
    scale = float(enc.score_scale(16, None))
    fwd_args = (q, k, v, *none, p.q_pos.contiguous(), p.k_pos.contiguous().clone(),
                torch.empty(0, device=dev, dtype=torch.int32), torch.empty(0, device=dev), id(enc), scale, True, True,
                False)
    torch.library.opcheck(triton_forward, fwd_args)
    out, lse = triton_forward(*fwd_args)
    bwd_args = (torch.randn_like(out), q, k, v, out, lse, *none, *fwd_args[7:], False)
    torch.library.opcheck(triton_backward, bwd_args)


def test_return_lse_compiles_with_its_gradient():
    enc = _fresh_encoding("alibi-learnable")
    q, k, v = _inputs(8)

    def f(q, k, v):
        out, lse = fused_attention(q, k, v, enc, causal=True, backend="cpu", return_lse=True)
        return out.square().sum() + lse.sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    wrt = [q, k, v, enc._slopes]
    for a, b in zip(torch.autograd.grad(f(q, k, v), wrt), torch.autograd.grad(compiled(q, k, v), wrt)):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
