// Tensor-core and copy primitives of the fp16/bf16 kernels (sm_80+): mma.sync m16n8k16, ldmatrix, cp.async.
// Fragment layouts are derived in csrc/cuda/README.md; the short version, lane = 4 g + t (g = lane / 4, t = lane % 4):
//   A 16x16 (row-major, 4 x b32): a0 (g, 2t..2t+1)  a1 (g+8, 2t..)  a2 (g, 2t+8..)  a3 (g+8, 2t+8..)
//   B 16x8  ("col", 2 x b32):     b0 (k 2t..2t+1, n g)  b1 (k 2t+8..2t+9, n g)
//   C 16x8  (4 x f32):            c0, c1 (g, 2t..2t+1)  c2, c3 (g+8, 2t..2t+1)
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fused_posenc {
namespace tc {

// ---- 16-bit element types ------------------------------------------------------------------------
template <typename X> struct Elem;
template <> struct Elem<__half> {
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ __forceinline__ static float to_f(__half x) { return __half2float(x); }
  __device__ __forceinline__ static __half from_f(float x) { return __float2half_rn(x); }
};
template <> struct Elem<__nv_bfloat16> {
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ __forceinline__ static float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ __forceinline__ static __nv_bfloat16 from_f(float x) { return __float2bfloat16_rn(x); }
};

// D += A B, fp32 accumulators. X selects the f16 or bf16 instruction.
template <typename X>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i receives matrix i
// (lane 4g + t: row g, columns 2t, 2t+1; with .trans: rows 2t, 2t+1 of column g).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row_ptr)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row_ptr)));
}

// Two 8x8 matrices (.trans): lanes 0-7 / 8-15 give the row addresses of matrix 0 / 1 (lanes 16-31: ignored, kept
// valid by the callers).
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(row_ptr)));
}

// 16-byte global -> shared copy that bypasses L1; src_bytes = 0 writes 16 zero bytes (out-of-range rows, padding).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

// Keep the 16-bit halves of r whose column (col for the low half, col + 1 for the high half) is below `split`.
__device__ __forceinline__ uint32_t keep_below(uint32_t r, int col, int split) {
  const uint32_t m = (col < split ? 0x0000ffffu : 0u) | (col + 1 < split ? 0xffff0000u : 0u);
  return r & m;
}

// Row reductions over the 4 lanes (t = 0..3) that share a fragment row g.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// ---- a [rows, kHD] tile of 16-bit rows in shared memory --------------------------------------------
// Layout: row r at r * (kHD + 8) elements. The 8-element (16-byte) pad makes the row stride an odd number of
// 16-byte chunks, so the 8 row addresses of every ldmatrix phase (8 rows, same column chunk) fall in 8
// distinct 16-byte bank groups: no bank conflicts for ldmatrix (plain or .trans) nor for the cp.async stores.
template <int kHD> struct RowTile {
  static constexpr int kStride = kHD + 8;
};

// Copy rows [r0, r0 + ROWS) of a strided global matrix (row r at src + r * row_stride, `ncols` valid columns) into a
// RowTile; rows >= nrows and columns >= ncols become 0. vec: 16-byte cp.async (needs ncols % 8 == 0 and 16-byte
// aligned rows), else plain element loads (synchronous).
template <typename X, int ROWS, int kHD, int NT>
__device__ __forceinline__ void load_rows(X* dst, const X* src, int64_t row_stride, int nrows, int ncols, bool vec) {
  constexpr int kChunks = kHD / 8;
  constexpr int kStride = RowTile<kHD>::kStride;
  if (vec) {
    for (int idx = threadIdx.x; idx < ROWS * kChunks; idx += NT) {
      const int r = idx / kChunks, c = idx % kChunks;
      const bool ok = r < nrows && c * 8 < ncols;
      const X* s = ok ? src + (int64_t)r * row_stride + c * 8 : src;
      cp_async_16(dst + r * kStride + c * 8, s, ok);
    }
  } else {
    for (int idx = threadIdx.x; idx < ROWS * kHD; idx += NT) {
      const int r = idx / kHD, c = idx % kHD;
      dst[r * kStride + c] = (r < nrows && c < ncols) ? src[(int64_t)r * row_stride + c] : Elem<X>::from_f(0.f);
    }
  }
}

}  // namespace tc
}  // namespace fused_posenc
