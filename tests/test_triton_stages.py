"""The Triton kernels' interior/boundary split (``hooks.stage_tiles``): the tiles a block runs without a mask are
exactly those in which every (query, key) pair is visible and valid, for default and caller-given positions,
causal or not, windows and key padding; the rest run masked. A correct split is invisible in the results (a
masked interior tile gives the same numbers), so this checks the split itself, by brute force over every block."""
import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from triton_cases import DEVICE, needs_triton  # noqa: E402

pytestmark = needs_triton

from fused_posenc.ops.triton.bounds import tile_bounds  # noqa: E402
from fused_posenc.ops.triton.hooks import block_query_range, key_stages, stage_tiles  # noqa: E402


@triton.jit
def _key_stages(BOUNDS, OUT, N_CHUNKS, LK, q_pos_offset, win_l, win_r, KLEN, KLEN_LEFT: tl.constexpr,
                CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DEFAULT_POS: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)  # the forward's and dq's key loop of query block pid_m (its keys: [n_beg, n_end))
    lo, _, _, n, t_a, t_b = key_stages(BOUNDS, pid_m, N_CHUNKS, KLEN, 0, LK, q_pos_offset, win_l, win_r, 0, LK, CAUSAL,
                                       WINDOW, DEFAULT_POS, True, KLEN_LEFT, BLOCK_M, BLOCK_N)
    tl.store(OUT + pid_m * 4 + tl.arange(0, 4), tl.where(tl.arange(0, 4) == 0, lo, tl.where(
        tl.arange(0, 4) == 1, n, tl.where(tl.arange(0, 4) == 2, t_a, t_b))))


@triton.jit
def _query_stages(BOUNDS, OUT, N_CHUNKS, LQ, q_pos_offset, win_l, win_r, n_beg, n_end,
                  CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DEFAULT_POS: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_M: tl.constexpr):
    pid_n = tl.program_id(0)  # as the dk/dv kernel does for its key block
    lo, hi, f_lo, f_hi = block_query_range(BOUNDS, pid_n, N_CHUNKS, LQ, q_pos_offset, win_l, win_r, CAUSAL,
                                           WINDOW, DEFAULT_POS, BLOCK_N, BLOCK_M)
    m_block = (pid_n * BLOCK_N >= n_beg) & ((pid_n + 1) * BLOCK_N <= n_end)
    n, t_a, t_b = stage_tiles(lo, hi, f_lo, tl.where(m_block, tl.minimum(f_hi, LQ), 0), BLOCK_M)
    tl.store(OUT + pid_n * 4 + tl.arange(0, 4), tl.where(tl.arange(0, 4) == 0, lo, tl.where(
        tl.arange(0, 4) == 1, n, tl.where(tl.arange(0, 4) == 2, t_a, t_b))))


def _visible(qp, kp, causal, window):
    d = qp[:, None] - kp[None, :]
    keep = torch.ones_like(d, dtype=torch.bool)
    if causal:
        keep &= d >= 0
    left, right = window if window is not None else (-1, -1)
    if left >= 0:
        keep &= d <= left
    if right >= 0:
        keep &= -d <= right
    return keep


CASES = [(True, None), (False, None), (True, (64, -1)), (False, (9, 64)), (False, (-1, 3))]


@pytest.mark.parametrize("explicit", [False, True], ids=["default", "explicit"])
@pytest.mark.parametrize("causal,window", CASES)
@pytest.mark.parametrize("bm,bn", [(32, 16), (16, 32)])  # two 16-row chunks per query block, per key block
def test_interior_tiles_are_exactly_the_fully_visible_ones(explicit, causal, window, bm, bn):
    # query offsets Lk - Lq of every residue near a tile edge (an off-by-one in a bound shows at one of them),
    # Lq != Lk both ways, key padding on the right and on the left
    for lq, lk, klen in [(70, 70, None), (37, 70, None), (70, 37, None), (69, 70, None), (68, 70, None),
                         (55, 70, None), (56, 70, None), (70, 69, None), (70, 68, None), (70, 54, None),
                         (70, 70, (0, 41)), (70, 70, (23, 70))]:
        _check_block_stages(explicit, causal, window, lq, lk, klen, bm, bn)


