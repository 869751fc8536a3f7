// The rotations outside the attention kernels, once per call: encode_rows writes the rotary / FoPE-encoded copy of
// q or k (FoPE's Fourier basis once per row, shared by all pairs), decode_rows takes a gradient w.r.t. the encoded
// rows back through the transposed rotation and reduces FoPE's coefficient gradients over a block of rows in shared
// memory before one atomic per coefficient per block. All math from encoding_math.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "convert.cuh"
#include "launchers.h"

namespace fused_posenc {
namespace {

constexpr int kThreads = 128;

// Blocks: (head hy, chunk of R consecutive (b, t) rows), head fastest. Shared memory (floats):
//   ck, sk [R][Dk] (FoPE basis) | dcs, dss [R][P] (decode with coefficient grads)
struct RowChunk {
  int h;
  int64_t row0;
};
__device__ __forceinline__ RowChunk row_chunk(int H, int R) {
  RowChunk c;
  c.h = (int)(blockIdx.x % H);
  c.row0 = (int64_t)(blockIdx.x / H) * R;
  return c;
}

// FoPE basis cos / sin(omega_k pos) of the chunk's rows; rows past the end get 0
__device__ void chunk_basis(const EncParams& p, const int64_t* pos, int64_t pos_bs, int L, int64_t row0, int64_t nrows,
                            int R, float* ck, float* sk) {
  const int dk = p.fope_dk;
  for (int idx = threadIdx.x; idx < R * dk; idx += blockDim.x) {
    const int r = idx / dk, kk = idx % dk;
    const int64_t row = row0 + r;
    if (row < nrows) {
      const int64_t t = row % L, b = row / L;
      fope_basis<float>(pos[b * pos_bs + t], 1, p.fope_turns + 2 * kk, ck + idx, sk + idx);
    } else {
      ck[idx] = 0.f;
      sk[idx] = 0.f;
    }
  }
}

// cos / sin table entry of pair j at row r of the chunk (head h)
__device__ __forceinline__ void pair_table(const EncParams& p, int64_t pos, int h, int j, const float* ck_r,
                                           const float* sk_r, float& c, float& s) {
  if (p.kind == ENC_ROTARY) {
    rotary_cos_sin<float>(pos, p.pair_turns + 2 * j, p.pair_scale[j], c, s);
  } else {
    const int64_t off = (int64_t)h * p.fope_dk * p.npairs;
    fope_cos_sin_basis<float>(j, p.fope_dk, p.npairs, ck_r, sk_r, p.fope_cos_coef + off, p.fope_sin_coef + off,
                              p.fope_pad, c, s);
  }
}

template <typename X>
__global__ void encode_kernel(const X* x, X* y, const int64_t* pos, int64_t pos_bs, int B, int L, int Hx, int Hy, int D,
                              EncParams p, int R) {
  extern __shared__ float sm[];
  const RowChunk ch = row_chunk(Hy, R);
  const int64_t nrows = (int64_t)B * L;
  const int hx = ch.h / (Hy / Hx), P = p.npairs;
  float* ck = sm;
  float* sk = ck + R * p.fope_dk;
  if (p.kind == ENC_FOPE) chunk_basis(p, pos, pos_bs, L, ch.row0, nrows, R, ck, sk);
  __syncthreads();
  const int tail = D - 2 * P;  // unpaired columns [2P, D) pass through
  for (int idx = threadIdx.x; idx < R * (P + tail); idx += blockDim.x) {
    const int r = idx / (P + tail), j = idx % (P + tail);
    const int64_t row = ch.row0 + r;
    if (row >= nrows) continue;
    const X* xr = x + (row * Hx + hx) * D;
    X* yr = y + (row * Hy + ch.h) * D;
    if (j >= P) {
      const int d = 2 * P + (j - P);
      yr[d] = xr[d];
      continue;
    }
    const int64_t t = row % L, b = row / L;
    float c, s;
    pair_table(p, pos[b * pos_bs + t], ch.h, j, ck + r * p.fope_dk, sk + r * p.fope_dk, c, s);
    const int i1 = (int)p.idx1[j], i2 = (int)p.idx2[j];
    float y1, y2;
    rotate_pair<float>(to_f(xr[i1]), to_f(xr[i2]), c, s, y1, y2);
    yr[i1] = from_f<X>(y1);
    yr[i2] = from_f<X>(y2);
  }
}

template <typename X>
__global__ void decode_kernel(const float* g, const X* x, float* dx, const int64_t* pos, int64_t pos_bs, int B, int L,
                              int H, int Hx, int D, EncParams p, float* dcos, float* dsin, int R) {
  extern __shared__ float sm[];
  const RowChunk ch = row_chunk(H, R);
  const int64_t nrows = (int64_t)B * L;
  const int hx = ch.h / (H / Hx), P = p.npairs, dk = p.fope_dk;
  if (!is_rotation(p.kind)) {
    for (int idx = threadIdx.x; idx < R * D; idx += blockDim.x) {
      const int64_t row = ch.row0 + idx / D;
      if (row < nrows) dx[(row * H + ch.h) * D + idx % D] = g[(row * H + ch.h) * D + idx % D];
    }
    return;
  }
  const bool coef = dcos != nullptr && p.kind == ENC_FOPE;
  float* ck = sm;                // [R][dk]
  float* sk = ck + R * dk;       // [R][dk]
  float* dcs = sk + R * dk;      // [R][P]
  float* dss = dcs + R * P;      // [R][P]
  if (p.kind == ENC_FOPE) chunk_basis(p, pos, pos_bs, L, ch.row0, nrows, R, ck, sk);
  __syncthreads();
  const int tail = D - 2 * P;
  for (int idx = threadIdx.x; idx < R * (P + tail); idx += blockDim.x) {
    const int r = idx / (P + tail), j = idx % (P + tail);
    const int64_t row = ch.row0 + r;
    const bool in = row < nrows;
    if (j >= P) {
      const int d = 2 * P + (j - P);
      if (in) dx[(row * H + ch.h) * D + d] = g[(row * H + ch.h) * D + d];
      continue;
    }
    float dc = 0.f, ds = 0.f;
    if (in) {
      const float* gr = g + (row * H + ch.h) * D;
      const int64_t t = row % L, b = row / L;
      float c, s;
      pair_table(p, pos[b * pos_bs + t], ch.h, j, ck + r * dk, sk + r * dk, c, s);
      const int i1 = (int)p.idx1[j], i2 = (int)p.idx2[j];
      float h1, h2;
      rotate_pair_t<float>(gr[i1], gr[i2], c, s, h1, h2);
      dx[(row * H + ch.h) * D + i1] = h1;
      dx[(row * H + ch.h) * D + i2] = h2;
      if (coef && p.fope_pad[j] == 0.f) {
        const X* xr = x + (row * Hx + hx) * D;
        rotate_pair_dtables<float>(to_f(xr[i1]), to_f(xr[i2]), gr[i1], gr[i2], dc, ds);
      }
    }
    if (coef) {
      dcs[r * P + j] = dc;
      dss[r * P + j] = ds;
    }
  }
  if (!coef) return;
  __syncthreads();
  // dcos[h, k, j] += sum_r cos(omega_k pos_r) dC[r, j]   (and sin / dS): a [dk, R] x [R, P] product per block
  for (int idx = threadIdx.x; idx < dk * P; idx += blockDim.x) {
    const int kk = idx / P, j = idx % P;
    float ac = 0.f, as = 0.f;
    for (int r = 0; r < R; ++r) {
      ac += ck[r * dk + kk] * dcs[r * P + j];
      as += sk[r * dk + kk] * dss[r * P + j];
    }
    const int64_t o = ((int64_t)ch.h * dk + kk) * P + j;
    if (ac != 0.f) atomicAdd(dcos + o, ac);
    if (as != 0.f) atomicAdd(dsin + o, as);
  }
}

// rows per block: up to 32, within 40 KiB of shared memory
int rows_per_block(int per_row_floats) {
  int r = 32;
  while (r > 1 && (size_t)r * per_row_floats * sizeof(float) > 40 * 1024) r /= 2;
  return r;
}

int64_t blocks_for(int64_t nrows, int R, int H) { return (nrows + R - 1) / R * H; }

template <typename X>
int encode_typed(const void* x, void* y, const int64_t* pos, int64_t pos_bs, int B, int L, int Hx, int Hy, int D,
                 const EncParams& p, cudaStream_t st) {
  const int per_row = p.kind == ENC_FOPE ? 2 * p.fope_dk : 0;
  const int R = rows_per_block(per_row);
  const int64_t blocks = blocks_for((int64_t)B * L, R, Hy);
  if (blocks == 0) return 0;
  if (blocks > 0x7fffffffLL) return (int)cudaErrorInvalidConfiguration;
  encode_kernel<X><<<(unsigned)blocks, kThreads, (size_t)R * per_row * sizeof(float), st>>>(
      static_cast<const X*>(x), static_cast<X*>(y), pos, pos_bs, B, L, Hx, Hy, D, p, R);
  return (int)cudaGetLastError();
}

template <typename X>
int decode_typed(const float* g, const void* x, float* dx, const int64_t* pos, int64_t pos_bs, int B, int L, int H,
                 int Hx, int D, const EncParams& p, float* dcos, float* dsin, cudaStream_t st) {
  const bool coef = dcos != nullptr && p.kind == ENC_FOPE;
  const int per_row = (p.kind == ENC_FOPE ? 2 * p.fope_dk : 0) + (coef ? 2 * p.npairs : 0);
  const int R = rows_per_block(per_row);
  const int64_t blocks = blocks_for((int64_t)B * L, R, H);
  if (blocks == 0) return 0;
  if (blocks > 0x7fffffffLL) return (int)cudaErrorInvalidConfiguration;
  decode_kernel<X><<<(unsigned)blocks, kThreads, (size_t)R * per_row * sizeof(float), st>>>(
      g, static_cast<const X*>(x), dx, pos, pos_bs, B, L, H, Hx, D, p, dcos, dsin, R);
  return (int)cudaGetLastError();
}

}  // namespace

int encode_rows(int dtype, const void* x, void* y, const int64_t* pos, int64_t pos_bs, int B, int L, int Hx, int Hy,
                int D, const EncParams& p, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DT_F16: return encode_typed<__half>(x, y, pos, pos_bs, B, L, Hx, Hy, D, p, st);
    case DT_BF16: return encode_typed<__nv_bfloat16>(x, y, pos, pos_bs, B, L, Hx, Hy, D, p, st);
    default: return encode_typed<float>(x, y, pos, pos_bs, B, L, Hx, Hy, D, p, st);
  }
}

int decode_rows(int dtype, const float* g, const void* x, float* dx, const int64_t* pos, int64_t pos_bs, int B, int L,
                int H, int Hx, int D, const EncParams& p, float* dcos, float* dsin, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DT_F16: return decode_typed<__half>(g, x, dx, pos, pos_bs, B, L, H, Hx, D, p, dcos, dsin, st);
    case DT_BF16: return decode_typed<__nv_bfloat16>(g, x, dx, pos, pos_bs, B, L, H, Hx, D, p, dcos, dsin, st);
    default: return decode_typed<float>(g, x, dx, pos, pos_bs, B, L, H, Hx, D, p, dcos, dsin, st);
  }
}

}  // namespace fused_posenc
