// Tensor-core forward (fp16 / bf16), FlashAttention-2 structure: one block = kBM query rows of one (batch, head),
// 8 warps x 16 rows; the Q tile stays in shared memory, K/V tiles stream through two shared buffers (cp.async,
// the next visible tile loads while this one computes); S = Q K^T and O += P V on mma.sync m16n8k16 with fp32
// accumulators; online softmax in registers. Rotary / FoPE inputs arrive pre-encoded (prologue.cu).
#include <climits>

#include "launchers.h"
#include "score.cuh"
#include "tile.cuh"

namespace fused_posenc {
namespace tc {
namespace {

constexpr int kBM = 128;  // query rows per block (8 warps x 16): each K/V tile serves 128 rows
constexpr int kBN = 64;   // keys per streamed tile
constexpr int kNT = 256;  // threads

// Dynamic shared memory (X = 2 bytes), kS = kHD + 8 (see RowTile):
//   Q [kBM][kS] | K [2][kBN][kS] | V [2][kBN][kS] | kpos [2][kBN] int64
template <int kHD>
constexpr size_t fwd_smem() {
  return sizeof(uint16_t) * (size_t)(kBM + 4 * kBN) * RowTile<kHD>::kStride + sizeof(long long) * 2 * kBN;
}

template <typename X, int kHD, bool kTapa>
__global__ void __launch_bounds__(kNT, 1) fwd_tc_kernel(CudaAttnArgs a, EncParams p, bool vec) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // sm_80+ only (the glue refuses older GPUs before launching)
#else
  constexpr int kS = RowTile<kHD>::kStride;
  constexpr int kNB = kBN / 8;   // score n-blocks per warp   (S: [16, kBN] = kNB x m16n8)
  constexpr int kND = kHD / 8;   // output n-blocks per warp  (O: [16, kHD])
  extern __shared__ __align__(16) unsigned char smem_raw[];
  X* Qs = reinterpret_cast<X*>(smem_raw);  // [kBM][kS]
  X* Ks = Qs + kBM * kS;                   // [2][kBN][kS]
  X* Vs = Ks + 2 * kBN * kS;               // [2][kBN][kS]
  long long* kpos_s = reinterpret_cast<long long*>(Vs + 2 * kBN * kS);  // [2][kBN]
  __shared__ long long red[kNT / 32];

  const int nqt = (a.Lq + kBM - 1) / kBM;
  const TileHead th = decompose_block(nqt, a.H, a.Hkv);
  const int b = th.b, h = th.h, i0 = th.tile * kBM;
  const QKSource src = qk_source(a, p, h, th.hk);
  const ScoreCtx sc = make_score_ctx(a, p, b, h);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;

  // Q tile -> shared (zero rows past Lq, zero columns past D)
  const int64_t q_rs = (int64_t)a.H * a.D;
  const X* qbase = static_cast<const X*>(src.q) + ((int64_t)b * a.Lq * a.H + h) * a.D;
  load_rows<X, kBM, kHD, kNT>(Qs, qbase + (int64_t)i0 * q_rs, q_rs, a.Lq - i0, a.D, vec);

  // this thread's two rows (g, g + 8 of the warp's 16) and their positions
  const int64_t* qpos_all = a.q_pos + (int64_t)b * a.qpos_bs;
  int row[2];
  long long qp[2];
  for (int r = 0; r < 2; ++r) {
    row[r] = i0 + warp * 16 + g + 8 * r;
    qp[r] = row[r] < a.Lq ? qpos_all[row[r]] : 0;
  }
  // causal tile skipping: a key tile is visible iff some key position <= the largest query position of the tile
  long long qmax = LLONG_MIN;
  if (tid < kBM && i0 + tid < a.Lq) qmax = qpos_all[i0 + tid];
  qmax = block_reduce_ll<kNT, true>(qmax, red);

  const int64_t* kpos_all = a.k_pos + (int64_t)b * a.kpos_bs;
  const int nkt = (a.Lk + kBN - 1) / kBN;
  // first visible key tile >= j, its positions stored in kpos_s[buf]; block-uniform
  auto next_visible = [&](int j, int buf) {
    for (; j < nkt; ++j) {
      const int kj = j * kBN + tid;
      const bool in = tid < kBN && kj < a.Lk;
      long long kp = 0;
      if (in) kp = kpos_all[kj];
      if (tid < kBN) kpos_s[buf * kBN + tid] = kp;
      if (!a.causal) break;
      if (__syncthreads_or(in && kp <= qmax)) break;
    }
    return j;
  };
  const int64_t k_rs = (int64_t)src.k_heads * a.D, v_rs = (int64_t)a.Hkv * a.Dv;
  const X* kbase = static_cast<const X*>(src.k) + ((int64_t)b * a.Lk * src.k_heads + src.k_head) * a.D;
  const X* vbase = static_cast<const X*>(a.v) + ((int64_t)b * a.Lk * a.Hkv + th.hk) * a.Dv;
  auto issue_kv = [&](int j, int buf) {
    const int j0 = j * kBN, nk = a.Lk - j0;
    load_rows<X, kBN, kHD, kNT>(Ks + buf * kBN * kS, kbase + j0 * k_rs, k_rs, nk, a.D, vec);
    load_rows<X, kBN, kHD, kNT>(Vs + buf * kBN * kS, vbase + j0 * v_rs, v_rs, nk, a.Dv, vec);
  };

