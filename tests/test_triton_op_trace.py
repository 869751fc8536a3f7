"""torch.compile sees into the Triton launches: on a GPU the launchers are ``torch.library.triton_op``s whose kernels
go through ``wrap_triton``, so AOTAutograd traces every Triton kernel of a forward and backward into the graph as a
``triton_kernel_wrapper_functional`` node (Inductor then compiles and schedules them itself) and no opaque
``fused_posenc::`` op is left.

Checked here without a GPU: a subprocess without ``TRITON_INTERPRET`` (so the ops register as Triton ops and the
kernels are compiled Triton functions) compiles forward + backward with ``torch.compile(fullgraph=True)`` and
AOTAutograd on ``meta`` tensors, records each graph's kernel nodes and runs the graphs on fake tensors. Triton's active driver is a stand-in that names an sm_90 target, so that
PyTorch's TTIR mutation analysis runs as it would on an H100/H200: it must find that the kernels write only their
outputs (plus the index maps ``IDX1``/``IDX2``, which the analysis over-approximates: they reach the stores' offsets
through a call, in the non-gather layout as dead arguments), never q, k, v, dO or the saved statistics. Caller-given
ALiBi slopes must reach the kernels from the graph's inputs (a constant frozen at trace time would go stale after
an optimizer step). The graphs are never run (no GPU); running them is a GPU check.
"""
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

# (encoding, call options) traced in the subprocess
CASES = {
    "rope-explicit": ("rope", {"explicit": True}),
    "rope-gather-window": ("rope-gather", {"window": (7, -1)}),
    "fope-learnable": ("fope-learnable", {}),
    "alibi-learnable": ("alibi-learnable", {"explicit": True}),
    "tapa-keylen": ("tapa", {"klen": True}),
    "none-lse": ("none", {"lse": True}),
}
# what each kernel may write (its output arguments), besides the index maps the analysis over-approximates
WRITES = {"rope_table_kernel": {"TC", "TS"}, "rotate_fwd_kernel": {"Y"}, "attn_fwd_kernel": {"O", "LSE"},
          "attn_bwd_preprocess_kernel": {"DELTA"}, "attn_bwd_dkdv_kernel": {"DK", "DV_OUT", "DCK", "DSK"},
          "attn_bwd_dq_kernel": {"DQ", "DCQ", "DSQ", "DSLOPE"}}
OVER_APPROXIMATED = {"IDX1", "IDX2"}


def _trace(cases):
    """Run in the subprocess: ``{case: {"fwd": [...], "bwd": [...]}}``, each a list of ``[kernel name, written
    arguments, slopes source]`` per kernel node, or ``["OPAQUE", op]`` for a ``fused_posenc`` op left in the graph."""
    import torch
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from triton.backends.compiler import GPUTarget

    from fused_posenc import ALiBi, FoPE, NoPE, RoPE, TAPA
    from fused_posenc.attention import Problem
    from fused_posenc.ops.triton.autograd import triton_attention

    class Sm90:  # Triton's driver as far as PyTorch's mutation analysis asks: the target to generate TTIR for
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    triton.runtime.driver.set_active(Sm90())
    encodings = {"rope": RoPE, "rope-gather": lambda: RoPE(interleaved=True), "tapa": TAPA, "none": NoPE,
                 "fope-learnable": lambda: FoPE(head_dim=64, num_heads=4, learnable=True, seed=1).to("meta"),
                 "alibi-learnable": lambda: ALiBi(torch.linspace(0.5, 0.1, 4, device="meta").requires_grad_())}

    def nodes(gm):
        out = []
        for n in gm.graph.nodes:
            if n.op != "call_function":
                continue
            if "triton_kernel_wrapper" in str(n.target):
                fn = kernel_side_table.get_kernel(n.kwargs["kernel_idx"])
                while not isinstance(fn, triton.runtime.JITFunction):
                    fn = fn.fn
                slopes = n.kwargs["kwargs"].get("SLOPES")
                src = None
                while slopes is not None and src is None:  # follow the argument back to a graph input or constant
                    if slopes.op in ("placeholder", "get_attr"):
                        src = slopes.op
                    else:
                        slopes = next((a for a in slopes.all_input_nodes), None)
                out.append([fn.__name__, sorted(n.kwargs.get("tensors_to_clone", [])), src])
            elif "fused_posenc" in str(n.target):
                out.append(["OPAQUE", str(n.target), None])
        return out

    report = {}
    for case in cases:
        name, opts = CASES[case]
        enc = encodings[name]()
        graphs = []

        def capture(gm, _):  # record the graph; run it on fake tensors (the kernels have no GPU to run on)
            graphs.append(nodes(gm))

            def run(*args):
                with FakeTensorMode(allow_non_fake_inputs=True):
                    return gm.forward(*args)

            return make_boxed_func(run)

        b, lq, lk, h, d = 2, 96, 128, 4, 64

        def f(q, k, v, pos):
            p = Problem(q, k, v, enc, True, None, pos[:, lk - lq:], pos, not opts.get("explicit"),
                        return_lse=bool(opts.get("lse")))
            if opts.get("klen"):
                p.k_lengths = torch.full((b,), lk - 5, dtype=torch.int32, device="meta")
            p.window = opts.get("window")
            out = triton_attention(p)
            return out[0].float().sum() + out[1].sum() if opts.get("lse") else out.float().sum()

        q = torch.empty(b, lq, h, d, device="meta", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.empty(b, lk, 2, d, device="meta", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        pos = torch.arange(lk, device="meta")[None].expand(b, lk)
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True, backend=aot_autograd(fw_compiler=capture, bw_compiler=capture))
        compiled(q, k, v, pos).backward()
        report[case] = {"fwd": graphs[0], "bwd": graphs[1]}
    return report


def _run_traces():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9 warns when it is unset
    proc = subprocess.run([sys.executable, __file__, *CASES], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def traces():
    return _run_traces()


@pytest.mark.parametrize("case", list(CASES))
def test_every_triton_kernel_is_a_graph_node(traces, case):
    fwd, bwd = traces[case]["fwd"], traces[case]["bwd"]
    assert not [n for n in fwd + bwd if n[0] == "OPAQUE"], "a fused_posenc op stayed opaque to AOTAutograd"
    assert [n[0] for n in fwd].count("attn_fwd_kernel") == 1
    names = [n[0] for n in bwd]
    passes = 2 if CASES[case][1].get("lse") else 1  # the lse's gradient is a second backward pass
    for kernel in ("attn_bwd_preprocess_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel"):
        assert names.count(kernel) == passes, names
    if CASES[case][0].startswith(("rope", "fope")):  # the streaming operands are rotated by their own kernel
        assert "rotate_fwd_kernel" in [n[0] for n in fwd] and names.count("rotate_fwd_kernel") == 2


@pytest.mark.parametrize("case", list(CASES))
def test_kernels_write_only_their_outputs(traces, case):
    for kernel, written, _ in traces[case]["fwd"] + traces[case]["bwd"]:
        extra = set(written) - WRITES[kernel] - OVER_APPROXIMATED
        assert not extra, f"{kernel} is seen to write {sorted(extra)}: the compiled graph would clone them"


def test_learnable_alibi_slopes_are_read_from_the_graph_inputs(traces):
    for kernel, _, src in traces["alibi-learnable"]["fwd"] + traces["alibi-learnable"]["bwd"]:
        if kernel.startswith("attn_") and kernel != "attn_bwd_preprocess_kernel":
            assert src == "placeholder", f"{kernel} reads the slopes from a {src}, not from the graph's inputs"


if __name__ == "__main__":
    print(json.dumps(_trace(sys.argv[1:])))
