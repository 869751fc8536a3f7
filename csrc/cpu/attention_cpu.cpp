// CPU forward/backward: tiled online-softmax attention with the encodings fused in.
//
// Per call: (1) rotation tables, once per distinct position (FoPE: per coefficient head too); (2) q, k, v (and
// dO) encoded, zero-padded to whole 64-byte vectors and laid out for the matmuls, in buffers the size of the
// inputs; (3) the attention: forward work items are (batch, head, query block), backward ones (batch, head,
// share of the key tiles); an item holds BQ x BK tiles of scores, never Lq x Lk; (4) backward: the gradients
// w.r.t. the encoded rows go back through the rotations. Every matmul is one register-blocked micro-kernel.
// Compute type T: float for fp16/bf16/fp32 inputs, double for fp64.
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "../native.h"

// The vector helpers return vectors by value; they are always inlined, so no ABI is involved.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace fused_posenc {
namespace {

// The per-item functions are also compiled for the x86-64-v4 (AVX-512) and x86-64-v3 (AVX2 + FMA) ISA levels;
// the loader picks one by CPU features (GCC ifunc). What they call in their loops is FPE_INLINE: GCC does not
// inline a plain function into a clone of another ISA, and the call would run at baseline (SSE2) speed.
// Define FUSED_POSENC_NO_CLONES to disable the clones.
// kVecBytes: the register width of the clone that runs (checked by the features of x86-64-v4 / v3). The explicit
// vector code (matmul, row reductions) uses vectors of that width: GCC lowers wider ones through the stack.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FUSED_POSENC_NO_CLONES)
#define FPE_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
int widest_vector_bytes() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512cd") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    return 64;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi") &&
      __builtin_cpu_supports("bmi2"))
    return 32;
  return 16;
}
#else
#define FPE_CPU_CLONES
int widest_vector_bytes() {
#if defined(__AVX512F__)
  return 64;
#elif defined(__AVX2__)
  return 32;
#else
  return 16;
#endif
}
#endif
// FUSED_POSENC_CPU_VECTOR_BYTES=16 or 32 (read once, at load) narrows the explicit vectors below what the CPU has:
// the tests run the AVX2 and SSE code paths on an AVX-512 machine that way.
const int kVecBytes = [] {
  int w = widest_vector_bytes();
  if (const char* env = std::getenv("FUSED_POSENC_CPU_VECTOR_BYTES")) {
    const int want = std::atoi(env);
    if (want == 16 || want == 32 || want == 64) w = std::min(w, want);
  }
  return w;
}();
#define FPE_INLINE inline __attribute__((always_inline))

constexpr int BQ = 64;  // query rows per block
constexpr int BK = 64;  // keys per tile
constexpr int MR = 4;   // rows of the micro-kernel's register tile

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---- vectors of VB bytes (GCC vector extensions) ----------------------------------------------------------------
template <class T, int VB>
struct VecOf {
  typedef T type __attribute__((vector_size(VB)));
};
template <class T, int VB>
using Vec = typename VecOf<T, VB>::type;
template <class T>
constexpr int64_t kW = 64 / sizeof(T);  // rows are padded to whole 64-byte vectors (any VB divides them)