  float o[kND][4];  // O [16, kHD] of the warp, m16n8 fragments
  for (int n = 0; n < kND; ++n)
    for (int e = 0; e < 4; ++e) o[n][e] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};  // l: this thread's partial row sums

  int j = next_visible(0, 0), buf = 0;
  if (j < nkt) issue_kv(j, 0);
  cp_async_commit();
  const X* q_warp = Qs + warp * 16 * kS;
  while (j < nkt) {
    cp_async_wait_all();
    __syncthreads();  // tile j (and Q) landed; every warp is done with buffer buf ^ 1
    const int jn = next_visible(j + 1, buf ^ 1);
    if (jn < nkt) issue_kv(jn, buf ^ 1);
    cp_async_commit();

    const X* kt = Ks + buf * kBN * kS;
    const X* vt = Vs + buf * kBN * kS;
    // ---- S = Q K^T: [16, kBN] per warp; TAPA: s = amplitude part, sd = phase part
    float s[kNB][4], sd[kTapa ? kNB : 1][4];
    for (int n = 0; n < kNB; ++n)
      for (int e = 0; e < 4; ++e) s[n][e] = 0.f;
    for (int n = 0; n < (kTapa ? kNB : 1); ++n)
      for (int e = 0; e < 4; ++e) sd[n][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kHD / 16; ++ks) {
      const int k0 = ks * 16;
      uint32_t qa[4];
      ldmatrix_x4(qa, q_warp + (lane & 15) * kS + k0 + (lane >> 4) * 8);
      const bool amp_part = k0 < sc.split, dot_part = kTapa && k0 + 16 > sc.split;
      uint32_t qa_amp[4] = {qa[0], qa[1], qa[2], qa[3]}, qa_dot[4];
      if (dot_part) {  // split the k-step's columns between the two dot products
        qa_amp[0] = keep_below(qa[0], k0 + 2 * t, sc.split);
        qa_amp[1] = keep_below(qa[1], k0 + 2 * t, sc.split);
        qa_amp[2] = keep_below(qa[2], k0 + 8 + 2 * t, sc.split);
        qa_amp[3] = keep_below(qa[3], k0 + 8 + 2 * t, sc.split);
        for (int r = 0; r < 4; ++r) qa_dot[r] = qa[r] ^ qa_amp[r];
      }
#pragma unroll
      for (int n2 = 0; n2 < kNB / 2; ++n2) {
        uint32_t kb[4];  // B fragments of n-blocks 2 n2, 2 n2 + 1
        ldmatrix_x4(kb, kt + (n2 * 16 + (lane & 7) + (lane >> 4) * 8) * kS + k0 + ((lane >> 3) & 1) * 8);
        if (amp_part) {
          mma16816<X>(s[2 * n2], qa_amp, kb[0], kb[1]);
          mma16816<X>(s[2 * n2 + 1], qa_amp, kb[2], kb[3]);
        }
        if constexpr (kTapa) {
          if (dot_part) {
            mma16816<X>(sd[2 * n2], qa_dot, kb[0], kb[1]);
            mma16816<X>(sd[2 * n2 + 1], qa_dot, kb[2], kb[3]);
          }
        }
      }
    }
    // ---- score epilogue + masks (out of range, causal) -> s holds the scores, -inf where invisible
    const int j0 = j * kBN;
    const long long* kp_t = kpos_s + buf * kBN;
    float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
    for (int n = 0; n < kNB; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1, c = n * 8 + 2 * t + (e & 1);
        float v = -INFINITY;
        if (row[r] < a.Lq && j0 + c < a.Lk) {
          const long long kp = kp_t[c];
          if (!(a.causal && kp > qp[r])) {
            float amp, om;
            v = finish_score<kTapa>(sc, s[n][e], kTapa ? sd[kTapa ? n : 0][e] : 0.f, qp[r], kp, amp, om);
          }
        }
        s[n][e] = v;
        mx[r] = fmaxf(mx[r], v);
      }
    // ---- online softmax (rows g, g + 8; the 4 lanes of a quad share a row)
    float corr[2], m_use[2];
    for (int r = 0; r < 2; ++r) {
      mx[r] = quad_max(mx[r]);
      m_use[r] = mx[r] == -INFINITY ? 0.f : mx[r];  // a row with nothing visible yet: p = 0, no NaN
      corr[r] = exp2f((m_run[r] - m_use[r]) * kLog2e);
      m_run[r] = mx[r];
      l_run[r] *= corr[r];
    }
#pragma unroll
    for (int n = 0; n < kNB; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float pv = exp2f((s[n][e] - m_use[e >> 1]) * kLog2e);
        s[n][e] = pv;
        l_run[e >> 1] += pv;
      }
#pragma unroll
    for (int n = 0; n < kND; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[n][e] *= corr[e >> 1];
    // ---- O += P V: P from the score registers (C layout of n-blocks 2kk, 2kk+1 = A layout of k-step kk)
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      uint32_t pa[4];
      pa[0] = Elem<X>::pack(s[2 * kk][0], s[2 * kk][1]);
      pa[1] = Elem<X>::pack(s[2 * kk][2], s[2 * kk][3]);
      pa[2] = Elem<X>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[3] = Elem<X>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int n2 = 0; n2 < kND / 2; ++n2) {
        uint32_t vb[4];  // V [keys, dv] row-major = K x N: .trans gives the "col" B fragments
        ldmatrix_x4_trans(vb, vt + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kS + n2 * 16 + (lane >> 4) * 8);
        mma16816<X>(o[2 * n2], pa, vb[0], vb[1]);
        mma16816<X>(o[2 * n2 + 1], pa, vb[2], vb[3]);
      }
    }
    j = jn;
    buf ^= 1;
  }
  cp_async_wait_all();

