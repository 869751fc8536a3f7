// Tensor-core backward (fp16 / bf16), FlashAttention-2 structure: one block = kBN = 64 keys of one (batch, query
// head), 8 warps; K and V stay in shared memory, Q / dO tiles of kBM = 32 rows (with their lse, delta, positions)
// stream through two shared buffers (cp.async). Per tile, three phases on mma.sync m16n8k16:
//   1. warp (kw, qh) = (w % 4, w / 4): S^T = K Q^T and dP^T = V dO^T for keys 16 kw.., queries 16 qh.. ([16, 16]
//      in registers), P^T = exp(S^T - lse), dS^T = P^T (dP^T - delta) * scale -> shared [key][q] (16-bit)
//   2. warp (kw, ch) = (w % 4, w / 4): dV += P^T dO, dK += dS^T Q for keys 16 kw.., columns ch kHD/2.. (registers,
//      [16, kHD / 2] each: 64 fp32 per thread at kHD = 128, which is what keeps the kernel off local memory)
//   3. warp (mq, cq) = (w % 2, w / 2): dQ = dS K for queries 16 mq.., columns cq kHD/4.., one atomic per element
// Phases 2 and 3 only read shared memory, so one barrier separates them from phase 1.
// Outputs as the glue expects: dq_rot (+=, zeroed by the caller), dk_rot and dv_h per query head (written).
#include <climits>

#include "launchers.h"
#include "score.cuh"
#include "tile.cuh"

namespace fused_posenc {
namespace tc {
namespace {

constexpr int kBN = 64;   // keys per block
constexpr int kBM = 32;   // query rows per streamed tile
constexpr int kNT = 256;  // 8 warps
constexpr int kPS = kBM + 8;  // P^T / dS^T [key][q] row stride: 80 bytes = 5 x 16 B (odd): conflict-free ldmatrix,
                              // and the 32-bit fragment stores (word g * 20 + t + const) hit 32 distinct banks

// Dynamic shared memory (X = 2 bytes), kS = kHD + 8:
//   K [kBN][kS] | V [kBN][kS] | Q [2][kBM][kS] | dO [2][kBM][kS] | P^T, dSa^T, dSb^T [kBN][kPS]
//   | qpos [2][kBM] int64 | lse [2][kBM] | delta [2][kBM] fp32
template <int kHD>
constexpr size_t bwd_smem() {
  return sizeof(uint16_t) * ((size_t)(2 * kBN + 4 * kBM) * RowTile<kHD>::kStride + 3 * kBN * kPS) +
         sizeof(long long) * 2 * kBM + sizeof(float) * 4 * kBM;
}

template <typename X, int kHD, bool kTapa>
__global__ void __launch_bounds__(kNT, 1) bwd_tc_kernel(CudaAttnArgs a, EncParams p, bool vec) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // sm_80+ only (the glue refuses older GPUs before launching)
#else
  constexpr int kS = RowTile<kHD>::kStride;
  constexpr int kCH = kHD / 2;  // phase 2: columns per warp
  constexpr int kCQ = kHD / 4;  // phase 3: columns per warp
  extern __shared__ __align__(16) unsigned char smem_raw[];
  X* Ks = reinterpret_cast<X*>(smem_raw);  // [kBN][kS]
  X* Vs = Ks + kBN * kS;                   // [kBN][kS]
  X* Qs = Vs + kBN * kS;                   // [2][kBM][kS]
  X* dOs = Qs + 2 * kBM * kS;              // [2][kBM][kS]
  X* Pt = dOs + 2 * kBM * kS;              // [kBN][kPS]: P^T
  X* dSa = Pt + kBN * kPS;                 // [kBN][kPS]: dS^T * scale (TAPA: amplitude part)
  X* dSb = dSa + kBN * kPS;                // [kBN][kPS]: TAPA phase part
  long long* qpos_s = reinterpret_cast<long long*>(dSb + kBN * kPS);  // [2][kBM]
  float* lse_s = reinterpret_cast<float*>(qpos_s + 2 * kBM);         // [2][kBM]
  float* delta_s = lse_s + 2 * kBM;                                   // [2][kBM]
  __shared__ long long red[kNT / 32];

