"""Triton backend with explicit positions: per batch, unsorted, gaps, rows that see no key."""
import pytest
import torch

from helpers import make_qkv
from triton_cases import DEVICE, check_triton, needs_triton

pytestmark = needs_triton


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("encoding", ["rope", "fope", "alibi", "tapa"])
def test_batched_unsorted_positions(encoding, causal):
    b, lq, lk, h, hkv, d = 2, 19, 35, 2, 1, 32
    g = torch.Generator().manual_seed(7)
    k_pos = torch.stack([torch.randperm(200, generator=g)[:lk] for _ in range(b)]).to(DEVICE)
    q_pos = torch.randint(0, 220, (b, lq), generator=g).to(DEVICE)
    q, k, v = make_qkv(b, lq, lk, h, hkv, d, torch.float32, DEVICE, seed=8)
    check_triton(q, k, v, encoding, causal, q_positions=q_pos, k_positions=k_pos)


@pytest.mark.parametrize("encoding", ["rope", "tapa"])
def test_rows_without_visible_keys_are_zero(encoding):
    b, lq, lk, h, d = 1, 16, 16, 2, 32
    q, k, v = make_qkv(b, lq, lk, h, h, d, torch.float16, DEVICE, seed=9)
    q_pos = torch.arange(lq, device=DEVICE) - 8  # the first 8 queries precede every key
    k_pos = torch.arange(lk, device=DEVICE)
    check_triton(q, k, v, encoding, True, q_positions=q_pos, k_positions=k_pos)
    import fused_posenc as fp
    out = fp.fused_attention(q, k, v, encoding, causal=True, q_positions=q_pos, k_positions=k_pos, backend="triton")
    assert torch.equal(out[:, :8], torch.zeros_like(out[:, :8]))
    (dq,) = torch.autograd.grad(out.float().sum(), [q])
    assert torch.isfinite(dq).all() and torch.equal(dq[:, :8], torch.zeros_like(dq[:, :8]))


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU tensors (interpreter): on CUDA see the subprocess test below")
def test_positions_beyond_int32_arithmetic_are_refused():
    import fused_posenc as fp
    q, k, v = make_qkv(1, 4, 4, 1, 1, 16, torch.float32, DEVICE, seed=10)
    big = torch.tensor([0, 1, 2, 2**30], device=DEVICE)
    with pytest.raises(ValueError, match=r"k_positions \(backend='triton'\) must lie in \[-2\^30, 2\^30\)"):
        fp.fused_attention(q, k, v, "alibi", k_positions=big, backend="triton")
    fp.fused_attention(q, k, v, "alibi", k_positions=big - 1, backend="triton")  # the largest allowed


_CUDA_REFUSAL = """
import torch, fused_posenc as fp
q = torch.randn(1, 4, 1, 16, device="cuda")
big = torch.tensor([0, 1, 2, 2**30], device="cuda")
fp.fused_attention(q, q, q, "alibi", k_positions=big - 1, backend="triton")
torch.cuda.synchronize()
print("largest allowed: ok", flush=True)
fp.fused_attention(q, q, q, "alibi", k_positions=big, backend="triton")
torch.cuda.synchronize()
print("not refused", flush=True)
"""


