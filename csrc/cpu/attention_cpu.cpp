// CPU forward/backward: tiled online-softmax attention with the encodings fused in.
// One task per (batch, query head), OpenMP across tasks; per task only O(seqlen) buffers
// (the rotated q/k rows, a transposed copy for the score tile, gradient rows), never Lq x Lk.
// Compute type T: float for fp16/bf16/fp32 inputs, double for fp64.
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../native.h"

namespace fused_posenc {
namespace {

// The per-task functions are also compiled for the x86-64-v4 (AVX-512) and x86-64-v3 (AVX2 + FMA) ISA
// levels; the loader picks one by CPU features (GCC ifunc). Define FUSED_POSENC_NO_CLONES to disable it.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FUSED_POSENC_NO_CLONES)
#define FPE_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FPE_CPU_CLONES
#endif

constexpr int BQ = 16;   // query rows per block
constexpr int BK = 64;   // keys per tile

struct Dims {
  int64_t B, Lq, Lk, H, Hkv, D, Dv, G;
  int64_t qpos_bs, kpos_bs;  // batch strides of the position tensors (0 when shared)
};

// Table values (c, s) for every pair of one row; ck/sk: scratch (Dk) for FoPE's Fourier basis.
template <typename T>
void row_tables(const EncParams& p, int64_t pos, int64_t h, T* c, T* s, T* ck, T* sk) {
  if (p.kind == ENC_ROTARY) {
    if (sizeof(T) == 8 && p.pair_freqs_f64 != nullptr)
      for (int j = 0; j < p.npairs; ++j) rotary_cos_sin<T, double>(pos, p.pair_freqs_f64[j], p.pair_scale_f64[j], c[j], s[j]);
    else
      for (int j = 0; j < p.npairs; ++j) rotary_cos_sin<T, float>(pos, p.pair_freqs[j], p.pair_scale[j], c[j], s[j]);
    return;
  }
  const float* a = p.fope_cos_coef + h * p.fope_dk * p.npairs;
  const float* bb = p.fope_sin_coef + h * p.fope_dk * p.npairs;
  fope_basis<T>(pos, p.fope_dk, p.fope_freqs, ck, sk);
  for (int j = 0; j < p.npairs; ++j) fope_cos_sin_basis<T>(j, p.fope_dk, p.npairs, ck, sk, a, bb, p.fope_pad, c[j], s[j]);
}

// Encoded (rotated) rows of x (B, L, Hx, D) for batch b, head hx, with the tables of query head h.
template <typename T>
void encode_rows(const EncParams& p, const T* x, int64_t L, int64_t Hx, int64_t D, int64_t b, int64_t hx, int64_t h,
                 const int64_t* pos, T* y) {
  std::vector<T> c(p.npairs + 1), s(p.npairs + 1), ck(p.fope_dk + 1), sk(p.fope_dk + 1);
  for (int64_t t = 0; t < L; ++t) {
    const T* row = x + ((b * L + t) * Hx + hx) * D;
    T* yr = y + t * D;
    for (int64_t d = 0; d < D; ++d) yr[d] = row[d];
    if (!is_rotation(p.kind)) continue;
    row_tables<T>(p, pos[t], h, c.data(), s.data(), ck.data(), sk.data());
    for (int j = 0; j < p.npairs; ++j) {
      const int64_t i1 = p.idx1[j], i2 = p.idx2[j];
      rotate_pair<T>(row[i1], row[i2], c[j], s[j], yr[i1], yr[i2]);
    }
  }
}

// C[i][j] = sum_k A[i*lda + k] * BT[k*ldb + j] for i < nrows, j < BK (BT padded to BK columns).
// Four rows at a time share each load of BT.
template <typename T>
inline void gemm_rows(const T* A, int64_t lda, int nrows, const T* BT, int64_t ldb, int64_t K, T (*C)[BK]) {
  int i = 0;
  for (; i + 4 <= nrows; i += 4) {
    T c0[BK] = {}, c1[BK] = {}, c2[BK] = {}, c3[BK] = {};
    const T *a0 = A + i * lda, *a1 = a0 + lda, *a2 = a1 + lda, *a3 = a2 + lda;
    for (int64_t kk = 0; kk < K; ++kk) {
      const T* b = BT + kk * ldb;
      const T x0 = a0[kk], x1 = a1[kk], x2 = a2[kk], x3 = a3[kk];
#pragma omp simd
      for (int j = 0; j < BK; ++j) {
        const T bj = b[j];
        c0[j] += x0 * bj; c1[j] += x1 * bj; c2[j] += x2 * bj; c3[j] += x3 * bj;
      }
    }
    for (int j = 0; j < BK; ++j) { C[i][j] = c0[j]; C[i + 1][j] = c1[j]; C[i + 2][j] = c2[j]; C[i + 3][j] = c3[j]; }
  }
  for (; i < nrows; ++i) {
    T c0[BK] = {};
    const T* a0 = A + i * lda;
    for (int64_t kk = 0; kk < K; ++kk) {
      const T* b = BT + kk * ldb;
      const T x0 = a0[kk];
#pragma omp simd
      for (int j = 0; j < BK; ++j) c0[j] += x0 * b[j];
    }
    for (int j = 0; j < BK; ++j) C[i][j] = c0[j];
  }
}

// exp that vectorizes: float via 2^n * p(f) (Cephes exp2f polynomial, ~2 ulp), 0 below -87; double: std::exp.
inline float vexp(float x) {
  const float t = x * 1.44269504088896341f;
  const float n = std::floor(t + 0.5f);
  const float f = t - n;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const int32_t e = (static_cast<int32_t>(x < -87.f ? 0.f : n) + 127) << 23;
  float sc;
  std::memcpy(&sc, &e, sizeof(sc));
  return x < -87.f ? 0.f : p * sc;
}
inline double vexp(double x) { return std::exp(x); }

inline int64_t padded(int64_t L) { return (L + BK - 1) / BK * BK; }

// Score tile: s[i][j] (and the TAPA phase dot in s2) for query rows [i0, i0+nq) and keys [j0, j0+nk).
template <typename T>
inline void score_tile(const EncParams& p, const Dims& dm, const T* qr, const T* krT, const int64_t* qpos,
                       const int64_t* kpos, int64_t slope_idx, int i0, int nq, int j0, int nk, bool causal, T scale,
                       T (*s)[BK], T (*amp)[BK], T (*dot)[BK]) {
  const int64_t D = dm.D, Lkp = padded(dm.Lk);
  const bool tapa = p.kind == ENC_TAPA;
  const int64_t da = tapa ? p.tapa_split : D;
  gemm_rows<T>(qr + (int64_t)i0 * D, D, nq, krT + j0, Lkp, da, s);
  if (tapa) gemm_rows<T>(qr + (int64_t)i0 * D + da, D, nq, krT + da * Lkp + j0, Lkp, D - da, dot);
  for (int i = 0; i < nq; ++i) {
    T* si = s[i];
    if (tapa) {
      T* di = dot[i];
      const int64_t qp = qpos[i0 + i];
      for (int j = 0; j < nk; ++j) {
        const T a = si[j] * scale;
        amp[i][j] = a;
        const T om = tapa_omega<T>(p.tapa_phase_scale, p.tapa_alpha, qp, kpos[j0 + j]);
        si[j] = tapa_score<T>(a, om, di[j]);
      }
    } else if (p.kind == ENC_ALIBI) {
      const float slope = p.slopes[slope_idx];
      const int64_t qp = qpos[i0 + i];
      for (int j = 0; j < nk; ++j) si[j] = si[j] * scale + alibi_bias<T>(slope, qp, kpos[j0 + j]);
    } else {
      for (int j = 0; j < nk; ++j) si[j] *= scale;
    }
    if (causal) {
      const int64_t qp = qpos[i0 + i];
      for (int j = 0; j < nk; ++j)
        if (kpos[j0 + j] > qp) si[j] = -std::numeric_limits<T>::infinity();
    }
  }
}

template <typename T>
void transpose(const T* x, int64_t L, int64_t D, T* y) {  // (L, D) -> (D, Lp), zero-padded columns
  const int64_t Lp = padded(L);
  for (int64_t d = 0; d < D; ++d)
    for (int64_t t = L; t < Lp; ++t) y[d * Lp + t] = 0;
  for (int64_t t = 0; t < L; ++t)
    for (int64_t d = 0; d < D; ++d) y[d * Lp + t] = x[t * D + d];
}

template <typename T>
void task_setup(const EncParams& p, const Dims& dm, const T* q, const T* k, int64_t b, int64_t h, const int64_t* qpos,
                const int64_t* kpos, std::vector<T>& qr, std::vector<T>& kr, std::vector<T>& krT) {
  const int64_t hk = h / dm.G;
  qr.assign((dm.Lq + BQ - 1) / BQ * BQ * dm.D, T(0));  // zero rows pad the last query block
  kr.assign(padded(dm.Lk) * dm.D, T(0));                // and the last key tile
  krT.resize(padded(dm.Lk) * dm.D);
  encode_rows<T>(p, q, dm.Lq, dm.H, dm.D, b, h, h, qpos, qr.data());
  encode_rows<T>(p, k, dm.Lk, dm.Hkv, dm.D, b, hk, h, kpos, kr.data());
  transpose<T>(kr.data(), dm.Lk, dm.D, krT.data());
}

inline bool tile_skipped(bool causal, const int64_t* qpos, int i0, int nq, const int64_t* kpos, int j0, int nk) {
  if (!causal) return false;
  int64_t qmax = qpos[i0], kmin = kpos[j0];
  for (int i = 1; i < nq; ++i) qmax = std::max(qmax, qpos[i0 + i]);
  for (int j = 1; j < nk; ++j) kmin = std::min(kmin, kpos[j0 + j]);
  return kmin > qmax;
}

template <typename T>
FPE_CPU_CLONES void forward_task(const T* q, const T* k, const T* v, const int64_t* qpos_all, const int64_t* kpos_all,
                                 const EncParams& p, const Dims dm, bool causal, T scale, T* out, T* lse, int64_t task) {
  {
    const int64_t b = task / dm.H, h = task % dm.H, hk = h / dm.G;
    const int64_t* qpos = qpos_all + b * dm.qpos_bs;
    const int64_t* kpos = kpos_all + b * dm.kpos_bs;
    const int64_t slope_idx = (p.slopes_batch > 1 ? b : 0) * dm.H + h;
    std::vector<T> qr, kr, krT;
    task_setup<T>(p, dm, q, k, b, h, qpos, kpos, qr, kr, krT);
    std::vector<T> acc(BQ * dm.Dv);
    T s[BQ][BK], amp[BQ][BK], dot[BQ][BK];
    T m[BQ], l[BQ];
    for (int i0 = 0; i0 < dm.Lq; i0 += BQ) {
      const int nq = (int)std::min<int64_t>(BQ, dm.Lq - i0);
      std::fill(acc.begin(), acc.end(), T(0));
      for (int i = 0; i < nq; ++i) { m[i] = -std::numeric_limits<T>::infinity(); l[i] = 0; }
      for (int j0 = 0; j0 < dm.Lk; j0 += BK) {
        const int nk = (int)std::min<int64_t>(BK, dm.Lk - j0);
        if (tile_skipped(causal, qpos, i0, nq, kpos, j0, nk)) continue;
        score_tile<T>(p, dm, qr.data(), krT.data(), qpos, kpos, slope_idx, i0, nq, j0, nk, causal, scale, s, amp, dot);
        for (int i = 0; i < nq; ++i) {
          T mx = m[i];
          for (int j = 0; j < nk; ++j) mx = std::max(mx, s[i][j]);
          if (mx == -std::numeric_limits<T>::infinity()) continue;  // nothing visible yet
          const T corr = m[i] == -std::numeric_limits<T>::infinity() ? T(0) : vexp(m[i] - mx);
          T* a = acc.data() + i * dm.Dv;
          if (corr != T(1))
            for (int64_t e = 0; e < dm.Dv; ++e) a[e] *= corr;
          T sum = 0;
          T* si = s[i];
#pragma omp simd reduction(+ : sum)
          for (int j = 0; j < nk; ++j) {
            const T pj = vexp(si[j] - mx);
            si[j] = pj;
            sum += pj;
          }
          for (int j = 0; j < nk; ++j) {
            const T pj = si[j];
            if (pj == T(0)) continue;
            const T* vr = v + ((b * dm.Lk + j0 + j) * dm.Hkv + hk) * dm.Dv;
#pragma omp simd
            for (int64_t e = 0; e < dm.Dv; ++e) a[e] += pj * vr[e];
          }
          l[i] = l[i] * corr + sum;
          m[i] = mx;
        }
      }
      for (int i = 0; i < nq; ++i) {
        T* o = out + ((b * dm.Lq + i0 + i) * dm.H + h) * dm.Dv;
        const T* a = acc.data() + i * dm.Dv;
        if (l[i] > 0) {
          const T inv = T(1) / l[i];
          for (int64_t e = 0; e < dm.Dv; ++e) o[e] = a[e] * inv;
          lse[(b * dm.H + h) * dm.Lq + i0 + i] = m[i] + std::log(l[i]);
        } else {
          for (int64_t e = 0; e < dm.Dv; ++e) o[e] = 0;
          lse[(b * dm.H + h) * dm.Lq + i0 + i] = -std::numeric_limits<T>::infinity();
        }
      }
    }
  }
}

template <typename T>
void forward_impl(const T* q, const T* k, const T* v, const int64_t* qpos_all, const int64_t* kpos_all,
                  const EncParams& p, const Dims dm, bool causal, T scale, T* out, T* lse) {
  const int64_t ntasks = dm.B * dm.H;
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads())
  for (int64_t task = 0; task < ntasks; ++task)
    forward_task<T>(q, k, v, qpos_all, kpos_all, p, dm, causal, scale, out, lse, task);
}

// Gradient rows g (w.r.t. the encoded rows) back to the input rows; FoPE coefficient gradients into dA/dB (Dk, P).
template <typename T>
void decode_grad_rows(const EncParams& p, const T* x, int64_t L, int64_t Hx, int64_t D, int64_t b, int64_t hx,
                      int64_t h, const int64_t* pos, const T* g, T* dx, int64_t dx_stride, T* dA, T* dB) {
  std::vector<T> c(p.npairs + 1), s(p.npairs + 1), ck(p.fope_dk + 1), sk(p.fope_dk + 1);
  for (int64_t t = 0; t < L; ++t) {
    const T* gr = g + t * D;
    T* out = dx + t * dx_stride;
    for (int64_t d = 0; d < D; ++d) out[d] = gr[d];
    if (!is_rotation(p.kind)) continue;
    row_tables<T>(p, pos[t], h, c.data(), s.data(), ck.data(), sk.data());
    const T* xr = x + ((b * L + t) * Hx + hx) * D;
    for (int j = 0; j < p.npairs; ++j) {
      const int64_t i1 = p.idx1[j], i2 = p.idx2[j];
      T h1, h2;
      rotate_pair_t<T>(gr[i1], gr[i2], c[j], s[j], h1, h2);
      out[i1] = h1; out[i2] = h2;
    }
    if (dA != nullptr) {
      for (int j = 0; j < p.npairs; ++j) {
        if (p.fope_pad[j] != 0.f) continue;
        const int64_t i1 = p.idx1[j], i2 = p.idx2[j];
        T dc, ds;
        rotate_pair_dtables<T>(xr[i1], xr[i2], gr[i1], gr[i2], dc, ds);
        for (int kk = 0; kk < p.fope_dk; ++kk) {
          dA[kk * p.npairs + j] += ck[kk] * dc;
          dB[kk * p.npairs + j] += sk[kk] * ds;
        }
      }
    }
  }
}

template <typename T>
FPE_CPU_CLONES void backward_task(const T* dout, const T* q, const T* k, const T* v, const T* out, const T* lse,
                                  const int64_t* qpos_all, const int64_t* kpos_all, const EncParams& p, const Dims dm,
                                  bool causal, T scale, T* dq, T* dkh, T* dvh, T* dA_all, T* dB_all, int64_t task) {
  const bool tapa = p.kind == ENC_TAPA;
  const int64_t D = dm.D, Dv = dm.Dv, da = tapa ? p.tapa_split : D;
  {
    const int64_t b = task / dm.H, h = task % dm.H, hk = h / dm.G;
    const int64_t* qpos = qpos_all + b * dm.qpos_bs;
    const int64_t* kpos = kpos_all + b * dm.kpos_bs;
    const int64_t slope_idx = (p.slopes_batch > 1 ? b : 0) * dm.H + h;
    std::vector<T> qr, kr, krT;
    task_setup<T>(p, dm, q, k, b, h, qpos, kpos, qr, kr, krT);
    const int64_t Lkp = padded(dm.Lk);
    std::vector<T> vT(Lkp * Dv, T(0)), delta(dm.Lq);
    for (int64_t t = 0; t < dm.Lk; ++t)
      for (int64_t e = 0; e < Dv; ++e) vT[e * Lkp + t] = v[((b * dm.Lk + t) * dm.Hkv + hk) * Dv + e];
    for (int64_t i = 0; i < dm.Lq; ++i) {
      const T* o = out + ((b * dm.Lq + i) * dm.H + h) * Dv;
      const T* g = dout + ((b * dm.Lq + i) * dm.H + h) * Dv;
      T acc = 0;
      for (int64_t e = 0; e < Dv; ++e) acc += o[e] * g[e];
      delta[i] = acc;
    }
    std::vector<T> gq(dm.Lq * D, T(0)), gk(dm.Lk * D, T(0));
    T* dvrow = dvh;  // (B, Lk, H, Dv)
    for (int64_t t = 0; t < dm.Lk; ++t)
      std::fill(dvrow + ((b * dm.Lk + t) * dm.H + h) * Dv, dvrow + ((b * dm.Lk + t) * dm.H + h) * Dv + Dv, T(0));
    T s[BQ][BK], amp[BQ][BK], dot[BQ][BK], dp[BQ][BK];
    const T* lse_bh = lse + (b * dm.H + h) * dm.Lq;
    for (int i0 = 0; i0 < dm.Lq; i0 += BQ) {
      const int nq = (int)std::min<int64_t>(BQ, dm.Lq - i0);
      for (int j0 = 0; j0 < dm.Lk; j0 += BK) {
        const int nk = (int)std::min<int64_t>(BK, dm.Lk - j0);
        if (tile_skipped(causal, qpos, i0, nq, kpos, j0, nk)) continue;
        score_tile<T>(p, dm, qr.data(), krT.data(), qpos, kpos, slope_idx, i0, nq, j0, nk, causal, scale, s, amp, dot);
        gemm_rows<T>(dout + ((b * dm.Lq + i0) * dm.H + h) * Dv, dm.H * Dv, nq, vT.data() + j0, Lkp, Dv, dp);
        for (int i = 0; i < nq; ++i) {
          const T L = lse_bh[i0 + i];
          const T* g = dout + ((b * dm.Lq + i0 + i) * dm.H + h) * Dv;
          if (L == -std::numeric_limits<T>::infinity()) {
            for (int j = 0; j < nk; ++j) { s[i][j] = 0; dp[i][j] = 0; }
            continue;
          }
          T* si = s[i];
#pragma omp simd
          for (int j = 0; j < nk; ++j) si[j] = vexp(si[j] - L);  // P
          for (int j = 0; j < nk; ++j) dp[i][j] = s[i][j] * (dp[i][j] - delta[i0 + i]);  // dS
          (void)g;
        }
        // dV[j] += sum_i P[i][j] dO[i], four queries per pass
        for (int j = 0; j < nk; ++j) {
          T* dvr = dvh + ((b * dm.Lk + j0 + j) * dm.H + h) * Dv;
          int i = 0;
          for (; i + 4 <= nq; i += 4) {
            const T p0 = s[i][j], p1 = s[i + 1][j], p2 = s[i + 2][j], p3 = s[i + 3][j];
            if (p0 == T(0) && p1 == T(0) && p2 == T(0) && p3 == T(0)) continue;
            const T* g0 = dout + ((b * dm.Lq + i0 + i) * dm.H + h) * Dv;
            const T *g1 = g0 + dm.H * Dv, *g2 = g1 + dm.H * Dv, *g3 = g2 + dm.H * Dv;
#pragma omp simd
            for (int64_t e = 0; e < Dv; ++e) dvr[e] += p0 * g0[e] + p1 * g1[e] + p2 * g2[e] + p3 * g3[e];
          }
          for (; i < nq; ++i) {
            const T p0 = s[i][j];
            if (p0 == T(0)) continue;
            const T* g0 = dout + ((b * dm.Lq + i0 + i) * dm.H + h) * Dv;
#pragma omp simd
            for (int64_t e = 0; e < Dv; ++e) dvr[e] += p0 * g0[e];
          }
        }
        // dS -> dq, dk (through the encoding's score function): fa multiplies dims < da, fb the rest (TAPA)
        for (int i = 0; i < BQ; ++i) {
          const int64_t qp = i < nq ? qpos[i0 + i] : 0;
          for (int j = 0; j < BK; ++j) {
            const T dsv = (i < nq && j < nk) ? dp[i][j] : T(0);
            if (tapa && dsv != T(0)) {
              const T om = tapa_omega<T>(p.tapa_phase_scale, p.tapa_alpha, qp, kpos[j0 + j]);
              T ds_amp, ds_dot;
              tapa_grad<T>(dsv, amp[i][j], om, dot[i][j], ds_amp, ds_dot);
              dp[i][j] = ds_amp * scale;
              s[i][j] = ds_dot;
            } else {
              dp[i][j] = dsv * scale;
              s[i][j] = 0;
            }
          }
        }
        for (int i = 0; i < nq; ++i) {  // dq[i] += sum_j f[i][j] k[j], four keys per pass
          T* gqi = gq.data() + (int64_t)(i0 + i) * D;
          for (int j = 0; j < BK; j += 4) {
            const T a0 = dp[i][j], a1 = dp[i][j + 1], a2 = dp[i][j + 2], a3 = dp[i][j + 3];
            const T b0 = s[i][j], b1 = s[i][j + 1], b2 = s[i][j + 2], b3 = s[i][j + 3];
            if (a0 == T(0) && a1 == T(0) && a2 == T(0) && a3 == T(0) && b0 == T(0) && b1 == T(0) && b2 == T(0) &&
                b3 == T(0))
              continue;
            const T* k0 = kr.data() + (int64_t)(j0 + j) * D;
            const T *k1 = k0 + D, *k2 = k1 + D, *k3 = k2 + D;
#pragma omp simd
            for (int64_t d = 0; d < da; ++d) gqi[d] += a0 * k0[d] + a1 * k1[d] + a2 * k2[d] + a3 * k3[d];
#pragma omp simd
            for (int64_t d = da; d < D; ++d) gqi[d] += b0 * k0[d] + b1 * k1[d] + b2 * k2[d] + b3 * k3[d];
          }
        }
        for (int j = 0; j < nk; ++j) {  // dk[j] += sum_i f[i][j] q[i], four queries per pass
          T* gkj = gk.data() + (int64_t)(j0 + j) * D;
          for (int i = 0; i < BQ; i += 4) {
            const T a0 = dp[i][j], a1 = dp[i + 1][j], a2 = dp[i + 2][j], a3 = dp[i + 3][j];
            const T b0 = s[i][j], b1 = s[i + 1][j], b2 = s[i + 2][j], b3 = s[i + 3][j];
            if (a0 == T(0) && a1 == T(0) && a2 == T(0) && a3 == T(0) && b0 == T(0) && b1 == T(0) && b2 == T(0) &&
                b3 == T(0))
              continue;
            const T* q0 = qr.data() + (int64_t)(i0 + i) * D;
            const T *q1 = q0 + D, *q2 = q1 + D, *q3 = q2 + D;
#pragma omp simd
            for (int64_t d = 0; d < da; ++d) gkj[d] += a0 * q0[d] + a1 * q1[d] + a2 * q2[d] + a3 * q3[d];
#pragma omp simd
            for (int64_t d = da; d < D; ++d) gkj[d] += b0 * q0[d] + b1 * q1[d] + b2 * q2[d] + b3 * q3[d];
          }
        }
      }
    }
    T* dA = dA_all ? dA_all + (b * dm.H + h) * p.fope_dk * p.npairs : nullptr;
    T* dB = dB_all ? dB_all + (b * dm.H + h) * p.fope_dk * p.npairs : nullptr;
    decode_grad_rows<T>(p, q, dm.Lq, dm.H, D, b, h, h, qpos, gq.data(), dq + (b * dm.Lq * dm.H + h) * D, dm.H * D, dA,
                        dB);
    decode_grad_rows<T>(p, k, dm.Lk, dm.Hkv, D, b, hk, h, kpos, gk.data(), dkh + (b * dm.Lk * dm.H + h) * D,
                        dm.H * D, dA, dB);
  }
}

template <typename T>
void backward_impl(const T* dout, const T* q, const T* k, const T* v, const T* out, const T* lse,
                   const int64_t* qpos_all, const int64_t* kpos_all, const EncParams& p, const Dims dm, bool causal,
                   T scale, T* dq, T* dkh, T* dvh, T* dA_all, T* dB_all) {
  const int64_t ntasks = dm.B * dm.H;
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads())
  for (int64_t task = 0; task < ntasks; ++task)
    backward_task<T>(dout, q, k, v, out, lse, qpos_all, kpos_all, p, dm, causal, scale, dq, dkh, dvh, dA_all, dB_all,
                     task);
}