template <class T, int VB>
FPE_INLINE Vec<T, VB> vload(const T* p) {
  Vec<T, VB> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <class T, int VB>
FPE_INLINE void vstore(T* p, const Vec<T, VB>& v) {
  std::memcpy(p, &v, sizeof(v));
}

// max of a row of BK: vector maxima, then halving (GCC does not reliably vectorize an omp simd max reduction, and
// a lane-by-lane scalar tail is a long dependency chain), down to one element (stopping at 16 bytes dropped the odd
// float lanes: a row whose visible keys all sat in odd lanes got max -inf and counted as seeing nothing)
template <class T, int N>
FPE_INLINE T hmax(const T* x) {  // max of the N bytes at x, N >= 2 elements
  if constexpr (N == 2 * sizeof(T)) {
    return (x[0] > x[1]) | (x[0] != x[0]) ? x[0] : x[1];
  } else {
    typedef T V __attribute__((vector_size(N / 2)));
    V lo, hi;
    std::memcpy(&lo, x, sizeof(V));
    std::memcpy(&hi, x + N / 2 / sizeof(T), sizeof(V));
    const V m = (lo > hi) | (lo != lo) ? lo : hi;  // NaN wins: a row with a NaN score is NaN, as in SDPA
    return hmax<T, N / 2>(reinterpret_cast<const T*>(&m));
  }
}
template <class T, int VB>
FPE_INLINE T row_max(const T* s) {
  Vec<T, VB> m = vload<T, VB>(s);
  for (int64_t v = VB / sizeof(T); v < BK; v += VB / sizeof(T)) {
    const Vec<T, VB> x = vload<T, VB>(s + v);
    m = (x > m) | (x != x) ? x : m;
  }
  return hmax<T, VB>(reinterpret_cast<const T*>(&m));
}
template <class T>
FPE_INLINE T row_max(const T* s) {
  return kVecBytes == 64 ? row_max<T, 64>(s) : kVecBytes == 32 ? row_max<T, 32>(s) : row_max<T, 16>(s);
}

// l (64 bytes of per-lane partial sums) = l * f + the BK values of s, lane-wise: one horizontal sum per row, at the end
template <class T, int VB>
FPE_INLINE void lane_sums(T* l, T f, const T* s) {
  for (int64_t u = 0; u < kW<T>; u += VB / sizeof(T)) {
    Vec<T, VB> acc = vload<T, VB>(l + u) * f;
    for (int64_t v = u; v < BK; v += kW<T>) acc += vload<T, VB>(s + v);
    vstore<T, VB>(l + u, acc);
  }
}
template <class T>
FPE_INLINE void lane_sums(T* l, T f, const T* s) {
  kVecBytes == 64 ? lane_sums<T, 64>(l, f, s) : kVecBytes == 32 ? lane_sums<T, 32>(l, f, s) : lane_sums<T, 16>(l, f, s);
}

// ---- matmul ------------------------------------------------------------------------------------------------
// C[m][:] (+)= sum_k a[m*am + k*ak] * B[k][:] for MR rows and NV vectors of columns. The MR x NV accumulators
// stay in registers, a row of B is NV contiguous vectors, a is broadcast (any strides: a transposed A is free).
template <class T, int VB, int NV, bool ACC>
FPE_INLINE void micro(const T* a, int64_t am, int64_t ak, const T* b, int64_t ldb, int64_t K, T* c, int64_t ldc) {
  constexpr int64_t W = VB / sizeof(T);
  Vec<T, VB> acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = ACC ? vload<T, VB>(c + m * ldc + v * W) : Vec<T, VB>{};
  for (int64_t k = 0; k < K; ++k) {
    Vec<T, VB> bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = vload<T, VB>(b + k * ldb + v * W);
    for (int m = 0; m < MR; ++m) {
      const T x = a[m * am + k * ak];
      for (int v = 0; v < NV; ++v) acc[m][v] += x * bv[v];
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) vstore<T, VB>(c + m * ldc + v * W, acc[m][v]);
}

// The part [lo, hi) of the summed index where a group of MR rows of A can be nonzero (see mask_ranges).
struct KRange {
  int lo, hi;
};

// columns [0, N) in blocks of NV vectors of VB bytes (then one block of the remaining NV' < NV), all rows
template <class T, int VB, int NV, bool ACC>
FPE_INLINE void gemm_cols(int64_t M, int64_t N, int64_t K, const T* a, int64_t am, int64_t ak, const T* b,
                          int64_t ldb, T* c, int64_t ldc, const KRange* kr) {
  constexpr int64_t W = VB / sizeof(T);
  int64_t n = 0;
  for (; n + NV * W <= N; n += NV * W)
    for (int64_t m = 0; m < M; m += MR) {
      const int64_t k0 = kr ? kr[m / MR].lo : 0, k1 = kr ? kr[m / MR].hi : K;
      micro<T, VB, NV, ACC>(a + m * am + k0 * ak, am, ak, b + k0 * ldb + n, ldb, std::max<int64_t>(k1 - k0, 0),
                            c + m * ldc + n, ldc);
    }
  if constexpr (NV > 1) {
    if (n < N) gemm_cols<T, VB, NV - 1, ACC>(M, N - n, K, a, am, ak, b + n, ldb, c + n, ldc, kr);
  }
}

// C (M x N) (+)= A (M x K) B (K x N): A[m][k] = a[m*am + k*ak], B and C row-major. M is a multiple of MR and N
// of 64 bytes: every buffer is padded so. Register tiles: 4 x 4 zmm (32 registers), 4 x 2 ymm or xmm (16).
// kr (optional): per group of MR rows, the only k where A is nonzero.
template <class T, bool ACC>
FPE_INLINE void gemm(int64_t M, int64_t N, int64_t K, const T* a, int64_t am, int64_t ak, const T* b, int64_t ldb,
                     T* c, int64_t ldc, const KRange* kr = nullptr) {
  if (kVecBytes == 64) gemm_cols<T, 64, 4, ACC>(M, N, K, a, am, ak, b, ldb, c, ldc, kr);
  else if (kVecBytes == 32) gemm_cols<T, 32, 2, ACC>(M, N, K, a, am, ak, b, ldb, c, ldc, kr);
  else gemm_cols<T, 16, 2, ACC>(M, N, K, a, am, ak, b, ldb, c, ldc, kr);
}

// ---- float math that vectorizes (double: libm) -----------------------------------------------------------------
// No float op may end up under a condition: GCC keeps a float op that could trap out of if-conversion and then
// does not vectorize the loop for AVX2 (AVX-512 has masked ops). Hence integer conditions and bitwise selects.

// c ? a : b through the bits: GCC turns a select into a branch and moves float ops into it
template <class T>
FPE_INLINE T pick(bool c, T a, T b) {
  using I = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  const I m = -static_cast<I>(c);
  return __builtin_bit_cast(T, (__builtin_bit_cast(I, a) & m) | (__builtin_bit_cast(I, b) & ~m));
}
// 2^n for integral n: 0 below -126, inf above 127 (and for NaN, whose product with the polynomial stays NaN);
// clamped as a float first, so the conversion is always defined
FPE_INLINE float exp2i(float n) {
  const int32_t i = static_cast<int32_t>(std::max(-127.f, std::min(128.f, n)));
  return __builtin_bit_cast(float, (i + 127) << 23);
}
// 2^t = 2^n * p(t - n), Cephes exp2f polynomial (~2 ulp)
FPE_INLINE float vexp2(float t) {
  const float n = std::nearbyint(t), f = t - n;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  return p * exp2i(n);
}
FPE_INLINE float vexp(float x) { return pick(!(x < -87.f), vexp2(x * 1.44269504088896341f), 0.f); }  // 0 for -inf
FPE_INLINE double vexp(double x) { return std::exp(x); }

// tanh: below |x| = 0.625 an odd polynomial x + x^3 p(x^2) (a minimax fit made for this file, ~1.3 ulp), above it
// 1 - 2 / (e^2|x| + 1), where nothing cancels (~3 ulp; |x| clamped at 16, where tanh rounds to 1: e^inf would be
// NaN; the clamp a pick, as std::min made GCC see control flow); the sign goes back as a bit. NaN stays NaN.
FPE_INLINE float vtanh(float x) {
  const float a = std::fabs(x), z = a * a;
  float p = -5.7049676239e-3f;
  p = p * z + 2.0639070829e-2f;
  p = p * z - 5.3739710352e-2f;
  p = p * z + 1.3331442145e-1f;
  p = p * z - 3.3333281940e-1f;
  const float small = p * z * a + a, big = 1.f - 2.f / (vexp(2.f * pick(!(a > 16.f), a, 16.f)) + 1.f);
  const uint32_t t = __builtin_bit_cast(uint32_t, pick(a < 0.625f, small, big));
  return __builtin_bit_cast(float, t | (__builtin_bit_cast(uint32_t, x) & 0x80000000u));
}
FPE_INLINE double vtanh(double x) { return std::tanh(x); }

// x^a for x >= 1: 2^(a log2 x) with x = 2^e m, m in [sqrt(1/2), sqrt(2)). a = hi + lo where hi has 12 low
// mantissa bits cleared, so hi * e is exact (|e| < 2^11) and the error stays ~2 ulp for any a and x, rather
// than growing with a log2 x.
struct PowExp {
  float a, hi, lo;
  explicit PowExp(float a_) : a(a_) {
    hi = __builtin_bit_cast(float, __builtin_bit_cast(int32_t, a_) & ~0xfff);
    lo = a_ - hi;
  }
};
FPE_INLINE float vpow(float x, float a, float ahi, float alo) {
  const int32_t i = __builtin_bit_cast(int32_t, x);
  const int32_t mi = (i & 0x7fffff) | 0x3f800000, big = mi > 0x3fb504f3;  // mantissa > sqrt(2): halve it
  const float m = __builtin_bit_cast(float, mi - (big << 23));
  const float e = static_cast<float>((i >> 23) - 127 + big);
  const float f = m - 1.f, z = f * f;  // log(1 + f): Cephes logf polynomial
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z - 0.5f * z;
  const float L = 0.44269504088896340736f;  // log2(e) - 1: f * log2(e) = f + f * L keeps f's bits
  const float log2m = ((y * L + f * L) + y) + f;
  const float te = ahi * e, n = std::nearbyint(te);
  return vexp2((te - n) + (alo * e + a * log2m)) * exp2i(n);
}
FPE_INLINE double vpow(double x, double a, double, double) { return std::pow(x, a); }

// sin and cos: x - j pi/2 in double (j = nearest quarter turn; accurate while |x| < ~1e15, far beyond what a float
// phase can mean), Cephes polynomials on [-pi/4, pi/4] in float; ~1e-7 absolute.
FPE_INLINE void vsincos(float x, float& s, float& c) {
  const double xd = x, j = std::nearbyint(xd * 0.63661977236758134308);
  const float r = static_cast<float>(xd - j * 1.57079632679489661923), z = r * r;
  const float sr = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * r + r;
  const float cr = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z -
                   0.5f * z + 1.f;
  // quadrant j mod 4 (exact in double, then small enough for int32): swap, then signs as bits
  const uint32_t q = static_cast<uint32_t>(static_cast<int32_t>(j - 4. * std::nearbyint(0.25 * j)));
  const float ss = pick(q & 1, cr, sr), cc = pick(q & 1, sr, cr);
  s = __builtin_bit_cast(float, __builtin_bit_cast(uint32_t, ss) ^ ((q & 2) << 30));
  c = __builtin_bit_cast(float, __builtin_bit_cast(uint32_t, cc) ^ (((q + 1) & 2) << 30));
}
FPE_INLINE void vsincos(double x, double& s, double& c) {
  s = std::sin(x);
  c = std::cos(x);
}

// ---- the plan of one call -------------------------------------------------------------------------------------
struct Dims {
  int64_t B, Lq, Lk, H, Hkv, D, Dv, G;
};

// Geometry, positions and the prepared operands: everything the work items read, built once per call.
template <class T>
struct Plan {
  Dims dm;
  EncParams p;
  bool causal = false;
  // key n is visible to query m iff dlo <= q_pos[m] - k_pos[n] <= dhi: the causal rule (dlo = 0) and the window
  // (dlo = -right, dhi = left); the int64 limits where unbounded. The difference is exact (positions in
  // [-2^62, 2^62)), dlo <= 0 <= dhi.
  int64_t dlo = std::numeric_limits<int64_t>::min(), dhi = std::numeric_limits<int64_t>::max();
  T cap = 0;  // soft cap of the scores (0: none), see soft_cap
  T scale = 1;
  bool tapa = false;
  // columns of an encoded row: input dims [0, split) at [0, split), [split, D) at [Da, Da + D - split) (TAPA
  // keeps its amplitude and phase parts in whole vectors); Dp columns in all. Without TAPA split = D, Da = Dp.
  int64_t split, Da, Dp, Dvp;
  int64_t Lqp, Lkp, nqb, nkt;  // lengths padded to whole blocks / tiles; query blocks, key tiles
  int64_t Hke, Ht;             // heads of the encoded k (FoPE: one per query head); heads of the tables
  int64_t nsplit = 1;          // backward: a head's key tiles are shared among this many work items
  const int64_t *qpos, *kpos;  // (Bq, Lqp), (Bk, Lkp), zero-padded
  // the key positions minus pos_base as doubles, for distances (AVX2 has no int64 -> float conversion): exact, and
  // so are their differences, while every position of the call lies within 2^53 of pos_base; else (`wide`) the
  // distances are formed in int64 (exact for positions in [-2^62, 2^62)) and rounded once.
  const double* kposd;
  int64_t pos_base = 0;
  bool wide = false;
  // ALiBi: each query row's nearest visible key distance r (0 when it sees none), (Bq or Bk, Lqp). The row's scores
  // are s q.k - slope (|m - n| - r): the softmax is unchanged, nothing of size slope |m - n| is rounded, and the lse
  // (forward output, backward input) is relative to the same r (encodings/alibi.py). "Visible" is the causal rule
  // only, not the window, as the Python side (nearest_key_distance, lse_shift) has it: r is a per-row shift, which
  // the softmax does not see, so the results are exact either way.
  std::vector<int64_t> aref;
  bool aref_batched = false;
  bool qpos_batched, kpos_batched;
  std::vector<int64_t> qmin, qmax, kmin, kmax;  // per (batch, query block) / (batch, key tile): masked tiles
  std::vector<uint8_t> qasc, kasc;               // whether positions ascend within the block / tile
  // tables: row r is position tpos[r]; qrow / krow give each position's row
  const int64_t *tpos = nullptr, *qrow = nullptr, *krow = nullptr;
  int64_t ntab = 0;
  // TAPA: Omega by key - query position, omega[n - m - omega_lo], when these span a short range; kcontig: whether
  // the key positions of a (batch, key tile) are consecutive, so that a query row reads Omega as one contiguous run
  T* omega = nullptr;
  int64_t omega_lo = 0, nomega = 0;
  std::vector<uint8_t> kcontig;
  T *tc = nullptr, *ts = nullptr;  // (ntab, Ht, P) cos / sin tables
  T *bc = nullptr, *bs = nullptr;  // (ntab, Dk) FoPE Fourier basis cos(omega_k t), sin(omega_k t)
  T* qe = nullptr;                 // (B, H, Lqp, Dp) encoded q
  T* kt = nullptr;                 // (B, Hke, nkt, Dp, BK) encoded k, transposed per tile
  T* ke = nullptr;                 // (B, Hke, Lkp, Dp) encoded k (backward)
  T* ve = nullptr;                 // (B, Hkv, Lkp, Dvp) v (forward)
  T* vt = nullptr;                 // (B, Hkv, nkt, Dvp, BK) v transposed per tile (backward)
  T* doe = nullptr;                // (B, H, Lqp, Dvp) dO (backward)
  T* delta = nullptr;              // (B, H, Lq) rowsum(dO * O) (backward)
  T* gq = nullptr;                 // (nsplit, B, H, Lqp, Dp) gradient w.r.t. encoded q, one per key-tile share
  T* gk = nullptr;                 // (B, H, Lkp, Dp) gradient w.r.t. encoded k, per query head
  double* dslope = nullptr;        // ALiBi with slope gradients: (B * H * nsplit) partial sums, one per work item

  // The differences q_pos - k_pos of a (query block, key tile) pair lie in [qmin - kmax, qmax - kmin].
  // visible: whether that range meets [dlo, dhi] (else the pair is skipped: cost grows with the window)
  bool visible(int64_t b, int64_t qb, int64_t kt_) const {
    const int64_t t = (kpos_batched ? b : 0) * nkt + kt_, u = (qpos_batched ? b : 0) * nqb + qb;
    return qmax[u] - kmin[t] >= dlo && qmin[u] - kmax[t] <= dhi;
  }
  // whether some key of the tile is padding or some (query, key) pair of it invisible (the range leaves [dlo, dhi])
  bool masked(int64_t b, int64_t qb, int64_t kt_) const {
    const int64_t t = (kpos_batched ? b : 0) * nkt + kt_, u = (qpos_batched ? b : 0) * nqb + qb;
    return (kt_ + 1) * BK > dm.Lk || qmin[u] - kmax[t] < dlo || qmax[u] - kmin[t] > dhi;
  }
  int64_t table_head(int64_t h) const { return Ht > 1 ? h : 0; }
  // ALiBi: the nearest-key distances of batch b's queries from i0 on (Plan::aref), else null
  const int64_t* row_refs(int64_t b, int64_t i0) const {
    return aref.empty() ? nullptr : aref.data() + (aref_batched ? b * Lqp : 0) + i0;
  }
  // the factor the softmax applies to the scores: the scale itself unless score_row already applied it
  T exp_scale() const { return tapa || p.kind == ENC_ALIBI || cap > 0 ? T(1) : scale; }
  // TAPA: the run of Omega for query position qp and the keys of a tile starting at kp0, or null
  const T* omega_run(int64_t b, int64_t kt_, int64_t qp, int64_t kp0) const {
    return omega && kcontig[(kpos_batched ? b : 0) * nkt + kt_] ? omega + (kp0 - qp - omega_lo) : nullptr;
  }
};

// a + b and a - b, saturated at the int64 limits
inline int64_t sat_add(int64_t a, int64_t b) {
  int64_t r;
  if (!__builtin_add_overflow(a, b, &r)) return r;
  return b < 0 ? std::numeric_limits<int64_t>::min() : std::numeric_limits<int64_t>::max();
}
inline int64_t sat_sub(int64_t a, int64_t b) {
  int64_t r;
  if (!__builtin_sub_overflow(a, b, &r)) return r;
  return b > 0 ? std::numeric_limits<int64_t>::min() : std::numeric_limits<int64_t>::max();
}

// Where P (and dS) can be nonzero on a masked (query block, key tile) pair, per group of MR rows: the keys a group
// of queries sees and the queries that see a group of keys. Key n is visible to query m iff dlo <= q_m - k_n <= dhi,
// so queries at positions in [a, b] see keys in [a - dhi, b - dlo] only, and keys in [a, b] are seen by queries in
// [a + dlo, b + dhi] only: an interval of the tile when its key positions ascend (else all valid keys), of the block
// when its query positions ascend (else all). The matmuls summing over keys (P V, dS K) or queries (P^T dO, dS^T Q)
// skip the rest: about half of a diagonal tile under the causal rule, most of a tile that a narrow window crosses.
template <class T>
void mask_ranges(const Plan<T>& c, int64_t b, int64_t qb, int64_t kt, const int64_t* qp, int nq, const int64_t* kp,
                 int nk, KRange* qrows, KRange* krows) {
  const bool bounded = c.dlo != std::numeric_limits<int64_t>::min() || c.dhi != std::numeric_limits<int64_t>::max();
  const bool kasc = bounded && c.kasc[(c.kpos_batched ? b : 0) * c.nkt + kt];
  const bool qasc = bounded && c.qasc[(c.qpos_batched ? b : 0) * c.nqb + qb];
  for (int g = 0; g * MR < nq; ++g) {
    const auto mm = std::minmax_element(qp + g * MR, qp + std::min(g * MR + MR, nq));
    qrows[g] = {0, nk};
    if (kasc)
      qrows[g] = {static_cast<int>(std::lower_bound(kp, kp + nk, sat_sub(*mm.first, c.dhi)) - kp),
                  static_cast<int>(std::upper_bound(kp, kp + nk, sat_sub(*mm.second, c.dlo)) - kp)};
  }
  const int mq = static_cast<int>(round_up(nq, MR));
  for (int g = 0; g * MR < BK; ++g) {
    if (g * MR >= nk) {
      krows[g] = {mq, mq};  // padding keys
      continue;
    }
    const auto mm = std::minmax_element(kp + g * MR, kp + std::min(g * MR + MR, nk));
    krows[g] = {0, mq};
    if (qasc)
      krows[g] = {static_cast<int>(std::lower_bound(qp, qp + nq, sat_add(*mm.first, c.dlo)) - qp),
                  static_cast<int>(std::upper_bound(qp, qp + nq, sat_add(*mm.second, c.dhi)) - qp)};
  }
}

// ---- encoding hooks -------------------------------------------------------------------------------------------
// Tables of one position: rotary cos/sin per pair; FoPE: the Fourier basis, then C_h, S_h for every head.
template <class T>
FPE_CPU_CLONES void table_row(const Plan<T>& c, int64_t r) {
  const EncParams& p = c.p;
  const int64_t pos = c.tpos[r], P = p.npairs;
  if (p.kind == ENC_ROTARY) {
    T *tc = c.tc + r * P, *ts = c.ts + r * P;
    for (int64_t j = 0; j < P; ++j) {
      const T sc = sizeof(T) == 8 && p.pair_scale_f64 != nullptr ? static_cast<T>(p.pair_scale_f64[j]) : p.pair_scale[j];
      rotary_cos_sin<T>(pos, p.pair_turns + 2 * j, sc, tc[j], ts[j]);
    }
    return;
  }
  const int64_t dk = p.fope_dk;
  const T *ck = c.bc + r * dk, *sk = c.bs + r * dk;
  fope_basis<T>(pos, (int)dk, p.fope_turns, c.bc + r * dk, c.bs + r * dk);
  for (int64_t h = 0; h < c.Ht; ++h) {  // fope_cos_sin_basis for all pairs at once (the same sums, pairs innermost)
    T *tc = c.tc + (r * c.Ht + h) * P, *ts = c.ts + (r * c.Ht + h) * P;
    const float *a = p.fope_cos_coef + h * dk * P, *b = p.fope_sin_coef + h * dk * P;
    std::fill(tc, tc + P, T(0));
    std::fill(ts, ts + P, T(0));
    for (int64_t k = 0; k < dk; ++k) {
      const T x = ck[k], y = sk[k];
#pragma omp simd
      for (int64_t j = 0; j < P; ++j) {
        tc[j] += static_cast<T>(a[k * P + j]) * x;
        ts[j] += static_cast<T>(b[k * P + j]) * y;
      }
    }
    for (int64_t j = 0; j < P; ++j)
      if (p.fope_pad[j] != 0.f) tc[j] = ts[j] = T(1);
  }
}

// The encoded row y (Dp columns, zero-padded) of the input row x at table row r of table head ht.
template <class T>
FPE_INLINE void encode_row(const Plan<T>& c, const T* x, int64_t r, int64_t ht, T* y) {
  const int64_t D = c.dm.D, split = c.split, Da = c.Da;
  std::copy(x, x + split, y);
  std::fill(y + split, y + Da, T(0));
  std::copy(x + split, x + D, y + Da);
  std::fill(y + Da + D - split, y + c.Dp, T(0));
  if (!is_rotation(c.p.kind)) return;
  const int64_t P = c.p.npairs;
  const T *tc = c.tc + (r * c.Ht + ht) * P, *ts = c.ts + (r * c.Ht + ht) * P;
  for (int64_t j = 0; j < P; ++j) {
    const int64_t i1 = c.p.idx1[j], i2 = c.p.idx2[j];
    rotate_pair<T>(x[i1], x[i2], tc[j], ts[j], y[i1], y[i2]);
  }
}

// The gradient row g w.r.t. an encoded row back to the input row (out, D values): the transposed rotation. FoPE
// with dA: the coefficient gradients of this row, given the input row x (dc, ds: scratch of P).
template <class T>
FPE_INLINE void decode_row(const Plan<T>& c, const T* g, const T* x, int64_t r, int64_t ht, T* out, T* dA, T* dB,
                           T* dc, T* ds) {
  const EncParams& p = c.p;
  std::copy(g, g + c.split, out);
  std::copy(g + c.Da, g + c.Da + c.dm.D - c.split, out + c.split);
  if (!is_rotation(p.kind)) return;
  const int64_t P = p.npairs;
  const T *tc = c.tc + (r * c.Ht + ht) * P, *ts = c.ts + (r * c.Ht + ht) * P;
  for (int64_t j = 0; j < P; ++j) {
    const int64_t i1 = p.idx1[j], i2 = p.idx2[j];
    rotate_pair_t<T>(g[i1], g[i2], tc[j], ts[j], out[i1], out[i2]);
  }
  if (dA == nullptr) return;
  for (int64_t j = 0; j < P; ++j) {
    const int64_t i1 = p.idx1[j], i2 = p.idx2[j];
    rotate_pair_dtables<T>(x[i1], x[i2], g[i1], g[i2], dc[j], ds[j]);
    if (p.fope_pad[j] != 0.f) dc[j] = ds[j] = T(0);  // padded pairs have constant tables
  }
  const int64_t dk = p.fope_dk;
  const T *ck = c.bc + r * dk, *sk = c.bs + r * dk;
  for (int64_t k = 0; k < dk; ++k) {
#pragma omp simd
    for (int64_t j = 0; j < P; ++j) {
      dA[k * P + j] += ck[k] * dc[j];
      dB[k * P + j] += sk[k] * ds[j];
    }
  }
}

// TAPA's score for key j given Omega (om); see score_row
template <class T, bool GRAD>
FPE_INLINE void tapa_score(T om, T sc, T* s, T* x, T* y, int j) {
  T sn, cs;
  vsincos(om * x[j], sn, cs);
  const T amp = s[j] * sc;
  s[j] = amp * cs;
  if (GRAD) {
    x[j] = sc * cs;
    y[j] = -amp * sn * om;
  }
}

// Soft cap of the scores of one row: s -> cap t, t = tanh(s / cap), on the encoding's score with the scale applied:
// TAPA's s is scaled already; the dot-product encodings' s is q.k, scaled here (Plan::exp_scale is 1 then).
// With GRAD, the chain factor ds_capped/ds = 1 - t^2 joins dS's factors: TAPA's x and y are multiplied by it, the
// others get x = scale (1 - t^2), the derivative w.r.t. q.k (backward_item).
template <class T, bool GRAD>
FPE_INLINE void soft_cap(const Plan<T>& c, T* s, T* x, T* y) {
  const T cap = c.cap, sc = c.scale, f = (c.tapa ? T(1) : sc) / cap;
  if (c.tapa) {
#pragma omp simd
    for (int j = 0; j < BK; ++j) {
      const T t = vtanh(s[j] * f), g = 1 - t * t;
      s[j] = cap * t;
      if (GRAD) {
        x[j] *= g;
        y[j] *= g;
      }
    }
  } else {
#pragma omp simd
    for (int j = 0; j < BK; ++j) {
      const T t = vtanh(s[j] * f);
      s[j] = cap * t;
      if (GRAD) x[j] = sc * (1 - t * t);
    }
  }
}

// Scores of one query row of a tile. s holds q.k over the input dims [0, split) on entry, the score on exit (still
// unscaled when the encoding adds nothing to it: Plan::exp_scale); soft-capped (soft_cap) before ALiBi's bias, which
// is not capped; with `mask`, keys j >= nk and keys the query does not see (Plan::dlo) get -inf. TAPA: x holds the
// phase dot q_P.k_P on entry; with GRAD, x and y return the factors of dS in the gradients of q_A.k_A (scale cos psi)
// and of q_P.k_P (-amp sin psi Omega); om is Omega of the row's keys from the per-call table (Plan::omega_run), or
// null to compute it. No float op sits under a condition (GCC would not vectorize the loop for AVX2).
// |a - b| for positions in [-2^62, 2^62), formed exactly in int64
FPE_INLINE int64_t int_distance(int64_t a, int64_t b) { return a >= b ? a - b : b - a; }
// |a - b| rounded to double once
FPE_INLINE double wide_distance(int64_t a, int64_t b) { return static_cast<double>(int_distance(a, b)); }

template <class T, bool GRAD>
FPE_INLINE void score_row(const Plan<T>& c, int64_t qp, const int64_t* kp, const double* kpd, const T* om, int nk,
                          bool mask, T slope, int64_t ref, T* s, T* x, T* y) {
  const T sc = c.scale;
  const double qpd = static_cast<double>(qp - c.pos_base);
  alignas(64) T gathered[BK];
  if (c.tapa && om == nullptr && c.omega != nullptr) {  // keys not consecutive, in the table's range: gather
    for (int j = 0; j < BK; ++j) gathered[j] = j < nk ? c.omega[kp[j] - qp - c.omega_lo] : T(0);
    om = gathered;
  }
  if (c.tapa && om != nullptr) {
#pragma omp simd
    for (int j = 0; j < BK; ++j) tapa_score<T, GRAD>(om[j], sc, s, x, y, j);
  } else if (c.tapa) {
    const T ps = static_cast<T>(c.p.tapa_phase_scale), al = static_cast<T>(c.p.tapa_alpha);
    const PowExp pe(static_cast<float>(c.p.tapa_alpha));
    const T ahi = pe.hi, alo = pe.lo;
    auto omega = [&](double d) { return pick(d != 0., ps * vpow(static_cast<T>(d), al, ahi, alo), T(0)); };
    if (c.wide) {
      for (int j = 0; j < BK; ++j) tapa_score<T, GRAD>(omega(wide_distance(qp, kp[j])), sc, s, x, y, j);
    } else {
#pragma omp simd
      for (int j = 0; j < BK; ++j) tapa_score<T, GRAD>(omega(std::fabs(qpd - kpd[j])), sc, s, x, y, j);
    }
  }
  if (c.cap > 0) soft_cap<T, GRAD>(c, s, x, y);
  if (c.p.kind == ENC_ALIBI) {  // relative to the row's nearest visible key at distance ref (Plan::aref)
    const T a = c.cap > 0 ? T(1) : sc;  // (capped: scaled already)
    if (c.wide) {
      for (int j = 0; j < BK; ++j)
        s[j] = s[j] * a - slope * static_cast<T>(static_cast<double>(int_distance(qp, kp[j]) - ref));
    } else {  // exact: every operand an integer below 2^53
      const double rd = static_cast<double>(ref);
#pragma omp simd
      for (int j = 0; j < BK; ++j) s[j] = s[j] * a - slope * static_cast<T>(std::fabs(qpd - kpd[j]) - rd);
    }
  }  // else (uncapped) the scale stays in the softmax: exp(scale * s - m), see Plan::exp_scale
  if (!mask) return;
  const T ninf = -std::numeric_limits<T>::infinity();
  const int64_t lo = c.dlo, hi = c.dhi;
#pragma omp simd
  for (int j = 0; j < BK; ++j) {
    const int64_t d = qp - kp[j];  // exact (padding keys sit at position 0)
    s[j] = ((j < nk) & (d >= lo) & (d <= hi)) ? s[j] : ninf;
  }
}

// ---- preparation of the operands ---------------------------------------------------------------------------------
// One query block of one head: encoded q rows, zero rows past Lq.
template <class T>
FPE_CPU_CLONES void prep_q_block(const Plan<T>& c, const T* q, int64_t item) {
  const Dims& dm = c.dm;
  const int64_t h = item % dm.H, qb = item / dm.H % c.nqb, b = item / dm.H / c.nqb, Dp = c.Dp;
  T* rows = c.qe + ((b * dm.H + h) * c.Lqp + qb * BQ) * Dp;
  for (int64_t i = 0; i < BQ; ++i) {
    const int64_t t = qb * BQ + i;
    if (t >= dm.Lq) {
      std::fill(rows + i * Dp, rows + BQ * Dp, T(0));
      break;
    }
    const int64_t r = c.qrow ? c.qrow[(c.qpos_batched ? b : 0) * dm.Lq + t] : 0;
    encode_row<T>(c, q + ((b * dm.Lq + t) * dm.H + h) * dm.D, r, c.table_head(h), rows + i * Dp);
  }
}

// rows (BK x n, leading dimension ld) -> panel (n x BK); contiguous stores (strided ones were slower)
template <class T>
FPE_INLINE void transpose_tile(const T* rows, int64_t ld, int64_t n, T* panel) {
  for (int64_t d = 0; d < n; ++d)
    for (int64_t j = 0; j < BK; ++j) panel[d * BK + j] = rows[j * ld + d];
}

// One key tile of one head of the encoded k: transposed (the panel), for the backward also as rows. A tile at a time
// keeps its panel in L1 (a row at a time would scatter into every head's panel).
template <class T>
FPE_CPU_CLONES void prep_k_tile(const Plan<T>& c, const T* k, int64_t item, T* tmp) {
  const Dims& dm = c.dm;
  const int64_t he = item % c.Hke, tile = item / c.Hke % c.nkt, b = item / c.Hke / c.nkt;
  const int64_t src = c.Hke == dm.Hkv ? he : he / dm.G, t0 = tile * BK, Dp = c.Dp;
  const int64_t nk = std::min<int64_t>(BK, dm.Lk - t0);
  T* rows = c.ke ? c.ke + ((b * c.Hke + he) * c.Lkp + t0) * Dp : tmp;
  std::fill(rows + nk * Dp, rows + BK * Dp, T(0));
  for (int64_t j = 0; j < nk; ++j) {
    const int64_t r = c.krow ? c.krow[(c.kpos_batched ? b : 0) * dm.Lk + t0 + j] : 0;
    encode_row<T>(c, k + ((b * dm.Lk + t0 + j) * dm.Hkv + src) * dm.D, r, c.table_head(he), rows + j * Dp);
  }
  transpose_tile<T>(rows, Dp, Dp, c.kt + ((b * c.Hke + he) * c.nkt + tile) * Dp * BK);
}

// One key tile of one head of v: as rows (forward) or transposed (backward).
template <class T>
FPE_CPU_CLONES void prep_v_tile(const Plan<T>& c, const T* v, int64_t item, T* tmp) {
  const Dims& dm = c.dm;
  const int64_t hv = item % dm.Hkv, tile = item / dm.Hkv % c.nkt, b = item / dm.Hkv / c.nkt;
  const int64_t t0 = tile * BK, Dvp = c.Dvp, nk = std::min<int64_t>(BK, dm.Lk - t0);
  T* rows = c.ve ? c.ve + ((b * dm.Hkv + hv) * c.Lkp + t0) * Dvp : tmp;
  std::fill(rows, rows + BK * Dvp, T(0));
  for (int64_t j = 0; j < nk; ++j) {
    const T* x = v + ((b * dm.Lk + t0 + j) * dm.Hkv + hv) * dm.Dv;
    std::copy(x, x + dm.Dv, rows + j * Dvp);
  }
  if (c.vt) transpose_tile<T>(rows, Dvp, Dvp, c.vt + ((b * dm.Hkv + hv) * c.nkt + tile) * Dvp * BK);
}

// dO rows of one query block of one head (zero-padded) and delta = rowsum(dO * O).
template <class T>
FPE_CPU_CLONES void prep_do_block(const Plan<T>& c, const T* dout, const T* out, int64_t item) {
  const Dims& dm = c.dm;
  const int64_t h = item % dm.H, qb = item / dm.H % c.nqb, b = item / dm.H / c.nqb, Dvp = c.Dvp;
  T* rows = c.doe + ((b * dm.H + h) * c.Lqp + qb * BQ) * Dvp;
  std::fill(rows, rows + BQ * Dvp, T(0));
  for (int64_t i = 0; i < BQ && qb * BQ + i < dm.Lq; ++i) {
    const int64_t t = qb * BQ + i;
    const T *g = dout + ((b * dm.Lq + t) * dm.H + h) * dm.Dv, *o = out + ((b * dm.Lq + t) * dm.H + h) * dm.Dv;
    std::copy(g, g + dm.Dv, rows + i * Dvp);
    // in index order, one (fused) multiply-add at a time: the order of gemm's sums, so that a row whose output is
    // one key's v (a single visible key) gets delta == dP bitwise and dS exactly 0, as in exact arithmetic (a
    // reordered sum leaves rounding noise there, which TAPA's dS factors scale by up to Omega ~ 1e5)
    T acc = 0;
    for (int64_t e = 0; e < dm.Dv; ++e) acc += g[e] * o[e];
    c.delta[(b * dm.H + h) * dm.Lq + t] = acc;
  }
}

// ---- forward: one query block of one (batch, head) ---------------------------------------------------------------
template <class T>
int64_t forward_scratch(const Plan<T>& c) {
  return std::max<int64_t>(2 * BQ * BK + BQ * c.Dvp + BQ * kW<T> + 2 * BQ, BK * std::max(c.Dp, c.Dvp));
}

template <class T>
FPE_CPU_CLONES void forward_block(const Plan<T>& c, int64_t item, T* scratch, T* out, T* lse) {
  const Dims& dm = c.dm;
  const int64_t task = item / c.nqb, qb = c.nqb - 1 - item % c.nqb;  // late (longest causal) blocks first
  const int64_t b = task / dm.H, h = task % dm.H, hk = h / dm.G, he = c.Hke == dm.H ? h : hk;
  const int64_t i0 = qb * BQ, Dp = c.Dp, Dvp = c.Dvp;
  const int nq = (int)std::min<int64_t>(BQ, dm.Lq - i0);
  const int64_t Mq = round_up(nq, MR);
  T *S = scratch, *X = S + BQ * BK, *O = X + BQ * BK, *l = O + BQ * Dvp, *m = l + BQ * kW<T>, *corr = m + BQ;
  const T ninf = -std::numeric_limits<T>::infinity();
  const T* Q = c.qe + ((b * dm.H + h) * c.Lqp + i0) * Dp;
  const int64_t* qp = c.qpos + (c.qpos_batched ? b * c.Lqp : 0) + i0;
  const T esc = c.exp_scale();
  const T slope = c.p.kind == ENC_ALIBI ? static_cast<T>(c.p.slopes[(c.p.slopes_batch > 1 ? b : 0) * dm.H + h]) : T(0);
  const int64_t* rq = c.row_refs(b, i0);
  std::fill(O, O + Mq * Dvp, T(0));
  std::fill(m, m + BQ, ninf);
  std::fill(l, l + BQ * kW<T>, T(0));
  for (int64_t kt = 0; kt < c.nkt; ++kt) {
    if (!c.visible(b, qb, kt)) continue;
    const T* KT = c.kt + ((b * c.Hke + he) * c.nkt + kt) * Dp * BK;
    gemm<T, false>(Mq, BK, c.split, Q, Dp, 1, KT, BK, S, BK);
    if (c.tapa) gemm<T, false>(Mq, BK, dm.D - c.split, Q + c.Da, Dp, 1, KT + c.Da * BK, BK, X, BK);
    const int nk = (int)std::min<int64_t>(BK, dm.Lk - kt * BK);
    const int64_t* kp = c.kpos + (c.kpos_batched ? b * c.Lkp : 0) + kt * BK;
    const double* kpd = c.kposd + (kp - c.kpos);
    const bool mask = c.masked(b, qb, kt);
    for (int i = 0; i < nq; ++i) {  // online softmax: S becomes P = exp(s - m_new), O is rescaled by corr
      T* s = S + i * BK;
      score_row<T, false>(c, qp[i], kp, kpd, c.omega_run(b, kt, qp[i], kp[0]), nk, mask, slope, rq ? rq[i] : 0, s,
                          X + i * BK, nullptr);
      const T rm = esc * row_max(s);  // esc > 0: the max of the scaled scores
      const T mx = (rm > m[i]) | (rm != rm) ? rm : m[i];  // NaN propagates (std::max would drop it)
      if (mx == ninf) {  // nothing visible yet
        std::fill(s, s + BK, T(0));
        corr[i] = 1;
        continue;
      }
#pragma omp simd
      for (int j = 0; j < BK; ++j) s[j] = vexp(s[j] * esc - mx);
      corr[i] = vexp(m[i] - mx);
      m[i] = mx;
      lane_sums(l + i * kW<T>, corr[i], s);
    }
    std::fill(S + nq * BK, S + Mq * BK, T(0));
    for (int i = 0; i < nq; ++i) {
      if (corr[i] == T(1)) continue;
      T* o = O + i * Dvp;
      const T f = corr[i];
#pragma omp simd
      for (int64_t e = 0; e < Dvp; ++e) o[e] *= f;
    }
    KRange qrows[BQ / MR], krows[BK / MR];
    if (mask) mask_ranges(c, b, qb, kt, qp, nq, kp, nk, qrows, krows);
    gemm<T, true>(Mq, Dvp, BK, S, BK, 1, c.ve + ((b * dm.Hkv + hk) * c.Lkp + kt * BK) * Dvp, Dvp, O, Dvp,
                  mask ? qrows : nullptr);
  }
  for (int i = 0; i < nq; ++i) {
    T sum = 0;
    for (int64_t e = 0; e < kW<T>; ++e) sum += l[i * kW<T> + e];
    T* o = out + ((b * dm.Lq + i0 + i) * dm.H + h) * dm.Dv;
    // rows that see no key (sum 0): zeros, lse -inf; a NaN row stays NaN (its sum is NaN)
    const T inv = sum == T(0) ? T(0) : T(1) / sum;
    for (int64_t e = 0; e < dm.Dv; ++e) o[e] = O[i * Dvp + e] * inv;
    lse[(b * dm.H + h) * dm.Lq + i0 + i] = sum == T(0) ? ninf : m[i] + std::log(sum);
  }
}

// ---- backward: a share of the key tiles of one (batch, head) ------------------------------------------------
// ALiBi: this row's share of dL/dslope = -sum_n dS_n |m - n|, with dS = P (dP - delta) from the row's scores s
// (slope bias included) and dP = dO v_n in dp, before they become P and dS.
template <class T>
FPE_INLINE double alibi_dslope_row(const Plan<T>& c, int64_t qp, const int64_t* kp, int64_t ref, const T* s,
                                   const T* dp, T L, T dl) {
  if (L == -std::numeric_limits<T>::infinity()) return 0;  // the row sees no key
  // sum_n dS_n = 0, so the distances may be taken relative to the row's reference ref: no cancellation at large ones
  double acc = 0;
  for (int j = 0; j < BK; ++j) {
    const T pj = vexp(s[j] - L);
    if (pj == T(0)) continue;  // invisible keys (s = -inf) and padding
    acc += static_cast<double>(pj * (dp[j] - dl)) * static_cast<double>(int_distance(qp, kp[j]) - ref);
  }
  return -acc;
}

template <class T>
int64_t backward_scratch(const Plan<T>& c) {
  return std::max(4 * BQ * BK + BK * c.Dp + BK * c.Dvp, BK * std::max(c.Dp, c.Dvp)) + c.Dp + 2 * c.p.npairs;
}

template <class T>
FPE_CPU_CLONES void backward_item(const Plan<T>& c, int64_t item, T* scratch, const T* lse, T* dvh) {
  const Dims& dm = c.dm;
  const int64_t task = item / c.nsplit, share = item % c.nsplit;
  const int64_t b = task / dm.H, h = task % dm.H, hk = h / dm.G, he = c.Hke == dm.H ? h : hk;
  const int64_t Dp = c.Dp, Dvp = c.Dvp, Da = c.Da;
  T *S = scratch, *DP = S + BQ * BK, *X = DP + BQ * BK, *Y = X + BQ * BK, *dK = Y + BQ * BK, *dV = dK + BK * Dp;
  const T ninf = -std::numeric_limits<T>::infinity(), esc = c.exp_scale();
  alignas(64) T scales[BK];
  std::fill(scales, scales + BK, c.scale);
  const T slope = c.p.kind == ENC_ALIBI ? static_cast<T>(c.p.slopes[(c.p.slopes_batch > 1 ? b : 0) * dm.H + h]) : T(0);
  const T* lse_bh = lse + (b * dm.H + h) * dm.Lq;
  const int64_t* rq_bh = c.row_refs(b, 0);
  const T* delta = c.delta + (b * dm.H + h) * dm.Lq;
  T* gq = c.gq + ((share * dm.B + b) * dm.H + h) * c.Lqp * Dp;
  std::fill(gq, gq + c.Lqp * Dp, T(0));
  double dslope_acc = 0;
  for (int64_t kt = share; kt < c.nkt; kt += c.nsplit) {
    std::fill(dK, dK + BK * Dp, T(0));
    std::fill(dV, dV + BK * Dvp, T(0));
    const T* KT = c.kt + ((b * c.Hke + he) * c.nkt + kt) * Dp * BK;
    const T* KR = c.ke + ((b * c.Hke + he) * c.Lkp + kt * BK) * Dp;
    const T* VT = c.vt + ((b * dm.Hkv + hk) * c.nkt + kt) * Dvp * BK;
    const int nk = (int)std::min<int64_t>(BK, dm.Lk - kt * BK);
    const int64_t* kp = c.kpos + (c.kpos_batched ? b * c.Lkp : 0) + kt * BK;
    const double* kpd = c.kposd + (kp - c.kpos);
    for (int64_t qb = 0; qb < c.nqb; ++qb) {
      if (!c.visible(b, qb, kt)) continue;
      const int64_t i0 = qb * BQ;
      const int nq = (int)std::min<int64_t>(BQ, dm.Lq - i0);
      const int64_t Mq = round_up(nq, MR);
      const T* Q = c.qe + ((b * dm.H + h) * c.Lqp + i0) * Dp;
      const T* DO = c.doe + ((b * dm.H + h) * c.Lqp + i0) * Dvp;
      const int64_t* qp = c.qpos + (c.qpos_batched ? b * c.Lqp : 0) + i0;
      const bool mask = c.masked(b, qb, kt);
      gemm<T, false>(Mq, BK, c.split, Q, Dp, 1, KT, BK, S, BK);
      if (c.tapa) gemm<T, false>(Mq, BK, dm.D - c.split, Q + Da, Dp, 1, KT + Da * BK, BK, X, BK);
      gemm<T, false>(Mq, BK, dm.Dv, DO, Dvp, 1, VT, BK, DP, BK);  // dP = dO V^T
      for (int i = 0; i < nq; ++i) {  // S becomes P, DP becomes dS (times the amplitude factor), X the phase part
        T *s = S + i * BK, *dp = DP + i * BK, *x = X + i * BK, *y = Y + i * BK;
        const int64_t ref = rq_bh ? rq_bh[i0 + i] : 0;
        score_row<T, true>(c, qp[i], kp, kpd, c.omega_run(b, kt, qp[i], kp[0]), nk, mask, slope, ref, s, x, y);
        if (c.dslope) dslope_acc += alibi_dslope_row<T>(c, qp[i], kp, ref, s, dp, lse_bh[i0 + i], delta[i0 + i]);
        const T L = lse_bh[i0 + i], dl = delta[i0 + i];
        if (L == ninf) {  // the row sees no key
          std::fill(s, s + BK, T(0));
          std::fill(dp, dp + BK, T(0));
          std::fill(x, x + BK, T(0));
          continue;
        }
        if (c.tapa) {
#pragma omp simd
          for (int j = 0; j < BK; ++j) {
            const T pj = vexp(s[j] - L), ds = pj * (dp[j] - dl);
            s[j] = pj;
            dp[j] = ds * x[j];
            x[j] = ds * y[j];
          }
        } else {
          const T* g = c.cap > 0 ? x : scales;  // dS's factor w.r.t. q.k: the scale, or soft_cap's derivative
#pragma omp simd
          for (int j = 0; j < BK; ++j) {
            const T pj = vexp(s[j] * esc - L);
            s[j] = pj;
            dp[j] = pj * (dp[j] - dl) * g[j];
          }
        }
      }
      std::fill(S + nq * BK, S + Mq * BK, T(0));
      std::fill(DP + nq * BK, DP + Mq * BK, T(0));
      std::fill(X + nq * BK, X + Mq * BK, T(0));
      KRange qrows[BQ / MR], krows[BK / MR];
      if (mask) mask_ranges(c, b, qb, kt, qp, nq, kp, nk, qrows, krows);
      const KRange *qr = mask ? qrows : nullptr, *kr = mask ? krows : nullptr;
      gemm<T, true>(BK, Dvp, Mq, S, 1, BK, DO, Dvp, dV, Dvp, kr);          // dV += P^T dO
      gemm<T, true>(BK, Da, Mq, DP, 1, BK, Q, Dp, dK, Dp, kr);             // dK += dS^T Q
      gemm<T, true>(Mq, Da, BK, DP, BK, 1, KR, Dp, gq + i0 * Dp, Dp, qr);  // dQ += dS K
      if (c.tapa) {
        gemm<T, true>(BK, Dp - Da, Mq, X, 1, BK, Q + Da, Dp, dK + Da, Dp, kr);
        gemm<T, true>(Mq, Dp - Da, BK, X, BK, 1, KR + Da, Dp, gq + i0 * Dp + Da, Dp, qr);
      }
    }
    std::copy(dK, dK + BK * Dp, c.gk + ((b * dm.H + h) * c.Lkp + kt * BK) * Dp);
    for (int j = 0; j < nk; ++j)
      std::copy(dV + j * Dvp, dV + j * Dvp + dm.Dv, dvh + ((b * dm.Lk + kt * BK + j) * dm.H + h) * dm.Dv);
  }
  if (c.dslope) c.dslope[item] = dslope_acc;
}

// Gradients w.r.t. the encoded rows of one (batch, head) back to dq, dk (per query head) and FoPE's dA, dB.
template <class T>
FPE_CPU_CLONES void decode_head(const Plan<T>& c, int64_t task, const T* q, const T* k, T* dq, T* dkh, T* dA_all,
                                T* dB_all, T* scratch) {
  const Dims& dm = c.dm;
  const int64_t b = task / dm.H, h = task % dm.H, hk = h / dm.G, ht = c.table_head(h), Dp = c.Dp;
  const int64_t P = c.p.npairs, dk = c.p.fope_dk;
  T *g = scratch, *dc = g + Dp, *ds = dc + P;
  T* dA = dA_all ? dA_all + task * dk * P : nullptr;
  T* dB = dB_all ? dB_all + task * dk * P : nullptr;
  for (int64_t t = 0; t < dm.Lq; ++t) {
    std::fill(g, g + Dp, T(0));
    for (int64_t sh = 0; sh < c.nsplit; ++sh) {
      const T* gs = c.gq + (((sh * dm.B + b) * dm.H + h) * c.Lqp + t) * Dp;
      for (int64_t d = 0; d < Dp; ++d) g[d] += gs[d];
    }
    const int64_t r = c.qrow ? c.qrow[(c.qpos_batched ? b : 0) * dm.Lq + t] : 0;
    decode_row<T>(c, g, q + ((b * dm.Lq + t) * dm.H + h) * dm.D, r, ht, dq + ((b * dm.Lq + t) * dm.H + h) * dm.D, dA,
                  dB, dc, ds);
  }
  for (int64_t t = 0; t < dm.Lk; ++t) {
    const int64_t r = c.krow ? c.krow[(c.kpos_batched ? b : 0) * dm.Lk + t] : 0;
    decode_row<T>(c, c.gk + ((b * dm.H + h) * c.Lkp + t) * Dp, k + ((b * dm.Lk + t) * dm.Hkv + hk) * dm.D, r, ht,
                  dkh + ((b * dm.Lk + t) * dm.H + h) * dm.D, dA, dB, dc, ds);
  }
}

// ---- launchers ----------------------------------------------------------------------------------------------------
// Plan::aref: per batch of positions, a binary search per query when the keys ascend (the usual case), else a scan.
template <class T>
void nearest_key_distances(Plan<T>& c, const int64_t* qp, int64_t Bq, const int64_t* kp, int64_t Bk) {
  const Dims& dm = c.dm;
  const int64_t Br = std::max(Bq, Bk);
  c.aref_batched = Br > 1;
  c.aref.assign(Br * c.Lqp, 0);
  for (int64_t b = 0; b < Br; ++b) {
    const int64_t *Q = qp + (Bq > 1 ? b : 0) * dm.Lq, *K = kp + (Bk > 1 ? b : 0) * dm.Lk, *Ke = K + dm.Lk;
    int64_t* r = c.aref.data() + b * c.Lqp;
    if (dm.Lk == 0) continue;
    const bool ascending = std::is_sorted(K, Ke);
    for (int64_t i = 0; i < dm.Lq; ++i) {
      const int64_t x = Q[i];
      int64_t best = std::numeric_limits<int64_t>::max();
      if (ascending) {
        const int64_t* it = std::upper_bound(K, Ke, x);  // the first key after x
        if (it != K) best = x - it[-1];
        if (!c.causal && it != Ke) best = std::min(best, *it - x);
      } else {
        for (const int64_t* k = K; k != Ke; ++k)
          if (!c.causal || *k <= x) best = std::min(best, int_distance(x, *k));
      }
      r[i] = best == std::numeric_limits<int64_t>::max() ? 0 : best;
    }
  }
}

// Geometry, padded positions, block summaries, table rows and the operand buffers; `keep` owns the memory.
template <class T>
Plan<T> make_plan(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_pos,
                  const at::Tensor& k_pos, const EncParams& p, const ScoreOpts& o, bool backward, int nthreads,
                  std::vector<at::Tensor>& keep) {
  Plan<T> c;
  Dims& dm = c.dm;
  dm.B = q.size(0); dm.Lq = q.size(1); dm.H = q.size(2); dm.D = q.size(3);
  dm.Lk = k.size(1); dm.Hkv = k.size(2); dm.Dv = v.size(3); dm.G = dm.H / dm.Hkv;
  c.p = p;
  c.causal = o.causal;
  if (o.causal) c.dlo = 0;
  if (o.window_right >= 0) c.dlo = std::max(c.dlo, -o.window_right);
  if (o.window_left >= 0) c.dhi = o.window_left;
  c.cap = static_cast<T>(o.softcap);
  c.scale = static_cast<T>(o.scale);
  c.tapa = p.kind == ENC_TAPA;
  const int64_t W = kW<T>;
  c.split = c.tapa ? p.tapa_split : dm.D;
  c.Da = round_up(c.split, W);
  c.Dp = c.Da + round_up(dm.D - c.split, W);
  if (!c.tapa) c.Da = c.Dp;
  c.Dvp = round_up(dm.Dv, W);
  c.nqb = (dm.Lq + BQ - 1) / BQ;
  c.nkt = (dm.Lk + BK - 1) / BK;
  c.Lqp = c.nqb * BQ;
  c.Lkp = c.nkt * BK;
  c.Hke = p.kind == ENC_FOPE ? dm.H : dm.Hkv;
  c.Ht = p.kind == ENC_FOPE ? dm.H : 1;
  const int64_t Bq = q_pos.size(0), Bk = k_pos.size(0);
  c.qpos_batched = Bq > 1;
  c.kpos_batched = Bk > 1;
  auto i64 = [&](const at::Tensor& t) {
    keep.push_back(t.contiguous());
    return keep.back().data_ptr<int64_t>();
  };
  c.qpos = i64(at::constant_pad_nd(q_pos, {0, c.Lqp - dm.Lq}, 0));
  c.kpos = i64(at::constant_pad_nd(k_pos, {0, c.Lkp - dm.Lk}, 0));
  const int64_t *qp = q_pos.data_ptr<int64_t>(), *kp = k_pos.data_ptr<int64_t>();
  if (q_pos.numel() > 0 && k_pos.numel() > 0) {  // distances: see Plan::kposd
    const int64_t lo = std::min(*std::min_element(qp, qp + q_pos.numel()), *std::min_element(kp, kp + k_pos.numel()));
    const int64_t hi = std::max(*std::max_element(qp, qp + q_pos.numel()), *std::max_element(kp, kp + k_pos.numel()));
    c.pos_base = lo;
    c.wide = static_cast<uint64_t>(hi) - static_cast<uint64_t>(lo) >= (uint64_t(1) << 53);
  }
  keep.push_back((keep.back() - c.pos_base).to(at::kDouble));
  c.kposd = keep.back().data_ptr<double>();
  if (p.kind == ENC_ALIBI) nearest_key_distances(c, qp, Bq, kp, Bk);
  c.qmin.assign(Bq * c.nqb, std::numeric_limits<int64_t>::max());
  c.qmax.assign(Bq * c.nqb, std::numeric_limits<int64_t>::min());
  c.kmin.assign(Bk * c.nkt, std::numeric_limits<int64_t>::max());
  c.kmax.assign(Bk * c.nkt, std::numeric_limits<int64_t>::min());
  c.qasc.assign(Bq * c.nqb, 1);
  c.kasc.assign(Bk * c.nkt, 1);
  for (int64_t i = 0; i < Bq * dm.Lq; ++i) {
    const int64_t blk = i / dm.Lq * c.nqb + i % dm.Lq / BQ;
    c.qmin[blk] = std::min(c.qmin[blk], qp[i]);
    c.qmax[blk] = std::max(c.qmax[blk], qp[i]);
    if (i % dm.Lq % BQ != 0 && qp[i] < qp[i - 1]) c.qasc[blk] = 0;
  }
  for (int64_t i = 0; i < Bk * dm.Lk; ++i) {
    const int64_t tile = i / dm.Lk * c.nkt + i % dm.Lk / BK;
    c.kmin[tile] = std::min(c.kmin[tile], kp[i]);
    c.kmax[tile] = std::max(c.kmax[tile], kp[i]);
    if (i % dm.Lk % BK != 0 && kp[i] < kp[i - 1]) c.kasc[tile] = 0;
  }
  auto opts = q.options();
  auto buf = [&](int64_t n) {  // the preparation writes every element, padding included (dQ: its work item)
    keep.push_back(at::empty({n}, opts));
    return keep.back().data_ptr<T>();
  };
  if (is_rotation(p.kind)) {  // one table row per distinct position when they span a short range (the usual case)
    const int64_t nqp = Bq * dm.Lq, nkp = Bk * dm.Lk;
    int64_t lo = std::numeric_limits<int64_t>::max(), hi = std::numeric_limits<int64_t>::min();
    for (int64_t i = 0; i < nqp; ++i) lo = std::min(lo, qp[i]), hi = std::max(hi, qp[i]);
    for (int64_t i = 0; i < nkp; ++i) lo = std::min(lo, kp[i]), hi = std::max(hi, kp[i]);
    at::Tensor tpos, qrow, krow;
    if (nqp + nkp > 0 && static_cast<uint64_t>(hi) - static_cast<uint64_t>(lo) < static_cast<uint64_t>(nqp + nkp)) {
      tpos = at::arange(lo, hi + 1, q_pos.options());
      qrow = q_pos - lo;
      krow = k_pos - lo;
    } else {
      tpos = at::cat({q_pos.flatten(), k_pos.flatten()});
      qrow = at::arange(nqp, q_pos.options());
      krow = at::arange(nqp, nqp + nkp, q_pos.options());
    }
    c.ntab = tpos.numel();
    c.tpos = i64(tpos);
    c.qrow = i64(qrow);
    c.krow = i64(krow);
    c.tc = buf(c.ntab * c.Ht * p.npairs);
    c.ts = buf(c.ntab * c.Ht * p.npairs);
    if (p.kind == ENC_FOPE) {
      c.bc = buf(c.ntab * p.fope_dk);
      c.bs = buf(c.ntab * p.fope_dk);
    }
  }
  if (c.tapa && dm.Lq > 0 && dm.Lk > 0) {
    const int64_t qlo = *std::min_element(qp, qp + Bq * dm.Lq), qhi = *std::max_element(qp, qp + Bq * dm.Lq);
    const int64_t klo = *std::min_element(kp, kp + Bk * dm.Lk), khi = *std::max_element(kp, kp + Bk * dm.Lk);
    const __int128 lo = static_cast<__int128>(klo) - qhi, n = static_cast<__int128>(khi) - qlo - lo + 1 + BK;
    if (n <= 4 * (dm.Lq + dm.Lk + BK)) {  // (+ BK: a run may read past the last key of a tile)
      c.nomega = static_cast<int64_t>(n);
      c.omega = buf(c.nomega);
      c.omega_lo = static_cast<int64_t>(lo);
      c.kcontig.assign(Bk * c.nkt, 1);
      for (int64_t i = 0; i < Bk * dm.Lk; ++i)
        if (i % dm.Lk % BK != 0 && static_cast<uint64_t>(kp[i]) - static_cast<uint64_t>(kp[i - 1]) != 1)
          c.kcontig[i / dm.Lk * c.nkt + i % dm.Lk / BK] = 0;
    }
  }
  c.qe = buf(dm.B * dm.H * c.Lqp * c.Dp);
  c.kt = buf(dm.B * c.Hke * c.Lkp * c.Dp);
  if (!backward) {
    c.ve = buf(dm.B * dm.Hkv * c.Lkp * c.Dvp);
  } else {
    // a head's key tiles go to several work items (each with its own dQ) only when heads are too few to share
    const int64_t tasks = dm.B * dm.H;
    c.nsplit = std::max<int64_t>(1, std::min<int64_t>(c.nkt, (2 * nthreads + tasks - 1) / tasks));
    c.ke = buf(dm.B * c.Hke * c.Lkp * c.Dp);
    c.vt = buf(dm.B * dm.Hkv * c.Lkp * c.Dvp);
    c.doe = buf(dm.B * dm.H * c.Lqp * c.Dvp);
    c.delta = buf(dm.B * dm.H * dm.Lq);
    c.gq = buf(c.nsplit * dm.B * dm.H * c.Lqp * c.Dp);
    c.gk = buf(dm.B * dm.H * c.Lkp * c.Dp);
  }
  return c;
}

// The per-call tables (rotations, TAPA's Omega), inside the launchers' parallel region; a barrier only if there are
// any. (Every barrier is a stall when the machine is oversubscribed; hence also dynamic schedules throughout: a
// running thread takes over the work of a descheduled one.)
template <class T>
void fill_tables(const Plan<T>& c) {
#pragma omp for schedule(dynamic, 16) nowait
  for (int64_t r = 0; r < c.ntab; ++r) table_row<T>(c, r);
#pragma omp for schedule(dynamic, 256) nowait
  for (int64_t i = 0; i < c.nomega; ++i)
    c.omega[i] = tapa_omega<T>(c.p.tapa_phase_scale, c.p.tapa_alpha, 0, c.omega_lo + i);
  if (c.ntab + c.nomega > 0) {
#pragma omp barrier
  }
}

template <class T>
T* thread_scratch(at::Tensor& all) {
  return all.data_ptr<T>() + omp_get_thread_num() * all.size(1);
}

// Inside a parallel region: encoding tables, then q blocks, k tiles and v tiles in the kernels' layouts.
// Ends with a barrier: every operand is ready for the attention loops.
template <class T>
void prepare_operands(const Plan<T>& c, const T* qd, const T* kd, const T* vd, T* mine) {
  const Dims& dm = c.dm;
  fill_tables<T>(c);
#pragma omp for schedule(dynamic, 1) nowait
  for (int64_t item = 0; item < dm.B * dm.H * c.nqb; ++item) prep_q_block<T>(c, qd, item);
#pragma omp for schedule(dynamic, 1) nowait
  for (int64_t item = 0; item < dm.B * c.Hke * c.nkt; ++item) prep_k_tile<T>(c, kd, item, mine);
#pragma omp for schedule(dynamic, 1)
  for (int64_t item = 0; item < dm.B * dm.Hkv * c.nkt; ++item) prep_v_tile<T>(c, vd, item, mine);
}

template <class T>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_pos,
                  const at::Tensor& k_pos, const EncParams& p, const ScoreOpts& o, T* out, T* lse) {
  const int nth = at::get_num_threads();
  std::vector<at::Tensor> keep;
  const Plan<T> c = make_plan<T>(q, k, v, q_pos, k_pos, p, o, false, nth, keep);
  at::Tensor scratch = at::empty({nth, round_up(forward_scratch(c), 16)}, q.options());
  const T *qd = q.data_ptr<T>(), *kd = k.data_ptr<T>(), *vd = v.data_ptr<T>();
  const Dims& dm = c.dm;
#pragma omp parallel num_threads(nth)
  {
    T* mine = thread_scratch<T>(scratch);
    prepare_operands<T>(c, qd, kd, vd, mine);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < dm.B * dm.H * c.nqb; ++item) forward_block<T>(c, item, mine, out, lse);
  }
}