  const int nkt = (a.Lk + kBN - 1) / kBN;
  const TileHead th = decompose_block(nkt, a.H, a.Hkv);
  const int b = th.b, h = th.h, j0 = th.tile * kBN;
  const QKSource src = qk_source(a, p, h, th.hk);
  const ScoreCtx sc = make_score_ctx(a, p, b, h);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int kw = warp & 3, half = warp >> 2;  // phases 1, 2: key group, query half / column half

  const int64_t k_rs = (int64_t)src.k_heads * a.D, v_rs = (int64_t)a.Hkv * a.Dv;
  const X* kbase = static_cast<const X*>(src.k) + (((int64_t)b * a.Lk + j0) * src.k_heads + src.k_head) * a.D;
  const X* vbase = static_cast<const X*>(a.v) + (((int64_t)b * a.Lk + j0) * a.Hkv + th.hk) * a.Dv;
  load_rows<X, kBN, kHD, kNT>(Ks, kbase, k_rs, a.Lk - j0, a.D, vec);
  load_rows<X, kBN, kHD, kNT>(Vs, vbase, v_rs, a.Lk - j0, a.Dv, vec);

  const int64_t* kpos_all = a.k_pos + (int64_t)b * a.kpos_bs;
  int key[2];  // phase 1 and 2 rows of this thread: keys 16 kw + g, + 8
  long long kp[2];
  for (int r = 0; r < 2; ++r) {
    key[r] = j0 + kw * 16 + g + 8 * r;
    kp[r] = key[r] < a.Lk ? kpos_all[key[r]] : 0;
  }
  // causal tile skipping: a query tile is visible iff some query position >= the smallest key position here
  long long kmin = LLONG_MAX;
  if (tid < kBN && j0 + tid < a.Lk) kmin = kpos_all[j0 + tid];
  kmin = block_reduce_ll<kNT, false>(kmin, red);

  const int64_t* qpos_all = a.q_pos + (int64_t)b * a.qpos_bs;
  const int nqt = (a.Lq + kBM - 1) / kBM;
  auto next_visible = [&](int i, int buf) {  // first visible query tile >= i, its row data in buffer buf
    for (; i < nqt; ++i) {
      const int qi = i * kBM + tid;
      const bool in = tid < kBM && qi < a.Lq;
      long long qp = 0;
      if (tid < kBM) {
        float ls = -INFINITY, dl = 0.f;
        if (in) {
          qp = qpos_all[qi];
          ls = a.lse[((int64_t)b * a.H + h) * a.Lq + qi];
          dl = a.delta[((int64_t)b * a.Lq + qi) * a.H + h];
        }
        qpos_s[buf * kBM + tid] = qp;
        lse_s[buf * kBM + tid] = ls;
        delta_s[buf * kBM + tid] = dl;
      }
      if (!a.causal) break;
      if (__syncthreads_or(in && qp >= kmin)) break;
    }
    return i;
  };
  const int64_t q_rs = (int64_t)a.H * a.D, o_rs = (int64_t)a.H * a.Dv;
  const X* qbase = static_cast<const X*>(src.q) + ((int64_t)b * a.Lq * a.H + h) * a.D;
  const X* obase = static_cast<const X*>(a.dout) + ((int64_t)b * a.Lq * a.H + h) * a.Dv;
  auto issue_q = [&](int i, int buf) {
    const int i0 = i * kBM, nq = a.Lq - i0;
    load_rows<X, kBM, kHD, kNT>(Qs + buf * kBM * kS, qbase + i0 * q_rs, q_rs, nq, a.D, vec);
    load_rows<X, kBM, kHD, kNT>(dOs + buf * kBM * kS, obase + i0 * o_rs, o_rs, nq, a.Dv, vec);
  };

  float dk[kCH / 8][4], dv[kCH / 8][4];  // [16 keys, kHD / 2] per warp
  for (int n = 0; n < kCH / 8; ++n)
    for (int e = 0; e < 4; ++e) dk[n][e] = dv[n][e] = 0.f;

