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
  // rotary / FoPE only (forward and backward): scratch for the per-call encoded copies, input dtype, written by the
  // prologue kernel: q_enc (B, Lq, H, D), k_enc (B, Lk, encoded_k_heads(kind, H, Hkv), D). Required when
  // is_rotation(kind): the attention kernels read the encoded copies, never rotate per tile.
  void* q_enc = nullptr;
  void* k_enc = nullptr;
};

// Heads of k_enc: FoPE's tables belong to query heads (coefficients (H, Dk, P)), rotary tables to no head.
FPE_HD int encoded_k_heads(int kind, int H, int Hkv) { return kind == ENC_FOPE ? H : Hkv; }

// True when launch_attention_* runs the tensor-core kernels (fp16/bf16, max(D, Dv) <= kMaxTensorCoreHeadDim),
// false for the scalar fp32-in-shared-memory kernels (fp32 inputs, larger head dims).
constexpr int kMaxTensorCoreHeadDim = 128;
bool attention_uses_tensor_cores(const CudaAttnArgs& a);

// Dynamic shared memory of one block of the forward (backward = false) or backward kernel, in bytes.
size_t attention_smem_bytes(const CudaAttnArgs& a, bool backward);

// Both return a cudaError_t as int (0 = success). `stream` is a cudaStream_t.
int launch_attention_forward(const CudaAttnArgs& a, const EncParams& p, void* stream);
int launch_attention_backward(const CudaAttnArgs& a, const EncParams& p, void* stream);

}  // namespace fused_posenc