  // ---- epilogue: O / l, lse = m + log(l) (natural log; -inf and zero output for rows that saw no key)
  X* out = static_cast<X*>(a.out);
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(l_run[r]);
    if (row[r] >= a.Lq) continue;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    X* orow = out + (((int64_t)b * a.Lq + row[r]) * a.H + h) * a.Dv;
    for (int n = 0; n < kND; ++n)
      for (int e = 0; e < 2; ++e) {
        const int c = n * 8 + 2 * t + e;
        if (c < a.Dv) orow[c] = Elem<X>::from_f(o[n][2 * r + e] * inv);
      }
    if (t == 0) a.lse[((int64_t)b * a.H + h) * a.Lq + row[r]] = l > 0.f ? m_run[r] + logf(l) : -INFINITY;
  }
#endif
}

template <typename X, int kHD>
int launch_fwd(const CudaAttnArgs& a, const EncParams& p, cudaStream_t st, bool vec) {
  const size_t smem = fwd_smem<kHD>();
  // TAPA's two dot products and its modulation get their own instantiation: the other encodings keep the registers
  auto kernel = p.kind == ENC_TAPA ? fwd_tc_kernel<X, kHD, true> : fwd_tc_kernel<X, kHD, false>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (e != cudaSuccess) return (int)e;
  const int64_t blocks = (int64_t)((a.Lq + kBM - 1) / kBM) * a.B * a.H;
  if (blocks == 0) return 0;  // no rows / keys: nothing to compute or write
  if (blocks > 0x7fffffffLL) return (int)cudaErrorInvalidConfiguration;
  kernel<<<(unsigned)blocks, kNT, smem, st>>>(a, p, vec);
  return (int)cudaGetLastError();
}

template <typename X>
int launch_fwd_hd(const CudaAttnArgs& a, const EncParams& p, cudaStream_t st, bool vec) {
  switch (padded_head_dim(a.D, a.Dv)) {
    case 32:
      if constexpr (FPE_HD_ENABLED(32)) return launch_fwd<X, 32>(a, p, st, vec);
      break;
    case 64:
      if constexpr (FPE_HD_ENABLED(64)) return launch_fwd<X, 64>(a, p, st, vec);
      break;
    case 96:
      if constexpr (FPE_HD_ENABLED(96)) return launch_fwd<X, 96>(a, p, st, vec);
      break;
    case 128:
      if constexpr (FPE_HD_ENABLED(128)) return launch_fwd<X, 128>(a, p, st, vec);
      break;
    default: break;
  }
  return (int)cudaErrorInvalidValue;
}

}  // namespace
}  // namespace tc

int padded_head_dim(int D, int Dv) {
  const int d = D > Dv ? D : Dv;
  if (d <= 32) return 32;
  if (d <= 64) return 64;
  if (d <= 96) return 96;
  if (d <= kMaxTensorCoreHeadDim) return 128;
  return 0;
}

size_t tc_forward_smem_bytes(int kHD) {
  switch (kHD) {
    case 32: return tc::fwd_smem<32>();
    case 64: return tc::fwd_smem<64>();
    case 96: return tc::fwd_smem<96>();
    default: return tc::fwd_smem<128>();
  }
}

int tc_forward(const CudaAttnArgs& a, const EncParams& p, void* stream, bool vec) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (a.dtype == DT_BF16) return tc::launch_fwd_hd<__nv_bfloat16>(a, p, st, vec);
  if constexpr (FPE_F16_ENABLED) return tc::launch_fwd_hd<__half>(a, p, st, vec);
  return (int)cudaErrorInvalidValue;
}

}  // namespace fused_posenc