def _check_block_stages(explicit, causal, window, lq, lk, klen, bm, bn):
    n_beg, n_end = klen if klen is not None else (0, lk)
    qp = torch.arange(lk - lq, lk)  # default positions, bottom-right aligned
    kp = torch.arange(lk)
    if explicit:  # ascending with gaps (bounds.py's ranges); the window in the same units
        qp, kp = qp * 3 + 5, kp * 3
        window = None if window is None else tuple(w * 3 if w >= 0 else w for w in window)
    bounds = None
    if (causal or window is not None) and explicit:
        bounds = [b.to(DEVICE) for b in tile_bounds(qp[None], kp[None], causal, window)]
    win = window if window is not None else (-1, -1)
    flags = dict(CAUSAL=causal, WINDOW=window is not None, DEFAULT_POS=not explicit)
    valid_k = (torch.arange(lk) >= n_beg) & (torch.arange(lk) < n_end)

    # forward / dq: query blocks, key tiles
    nb = triton.cdiv(lq, bm)
    out = torch.zeros(nb * 4, dtype=torch.int32, device=DEVICE)
    kr = bounds[0] if bounds is not None else out
    lengths = torch.tensor([n_end - n_beg], dtype=torch.int32, device=DEVICE)  # the row's keys as key padding
    _key_stages[(nb,)](kr, out, kr.shape[-1] if bounds is not None else 0, lk, lk - lq, *win, lengths, n_beg > 0,
                       BLOCK_M=bm, BLOCK_N=bn, **flags)
    # padding rows of the last block keep default positions' arithmetic (the kernels' block-level bound)
    q_all = torch.arange(nb * bm) + (lk - lq) if not explicit else torch.cat([qp, qp.new_zeros(nb * bm - lq)])
    seen = _visible(q_all, kp, causal, window) & valid_k[None, :]
    interior = 0
    for pid, (lo, n, t_a, t_b) in enumerate(out.view(-1, 4).tolist()):
        interior += t_b - t_a
        rows = slice(pid * bm, min((pid + 1) * bm, lq)) if explicit else slice(pid * bm, (pid + 1) * bm)
        for t in range(n):
            keys = slice(lo + t * bn, lo + (t + 1) * bn)
            full = keys.stop <= lk and bool(seen[rows, keys].all())
            if t_a <= t < t_b:
                assert full, (pid, t, lo, t_a, t_b)  # safe: no mask only where none is needed
            else:
                assert not full, (pid, t, lo, t_a, t_b)  # tight: every fully visible tile runs unmasked
        assert not seen[rows, :lo].any() and not seen[rows, lo + n * bn:].any()  # the loop covers every pair
    assert interior > 0 or window is not None  # (a narrow window may leave no full tile)

    # dk/dv: key blocks, query tiles
    nb = triton.cdiv(lk, bn)
    out = torch.zeros(nb * 4, dtype=torch.int32, device=DEVICE)
    qr = bounds[1] if bounds is not None else out
    _query_stages[(nb,)](qr, out, qr.shape[-1] if bounds is not None else 0, lq, lk - lq, *win, n_beg, n_end,
                        BLOCK_N=bn, BLOCK_M=bm, **flags)
    k_all = torch.arange(nb * bn) if not explicit else torch.cat([kp, kp.new_zeros(nb * bn - lk)])
    valid_all = torch.cat([valid_k, valid_k.new_zeros(nb * bn - lk)])
    seen_t = _visible(qp, k_all, causal, window) & valid_all[None, :]
    for pid, (lo, n, t_a, t_b) in enumerate(out.view(-1, 4).tolist()):
        keys = slice(pid * bn, (pid + 1) * bn)
        for t in range(n):
            queries = slice(lo + t * bm, lo + (t + 1) * bm)
            full = queries.stop <= lq and bool(seen_t[queries, keys].all())
            if t_a <= t < t_b:
                assert full, (pid, t, lo, t_a, t_b)
            else:
                assert not full, (pid, t, lo, t_a, t_b)