template <class T>
void backward_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& out, const T* lse, const at::Tensor& q_pos, const at::Tensor& k_pos,
                   const EncParams& p, const ScoreOpts& o, T* dq, T* dkh, T* dvh, T* dA, T* dB, at::Tensor* dslopes) {
  const int nth = at::get_num_threads();
  std::vector<at::Tensor> keep;
  Plan<T> c = make_plan<T>(q, k, v, q_pos, k_pos, p, o, true, nth, keep);
  at::Tensor dslope_parts;
  if (dslopes != nullptr) {
    dslope_parts = at::zeros({c.dm.B * c.dm.H, c.nsplit}, q.options().dtype(at::kDouble));
    c.dslope = dslope_parts.data_ptr<double>();
  }
  at::Tensor scratch = at::empty({nth, round_up(backward_scratch(c), 16)}, q.options());
  const T *qd = q.data_ptr<T>(), *kd = k.data_ptr<T>(), *vd = v.data_ptr<T>();
  const T *dod = dout.data_ptr<T>(), *od = out.data_ptr<T>();
  const Dims& dm = c.dm;
  // the last work item of a (batch, head) to finish decodes its gradients (no barrier before the decode)
  std::unique_ptr<std::atomic<int64_t>[]> left(new std::atomic<int64_t>[dm.B * dm.H]);
  for (int64_t t = 0; t < dm.B * dm.H; ++t) left[t] = c.nsplit;
#pragma omp parallel num_threads(nth)
  {
    T* mine = thread_scratch<T>(scratch);
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t item = 0; item < dm.B * dm.H * c.nqb; ++item) prep_do_block<T>(c, dod, od, item);
    prepare_operands<T>(c, qd, kd, vd, mine);  // ends with a barrier, which also covers dO
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < dm.B * dm.H * c.nsplit; ++item) {
      backward_item<T>(c, item, mine, lse, dvh);
      const int64_t task = item / c.nsplit;
      if (left[task].fetch_sub(1) == 1) decode_head<T>(c, task, qd, kd, dq, dkh, dA, dB, mine);
    }
  }
  if (dslopes != nullptr) *dslopes = dslope_parts.sum(1).view({c.dm.B, c.dm.H}).to(at::kFloat);
}

