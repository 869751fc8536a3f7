// Torch-free interface of the CUDA kernels (raw pointers, contiguous layouts) used by the torch glue.
#pragma once

#include <cstddef>
#include <cstdint>

#include "fused_posenc/encoding_math.h"

namespace fused_posenc {

enum DType : int { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };

struct CudaAttnArgs {
  int dtype = DT_F32;
  // q (B, Lq, H, D), k (B, Lk, Hkv, D), v (B, Lk, Hkv, Dv), out/dout (B, Lq, H, Dv): contiguous, input dtype
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;            // (B, H, Lq)
  const int64_t* q_pos = nullptr;  // (Bp, Lq)
  const int64_t* k_pos = nullptr;  // (Bp, Lk)
  int64_t qpos_bs = 0, kpos_bs = 0;
  int B = 0, Lq = 0, Lk = 0, H = 0, Hkv = 0, D = 0, Dv = 0;
  float scale = 1.f;
  bool causal = false;
  // backward only
  const void* dout = nullptr;
  const float* delta = nullptr;    // (B, Lq, H) rowsum(dout * out)
  float* dq_rot = nullptr;         // (B, Lq, H, D) fp32, zeroed: gradient w.r.t. the encoded q
  float* dk_rot = nullptr;         // (B, Lk, H, D) fp32: gradient w.r.t. the encoded k, per query head
  float* dv_h = nullptr;           // (B, Lk, H, Dv) fp32, per query head
  float* dq = nullptr;             // (B, Lq, H, D) fp32 outputs of the decode step
  float* dk_h = nullptr;           // (B, Lk, H, D) fp32
  float* dcos = nullptr;           // (H, Dk, P) fp32, zeroed; null unless FoPE coefficient grads are wanted
  float* dsin = nullptr;
};

// Dynamic shared memory of one block of the forward (backward = false) or backward kernel, in bytes.
size_t attention_smem_bytes(const CudaAttnArgs& a, bool backward);

// Both return a cudaError_t as int (0 = success). `stream` is a cudaStream_t.
int launch_attention_forward(const CudaAttnArgs& a, const EncParams& p, void* stream);
int launch_attention_backward(const CudaAttnArgs& a, const EncParams& p, void* stream);

}  // namespace fused_posenc