  int i = next_visible(0, 0), buf = 0;
  if (i < nqt) issue_q(i, 0);
  cp_async_commit();
  const X* k_warp = Ks + kw * 16 * kS;
  const X* v_warp = Vs + kw * 16 * kS;
  while (i < nqt) {
    cp_async_wait_all();
    __syncthreads();  // tile i (and K, V) landed; buffer buf ^ 1 and P^T / dS^T are free
    const int inext = next_visible(i + 1, buf ^ 1);
    if (inext < nqt) issue_q(inext, buf ^ 1);
    cp_async_commit();

    const X* qt = Qs + buf * kBM * kS;
    const X* ot = dOs + buf * kBM * kS;
    const int i0 = i * kBM;
    // ---- phase 1: S^T = K Q^T (TAPA: st amplitude, sd phase), dP^T = V dO^T: [16 keys, 16 queries] per warp
    {
      float st[2][4], sd[2][4], dp[2][4];
      for (int n = 0; n < 2; ++n)
        for (int e = 0; e < 4; ++e) st[n][e] = sd[n][e] = dp[n][e] = 0.f;
      const int brow = (half * 16 + (lane & 7) + (lane >> 4) * 8) * kS + ((lane >> 3) & 1) * 8;
#pragma unroll
      for (int ks = 0; ks < kHD / 16; ++ks) {
        const int k0 = ks * 16;
        uint32_t ka[4], va[4], qb[4], ob[4];
        ldmatrix_x4(ka, k_warp + (lane & 15) * kS + k0 + (lane >> 4) * 8);
        ldmatrix_x4(va, v_warp + (lane & 15) * kS + k0 + (lane >> 4) * 8);
        ldmatrix_x4(qb, qt + brow + k0);  // [q rows][d] row-major = "col" B of the warp's 2 query n-blocks
        ldmatrix_x4(ob, ot + brow + k0);
        mma16816<X>(dp[0], va, ob[0], ob[1]);
        mma16816<X>(dp[1], va, ob[2], ob[3]);
        if constexpr (kTapa) {  // split the k-step's columns between the two dot products
          if (k0 < sc.split) {
            uint32_t amp[4];
            amp[0] = keep_below(ka[0], k0 + 2 * t, sc.split);
            amp[1] = keep_below(ka[1], k0 + 2 * t, sc.split);
            amp[2] = keep_below(ka[2], k0 + 8 + 2 * t, sc.split);
            amp[3] = keep_below(ka[3], k0 + 8 + 2 * t, sc.split);
            mma16816<X>(st[0], amp, qb[0], qb[1]);
            mma16816<X>(st[1], amp, qb[2], qb[3]);
            for (int r = 0; r < 4; ++r) ka[r] ^= amp[r];
          }
          if (k0 + 16 > sc.split) {
            mma16816<X>(sd[0], ka, qb[0], qb[1]);
            mma16816<X>(sd[1], ka, qb[2], qb[3]);
          }
        } else {
          mma16816<X>(st[0], ka, qb[0], qb[1]);
          mma16816<X>(st[1], ka, qb[2], qb[3]);
        }
      }
      const long long* qp_t = qpos_s + buf * kBM;
      const float* lse_t = lse_s + buf * kBM;
      const float* dl_t = delta_s + buf * kBM;
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1, c = half * 16 + n * 8 + 2 * t + (e & 1);  // c: query within the tile
          float pv = 0.f, dsa = 0.f, dsb = 0.f;
          const float ls = lse_t[c];
          const long long qp = qp_t[c];
          if (key[r] < a.Lk && i0 + c < a.Lq && ls != -INFINITY && !(a.causal && kp[r] > qp)) {
            float amp = 0.f, om = 0.f;
            const float s = finish_score<kTapa>(sc, st[n][e], sd[n][e], qp, kp[r], amp, om);
            pv = exp2f((s - ls) * kLog2e);
            const float ds = pv * (dp[n][e] - dl_t[c]);
            if constexpr (kTapa) {
              float ga, gb;
              tapa_grad<float>(ds, amp, om, sd[n][e], ga, gb);
              dsa = ga * sc.scale;
              dsb = gb;
            } else {
              dsa = ds * sc.scale;
            }
          }
          st[n][e] = pv;
          dp[n][e] = dsa;
          sd[n][e] = dsb;
        }
      // P^T, dS^T -> shared [key][q], one 32-bit store per (row, n-block)
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int off = (kw * 16 + g + 8 * r) * kPS + half * 16 + n * 8 + 2 * t;
          *reinterpret_cast<uint32_t*>(Pt + off) = Elem<X>::pack(st[n][2 * r], st[n][2 * r + 1]);
          *reinterpret_cast<uint32_t*>(dSa + off) = Elem<X>::pack(dp[n][2 * r], dp[n][2 * r + 1]);
          if constexpr (kTapa) *reinterpret_cast<uint32_t*>(dSb + off) = Elem<X>::pack(sd[n][2 * r], sd[n][2 * r + 1]);
        }
    }
    __syncthreads();  // P^T, dS^T complete
    // ---- phase 2: dV += P^T dO, dK += dS^T Q (TAPA: dSa^T on columns < split, dSb^T on the rest)
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) {
      uint32_t pa[4], da[4], db[4];  // A fragments [16 keys, 16 queries] from [key][q] row-major
      const int aoff = (kw * 16 + (lane & 15)) * kPS + kk * 16 + (lane >> 4) * 8;
      ldmatrix_x4(pa, Pt + aoff);
      ldmatrix_x4(da, dSa + aoff);
      if constexpr (kTapa) ldmatrix_x4(db, dSb + aoff);
#pragma unroll
      for (int n2 = 0; n2 < kCH / 16; ++n2) {
        uint32_t ob[4], qb[4];  // [q rows][cols] row-major = K x N: .trans
        const int c0 = half * kCH + n2 * 16;
        const int roff = (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kS + c0 + (lane >> 4) * 8;
        ldmatrix_x4_trans(ob, ot + roff);
        ldmatrix_x4_trans(qb, qt + roff);
        mma16816<X>(dv[2 * n2], pa, ob[0], ob[1]);
        mma16816<X>(dv[2 * n2 + 1], pa, ob[2], ob[3]);
#pragma unroll
        for (int hb = 0; hb < 2; ++hb) {
          const int n = 2 * n2 + hb, cb = c0 + hb * 8;  // this lane's B column: cb + g
          const uint32_t b0 = qb[2 * hb], b1 = qb[2 * hb + 1];
          if (!kTapa || cb + 8 <= sc.split) {
            mma16816<X>(dk[n], da, b0, b1);
          } else if (cb >= sc.split) {
            mma16816<X>(dk[n], db, b0, b1);
          } else {
            const bool lo = cb + g < sc.split;
            mma16816<X>(dk[n], da, lo ? b0 : 0u, lo ? b1 : 0u);
            mma16816<X>(dk[n], db, lo ? 0u : b0, lo ? 0u : b1);
          }
        }
      }
    }
    // ---- phase 3: dQ = dS K for queries 16 mq.., columns kCQ cq.., one atomic per element
    {
      const int mq = warp & 1, cq0 = (warp >> 1) * kCQ;
      float dq[kCQ / 8][4];
      for (int n = 0; n < kCQ / 8; ++n)
        for (int e = 0; e < 4; ++e) dq[n][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) {
        uint32_t aa[4], ab[4];  // A = dS [q][key] from the stored dS^T [key][q] by .trans
        const int aoff = (kk * 16 + (lane & 7) + (lane >> 4) * 8) * kPS + mq * 16 + ((lane >> 3) & 1) * 8;
        ldmatrix_x4_trans(aa, dSa + aoff);
        if constexpr (kTapa) ldmatrix_x4_trans(ab, dSb + aoff);
#pragma unroll
        for (int n = 0; n < kCQ / 8; ++n) {
          const int cb = cq0 + n * 8;  // this lane's B column: cb + g
          uint32_t kb[2];  // K [keys][d] row-major = K x N: .trans, keys kk*16 + 0..15 at columns cb..cb+7
          ldmatrix_x2_trans(kb, Ks + (kk * 16 + (lane & 15)) * kS + cb);
          if (!kTapa || cb + 8 <= sc.split) {
            mma16816<X>(dq[n], aa, kb[0], kb[1]);
          } else if (cb >= sc.split) {
            mma16816<X>(dq[n], ab, kb[0], kb[1]);
          } else {
            const bool lo = cb + g < sc.split;
            mma16816<X>(dq[n], aa, lo ? kb[0] : 0u, lo ? kb[1] : 0u);
            mma16816<X>(dq[n], ab, lo ? 0u : kb[0], lo ? 0u : kb[1]);
          }
        }
      }
#pragma unroll
      for (int n = 0; n < kCQ / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qi = i0 + mq * 16 + g + 8 * (e >> 1), c = cq0 + n * 8 + 2 * t + (e & 1);
          if (qi < a.Lq && c < a.D && dq[n][e] != 0.f)
            atomicAdd(a.dq_rot + (((int64_t)b * a.Lq + qi) * a.H + h) * a.D + c, dq[n][e]);
        }
    }
    i = inext;
    buf ^= 1;
  }
  cp_async_wait_all();

