"""Triton backend on cases the other Triton tests leave uncovered (each one found by mutation testing:
a deliberately broken kernel or launcher that still passed the suite).

* a caller's ``softmax_scale`` (TAPA: it multiplies the amplitude term);
* per-batch ALiBi slopes ``(batch, H)``;
* causal block skipping when ``Lk - Lq = 1``: the last query of every block then sees the first key
  of the next key block, so an off-by-one in the bounds (``hi`` in the forward and dq kernels, ``lo``
  in the dk/dv kernel) drops a visible key for any block sizes;
* learnable FoPE coefficients with batch > 1 sharing one set of positions (the table gradients
  are summed over the batch);
* positions far above 2^11 (not exact in fp16/bf16): angles must come from exact integer positions;
* TAPA with options other than its defaults (alpha, theta_split, phase_scale).
"""
import pytest
import torch

import fused_posenc as fp
from helpers import make_qkv
from triton_cases import DEVICE, ON_GPU, check_triton, needs_triton

pytestmark = needs_triton


@pytest.mark.parametrize("encoding", ["none", "rope", "fope", "alibi", "tapa"])
def test_softmax_scale(encoding):
    q, k, v = make_qkv(1, 9, 20, 2, 1, 32, torch.float32, DEVICE, seed=31)
    check_triton(q, k, v, encoding, True, softmax_scale=0.37)


@pytest.mark.parametrize("causal", [False, True])
def test_alibi_per_batch_slopes(causal):
    slopes = torch.tensor([[0.5, 0.0625], [0.02, 1.0]], device=DEVICE)
    q, k, v = make_qkv(2, 9, 20, 2, 1, 32, torch.float32, DEVICE, seed=32)
    check_triton(q, k, v, fp.ALiBi(slopes), causal)


CAUSAL_OFFSET_ONE = [(1, 32, 33, 2, 1, 32)]
if ON_GPU:
    CAUSAL_OFFSET_ONE += [(1, 256, 257, 2, 1, 64)]


@pytest.mark.parametrize("shape", CAUSAL_OFFSET_ONE, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("encoding", ["none", "rope"])
def test_causal_block_bounds_with_one_more_key(encoding, shape):
    q, k, v = make_qkv(*shape, torch.float32, DEVICE, seed=33)
    check_triton(q, k, v, encoding, True)


@pytest.mark.parametrize("hc", ["heads", "kv_heads", "one"])
def test_fope_learnable_batch_shares_positions(hc):
    b, lq, lk, h, hkv, d = 2, 9, 20, 4, 2, 32
    enc = fp.FoPE(d, num_heads={"heads": h, "kv_heads": hkv, "one": 1}[hc], train_len=64, learnable=True, seed=6)
    q, k, v = make_qkv(b, lq, lk, h, hkv, d, torch.float32, DEVICE, seed=34)
    check_triton(q, k, v, enc, True)


@pytest.mark.parametrize("encoding", ["rope", "fope", "alibi", "tapa"])
def test_large_positions(encoding):
    g = torch.Generator().manual_seed(35)
    k_pos = torch.stack([torch.randperm(30000, generator=g)[:20] + 3001 for _ in range(2)]).to(DEVICE)
    q_pos = k_pos[:, :9] + torch.randint(0, 50, (2, 9), generator=g).to(DEVICE)
    q, k, v = make_qkv(2, 9, 20, 2, 1, 32, torch.float32, DEVICE, seed=36)
    check_triton(q, k, v, encoding, True, q_positions=q_pos, k_positions=k_pos)


@pytest.mark.parametrize("opts", [{"theta_split": 0.25, "alpha": 0.5, "phase_scale": 1.0},
                                  {"theta_split": 0.7, "alpha": 0.0}], ids=["split.25-alpha.5-c1", "split.7-alpha0"])
@pytest.mark.parametrize("causal", [False, True])
def test_tapa_options(opts, causal):
    # every other Triton test runs TAPA's defaults (alpha 0.1, Da = Dp, c = 2 pi)
    q, k, v = make_qkv(2, 9, 20, 2, 1, 32, torch.float32, DEVICE, seed=37)
    check_triton(q, k, v, fp.TAPA(**opts), causal)