at::ScalarType compute_type(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

int cpu_vector_bytes() { return kVecBytes; }

std::tuple<at::Tensor, at::Tensor> cpu_forward(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                               const at::Tensor& q_pos_in, const at::Tensor& k_pos_in,
                                               const EncHolder& enc, const ScoreOpts& o) {
  const auto ct = compute_type(q_in);
  auto q = q_in.to(ct).contiguous(), k = k_in.to(ct).contiguous(), v = v_in.to(ct).contiguous();
  auto q_pos = q_pos_in.to(at::kLong).contiguous(), k_pos = k_pos_in.to(at::kLong).contiguous();
  const int64_t B = q.size(0), Lq = q.size(1), H = q.size(2), Dv = v.size(3);
  auto out = at::empty({B, Lq, H, Dv}, q.options());
  auto lse = at::empty({B, H, Lq}, q.options());
  if (ct == at::kDouble)
    forward_impl<double>(q, k, v, q_pos, k_pos, enc.p, o, out.data_ptr<double>(), lse.data_ptr<double>());
  else
    forward_impl<float>(q, k, v, q_pos, k_pos, enc.p, o, out.data_ptr<float>(), lse.data_ptr<float>());
  return {out.to(q_in.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpu_backward(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const at::Tensor& q_pos_in, const at::Tensor& k_pos_in,
    const EncHolder& enc, const ScoreOpts& o, bool want_coef_grad, at::Tensor* dslopes) {
  const auto ct = compute_type(q_in);
  auto q = q_in.to(ct).contiguous(), k = k_in.to(ct).contiguous(), v = v_in.to(ct).contiguous();
  auto dout = dout_in.to(ct).contiguous(), out = out_in.to(ct).contiguous(), lse = lse_in.to(ct).contiguous();
  auto q_pos = q_pos_in.to(at::kLong).contiguous(), k_pos = k_pos_in.to(at::kLong).contiguous();
  const int64_t B = q.size(0), Lq = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t Lk = k.size(1), Hkv = k.size(2), Dv = v.size(3), G = H / Hkv;
  auto dq = at::empty({B, Lq, H, D}, q.options());
  auto dkh = at::empty({B, Lk, H, D}, q.options());
  auto dvh = at::empty({B, Lk, H, Dv}, q.options());
  const bool coef = want_coef_grad && enc.p.kind == ENC_FOPE;
  at::Tensor dA, dB;
  if (coef) {
    dA = at::zeros({B, H, enc.p.fope_dk, enc.p.npairs}, q.options());
    dB = at::zeros({B, H, enc.p.fope_dk, enc.p.npairs}, q.options());
  }
  if (ct == at::kDouble)
    backward_impl<double>(dout, q, k, v, out, lse.data_ptr<double>(), q_pos, k_pos, enc.p, o, dq.data_ptr<double>(),
                          dkh.data_ptr<double>(), dvh.data_ptr<double>(), coef ? dA.data_ptr<double>() : nullptr,
                          coef ? dB.data_ptr<double>() : nullptr, dslopes);
  else
    backward_impl<float>(dout, q, k, v, out, lse.data_ptr<float>(), q_pos, k_pos, enc.p, o, dq.data_ptr<float>(),
                         dkh.data_ptr<float>(), dvh.data_ptr<float>(), coef ? dA.data_ptr<float>() : nullptr,
                         coef ? dB.data_ptr<float>() : nullptr, dslopes);
  const auto dt = q_in.scalar_type();
  auto dk = G == 1 ? dkh : dkh.view({B, Lk, Hkv, G, D}).sum(3);
  auto dv = G == 1 ? dvh : dvh.view({B, Lk, Hkv, G, Dv}).sum(3);
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