  // ---- dK (gradient w.r.t. the encoded k) and dV of this block's keys, per query head
  for (int r = 0; r < 2; ++r) {
    if (key[r] >= a.Lk) continue;
    float* dkr = a.dk_rot + (((int64_t)b * a.Lk + key[r]) * a.H + h) * a.D;
    float* dvr = a.dv_h + (((int64_t)b * a.Lk + key[r]) * a.H + h) * a.Dv;
    for (int n = 0; n < kCH / 8; ++n)
      for (int e = 0; e < 2; ++e) {
        const int c = half * kCH + n * 8 + 2 * t + e;
        if (c < a.D) dkr[c] = dk[n][2 * r + e];
        if (c < a.Dv) dvr[c] = dv[n][2 * r + e];
      }
  }
#endif
}

template <typename X, int kHD>
int launch_bwd(const CudaAttnArgs& a, const EncParams& p, cudaStream_t st, bool vec) {
  const size_t smem = bwd_smem<kHD>();
  // TAPA's two dot products and its modulation get their own instantiation: the other encodings keep the registers
  auto kernel = p.kind == ENC_TAPA ? bwd_tc_kernel<X, kHD, true> : bwd_tc_kernel<X, kHD, false>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (e != cudaSuccess) return (int)e;
  const int64_t blocks = (int64_t)((a.Lk + kBN - 1) / kBN) * a.B * a.H;
  if (blocks == 0) return 0;  // no rows / keys: nothing to compute or write
  if (blocks > 0x7fffffffLL) return (int)cudaErrorInvalidConfiguration;
  kernel<<<(unsigned)blocks, kNT, smem, st>>>(a, p, vec);
  return (int)cudaGetLastError();
}