Dims make_dims(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_pos,
               const at::Tensor& k_pos) {
  Dims d;
  d.B = q.size(0); d.Lq = q.size(1); d.H = q.size(2); d.D = q.size(3);
  d.Lk = k.size(1); d.Hkv = k.size(2); d.Dv = v.size(3); d.G = d.H / d.Hkv;
  d.qpos_bs = q_pos.size(0) == 1 ? 0 : d.Lq;
  d.kpos_bs = k_pos.size(0) == 1 ? 0 : d.Lk;
  return d;
}

at::ScalarType compute_type(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cpu_forward(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                               const at::Tensor& q_pos_in, const at::Tensor& k_pos_in,
                                               const EncHolder& enc, bool causal, double scale) {
  const auto ct = compute_type(q_in);
  auto q = q_in.to(ct).contiguous(), k = k_in.to(ct).contiguous(), v = v_in.to(ct).contiguous();
  auto q_pos = q_pos_in.to(at::kLong).contiguous(), k_pos = k_pos_in.to(at::kLong).contiguous();
  const Dims dm = make_dims(q, k, v, q_pos, k_pos);
  auto out = at::empty({dm.B, dm.Lq, dm.H, dm.Dv}, q.options());
  auto lse = at::empty({dm.B, dm.H, dm.Lq}, q.options());
  if (ct == at::kDouble)
    forward_impl<double>(q.data_ptr<double>(), k.data_ptr<double>(), v.data_ptr<double>(), q_pos.data_ptr<int64_t>(),
                         k_pos.data_ptr<int64_t>(), enc.p, dm, causal, scale, out.data_ptr<double>(),
                         lse.data_ptr<double>());
  else
    forward_impl<float>(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), q_pos.data_ptr<int64_t>(),
                        k_pos.data_ptr<int64_t>(), enc.p, dm, causal, (float)scale, out.data_ptr<float>(),
                        lse.data_ptr<float>());
  return {out.to(q_in.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpu_backward(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const at::Tensor& q_pos_in, const at::Tensor& k_pos_in,
    const EncHolder& enc, bool causal, double scale, bool want_coef_grad) {
  const auto ct = compute_type(q_in);
  auto q = q_in.to(ct).contiguous(), k = k_in.to(ct).contiguous(), v = v_in.to(ct).contiguous();
  auto dout = dout_in.to(ct).contiguous(), out = out_in.to(ct).contiguous(), lse = lse_in.to(ct).contiguous();
  auto q_pos = q_pos_in.to(at::kLong).contiguous(), k_pos = k_pos_in.to(at::kLong).contiguous();
  const Dims dm = make_dims(q, k, v, q_pos, k_pos);
  auto dq = at::empty({dm.B, dm.Lq, dm.H, dm.D}, q.options());
  auto dkh = at::empty({dm.B, dm.Lk, dm.H, dm.D}, q.options());
  auto dvh = at::empty({dm.B, dm.Lk, dm.H, dm.Dv}, q.options());
  const bool coef = want_coef_grad && enc.p.kind == ENC_FOPE;
  at::Tensor dA, dB;
  if (coef) {
    dA = at::zeros({dm.B, dm.H, enc.p.fope_dk, enc.p.npairs}, q.options());
    dB = at::zeros({dm.B, dm.H, enc.p.fope_dk, enc.p.npairs}, q.options());
  }
  if (ct == at::kDouble)
    backward_impl<double>(dout.data_ptr<double>(), q.data_ptr<double>(), k.data_ptr<double>(), v.data_ptr<double>(),
                          out.data_ptr<double>(), lse.data_ptr<double>(), q_pos.data_ptr<int64_t>(),
                          k_pos.data_ptr<int64_t>(), enc.p, dm, causal, scale, dq.data_ptr<double>(),
                          dkh.data_ptr<double>(), dvh.data_ptr<double>(), coef ? dA.data_ptr<double>() : nullptr,
                          coef ? dB.data_ptr<double>() : nullptr);
  else
    backward_impl<float>(dout.data_ptr<float>(), q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
                         out.data_ptr<float>(), lse.data_ptr<float>(), q_pos.data_ptr<int64_t>(),
                         k_pos.data_ptr<int64_t>(), enc.p, dm, causal, (float)scale, dq.data_ptr<float>(),
                         dkh.data_ptr<float>(), dvh.data_ptr<float>(), coef ? dA.data_ptr<float>() : nullptr,
                         coef ? dB.data_ptr<float>() : nullptr);
  const auto dt = q_in.scalar_type();
  auto dk = dkh.view({dm.B, dm.Lk, dm.Hkv, dm.G, dm.D}).sum(3);
  auto dv = dvh.view({dm.B, dm.Lk, dm.Hkv, dm.G, dm.Dv}).sum(3);
  if (coef) {
    dA = dA.sum(0).to(at::kFloat);
    dB = dB.sum(0).to(at::kFloat);
  } else {
    dA = at::Tensor();
    dB = at::Tensor();
  }
  return {dq.to(dt), dk.to(dt), dv.to(dt), dA, dB};
}

}  // namespace fused_posenc
