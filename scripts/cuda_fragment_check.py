#!/usr/bin/env python3
"""numpy emulation of the ldmatrix / mma.sync m16n8k16 fragment index math of csrc/cuda/forward.cu and backward.cu.

The address expressions below are copies of the kernels' (keep them in sync when the kernels change); ldmatrix and mma
follow the PTX ISA fragment layouts (csrc/cuda/README.md). Each check prints the max error of the emulated tile
products against numpy (fp64, ~1e-14 when the index math is right): S = Q K^T, O = P V (register C -> A reuse),
the backward's S^T, dP^T, dV, dK, dQ (8-warp phases), and TAPA's column split (split = 21, not a multiple of 8):
forward amp / dot, backward S^T amp / dot (K-side mask), dK and dQ (per-lane B column selection); for every
padded head dim kHD in {32, 64, 96, 128} (the loop trip counts kHD / 16, kHD / 32 and kCH / 16 differ).
No GPU needed: python scripts/cuda_fragment_check.py
"""
import numpy as np
rng = np.random.default_rng(0)
WORST = [0.0]


def report(*items):
    print(*items)
    WORST[0] = max([WORST[0]] + [float(x) for x in items if not isinstance(x, str)])

def ldm(M, addr, n=4, trans=False):
    """addr(lane) -> (row, col). returns regs[lane][i] = (lo, hi)"""
    regs = [[None]*n for _ in range(32)]
    mats = []
    for i in range(n):
        rows = []
        for r in range(8):
            rr, cc = addr(8*i + r)
            rows.append(M[rr, cc:cc+8])
        mats.append(np.array(rows))
    for l in range(32):
        g, t = l // 4, l % 4
        for i in range(n):
            m = mats[i]
            regs[l][i] = (m[g, 2*t], m[g, 2*t+1]) if not trans else (m[2*t, g], m[2*t+1, g])
    return regs

def mma(C, A, b0, b1):
    """C: per-lane [4]; A: per-lane 4 regs; b0/b1 per-lane regs. returns new C"""
    Am = np.zeros((16, 16)); Bm = np.zeros((16, 8)); Cm = np.zeros((16, 8))
    for l in range(32):
        g, t = l // 4, l % 4
        a = A[l]
        Am[g, 2*t:2*t+2] = a[0]; Am[g+8, 2*t:2*t+2] = a[1]; Am[g, 2*t+8:2*t+10] = a[2]; Am[g+8, 2*t+8:2*t+10] = a[3]
        Bm[2*t:2*t+2, g] = b0[l]; Bm[2*t+8:2*t+10, g] = b1[l]
        Cm[g, 2*t:2*t+2] = C[l][0:2]; Cm[g+8, 2*t:2*t+2] = C[l][2:4]
    D = Am @ Bm + Cm
    out = []
    for l in range(32):
        g, t = l // 4, l % 4
        out.append([D[g, 2*t], D[g, 2*t+1], D[g+8, 2*t], D[g+8, 2*t+1]])
    return out

def frag_to_mat(Cs, nblocks):  # list of n-block accumulators -> [16, 8*nblocks]
    M = np.zeros((16, 8*nblocks))
    for n in range(nblocks):
        for l in range(32):
            g, t = l // 4, l % 4
            c = Cs[n][l]
            M[g, n*8+2*t] = c[0]; M[g, n*8+2*t+1] = c[1]; M[g+8, n*8+2*t] = c[2]; M[g+8, n*8+2*t+1] = c[3]
    return M

