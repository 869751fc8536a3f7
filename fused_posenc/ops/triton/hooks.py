"""Encoding hooks shared by every Triton attention kernel (forward, backward, prologue).

Every kernel sees a head as two parts ``x = (x1, x2)`` selected by index maps: the two halves of
each rotated pair for RoPE/HoPE/FoPE, amplitude and phase dims for TAPA, and an arbitrary split for
NoPE/ALiBi. Scores are ``dot(q1, k1) + dot(q2, k2)`` (or a function of the two dots for TAPA), so
rotations and their transposes are elementwise on the parts. Derivations: README.md beside this file.
"""
import triton
import triton.language as tl
from triton.language.extra import libdevice

ENC_NONE = tl.constexpr(0)
ENC_ROTARY = tl.constexpr(1)
ENC_FOPE = tl.constexpr(2)
ENC_ALIBI = tl.constexpr(3)
ENC_TAPA = tl.constexpr(4)

LOG2E = tl.constexpr(1.4426950408889634)
INV_2PI = tl.constexpr(0.15915494309189535)
TWO_PI = tl.constexpr(6.283185307179586)
TURN_2POW32 = tl.constexpr(6.283185307179586 / 2**32)  # radians per 2^-32 turn


@triton.jit
def part_offsets(p_idx, o_p, m_p, start, GATHER: tl.constexpr):
    """Head-dim offsets of one part: ``start + o_p`` or a gather through an index map."""
    if GATHER:
        o_d = tl.load(p_idx + o_p, mask=m_p, other=0)
    else:
        o_d = start + o_p
    return o_d


@triton.jit
def program_ids(L, BLOCK: tl.constexpr):
    """``(row block, batch * head)`` of this program in a 1-D grid of ``cdiv(L, BLOCK) * batch * heads``
    programs: row blocks vary fastest (neighbours share K/V in L2) and batch * heads has no 65535 cap."""
    n_blocks = tl.cdiv(L, BLOCK)
    pid = tl.program_id(0)
    return pid % n_blocks, pid // n_blocks


@triton.jit
def head_layout(IDX1, IDX2, P1, P2, DV, GATHER: tl.constexpr, BLOCK_P1: tl.constexpr, BLOCK_P2: tl.constexpr,
                BLOCK_DV: tl.constexpr):
    """Offsets and masks of a head's two parts (``o_p*`` inside a part, ``o_d*`` in the head dim) and of
    v's head dims: ``(o_p1, m_p1, o_p2, m_p2, o_d1, o_d2, o_dv, m_dv)``."""
    o_p1 = tl.arange(0, BLOCK_P1)
    m_p1 = o_p1 < P1
    o_p2 = tl.arange(0, BLOCK_P2)
    m_p2 = o_p2 < P2
    o_d1 = part_offsets(IDX1, o_p1, m_p1, 0, GATHER)
    o_d2 = part_offsets(IDX2, o_p2, m_p2, P1, GATHER)
    o_dv = tl.arange(0, BLOCK_DV)
    return o_p1, m_p1, o_p2, m_p2, o_d1, o_d2, o_dv, o_dv < DV


@triton.jit
def stream_layout(o_d1, m_d1, o_d2, m_d2, ROTATION: tl.constexpr, BLOCK_P1: tl.constexpr, BLOCK_P2: tl.constexpr):
    """Head-dim offsets and masks ``(o_1, m_1, o_2, m_2)`` of a kernel's streaming operand: the head's parts as stored
    (:func:`head_layout`), or for a rotation the pre-rotated buffer's whole row ``[0, BP1 + BP2)``, which
    ``rotate.rotate_tensor`` writes in the kernel's order (part 1, then part 2, padding zeroed): one contiguous load
    and one product per tile whatever the layout (half, interleaved, partial)."""
    if ROTATION:
        o_w = tl.arange(0, BLOCK_P1 + BLOCK_P2)
        m_w = o_w < BLOCK_P1 + BLOCK_P2
        o_1, m_1, o_2, m_2 = o_w, m_w, o_w, m_w
    else:
        o_1, m_1, o_2, m_2 = o_d1, m_d1, o_d2, m_d2
    return o_1, m_1, o_2, m_2


