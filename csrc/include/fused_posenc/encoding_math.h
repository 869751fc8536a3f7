// The encoding math of fused_posenc, once, for every C++/CUDA kernel (spec: shared/spec/encodings.md).
// Header-only, torch-free; every function is __host__ __device__ under nvcc and plain inline otherwise.
// The parameters mirror fused_posenc.encodings.base.KernelParams field by field (see EncParams).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FPE_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// always_inline: a plain inline function is not inlined into the CPU kernels' ISA clones (target_clones)
#define FPE_HD inline __attribute__((always_inline))
#else
#define FPE_HD inline
#endif

namespace fused_posenc {

using std::cos;
using std::pow;
using std::sin;

// KernelParams.kind
enum EncKind : int { ENC_NONE = 0, ENC_ROTARY = 1, ENC_FOPE = 2, ENC_ALIBI = 3, ENC_TAPA = 4 };

// Raw views of KernelParams (all contiguous, on the kernel's device). Unused pointers are null.
struct EncParams {
  int kind = ENC_NONE;
  int npairs = 0;                         // P = headdim / 2
  const int64_t* idx1 = nullptr;          // (P,) first index of each pair      (rotary, fope)
  const int64_t* idx2 = nullptr;          // (P,) second index of each pair     (rotary, fope)
  const int64_t* pair_turns = nullptr;    // (P, 2) frequencies as exact turn fractions (see turn_angle)
  const float* pair_scale = nullptr;      // (P,) multiplies cos and sin        (rotary)
  const double* pair_scale_f64 = nullptr; // (P,) the same in float64, for float64 inputs
  int fope_dk = 0;                        // Dk kept frequencies                (fope)
  const int64_t* fope_turns = nullptr;    // (Dk, 2) their turn fractions
  const float* fope_cos_coef = nullptr;   // (H, Dk, P), per query head, zero-padded
  const float* fope_sin_coef = nullptr;   // (H, Dk, P)
  const float* fope_pad = nullptr;        // (P,) 1 for padded pairs (C = S = 1)
  const float* slopes = nullptr;          // (Bs, H)                            (alibi)
  int slopes_batch = 1;                   // Bs in {1, batch}
  int tapa_split = 0;                     // Da                                 (tapa)
  double tapa_phase_scale = 1.0;          // c / sqrt(Dp)
  double tapa_alpha = 0.0;
};

FPE_HD bool is_rotation(int kind) { return kind == ENC_ROTARY || kind == ENC_FOPE; }

// ---- exact angles ----------------------------------------------------------------------------------
// The high 64 bits of the 128-bit product a * b.
FPE_HD uint64_t mulhi_u64(uint64_t a, uint64_t b) {
#if defined(__CUDA_ARCH__)
  return __umul64hi(a, b);
#elif defined(__SIZEOF_INT128__)
  return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
#else
  const uint64_t a0 = a & 0xffffffffu, a1 = a >> 32, b0 = b & 0xffffffffu, b1 = b >> 32;
  const uint64_t p00 = a0 * b0, p01 = a0 * b1, p10 = a1 * b0, p11 = a1 * b1;
  const uint64_t mid = (p00 >> 32) + (p01 & 0xffffffffu) + (p10 & 0xffffffffu);
  return p11 + (p01 >> 32) + (p10 >> 32) + (mid >> 32);
#endif
}

// angle = 2 pi frac(pos * f) in [-pi, pi), exact whatever the position (fused_posenc/encodings/angles.py): the
// frequency f in turns per position is stored as F = round(frac(f) 2^128) in two 64-bit words turns[0] (high),
// turns[1] (low), so |pos| * F mod 2^128 is exact unsigned arithmetic and its top 64 bits are the turn fraction.
// Error: |pos| 2^-129 turns plus the double rounding; |pos| < 2^62 (validated by the callers).
FPE_HD double turn_angle(int64_t pos, const int64_t* turns) {
  const uint64_t a = pos < 0 ? uint64_t(0) - static_cast<uint64_t>(pos) : static_cast<uint64_t>(pos);
  const uint64_t top = mulhi_u64(a, static_cast<uint64_t>(turns[1])) + a * static_cast<uint64_t>(turns[0]);
  const double ang = static_cast<double>(static_cast<int64_t>(top)) * 0x1p-64 * 6.283185307179586477;
  return pos < 0 ? -ang : ang;
}

// ---- rotary (RoPE / HoPE / scaled RoPE) -----------------------------------------------------------
// the exact angle rounded to T (float for every input dtype but float64), then cos/sin in T times scale.
template <typename T>
FPE_HD void rotary_cos_sin(int64_t pos, const int64_t* turns, T scale, T& c, T& s) {
  const T ang = static_cast<T>(turn_angle(pos, turns));
  c = cos(ang) * scale;
  s = sin(ang) * scale;
}

// ---- FoPE tables ------------------------------------------------------------------------------------
// C_h(t, i) = sum_k A[h,k,i] cos(omega_k t), S_h(t, i) = sum_k B[h,k,i] sin(omega_k t); padded pairs: 1.
// a, b point at the head's (Dk, P) slices; stride between k rows is P; turns: (Dk, 2) (see turn_angle).
template <typename T>
FPE_HD void fope_cos_sin(int64_t pos, int pair, int dk, int npairs, const int64_t* turns, const float* a,
                         const float* b, const float* pad, T& c, T& s) {
  if (pad[pair] != 0.f) { c = T(1); s = T(1); return; }
  T cc = 0, ss = 0;
  for (int k = 0; k < dk; ++k) {
    const T ang = static_cast<T>(turn_angle(pos, turns + 2 * k));
    cc += static_cast<T>(a[k * npairs + pair]) * cos(ang);
    ss += static_cast<T>(b[k * npairs + pair]) * sin(ang);
  }
  c = cc; s = ss;
}

// The same tables from a precomputed Fourier basis ck[k] = cos(omega_k t), sk[k] = sin(omega_k t)
// (one basis per row serves all P pairs).
template <typename T>
FPE_HD void fope_basis(int64_t pos, int dk, const int64_t* turns, T* ck, T* sk) {
  for (int k = 0; k < dk; ++k) {
    const T ang = static_cast<T>(turn_angle(pos, turns + 2 * k));
    ck[k] = cos(ang);
    sk[k] = sin(ang);
  }
}
template <typename T>
FPE_HD void fope_cos_sin_basis(int pair, int dk, int npairs, const T* ck, const T* sk, const float* a, const float* b,
                               const float* pad, T& c, T& s) {
  if (pad[pair] != 0.f) { c = T(1); s = T(1); return; }
  T cc = 0, ss = 0;
  for (int k = 0; k < dk; ++k) {
    cc += static_cast<T>(a[k * npairs + pair]) * ck[k];
    ss += static_cast<T>(b[k * npairs + pair]) * sk[k];
  }
  c = cc; s = ss;
}

// ---- the pair rotation and its transpose ------------------------------------------------------------
// forward: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s)
template <typename T>
FPE_HD void rotate_pair(T x1, T x2, T c, T s, T& y1, T& y2) {
  y1 = x1 * c - x2 * s;
  y2 = x2 * c + x1 * s;
}
// transpose (gradient back through the rotation): (g1, g2) -> (g1 c + g2 s, g2 c - g1 s)
template <typename T>
FPE_HD void rotate_pair_t(T g1, T g2, T c, T s, T& h1, T& h2) {
  h1 = g1 * c + g2 * s;
  h2 = g2 * c - g1 * s;
}
// gradient w.r.t. the tables (c, s) of one pair, given x (unrotated) and g = dL/dy:
// dC = g1 x1 + g2 x2, dS = g2 x1 - g1 x2.
template <typename T>
FPE_HD void rotate_pair_dtables(T x1, T x2, T g1, T g2, T& dc, T& ds) {
  dc = g1 * x1 + g2 * x2;
  ds = g2 * x1 - g1 * x2;
}

// ---- ALiBi ------------------------------------------------------------------------------------------
template <typename T>
FPE_HD T alibi_bias(float slope, int64_t qpos, int64_t kpos) {
  int64_t d = qpos - kpos;
  if (d < 0) d = -d;
  return -static_cast<T>(slope) * static_cast<T>(d);
}

// ---- TAPA -------------------------------------------------------------------------------------------
// Omega = phase_scale * |m - n|^alpha with |0|^alpha = 0 for every alpha (the spec's rule; pow(0, 0) would be 1).
template <typename T>
FPE_HD T tapa_omega(double phase_scale, double alpha, int64_t qpos, int64_t kpos) {
  int64_t d = qpos - kpos;
  if (d < 0) d = -d;
  if (d == 0) return T(0);
  return static_cast<T>(phase_scale) * pow(static_cast<T>(d), static_cast<T>(alpha));
}
// score = amp * cos(psi), amp = amp_scale * (qA . kA), psi = Omega * (qP . kP)
template <typename T>
FPE_HD T tapa_score(T amp, T omega, T dotp) { return amp * cos(omega * dotp); }
// derivative factors: dS_amp = dS * cos(psi) (multiplies amp_scale * k_A), dS_dot = -dS * amp * sin(psi) * Omega
template <typename T>
FPE_HD void tapa_grad(T ds, T amp, T omega, T dotp, T& ds_amp, T& ds_dot) {
  T psi = omega * dotp;
  ds_amp = ds * cos(psi);
  ds_dot = -ds * amp * sin(psi) * omega;
}

// ---- rows -------------------------------------------------------------------------------------------
// Rotate one row x (D values, any element type convertible to T) at position pos for query head h into y (T).
template <typename T, typename X>
FPE_HD void rotate_row(const EncParams& p, const X* x, int64_t xstride, int D, int64_t pos, int h, T* y) {
  for (int d = 0; d < D; ++d) y[d] = static_cast<T>(x[d * xstride]);
  if (!is_rotation(p.kind)) return;
  const float* a = p.kind == ENC_FOPE ? p.fope_cos_coef + (int64_t)h * p.fope_dk * p.npairs : nullptr;
  const float* b = p.kind == ENC_FOPE ? p.fope_sin_coef + (int64_t)h * p.fope_dk * p.npairs : nullptr;
  for (int j = 0; j < p.npairs; ++j) {
    T c, s;
    if (p.kind == ENC_ROTARY) rotary_cos_sin<T>(pos, p.pair_turns + 2 * j, static_cast<T>(p.pair_scale[j]), c, s);
    else fope_cos_sin<T>(pos, j, p.fope_dk, p.npairs, p.fope_turns, a, b, p.fope_pad, c, s);
    const int64_t i1 = p.idx1[j], i2 = p.idx2[j];
    T y1, y2;
    rotate_pair<T>(static_cast<T>(x[i1 * xstride]), static_cast<T>(x[i2 * xstride]), c, s, y1, y2);
    y[i1] = y1; y[i2] = y2;
  }
}

}  // namespace fused_posenc