zeros = lambda: [[0.0]*4 for _ in range(32)]
def run(HD):
    print(f"-- kHD = {HD}")
    BN = 64  # kBN of both kernels; HD = the padded head dim kHD
    # ---------------- forward, one warp (warp = 1), kBM rows irrelevant beyond the warp's 16
    warp = 1
    Q = rng.standard_normal((128, HD)); K = rng.standard_normal((BN, HD)); V = rng.standard_normal((BN, HD))
    s = [zeros() for _ in range(BN // 8)]
    for ks in range(HD // 16):
        k0 = ks * 16
        qa = ldm(Q, lambda l: (warp*16 + (l & 15), k0 + (l >> 4) * 8))
        qa = [[x for x in regs] for regs in qa]
        for n2 in range(BN // 16):
            kb = ldm(K, lambda l: (n2*16 + (l & 7) + (l >> 4)*8, k0 + ((l >> 3) & 1)*8))
            s[2*n2] = mma(s[2*n2], qa, [r[0] for r in kb], [r[1] for r in kb])
            s[2*n2+1] = mma(s[2*n2+1], qa, [r[2] for r in kb], [r[3] for r in kb])
    S = frag_to_mat(s, BN // 8)
    report("fwd S", np.abs(S - Q[warp*16:warp*16+16] @ K.T).max())
    P = np.tanh(S)  # any elementwise function
    for n in range(BN // 8):
        for l in range(32):
            g, t = l // 4, l % 4
            s[n][l] = [P[g, n*8+2*t], P[g, n*8+2*t+1], P[g+8, n*8+2*t], P[g+8, n*8+2*t+1]]
    o = [zeros() for _ in range(HD // 8)]
    for kk in range(BN // 16):
        pa = [[(s[2*kk][l][0], s[2*kk][l][1]), (s[2*kk][l][2], s[2*kk][l][3]), (s[2*kk+1][l][0], s[2*kk+1][l][1]),
               (s[2*kk+1][l][2], s[2*kk+1][l][3])] for l in range(32)]
        for n2 in range(HD // 16):
            vb = ldm(V, lambda l: (kk*16 + (l & 7) + ((l >> 3) & 1)*8, n2*16 + (l >> 4)*8), trans=True)
            o[2*n2] = mma(o[2*n2], pa, [r[0] for r in vb], [r[1] for r in vb])
            o[2*n2+1] = mma(o[2*n2+1], pa, [r[2] for r in vb], [r[3] for r in vb])
    report("fwd O", np.abs(frag_to_mat(o, HD // 8) - P @ V).max())

    # ---------------- backward: K, V [64 keys], Q, dO [32 q]; phases as backward.cu
    BM = 32
    K = rng.standard_normal((BN, HD)); V = rng.standard_normal((BN, HD))
    Q = rng.standard_normal((BM, HD)); dO = rng.standard_normal((BM, HD))
    St_full = np.zeros((BN, BM)); dPt_full = np.zeros((BN, BM))
    for w in range(8):
        kw, half = w & 3, w >> 2
        st = [zeros(), zeros()]; dp = [zeros(), zeros()]
        for ks in range(HD // 16):
            k0 = ks * 16
            ka = ldm(K, lambda l: (kw*16 + (l & 15), k0 + (l >> 4)*8))
            va = ldm(V, lambda l: (kw*16 + (l & 15), k0 + (l >> 4)*8))
            baddr = lambda l: (half*16 + (l & 7) + (l >> 4)*8, k0 + ((l >> 3) & 1)*8)
            qb = ldm(Q, baddr); ob = ldm(dO, baddr)
            dp[0] = mma(dp[0], va, [r[0] for r in ob], [r[1] for r in ob]); dp[1] = mma(dp[1], va, [r[2] for r in ob], [r[3] for r in ob])
            st[0] = mma(st[0], ka, [r[0] for r in qb], [r[1] for r in qb]); st[1] = mma(st[1], ka, [r[2] for r in qb], [r[3] for r in qb])
        # store like the kernel: off = (kw*16 + g + 8r) * kPS + half*16 + n*8 + 2t
        for n in range(2):
            for l in range(32):
                g, t = l // 4, l % 4
                for r in range(2):
                    row = kw*16 + g + 8*r; col = half*16 + n*8 + 2*t
                    St_full[row, col:col+2] = st[n][l][2*r:2*r+2]
                    dPt_full[row, col:col+2] = dp[n][l][2*r:2*r+2]
    report("bwd S^T", np.abs(St_full - K @ Q.T).max(), "dP^T", np.abs(dPt_full - V @ dO.T).max())
    Pt = np.tanh(St_full); dSt = np.sin(dPt_full)  # arbitrary
    dK = np.zeros((BN, HD)); dV = np.zeros((BN, HD)); dQ = np.zeros((BM, HD))
    kCH, kCQ = HD // 2, HD // 4
    for w in range(8):
        kw, half = w & 3, w >> 2
        dk = [zeros() for _ in range(kCH // 8)]; dv = [zeros() for _ in range(kCH // 8)]
        for kk in range(BM // 16):
            aaddr = lambda l: (kw*16 + (l & 15), kk*16 + (l >> 4)*8)
            pa = ldm(Pt, aaddr); da = ldm(dSt, aaddr)
            for n2 in range(kCH // 16):
                c0 = half*kCH + n2*16
                raddr = lambda l: (kk*16 + (l & 7) + ((l >> 3) & 1)*8, c0 + (l >> 4)*8)
                ob = ldm(dO, raddr, trans=True); qb = ldm(Q, raddr, trans=True)
                dv[2*n2] = mma(dv[2*n2], pa, [r[0] for r in ob], [r[1] for r in ob]); dv[2*n2+1] = mma(dv[2*n2+1], pa, [r[2] for r in ob], [r[3] for r in ob])
                dk[2*n2] = mma(dk[2*n2], da, [r[0] for r in qb], [r[1] for r in qb]); dk[2*n2+1] = mma(dk[2*n2+1], da, [r[2] for r in qb], [r[3] for r in qb])
        dK[kw*16:kw*16+16, half*kCH:(half+1)*kCH] = frag_to_mat(dk, kCH // 8)
        dV[kw*16:kw*16+16, half*kCH:(half+1)*kCH] = frag_to_mat(dv, kCH // 8)
        mq, cq0 = w & 1, (w >> 1) * kCQ
        dq = [zeros() for _ in range(kCQ // 8)]
        for kk in range(BN // 16):
            aa = ldm(dSt, lambda l: (kk*16 + (l & 7) + (l >> 4)*8, mq*16 + ((l >> 3) & 1)*8), trans=True)
            for n in range(kCQ // 8):
                cb = cq0 + n*8
                kb = ldm(K, lambda l: (kk*16 + (l & 15), cb), n=2, trans=True)
                dq[n] = mma(dq[n], aa, [r[0] for r in kb], [r[1] for r in kb])
        dQ[mq*16:mq*16+16, cq0:cq0+kCQ] = frag_to_mat(dq, kCQ // 8)
    report("bwd dV", np.abs(dV - Pt @ dO).max(), "dK", np.abs(dK - dSt @ Q).max(), "dQ", np.abs(dQ - dSt.T @ K).max())

    # ---------------- TAPA split (split = 21): forward amp/dot and backward dK / dQ column selection
    split = 21
    def keep_below(reg, col):
        return (reg[0] if col < split else 0.0, reg[1] if col + 1 < split else 0.0)
    Q = rng.standard_normal((128, HD)); K = rng.standard_normal((BN, HD))
    s = [zeros() for _ in range(BN // 8)]; sd = [zeros() for _ in range(BN // 8)]
    for ks in range(HD // 16):
        k0 = ks * 16
        qa = ldm(Q, lambda l: (warp*16 + (l & 15), k0 + (l >> 4) * 8))
        amp_part, dot_part = k0 < split, k0 + 16 > split
        qa_amp = [list(r) for r in qa]; qa_dot = None
        if dot_part:
            qa_amp = [[keep_below(qa[l][0], k0 + 2*(l % 4)), keep_below(qa[l][1], k0 + 2*(l % 4)),
                       keep_below(qa[l][2], k0 + 8 + 2*(l % 4)), keep_below(qa[l][3], k0 + 8 + 2*(l % 4))] for l in range(32)]
            qa_dot = [[(qa[l][i][0] - qa_amp[l][i][0], qa[l][i][1] - qa_amp[l][i][1]) for i in range(4)] for l in range(32)]
        for n2 in range(BN // 16):
            kb = ldm(K, lambda l: (n2*16 + (l & 7) + (l >> 4)*8, k0 + ((l >> 3) & 1)*8))
            if amp_part:
                s[2*n2] = mma(s[2*n2], qa_amp, [r[0] for r in kb], [r[1] for r in kb]); s[2*n2+1] = mma(s[2*n2+1], qa_amp, [r[2] for r in kb], [r[3] for r in kb])
            if dot_part:
                sd[2*n2] = mma(sd[2*n2], qa_dot, [r[0] for r in kb], [r[1] for r in kb]); sd[2*n2+1] = mma(sd[2*n2+1], qa_dot, [r[2] for r in kb], [r[3] for r in kb])
    Qw = Q[warp*16:warp*16+16]
    report("tapa amp", np.abs(frag_to_mat(s, 8) - Qw[:, :split] @ K[:, :split].T).max(),
          "dot", np.abs(frag_to_mat(sd, 8) - Qw[:, split:] @ K[:, split:].T).max())
    # backward dQ with split: dQ[:, d] = sum_key dS_sel(d)[q, key] K[key, d]
    dSa = rng.standard_normal((BN, BM)); dSb = rng.standard_normal((BN, BM))  # stored transposed [key][q]
    dQ = np.zeros((BM, HD))
    for w in range(8):
        mq, cq0 = w & 1, (w >> 1) * kCQ
        dq = [zeros() for _ in range(kCQ // 8)]
        for kk in range(BN // 16):
            ad = lambda l: (kk*16 + (l & 7) + (l >> 4)*8, mq*16 + ((l >> 3) & 1)*8)
            aa = ldm(dSa, ad, trans=True); ab = ldm(dSb, ad, trans=True)
            for n in range(kCQ // 8):
                cb = cq0 + n*8
                kb = ldm(K, lambda l: (kk*16 + (l & 15), cb), n=2, trans=True)
                b0 = [r[0] for r in kb]; b1 = [r[1] for r in kb]
                if cb + 8 <= split: dq[n] = mma(dq[n], aa, b0, b1)
                elif cb >= split: dq[n] = mma(dq[n], ab, b0, b1)
                else:
                    lo = [cb + l // 4 < split for l in range(32)]
                    z = (0.0, 0.0)
                    dq[n] = mma(dq[n], aa, [b0[l] if lo[l] else z for l in range(32)], [b1[l] if lo[l] else z for l in range(32)])
                    dq[n] = mma(dq[n], ab, [z if lo[l] else b0[l] for l in range(32)], [z if lo[l] else b1[l] for l in range(32)])
        dQ[mq*16:mq*16+16, cq0:cq0+kCQ] = frag_to_mat(dq, kCQ // 8)
    ref = np.concatenate([dSa.T @ K[:, :split], dSb.T @ K[:, split:]], axis=1)
    report("tapa dQ", np.abs(dQ - ref).max())
    # backward phase 1 with split (as backward.cu: the K A-fragment is masked, amp part, then ka ^= amp -> phase part)
    # and phase 2's dK column selection per B lane (column cb + g); Q [BM][HD], K [BN][HD]
    Qb = rng.standard_normal((BM, HD)); Kb = rng.standard_normal((BN, HD))
    St_a = np.zeros((BN, BM)); St_d = np.zeros((BN, BM))
    for w in range(8):
        kw, half = w & 3, w >> 2
        st = [zeros(), zeros()]; sdd = [zeros(), zeros()]
        for ks in range(HD // 16):
            k0 = ks * 16
            ka = ldm(Kb, lambda l: (kw*16 + (l & 15), k0 + (l >> 4)*8))
            qb = ldm(Qb, lambda l: (half*16 + (l & 7) + (l >> 4)*8, k0 + ((l >> 3) & 1)*8))
            ka = [list(r) for r in ka]
            if k0 < split:
                amp = [[keep_below(ka[l][0], k0 + 2*(l % 4)), keep_below(ka[l][1], k0 + 2*(l % 4)),
                        keep_below(ka[l][2], k0 + 8 + 2*(l % 4)), keep_below(ka[l][3], k0 + 8 + 2*(l % 4))] for l in range(32)]
                st[0] = mma(st[0], amp, [r[0] for r in qb], [r[1] for r in qb]); st[1] = mma(st[1], amp, [r[2] for r in qb], [r[3] for r in qb])
                ka = [[(ka[l][i][0] - amp[l][i][0], ka[l][i][1] - amp[l][i][1]) for i in range(4)] for l in range(32)]
            if k0 + 16 > split:
                sdd[0] = mma(sdd[0], ka, [r[0] for r in qb], [r[1] for r in qb]); sdd[1] = mma(sdd[1], ka, [r[2] for r in qb], [r[3] for r in qb])
        for n in range(2):
            for l in range(32):
                g, t = l // 4, l % 4
                for r in range(2):
                    row = kw*16 + g + 8*r; col = half*16 + n*8 + 2*t
                    St_a[row, col:col+2] = st[n][l][2*r:2*r+2]; St_d[row, col:col+2] = sdd[n][l][2*r:2*r+2]
    report("tapa bwd S^T amp", np.abs(St_a - Kb[:, :split] @ Qb[:, :split].T).max(),
           "dot", np.abs(St_d - Kb[:, split:] @ Qb[:, split:].T).max())
    dKt = np.zeros((BN, HD))
    for w in range(8):
        kw, half = w & 3, w >> 2
        dk = [zeros() for _ in range(kCH // 8)]
        for kk in range(BM // 16):
            aaddr = lambda l: (kw*16 + (l & 15), kk*16 + (l >> 4)*8)
            da = ldm(dSa, aaddr); db = ldm(dSb, aaddr)  # dS^T [key][q] row-major: A fragments
            for n2 in range(kCH // 16):
                c0 = half*kCH + n2*16
                qb = ldm(Qb, lambda l: (kk*16 + (l & 7) + ((l >> 3) & 1)*8, c0 + (l >> 4)*8), trans=True)
                for hb in range(2):
                    n, cb = 2*n2 + hb, c0 + hb*8
                    b0 = [r[2*hb] for r in qb]; b1 = [r[2*hb+1] for r in qb]
                    if cb + 8 <= split: dk[n] = mma(dk[n], da, b0, b1)
                    elif cb >= split: dk[n] = mma(dk[n], db, b0, b1)
                    else:
                        lo = [cb + l // 4 < split for l in range(32)]
                        z = (0.0, 0.0)
                        dk[n] = mma(dk[n], da, [b0[l] if lo[l] else z for l in range(32)], [b1[l] if lo[l] else z for l in range(32)])
                        dk[n] = mma(dk[n], db, [z if lo[l] else b0[l] for l in range(32)], [z if lo[l] else b1[l] for l in range(32)])
        dKt[kw*16:kw*16+16, half*kCH:(half+1)*kCH] = frag_to_mat(dk, kCH // 8)
    ref = np.concatenate([dSa @ Qb[:, :split], dSb @ Qb[:, split:]], axis=1)
    report("tapa dK", np.abs(dKt - ref).max())


for _hd in (32, 64, 96, 128):  # every padded head dim the kernels are instantiated for (loop trip counts differ)
    run(_hd)

if WORST[0] > 1e-9:
    raise SystemExit(f"fragment index math is wrong: max error {WORST[0]:.3g}")
print("fragment index math OK")
