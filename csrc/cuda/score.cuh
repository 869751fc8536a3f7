// What the tensor-core kernels share besides the mma primitives: the score epilogue of every encoding (ALiBi bias,
// TAPA modulation) from encoding_math.h, block reductions of positions, and the 1-D grid decomposition.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "attention_kernels.h"
#include "fused_posenc/encoding_math.h"

namespace fused_posenc {
namespace tc {

constexpr float kLog2e = 1.4426950408889634f;

// Per-block constants of the score of one (batch, query head).
struct ScoreCtx {
  int kind;
  float scale;
  float slope;         // ALiBi
  int split;           // TAPA: amplitude columns [0, split), phase columns [split, D)
  double phase_scale;  // TAPA
  double alpha;        // TAPA
};

__device__ __forceinline__ ScoreCtx make_score_ctx(const CudaAttnArgs& a, const EncParams& p, int b, int h) {
  ScoreCtx c;
  c.kind = p.kind;
  c.scale = a.scale;
  c.slope = p.kind == ENC_ALIBI ? p.slopes[(p.slopes_batch > 1 ? b : 0) * a.H + h] : 0.f;
  c.split = p.kind == ENC_TAPA ? p.tapa_split : a.D;
  c.phase_scale = p.tapa_phase_scale;
  c.alpha = p.tapa_alpha;
  return c;
}

// The score from the raw dot products (acc: q.k, or TAPA's qA.kA; dot: TAPA's qP.kP), as the scalar kernel's
// score_elem (kTapa: c.kind == ENC_TAPA); amp returns TAPA's amplitude (needed by the backward).
template <bool kTapa>
__device__ __forceinline__ float finish_score(const ScoreCtx& c, float acc, float dot, int64_t qp, int64_t kp,
                                              float& amp, float& omega) {
  if constexpr (kTapa) {
    amp = acc * c.scale;
    omega = tapa_omega<float>(c.phase_scale, c.alpha, qp, kp);
    return tapa_score<float>(amp, omega, dot);
  }
  float s = acc * c.scale;
  if (c.kind == ENC_ALIBI) s += alibi_bias<float>(c.slope, qp, kp);
  return s;
}

// Block-wide min / max of one value per thread (NT threads, NT / 32 warps); every thread gets the result.
template <int NT, bool kMax>
__device__ __forceinline__ long long block_reduce_ll(long long v, long long* scratch /* [NT / 32] */) {
  for (int o = 16; o > 0; o >>= 1) {
    const long long w = __shfl_xor_sync(0xffffffffu, v, o);
    v = kMax ? (w > v ? w : v) : (w < v ? w : v);
  }
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  v = scratch[0];
  for (int i = 1; i < NT / 32; ++i) v = kMax ? (scratch[i] > v ? scratch[i] : v) : (scratch[i] < v ? scratch[i] : v);
  __syncthreads();
  return v;
}

// 1-D grid: block id = tile + ntiles * (b * H + h); tiles of one head are adjacent (their K/V or Q/dO share L2).
struct TileHead {
  int tile, b, h, hk;
};
__device__ __forceinline__ TileHead decompose_block(int ntiles, int H, int Hkv) {
  const int64_t bid = blockIdx.x;
  TileHead t;
  t.tile = (int)(bid % ntiles);
  const int64_t bh = bid / ntiles;
  t.b = (int)(bh / H);
  t.h = (int)(bh % H);
  t.hk = t.h / (H / Hkv);
  return t;
}

// Where the attention kernels read q and k: the prologue's encoded copies for rotary / FoPE, else the inputs.
struct QKSource {
  const void* q;
  const void* k;
  int k_heads;  // heads of the k source
  int k_head;   // this block's head in it
};
__device__ __forceinline__ QKSource qk_source(const CudaAttnArgs& a, const EncParams& p, int h, int hk) {
  QKSource s;
  if (is_rotation(p.kind)) {
    s.q = a.q_enc;
    s.k = a.k_enc;
    s.k_heads = encoded_k_heads(p.kind, a.H, a.Hkv);
    s.k_head = p.kind == ENC_FOPE ? h : hk;
  } else {
    s.q = a.q;
    s.k = a.k;
    s.k_heads = a.Hkv;
    s.k_head = hk;
  }
  return s;
}

}  // namespace tc
}  // namespace fused_posenc
