// The scalar path of the CUDA backend: online-softmax attention over fp32 shared-memory tiles, no tensor cores.
// It serves fp32 inputs (no TF32: the fp32 contract is fp32 accuracy) and head dims above kMaxTensorCoreHeadDim,
// as far as shared memory holds them (attention_smem_bytes; the glue refuses the rest, naming the limit).
// 128 threads per block, BM x BN = 32 x 32 tiles, 1-D grid. Rotary / FoPE rows arrive pre-encoded (q_enc / k_enc
// from prologue.cu); without them (a caller that did not set the scratch) the tiles are rotated on load.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>

#include "convert.cuh"
#include "launchers.h"

namespace fused_posenc {
namespace {

constexpr int BM = 32;
constexpr int BN = 32;
constexpr int NT = 128;

__device__ __forceinline__ void tables(const EncParams& p, int64_t pos, int h, int j, float& c, float& s) {
  if (p.kind == ENC_ROTARY) {
    rotary_cos_sin<float>(pos, p.pair_turns + 2 * j, p.pair_scale[j], c, s);
  } else {
    const int64_t off = (int64_t)h * p.fope_dk * p.npairs;
    fope_cos_sin<float>(pos, j, p.fope_dk, p.npairs, p.fope_turns, p.fope_cos_coef + off, p.fope_sin_coef + off,
                        p.fope_pad, c, s);
  }
}

// dst (rows x D, fp32) <- encoded rows src[r * rowstride + d] at positions pos[r] for query head h; rows >= n are 0.
template <typename X>
__device__ void load_encoded(const EncParams& p, const X* src, int64_t rowstride, int n, int rows, int D,
                             const int64_t* pos, int h, float* dst, bool encode) {
  for (int idx = threadIdx.x; idx < rows * D; idx += blockDim.x) {
    const int r = idx / D, d = idx % D;
    dst[idx] = r < n ? to_f(src[(int64_t)r * rowstride + d]) : 0.f;
  }
  __syncthreads();
  if (encode && is_rotation(p.kind)) {
    const int P = p.npairs;
    for (int idx = threadIdx.x; idx < n * P; idx += blockDim.x) {
      const int r = idx / P, j = idx % P;
      float c, s;
      tables(p, pos[r], h, j, c, s);
      const int i1 = (int)p.idx1[j], i2 = (int)p.idx2[j];
      float y1, y2;
      rotate_pair<float>(dst[r * D + i1], dst[r * D + i2], c, s, y1, y2);
      dst[r * D + i1] = y1;
      dst[r * D + i2] = y2;
    }
  }
  __syncthreads();
}

// Smallest / largest of n positions (thread 0 of a block uses them to skip causally invisible tiles).
__device__ __forceinline__ long long pos_min(const int64_t* pos, int n) {
  long long r = pos[0];
  for (int i = 1; i < n; ++i) r = min(r, (long long)pos[i]);
  return r;
}
__device__ __forceinline__ long long pos_max(const int64_t* pos, int n) {
  long long r = pos[0];
  for (int i = 1; i < n; ++i) r = max(r, (long long)pos[i]);
  return r;
}

// One score element (and the TAPA amplitude / phase dot) from shared-memory rows.
__device__ __forceinline__ float score_elem(const EncParams& p, const float* qi, const float* kj, int D, float scale,
                                            int64_t qp, int64_t kp, float slope, float& amp, float& dot) {
  if (p.kind == ENC_TAPA) {
    float a = 0.f, b = 0.f;
    for (int d = 0; d < p.tapa_split; ++d) a += qi[d] * kj[d];
    for (int d = p.tapa_split; d < D; ++d) b += qi[d] * kj[d];
    amp = a * scale;
    dot = b;
    const float om = tapa_omega<float>(p.tapa_phase_scale, p.tapa_alpha, qp, kp);
    return tapa_score<float>(amp, om, dot);
  }
  float a = 0.f;
  for (int d = 0; d < D; ++d) a += qi[d] * kj[d];
  a *= scale;
  if (p.kind == ENC_ALIBI) a += alibi_bias<float>(slope, qp, kp);
  return a;
}

template <typename X>
__global__ void fwd_kernel(CudaAttnArgs a, EncParams p) {
  extern __shared__ float sm[];
  const int D = a.D, Dv = a.Dv;
  float* Qs = sm;
  float* Ks = Qs + BM * D;
  float* Vs = Ks + BN * D;
  float* S = Vs + BN * Dv;
  float* acc = S + BM * BN;
  float* m = acc + BM * Dv;
  float* l = m + BM;
  float* corr = l + BM;
  __shared__ int skip;
  __shared__ long long qmax;

  const int nqt = (a.Lq + BM - 1) / BM;
  const int i0 = (int)(blockIdx.x % nqt) * BM;
  const int64_t bh = blockIdx.x / nqt;
  const int b = (int)(bh / a.H), h = (int)(bh % a.H), hk = h / (a.H / a.Hkv);
  const int nq = min(BM, a.Lq - i0);
  const int64_t* qpos = a.q_pos + b * a.qpos_bs + i0;
  const int64_t* kpos_all = a.k_pos + b * a.kpos_bs;
  const float slope = p.kind == ENC_ALIBI ? p.slopes[(p.slopes_batch > 1 ? b : 0) * a.H + h] : 0.f;
  const bool pre = is_rotation(p.kind) && a.q_enc != nullptr;  // encoded copies from the prologue
  const int kh = pre ? encoded_k_heads(p.kind, a.H, a.Hkv) : a.Hkv, khi = pre && p.kind == ENC_FOPE ? h : hk;
  const X* q = static_cast<const X*>(pre ? a.q_enc : a.q) + (((int64_t)b * a.Lq + i0) * a.H + h) * D;
  load_encoded<X>(p, q, (int64_t)a.H * D, nq, BM, D, qpos, h, Qs, !pre);
  for (int idx = threadIdx.x; idx < BM * Dv; idx += blockDim.x) acc[idx] = 0.f;
  if (threadIdx.x < BM) { m[threadIdx.x] = -INFINITY; l[threadIdx.x] = 0.f; }
  if (threadIdx.x == 0) qmax = pos_max(qpos, nq);
  __syncthreads();
  for (int j0 = 0; j0 < a.Lk; j0 += BN) {
    const int nk = min(BN, a.Lk - j0);
    const int64_t* kpos = kpos_all + j0;
    if (threadIdx.x == 0) skip = a.causal && pos_min(kpos, nk) > qmax;
    __syncthreads();
    const bool skipped = skip;
    __syncthreads();  // everyone has read `skip` before thread 0 may rewrite it
    if (skipped) continue;  // uniform across the block
    const X* k = static_cast<const X*>(pre ? a.k_enc : a.k) + (((int64_t)b * a.Lk + j0) * kh + khi) * D;
    const X* v = static_cast<const X*>(a.v) + (((int64_t)b * a.Lk + j0) * a.Hkv + hk) * Dv;
    load_encoded<X>(p, k, (int64_t)kh * D, nk, BN, D, kpos, h, Ks, !pre);
    load_encoded<X>(p, v, (int64_t)a.Hkv * Dv, nk, BN, Dv, kpos, h, Vs, false);
    for (int idx = threadIdx.x; idx < BM * BN; idx += blockDim.x) {
      const int i = idx / BN, j = idx % BN;
      float s = -INFINITY;
      if (i < nq && j < nk && !(a.causal && kpos[j] > qpos[i])) {
        float amp, dot;
        s = score_elem(p, Qs + i * D, Ks + j * D, D, a.scale, qpos[i], kpos[j], slope, amp, dot);
      }
      S[idx] = s;
    }
    __syncthreads();
    if (threadIdx.x < BM) {
      const int i = threadIdx.x;
      float mx = m[i];
      for (int j = 0; j < BN; ++j) mx = fmaxf(mx, S[i * BN + j]);
      if (mx == -INFINITY) {
        corr[i] = 1.f;
        for (int j = 0; j < BN; ++j) S[i * BN + j] = 0.f;
      } else {
        const float c = __expf(m[i] - mx);
        float sum = 0.f;
        for (int j = 0; j < BN; ++j) {
          const float pj = __expf(S[i * BN + j] - mx);
          S[i * BN + j] = pj;
          sum += pj;
        }
        corr[i] = c;
        l[i] = l[i] * c + sum;
        m[i] = mx;
      }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < BM * Dv; idx += blockDim.x) {
      const int i = idx / Dv, e = idx % Dv;
      float o = acc[idx] * corr[i];
      for (int j = 0; j < BN; ++j) o += S[i * BN + j] * Vs[j * Dv + e];
      acc[idx] = o;
    }
    __syncthreads();
  }
  X* out = static_cast<X*>(a.out) + (((int64_t)b * a.Lq + i0) * a.H + h) * Dv;
  for (int idx = threadIdx.x; idx < nq * Dv; idx += blockDim.x) {
    const int i = idx / Dv, e = idx % Dv;
    out[(int64_t)i * a.H * Dv + e] = from_f<X>(l[i] > 0.f ? acc[idx] / l[i] : 0.f);
  }
  if (threadIdx.x < nq) {
    const int i = threadIdx.x;
    a.lse[((int64_t)b * a.H + h) * a.Lq + i0 + i] = l[i] > 0.f ? m[i] + logf(l[i]) : -INFINITY;
  }
}

// One block per (key tile, batch * query head): dK, dV of its keys in shared memory, dQ by atomics.
template <typename X>
__global__ void bwd_kernel(CudaAttnArgs a, EncParams p) {
  extern __shared__ float sm[];
  const int D = a.D, Dv = a.Dv;
  float* Ks = sm;
  float* Vs = Ks + BN * D;
  float* dKs = Vs + BN * Dv;
  float* dVs = dKs + BN * D;
  float* Qs = dVs + BN * Dv;
  float* dOs = Qs + BM * D;
  float* Pm = dOs + BM * Dv;   // P
  float* dSa = Pm + BM * BN;   // dS * scale (TAPA: amplitude part)
  float* dSb = dSa + BM * BN;  // TAPA phase part
  float* lse_s = dSb + BM * BN;
  float* delta_s = lse_s + BM;
  __shared__ int skip;
  __shared__ long long kmin;

  const int nkt = (a.Lk + BN - 1) / BN;
  const int j0 = (int)(blockIdx.x % nkt) * BN;
  const int64_t bh = blockIdx.x / nkt;
  const int b = (int)(bh / a.H), h = (int)(bh % a.H), hk = h / (a.H / a.Hkv);
  const int nk = min(BN, a.Lk - j0);
  const int64_t* kpos = a.k_pos + b * a.kpos_bs + j0;
  const int64_t* qpos_all = a.q_pos + b * a.qpos_bs;
  const float slope = p.kind == ENC_ALIBI ? p.slopes[(p.slopes_batch > 1 ? b : 0) * a.H + h] : 0.f;
  const bool tapa = p.kind == ENC_TAPA;
  const int da = tapa ? p.tapa_split : D;
  const bool pre = is_rotation(p.kind) && a.q_enc != nullptr;  // encoded copies from the prologue
  const int kh = pre ? encoded_k_heads(p.kind, a.H, a.Hkv) : a.Hkv, khi = pre && p.kind == ENC_FOPE ? h : hk;
  const X* k = static_cast<const X*>(pre ? a.k_enc : a.k) + (((int64_t)b * a.Lk + j0) * kh + khi) * D;
  const X* v = static_cast<const X*>(a.v) + (((int64_t)b * a.Lk + j0) * a.Hkv + hk) * Dv;
  load_encoded<X>(p, k, (int64_t)kh * D, nk, BN, D, kpos, h, Ks, !pre);
  load_encoded<X>(p, v, (int64_t)a.Hkv * Dv, nk, BN, Dv, kpos, h, Vs, false);
  for (int idx = threadIdx.x; idx < BN * D; idx += blockDim.x) dKs[idx] = 0.f;
  for (int idx = threadIdx.x; idx < BN * Dv; idx += blockDim.x) dVs[idx] = 0.f;
  if (threadIdx.x == 0) kmin = pos_min(kpos, nk);
  __syncthreads();
  for (int i0 = 0; i0 < a.Lq; i0 += BM) {
    const int nq = min(BM, a.Lq - i0);
    const int64_t* qpos = qpos_all + i0;
    if (threadIdx.x == 0) skip = a.causal && kmin > pos_max(qpos, nq);
    __syncthreads();
    const bool skipped = skip;
    __syncthreads();
    if (skipped) continue;
    const X* q = static_cast<const X*>(pre ? a.q_enc : a.q) + (((int64_t)b * a.Lq + i0) * a.H + h) * D;
    const X* dout = static_cast<const X*>(a.dout) + (((int64_t)b * a.Lq + i0) * a.H + h) * Dv;
    load_encoded<X>(p, q, (int64_t)a.H * D, nq, BM, D, qpos, h, Qs, !pre);
    load_encoded<X>(p, dout, (int64_t)a.H * Dv, nq, BM, Dv, qpos, h, dOs, false);
    if (threadIdx.x < BM) {
      const int i = threadIdx.x;
      lse_s[i] = i < nq ? a.lse[((int64_t)b * a.H + h) * a.Lq + i0 + i] : -INFINITY;
      delta_s[i] = i < nq ? a.delta[((int64_t)b * a.Lq + i0 + i) * a.H + h] : 0.f;
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < BM * BN; idx += blockDim.x) {
      const int i = idx / BN, j = idx % BN;
      float pij = 0.f, dsa = 0.f, dsb = 0.f;
      if (i < nq && j < nk && lse_s[i] != -INFINITY && !(a.causal && kpos[j] > qpos[i])) {
        float amp, dot;
        const float s = score_elem(p, Qs + i * D, Ks + j * D, D, a.scale, qpos[i], kpos[j], slope, amp, dot);
        pij = __expf(s - lse_s[i]);
        float dp = 0.f;
        for (int e = 0; e < Dv; ++e) dp += dOs[i * Dv + e] * Vs[j * Dv + e];
        const float ds = pij * (dp - delta_s[i]);
        if (tapa) {
          const float om = tapa_omega<float>(p.tapa_phase_scale, p.tapa_alpha, qpos[i], kpos[j]);
          float ga, gb;
          tapa_grad<float>(ds, amp, om, dot, ga, gb);
          dsa = ga * a.scale;
          dsb = gb;
        } else {
          dsa = ds * a.scale;
        }
      }
      Pm[idx] = pij;
      dSa[idx] = dsa;
      dSb[idx] = dsb;
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < BN * Dv; idx += blockDim.x) {
      const int j = idx / Dv, e = idx % Dv;
      float g = 0.f;
      for (int i = 0; i < BM; ++i) g += Pm[i * BN + j] * dOs[i * Dv + e];
      dVs[idx] += g;
    }
    for (int idx = threadIdx.x; idx < BN * D; idx += blockDim.x) {
      const int j = idx / D, d = idx % D;
      const float* dS = d < da ? dSa : dSb;
      float g = 0.f;
      for (int i = 0; i < BM; ++i) g += dS[i * BN + j] * Qs[i * D + d];
      dKs[idx] += g;
    }
    for (int idx = threadIdx.x; idx < nq * D; idx += blockDim.x) {
      const int i = idx / D, d = idx % D;
      const float* dS = d < da ? dSa : dSb;
      float g = 0.f;
      for (int j = 0; j < BN; ++j) g += dS[i * BN + j] * Ks[j * D + d];
      if (g != 0.f) atomicAdd(a.dq_rot + (((int64_t)b * a.Lq + i0 + i) * a.H + h) * D + d, g);
    }
    __syncthreads();
  }
  for (int idx = threadIdx.x; idx < nk * D; idx += blockDim.x) {
    const int j = idx / D, d = idx % D;
    a.dk_rot[(((int64_t)b * a.Lk + j0 + j) * a.H + h) * D + d] = dKs[idx];
  }
  for (int idx = threadIdx.x; idx < nk * Dv; idx += blockDim.x) {
    const int j = idx / Dv, e = idx % Dv;
    a.dv_h[(((int64_t)b * a.Lk + j0 + j) * a.H + h) * Dv + e] = dVs[idx];
  }
}

template <typename X>
int fwd_typed(const CudaAttnArgs& a, const EncParams& p, cudaStream_t st) {
  const size_t smem = scalar_smem_bytes(a, false);
  cudaError_t e = cudaFuncSetAttribute(fwd_kernel<X>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (e != cudaSuccess) return (int)e;
  const int64_t blocks = (int64_t)((a.Lq + BM - 1) / BM) * a.B * a.H;
  if (blocks == 0) return 0;  // no rows / keys: nothing to compute or write
  if (blocks > 0x7fffffffLL) return (int)cudaErrorInvalidConfiguration;
  fwd_kernel<X><<<(unsigned)blocks, NT, smem, st>>>(a, p);
  return (int)cudaGetLastError();
}

template <typename X>
int bwd_typed(const CudaAttnArgs& a, const EncParams& p, cudaStream_t st) {
  const size_t smem = scalar_smem_bytes(a, true);
  cudaError_t e = cudaFuncSetAttribute(bwd_kernel<X>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (e != cudaSuccess) return (int)e;
  const int64_t blocks = (int64_t)((a.Lk + BN - 1) / BN) * a.B * a.H;
  if (blocks == 0) return 0;  // no rows / keys: nothing to compute or write
  if (blocks > 0x7fffffffLL) return (int)cudaErrorInvalidConfiguration;
  bwd_kernel<X><<<(unsigned)blocks, NT, smem, st>>>(a, p);
  return (int)cudaGetLastError();
}

}  // namespace

size_t scalar_smem_bytes(const CudaAttnArgs& a, bool backward) {
  const size_t D = a.D, Dv = a.Dv;
  if (!backward) return sizeof(float) * (BM * D + BN * D + BN * Dv + BM * BN + BM * Dv + 3 * BM);
  return sizeof(float) * (2 * BN * D + 2 * BN * Dv + BM * D + BM * Dv + 3 * BM * BN + 2 * BM);
}

int scalar_forward(const CudaAttnArgs& a, const EncParams& p, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case DT_F16:
      if constexpr (FPE_SCALAR_16BIT_ENABLED) return fwd_typed<__half>(a, p, st);
      return (int)cudaErrorInvalidValue;
    case DT_BF16:
      if constexpr (FPE_SCALAR_16BIT_ENABLED) return fwd_typed<__nv_bfloat16>(a, p, st);
      return (int)cudaErrorInvalidValue;
    default: return fwd_typed<float>(a, p, st);
  }
}

// dq_rot / dk_rot / dv_h only; the caller decodes them (decode_rows)
int scalar_backward_main(const CudaAttnArgs& a, const EncParams& p, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case DT_F16:
      if constexpr (FPE_SCALAR_16BIT_ENABLED) return bwd_typed<__half>(a, p, st);
      return (int)cudaErrorInvalidValue;
    case DT_BF16:
      if constexpr (FPE_SCALAR_16BIT_ENABLED) return bwd_typed<__nv_bfloat16>(a, p, st);
      return (int)cudaErrorInvalidValue;
    default: return bwd_typed<float>(a, p, st);
  }
}

}  // namespace fused_posenc
