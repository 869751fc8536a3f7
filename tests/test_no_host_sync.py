"""No host-device synchronisation in a call's forward and backward (after the first call has built what it caches).

On this CPU machine the Triton kernels run under the interpreter: a TorchDispatchMode fails on every
``aten._local_scalar_dense`` (``.item()``, ``int(t)``, ``bool(t)``: a sync on CUDA) and on every copy from a CUDA
tensor to the host, and ``Tensor.tolist`` (which bypasses the dispatcher) is made to fail too. On a GPU the same
calls run under ``torch.cuda.set_sync_debug_mode("error")``.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fused_posenc as fp
from fused_posenc.backends import get_backend

from helpers import make_qkv
from triton_cases import DEVICE

_triton_ok, _triton_why = get_backend("triton").available()


class NoSync(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError(f"host sync: {func} on a {args[0].device} tensor")
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            dst = args[0].device if func is torch.ops.aten.copy_.default else kwargs.get("device")
            if isinstance(src, torch.Tensor) and src.is_cuda and dst is not None and torch.device(dst).type == "cpu":
                raise AssertionError(f"device-to-host copy: {func}")
        return func(*args, **kwargs)


@pytest.fixture
def no_sync(monkeypatch):
    def tolist(self, *a, **k):
        raise AssertionError("host sync: Tensor.tolist")

    def enter():
        monkeypatch.setattr(torch.Tensor, "tolist", tolist)
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("error")
        return NoSync()

    yield enter
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("default")


def _encodings():
    return {
        "none": lambda: "none", "rope": lambda: "rope", "hope": lambda: "hope", "fope": lambda: "fope",
        "alibi": lambda: "alibi", "tapa": lambda: "tapa",
        "rope-interleaved": lambda: fp.RoPE(interleaved=True, rotary_dim=16),
        "fope-learnable": lambda: fp.FoPE(head_dim=32, num_heads=2, train_len=64, learnable=True, seed=0).to(DEVICE),
        "alibi-learnable": lambda: fp.ALiBi(slopes=torch.tensor([0.1, 0.3], device=DEVICE, requires_grad=True)),
    }


def _backends():
    out = [pytest.param("torch")]
    out.append(pytest.param("triton", marks=pytest.mark.skipif(not _triton_ok, reason=_triton_why)))
    return out


@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize("name", list(_encodings()))
@pytest.mark.parametrize("backend", _backends())
def test_forward_and_backward_do_not_sync(backend, name, explicit, no_sync):
    enc = _encodings()[name]()
    q, k, v = make_qkv(1, 16, 16, 2, 1, 32, torch.float32, DEVICE, seed=3)
    kw = {}
    if explicit:
        pos = torch.arange(16, device=DEVICE) + 1000
        kw = dict(q_positions=pos, k_positions=pos.flip(0))

    def step():
        out = fp.fused_attention(q, k, v, enc, causal=True, backend=backend, **kw)
        out.square().sum().backward()

    step()  # the first call builds and caches the plan (kernel parameters on the device)
    with no_sync():
        step()
        step()