template <typename X>
int launch_bwd_hd(const CudaAttnArgs& a, const EncParams& p, cudaStream_t st, bool vec) {
  switch (padded_head_dim(a.D, a.Dv)) {
    case 32:
      if constexpr (FPE_HD_ENABLED(32)) return launch_bwd<X, 32>(a, p, st, vec);
      break;
    case 64:
      if constexpr (FPE_HD_ENABLED(64)) return launch_bwd<X, 64>(a, p, st, vec);
      break;
    case 96:
      if constexpr (FPE_HD_ENABLED(96)) return launch_bwd<X, 96>(a, p, st, vec);
      break;
    case 128:
      if constexpr (FPE_HD_ENABLED(128)) return launch_bwd<X, 128>(a, p, st, vec);
      break;
    default: break;
  }
  return (int)cudaErrorInvalidValue;
}

}  // namespace
}  // namespace tc

size_t tc_backward_smem_bytes(int kHD) {
  switch (kHD) {
    case 32: return tc::bwd_smem<32>();
    case 64: return tc::bwd_smem<64>();
    case 96: return tc::bwd_smem<96>();
    default: return tc::bwd_smem<128>();
  }
}

int tc_backward(const CudaAttnArgs& a, const EncParams& p, void* stream, bool vec) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (a.dtype == DT_BF16) return tc::launch_bwd_hd<__nv_bfloat16>(a, p, st, vec);
  if constexpr (FPE_F16_ENABLED) return tc::launch_bwd_hd<__half>(a, p, st, vec);
  return (int)cudaErrorInvalidValue;
}

}  // namespace fused_posenc
