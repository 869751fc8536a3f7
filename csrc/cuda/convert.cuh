// float <-> input dtype conversions shared by the scalar kernels and the encode/decode prologue (the tensor-core
// kernels use tile.cuh's Elem<X>, which also packs pairs).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fused_posenc {

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename X> __device__ __forceinline__ X from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

}  // namespace fused_posenc