@triton.jit
def join_parts(x1, x2):
    """``[BR, BP]`` parts -> ``[BR, 2 BP]``, part 1 then part 2 (the rotated buffers' order, :func:`stream_layout`)."""
    return tl.reshape(tl.permute(tl.join(x1, x2), (0, 2, 1)), (x1.shape[0], 2 * x1.shape[1]))


@triton.jit
def split_parts(x):
    """The inverse of :func:`join_parts`: ``[BR, 2 BP]`` -> its two ``[BR, BP]`` parts."""
    return tl.split(tl.permute(tl.reshape(x, (x.shape[0], 2, x.shape[1] // 2)), (0, 2, 1)))


@triton.jit
def positions(p_pos, o_r, m_r, pos_offset, DEFAULT_POS: tl.constexpr):
    """int32 positions of rows ``o_r``: ``o_r + pos_offset`` by default, else loaded (int64 in memory).

    Kernels work on int32 positions (|pos| < 2^31): int64 arithmetic on score tiles is emulated."""
    if DEFAULT_POS:
        pos = o_r + pos_offset
    else:
        pos = tl.load(p_pos + o_r, mask=m_r, other=0).to(tl.int32)
    return pos


@triton.jit
def load_part(p_x, o_r, m_r, o_d, m_d, stride_t, stride_d):
    """``[BR, BP]`` tile of rows ``o_r`` and head dims ``o_d``; zeros outside the masks."""
    return tl.load(p_x + o_r[:, None].to(tl.int64) * stride_t + o_d[None, :] * stride_d,
                   mask=m_r[:, None] & m_d[None, :], other=0.0)


@triton.jit
def store_part(p_x, val, o_r, m_r, o_d, m_d, stride_t, stride_d):
    tl.store(p_x + o_r[:, None].to(tl.int64) * stride_t + o_d[None, :] * stride_d, val,
             mask=m_r[:, None] & m_d[None, :])


@triton.jit
def rotation_tables(o_r, m_r, head, p_tc, p_ts, stride_tab_t, tab_group, o_p, m_p, P):
    """cos/sin tables ``[BR, BP]`` (float32) of rows ``o_r``, read from the call's per-row tables ``(rows, Ht, P)``
    (row stride ``stride_tab_t``), table head ``head // tab_group``: FoPE's Fourier sums (``fope_tables``), or
    RoPE/HoPE's scaled ``cos``/``sin`` of exact angles (``rotate.rope_tables``, one table head for all heads)."""
    o_tab = o_r[:, None].to(tl.int64) * stride_tab_t + (head // tab_group) * P + o_p[None, :]
    m_tab = m_r[:, None] & m_p[None, :]
    cos = tl.load(p_tc + o_tab, mask=m_tab, other=0.0)
    sin = tl.load(p_ts + o_tab, mask=m_tab, other=0.0)
    return cos, sin


@triton.jit
def rotate(x1, x2, cos, sin):
    """``(x1 c - x2 s, x2 c + x1 s)`` in float32."""
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def rotate_back(g1, g2, cos, sin):
    """The transposed rotation: ``(g1 c + g2 s, g2 c - g1 s)``."""
    return g1 * cos + g2 * sin, g2 * cos - g1 * sin


@triton.jit
def load_parts(p_x, o_r, m_r, o_d1, m_d1, o_d2, m_d2, stride_t, stride_d, ONE_DOT: tl.constexpr = False):
    """Both parts ``[BR, BP1]``, ``[BR, BP2]`` of a tile as stored; with ``ONE_DOT`` (part 1 is the whole head) part 2
    is not loaded and part 1 stands in for it (unused)."""
    x1 = load_part(p_x, o_r, m_r, o_d1, m_d1, stride_t, stride_d)
    if ONE_DOT:
        x2 = x1
    else:
        x2 = load_part(p_x, o_r, m_r, o_d2, m_d2, stride_t, stride_d)
    return x1, x2


@triton.jit
def load_encoded(p_x, o_r, m_r, o_d1, m_d1, o_d2, m_d2, stride_t, stride_d, head, p_tc, p_ts, stride_tab_t, tab_group,
                 o_p, m_p, P, ENC: tl.constexpr, ONE_DOT: tl.constexpr = False):
    """Both parts of a tile, rotated when the encoding rotates (the rows' tables, :func:`rotation_tables`), in the
    input dtype (ready for ``tl.dot``)."""
    x1, x2 = load_parts(p_x, o_r, m_r, o_d1, m_d1, o_d2, m_d2, stride_t, stride_d, ONE_DOT)
    if (ENC == ENC_ROTARY) or (ENC == ENC_FOPE):
        cos, sin = rotation_tables(o_r, m_r, head, p_tc, p_ts, stride_tab_t, tab_group, o_p, m_p, P)
        y1, y2 = rotate(x1, x2, cos, sin)
        x1 = y1.to(p_x.dtype.element_ty)
        x2 = y2.to(p_x.dtype.element_ty)
    return x1, x2


@triton.jit
def part_dots(q1, q2, k1, k2, ENC: tl.constexpr, PREC: tl.constexpr, ONE_DOT: tl.constexpr = False):
    """``[BM, BN]`` dots of the parts: ``(q1.k1 + q2.k2, unused)``, or ``(q1.k1, q2.k2)`` for TAPA; with ``ONE_DOT``
    (NoPE/ALiBi at a power-of-two head dim: part 1 is the whole head) the one product ``q1.k1``."""
    d1 = tl.dot(q1, tl.trans(k1), input_precision=PREC)
    if ONE_DOT:
        d2 = d1
    elif ENC == ENC_TAPA:
        d2 = tl.dot(q2, tl.trans(k2), input_precision=PREC)
    else:
        d1 = tl.dot(q2, tl.trans(k2), d1, input_precision=PREC)
        d2 = d1
    return d1, d2


@triton.jit
def reduce_turns(psi):
    """``psi`` reduced to ``[-pi, pi]`` through whole turns (exact enough: psi is a float32 already)."""
    r = psi * INV_2PI
    return (r - tl.floor(r + 0.5)) * TWO_PI


@triton.jit
def fast_cos(psi, FAST: tl.constexpr):
    x = reduce_turns(psi)
    if FAST:
        y = libdevice.fast_cosf(x)  # cos.approx on [-pi, pi]: abs error ~5e-7
    else:
        y = tl.cos(x)
    return y


@triton.jit
def fast_sin(psi, FAST: tl.constexpr):
    x = reduce_turns(psi)
    if FAST:
        y = libdevice.fast_sinf(x)
    else:
        y = tl.sin(x)
    return y


@triton.jit
def tapa_omega(pos_m, pos_n, phase, alpha, FAST: tl.constexpr):
    """TAPA's ``Omega = phase * |m - n|^alpha`` (0 on the diagonal), float32 ``[BM, BN]``: a log2 and an exp2 per
    element on the special-function unit. (A per-call table over distances read by a gather, and a sin on the FMA
    units, were compiled and lost: more instructions per tile than the SFU ops they replaced; README.md, Precision,
    and benchmarks/results/static_sm90_tiles.md.)"""
    dist = tl.maximum(tl.abs(pos_m[:, None] - pos_n[None, :]).to(tl.float32), 1.0)
    if FAST:
        lg = libdevice.fast_log2f(dist)
    else:
        lg = tl.log2(dist)
    return tl.where(dist > 1.0, tl.exp2(alpha * lg), (pos_m[:, None] != pos_n[None, :]).to(tl.float32)) * phase


@triton.jit
def tanh(x, FAST: tl.constexpr):
    """``tanh(x)`` in float32: libdevice's on the GPU; under the interpreter (which has no libdevice) an odd
    polynomial near 0 and ``(1 - e) / (1 + e)``, ``e = exp(-2|x|)``, elsewhere (both within a few ulp)."""
    if FAST:
        t = libdevice.tanh(x)
    else:
        a = tl.abs(x)
        e = tl.exp2(a * (-2.0 * LOG2E))
        big = (1.0 - e) / (1.0 + e)
        x2 = x * x
        small = a * (1.0 + x2 * (-1.0 / 3 + x2 * (2.0 / 15 + x2 * (-17.0 / 315 + x2 * (62.0 / 2835)))))
        t = tl.where(x < 0, -1.0, 1.0) * tl.where(a < 0.3, small, big)
    return t


@triton.jit
def scores_log2(d1, d2, pos_m, pos_n, scale, slope, omega, softcap, ENC: tl.constexpr, FAST: tl.constexpr,
                SOFTCAP: tl.constexpr):
    """Scores in log2 units (``score * log2(e)``) from the part dots, and ``t``: with ``SOFTCAP`` the cap's
    ``tanh(s / softcap)`` (its derivative is ``1 - t^2``), else ``s`` itself (unused). The encoding's score ``s``
    (scale applied) is capped, ALiBi's bias is added after. ``omega``: TAPA's ``Omega`` tile (:func:`tapa_omega`;
    unused otherwise)."""
    if ENC == ENC_TAPA:
        s = (d1 * scale) * fast_cos(omega * d2, FAST)
        if SOFTCAP:
            t = tanh(s / softcap, FAST)
            s = t * (softcap * LOG2E)
        else:
            s = s * LOG2E
            t = s
    else:
        if SOFTCAP:
            t = tanh(d1 * (scale / softcap), FAST)
            s = t * (softcap * LOG2E)
        else:
            s = d1 * (scale * LOG2E)
            t = s
        if ENC == ENC_ALIBI:
            dist = tl.abs(pos_m[:, None] - pos_n[None, :]).to(tl.float32)
            s = s - (slope * LOG2E) * dist
    return s, t


@triton.jit
def score_grads(ds, t, d1, d2, omega, scale, ENC: tl.constexpr, FAST: tl.constexpr, SOFTCAP: tl.constexpr):
    """Gradients w.r.t. the two part dots from ``ds = dL/dscore`` (``t``: from :func:`scores_log2`; the cap's
    derivative ``1 - t^2`` comes first).

    Dot-based scores: both are ``ds * scale``. TAPA (``score = scale d1 cos(omega d2)``):
    ``(ds scale cos(psi), -ds scale d1 sin(psi) omega)``.
    """
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    if ENC == ENC_TAPA:
        psi = omega * d2
        g1 = ds * scale * fast_cos(psi, FAST)
        g2 = -ds * (scale * d1) * fast_sin(psi, FAST) * omega
    else:
        g1 = ds * scale
        g2 = g1
    return g1, g2


@triton.jit
def key_range(p_krange, pid_m, n_chunks, LK, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys ``[lo, hi)`` query block ``pid_m`` can see under the causal rule and the window with caller-given
    positions: the union of its 16-row chunks' ranges (``bounds.py``; lo rounded down to a whole ``BLOCK_N``); and
    ``[f_lo, f_hi)``, the keys every query of the block sees (the intersection of the chunks' full ranges)."""
    o_c = pid_m * (BLOCK_M // 16) + tl.arange(0, BLOCK_M // 16)
    m_c = o_c < n_chunks
    lo = tl.min(tl.load(p_krange + o_c, mask=m_c, other=LK), 0) // BLOCK_N * BLOCK_N
    hi = tl.max(tl.load(p_krange + n_chunks + o_c, mask=m_c, other=0), 0)
    f_lo = tl.max(tl.load(p_krange + 2 * n_chunks + o_c, mask=m_c, other=0), 0)
    f_hi = tl.min(tl.load(p_krange + 3 * n_chunks + o_c, mask=m_c, other=LK), 0)
    return lo, hi, f_lo, f_hi


@triton.jit
def query_range(p_qrange, pid_n, n_chunks, LQ, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """Queries ``[lo, hi)`` that can see a key of block ``pid_n`` (the union of its 16-key chunks' ranges; lo
    rounded down to a whole ``BLOCK_M``), and ``[f_lo, f_hi)``, the queries that see every key of it."""
    o_c = pid_n * (BLOCK_N // 16) + tl.arange(0, BLOCK_N // 16)
    m_c = o_c < n_chunks
    lo = tl.min(tl.load(p_qrange + o_c, mask=m_c, other=LQ), 0) // BLOCK_M * BLOCK_M
    hi = tl.max(tl.load(p_qrange + n_chunks + o_c, mask=m_c, other=0), 0)
    f_lo = tl.max(tl.load(p_qrange + 2 * n_chunks + o_c, mask=m_c, other=0), 0)
    f_hi = tl.min(tl.load(p_qrange + 3 * n_chunks + o_c, mask=m_c, other=LQ), 0)
    return lo, hi, f_lo, f_hi


@triton.jit
def window_key_range(m0, m1, LK, q_pos_offset, win_l, win_r, BLOCK_N: tl.constexpr):
    """Default positions (query ``m`` at ``m + q_pos_offset``, key ``n`` at ``n``): the keys ``[lo, hi)`` that
    queries ``[m0, m1)`` can see in the window ``(win_l, win_r)`` (-1: unbounded), lo a whole ``BLOCK_N``, and the
    keys ``[f_lo, f_hi)`` that all of them see."""
    first = m0.to(tl.int64) + q_pos_offset  # smallest and largest query position of the block
    last = m1.to(tl.int64) - 1 + q_pos_offset
    lo = tl.where(win_l >= 0, tl.maximum(first - win_l, 0), 0)
    hi = tl.where(win_r >= 0, tl.minimum(last + 1 + win_r, LK), LK)
    f_lo = tl.where(win_l >= 0, tl.minimum(tl.maximum(last - win_l, 0), LK), 0)
    f_hi = tl.where(win_r >= 0, tl.minimum(tl.maximum(first + 1 + win_r, 0), LK), LK)
    return (lo // BLOCK_N * BLOCK_N).to(tl.int32), tl.maximum(hi, 0).to(tl.int32), f_lo.to(tl.int32), f_hi.to(tl.int32)


@triton.jit
def window_query_range(n0, n1, LQ, q_pos_offset, win_l, win_r, BLOCK_M: tl.constexpr):
    """Default positions: the queries ``[lo, hi)`` that can see keys ``[n0, n1)`` in the window, and ``[f_lo, f_hi)``
    that see all of them."""
    first = n0.to(tl.int64) - q_pos_offset  # query indices at the block's smallest and largest key position
    last = n1.to(tl.int64) - 1 - q_pos_offset
    lo = tl.where(win_r >= 0, tl.maximum(first - win_r, 0), 0)
    hi = tl.where(win_l >= 0, tl.minimum(last + 1 + win_l, LQ), LQ)
    f_lo = tl.where(win_r >= 0, tl.minimum(tl.maximum(last - win_r, 0), LQ), 0)
    f_hi = tl.where(win_l >= 0, tl.minimum(tl.maximum(first + 1 + win_l, 0), LQ), LQ)
    return (lo // BLOCK_M * BLOCK_M).to(tl.int32), tl.maximum(hi, 0).to(tl.int32), f_lo.to(tl.int32), f_hi.to(tl.int32)


@triton.jit
def block_key_range(p_krange, pid_m, n_chunks, LK, q_pos_offset, win_l, win_r, CAUSAL: tl.constexpr,
                    WINDOW: tl.constexpr, DEFAULT_POS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys ``[lo, hi)`` query block ``pid_m`` visits: those the causal rule and the window leave it, from the block
    index with default positions (``window_key_range``), else from ``bounds.py``'s ranges (``key_range``); and the
    keys ``[f_lo, f_hi)`` that every query of the block sees (their tiles need no mask)."""
    lo = 0
    hi = LK
    f_lo = 0
    f_hi = LK
    if CAUSAL and DEFAULT_POS:  # keys n <= largest query position of this block; all see n <= the smallest
        hi = tl.minimum(LK, tl.maximum((pid_m + 1) * BLOCK_M + q_pos_offset, 0))
        f_hi = tl.minimum(LK, tl.maximum(pid_m * BLOCK_M + q_pos_offset + 1, 0))
    if WINDOW and DEFAULT_POS:
        w_lo, w_hi, w_flo, w_fhi = window_key_range(pid_m * BLOCK_M, (pid_m + 1) * BLOCK_M, LK, q_pos_offset, win_l,
                                                    win_r, BLOCK_N)
        lo = w_lo
        hi = tl.minimum(hi, w_hi)
        f_lo = w_flo
        f_hi = tl.minimum(f_hi, w_fhi)
    if (CAUSAL or WINDOW) and not DEFAULT_POS:
        lo, hi, f_lo, f_hi = key_range(p_krange, pid_m, n_chunks, LK, BLOCK_M, BLOCK_N)
    return lo, hi, f_lo, f_hi


@triton.jit
def block_query_range(p_qrange, pid_n, n_chunks, LQ, q_pos_offset, win_l, win_r, CAUSAL: tl.constexpr,
                      WINDOW: tl.constexpr, DEFAULT_POS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """Queries ``[lo, hi)`` that can see a key of block ``pid_n`` and ``[f_lo, f_hi)`` that see all of its keys (the
    transpose of :func:`block_key_range`)."""
    lo = 0
    hi = LQ
    f_lo = 0
    f_hi = LQ
    if CAUSAL and DEFAULT_POS:  # queries whose position reaches this block's first key; all its keys: its last
        lo = tl.maximum(pid_n * BLOCK_N - q_pos_offset, 0) // BLOCK_M * BLOCK_M
        f_lo = tl.minimum(tl.maximum((pid_n + 1) * BLOCK_N - 1 - q_pos_offset, 0), LQ)
    if WINDOW and DEFAULT_POS:
        w_lo, w_hi, w_flo, w_fhi = window_query_range(pid_n * BLOCK_N, (pid_n + 1) * BLOCK_N, LQ, q_pos_offset, win_l,
                                                      win_r, BLOCK_M)
        lo = tl.maximum(lo, w_lo)
        hi = tl.minimum(hi, w_hi)
        f_lo = tl.maximum(f_lo, w_flo)
        f_hi = tl.minimum(f_hi, w_fhi)
    if (CAUSAL or WINDOW) and not DEFAULT_POS:
        lo, hi, f_lo, f_hi = query_range(p_qrange, pid_n, n_chunks, LQ, BLOCK_N, BLOCK_M)
    return lo, hi, f_lo, f_hi


@triton.jit
def stage_tiles(lo, hi, f_lo, f_hi, BLOCK: tl.constexpr):
    """Split the tiles ``[lo + t BLOCK, lo + (t + 1) BLOCK)``, ``t < n``, of a loop over ``[lo, hi)`` into the
    interior ``[t_a, t_b)``, whose tiles lie inside ``[f_lo, f_hi)`` (every pair visible: no mask), and the boundary
    tiles ``t < t_a`` and ``t >= t_b`` (masked). Returns ``(n, t_a, t_b)``; a loop runs ``stage_len`` tiles per stage,
    starting at ``stage_start``."""
    n = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK)
    t_a = tl.minimum(tl.cdiv(tl.maximum(f_lo - lo, 0), BLOCK), n)
    t_b = tl.maximum(tl.minimum(tl.maximum(f_hi - lo, 0) // BLOCK, n), t_a)
    return n, t_a, t_b


@triton.jit
def key_stages(p_krange, pid_m, n_chunks, p_klen, i_b, LK, q_pos_offset, win_l, win_r, split_lo, split_hi,
               CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DEFAULT_POS: tl.constexpr, HAS_KLEN: tl.constexpr,
               KLEN_LEFT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key loop of query block ``pid_m`` (forward, dq): the keys the causal rule and the window leave it
    (:func:`block_key_range`) within the key split ``[split_lo, split_hi)`` and the row's keys (:func:`key_span`),
    cut into interior and boundary tiles. Returns ``(lo, n_beg, n_end, n_tiles, t_a, t_b)``: tiles start at ``lo``,
    the row's keys are ``[n_beg, n_end)``, :func:`stage_tiles`' split."""
    lo, hi, f_lo, f_hi = block_key_range(p_krange, pid_m, n_chunks, LK, q_pos_offset, win_l, win_r, CAUSAL, WINDOW,
                                         DEFAULT_POS, BLOCK_M, BLOCK_N)
    n_beg, n_end = key_span(p_klen, i_b, LK, HAS_KLEN, KLEN_LEFT)
    n_end = tl.minimum(n_end, split_hi)
    lo = tl.maximum(tl.maximum(lo, split_lo), n_beg // BLOCK_N * BLOCK_N)
    hi = tl.minimum(hi, n_end)
    n_tiles, t_a, t_b = stage_tiles(lo, hi, tl.maximum(f_lo, n_beg), tl.minimum(f_hi, n_end), BLOCK_N)
    return lo, n_beg, n_end, n_tiles, t_a, t_b


@triton.jit
def stage_len(STAGE: tl.constexpr, n, t_a, t_b):
    """Tiles of a stage (:func:`stage_tiles`): 0, the interior ``[t_a, t_b)``; 1, the boundary (the rest)."""
    if STAGE == 0:
        count = t_b - t_a
    else:
        count = n - (t_b - t_a)
    return count


@triton.jit
def stage_start(STAGE: tl.constexpr, i, lo, t_a, t_b, BLOCK: tl.constexpr):
    """First row of the stage's ``i``-th tile: interior tiles ``t_a ..``, boundary tiles ``0 .. t_a - 1`` then
    ``t_b ..``."""
    if STAGE == 0:
        t = t_a + i
    else:
        t = tl.where(i < t_a, i, i - t_a + t_b)
    return lo + t * BLOCK


@triton.jit
def key_tile(start_n, n_beg, n_end, p_kpos, KLEN_LEFT: tl.constexpr, DEFAULT_POS: tl.constexpr,
             BLOCK_N: tl.constexpr):
    """Offsets ``[BN]`` of the key tile at ``start_n``, its mask (the row's keys ``[n_beg, n_end)``) and positions."""
    o_n = start_n + tl.arange(0, BLOCK_N)
    m_n = o_n < n_end
    if KLEN_LEFT:  # left padding: the row's keys start at n_beg
        m_n = m_n & (o_n >= n_beg)
    return o_n, m_n, positions(p_kpos, o_n, m_n, 0, DEFAULT_POS)


@triton.jit
def key_span(p_klen, i_b, LK, HAS_KLEN: tl.constexpr, KLEN_LEFT: tl.constexpr):
    """Keys ``[begin, end)`` of batch row ``i_b`` that take part: all, or (key padding) the first ``KLEN[b]`` /
    with ``KLEN_LEFT`` the last ``KLEN[b]``."""
    begin = 0
    end = LK
    if HAS_KLEN:
        n = tl.load(p_klen + i_b)
        if KLEN_LEFT:
            begin = LK - n
        else:
            end = n
    return begin, end


@triton.jit
def pair_mask(d, mask, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, win_l, win_r):
    """``mask`` (the pairs in range) and the visibility rule on ``d = q_pos - k_pos`` (a tile of either orientation):
    causal ``d >= 0``, the window ``-win_r <= d <= win_l`` (-1: unbounded side). ``|d| < 2^31``: positions lie in
    ``[-2^30, 2^30)``."""
    if CAUSAL:
        mask = mask & (d >= 0)
    if WINDOW:
        mask = mask & ((win_l < 0) | (d <= win_l)) & ((win_r < 0) | (-d <= win_r))
    return mask


@triton.jit
def visible(pos_m, pos_n, m_m, m_n, CAUSAL: tl.constexpr, WINDOW: tl.constexpr = False, win_l=-1, win_r=-1):
    """``[BM, BN]`` mask of the (query, key) pairs that take part in the softmax: in range, the causal rule
    ``k_pos <= q_pos``, and the window ``q_pos - win_l <= k_pos <= q_pos + win_r`` (-1: unbounded side)."""
    return pair_mask(pos_m[:, None] - pos_n[None, :], m_m[:, None] & m_n[None, :], CAUSAL, WINDOW, win_l, win_r)


@triton.jit
def visible_t(pos_n, pos_m, m_n, m_m, CAUSAL: tl.constexpr, WINDOW: tl.constexpr = False, win_l=-1, win_r=-1):
    """The transpose of :func:`visible`: ``[BN, BM]``, keys as rows (the dk/dv kernel's ``S^T`` tiles)."""
    return pair_mask(pos_m[None, :] - pos_n[:, None], m_n[:, None] & m_m[None, :], CAUSAL, WINDOW, win_l, win_r)