@pytest.mark.skipif(DEVICE == "cpu", reason="needs a CUDA device (the device assert is CUDA's)")
def test_positions_beyond_int32_arithmetic_fail_the_stream_on_cuda():
    """No host sync checks positions on CUDA: an asynchronous device assert fails the stream (in a subprocess,
    since a device assert leaves the CUDA context unusable)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _CUDA_REFUSAL], capture_output=True, text=True, timeout=300)
    assert "largest allowed: ok" in r.stdout and "not refused" not in r.stdout, r.stdout + r.stderr[-3000:]
    assert r.returncode != 0


@pytest.mark.parametrize("causal,window", [(True, None), (False, (9, 4)), (True, (30, -1)), (False, (-1, 7))])
def test_tile_bounds_are_tight_for_ascending_positions_and_safe_otherwise(causal, window):
    """Each 16-row chunk's range is exactly the span of the keys (queries) its rows can see under the causal rule
    and the window, and its full range the span of those every row sees (the tiles that need no mask), for
    ascending positions; the whole length (and no full range) when the positions do not ascend."""
    from fused_posenc.ops.triton.bounds import tile_bounds

    lq, lk = 40, 70
    k_pos = torch.arange(lk)[None] * 2  # even positions 0..138
    q_pos = torch.arange(lq)[None] * 3 + 20
    left, right = window if window is not None else (-1, -1)
    d = q_pos[0, :, None] - k_pos[0, None, :]  # (Lq, Lk)
    seen = torch.ones_like(d, dtype=torch.bool)
    if causal:
        seen &= d >= 0
    if left >= 0:
        seen &= d <= left
    if right >= 0:
        seen &= -d <= right
    krange, qrange = tile_bounds(q_pos, k_pos, causal, window)

    def span(mask):  # [first, last + 1) of the True entries, or an empty range
        idx = mask.nonzero().flatten()
        return (int(idx.min()), int(idx.max()) + 1) if len(idx) else None

    def check(got, want):
        assert want is None and got[0] >= got[1] or got == want, (c, got, want)

    for c in range(krange.shape[2]):
        check(tuple(int(x) for x in krange[0, :2, c]), span(seen[c * 16:(c + 1) * 16].any(0)))
        check(tuple(int(x) for x in krange[0, 2:, c]), span(seen[c * 16:(c + 1) * 16].all(0)))
    for c in range(qrange.shape[2]):
        check(tuple(int(x) for x in qrange[0, :2, c]), span(seen[:, c * 16:(c + 1) * 16].any(1)))
        check(tuple(int(x) for x in qrange[0, 2:, c]), span(seen[:, c * 16:(c + 1) * 16].all(1)))
    assert (krange[0, 2:, :] != krange[0, :2, :]).any()  # the full ranges are not the visible ones
    shuffled = k_pos[:, torch.randperm(lk, generator=torch.Generator().manual_seed(0))]
    kr2, _ = tile_bounds(q_pos, shuffled, causal, window)
    assert (kr2[:, 0] == 0).all() and (kr2[:, 1] == lk).all()  # keys out of order: nothing to skip
    assert (kr2[:, 2] >= kr2[:, 3]).all()  # and no tile without a mask
    _, qr2 = tile_bounds(q_pos.flip(1), k_pos, causal, window)
    assert (qr2[:, 0] == 0).all() and (qr2[:, 1] == lq).all() and (qr2[:, 2] >= qr2[:, 3]).all()
    kr3, qr3 = tile_bounds(torch.stack([q_pos[0], q_pos[0] + 1000]), k_pos, causal, window)  # per-batch rows
    assert kr3.shape == (2, 4, 3) and qr3.shape == (2, 4, 5)


@pytest.mark.parametrize("encoding", ["rope", "alibi", "tapa"])
@pytest.mark.parametrize("lq,lk", [(37, 37), (19, 50), (50, 19)])
def test_explicit_ascending_positions_equal_the_default_ones(encoding, lq, lk):
    """Causal tile skipping with caller-given positions (bounds.py) gives exactly the default-position result,
    and per-batch ascending positions with gaps and offsets match the reference."""
    import fused_posenc as fp

    q, k, v = make_qkv(2, lq, lk, 2, 1, 32, torch.float32, DEVICE, seed=12)
    q_pos = torch.arange(lk - lq, lk, device=DEVICE)
    k_pos = torch.arange(lk, device=DEVICE)
    base = fp.fused_attention(q, k, v, encoding, causal=True, backend="triton")
    given = fp.fused_attention(q, k, v, encoding, causal=True, q_positions=q_pos, k_positions=k_pos, backend="triton")
    torch.testing.assert_close(given, base, atol=1e-6, rtol=1e-6)
    g = torch.Generator().manual_seed(3)
    k_pos2 = torch.stack([torch.sort(torch.randperm(4 * lk, generator=g)[:lk]).values + 500 * i for i in range(2)])
    q_pos2 = torch.stack([torch.sort(torch.randint(0, 4 * lk, (lq,), generator=g)).values + 500 * i
                          for i in range(2)])
    check_triton(q, k, v, encoding, True, q_positions=q_pos2.to(DEVICE), k_positions=k_pos2.to(DEVICE))
