// The torch-free entry points of attention_kernels.h: pick the tensor-core or the scalar kernels, run the rotation
// prologue (encoded copies of q and k) before them and the decode (transposed rotation, FoPE coefficient gradients)
// after the backward.
#include <cuda_runtime.h>

#include <cstdint>

#include "launchers.h"

namespace fused_posenc {
namespace {

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// 16-byte cp.async rows: every row start of every operand 16-byte aligned
bool vector_loads_ok(const CudaAttnArgs& a, bool backward) {
  const bool rot = a.q_enc != nullptr;
  return a.D % 8 == 0 && a.Dv % 8 == 0 && aligned16(rot ? a.q_enc : a.q) && aligned16(rot ? a.k_enc : a.k) &&
         aligned16(a.v) && (!backward || aligned16(a.dout));
}

// rotary / FoPE: q_enc, k_enc <- encoded q, k (required by the tensor-core kernels, optional for the scalar ones)
int encode_inputs(const CudaAttnArgs& a, const EncParams& p, void* stream) {
  if (!is_rotation(p.kind)) return 0;
  if (a.q_enc == nullptr || a.k_enc == nullptr) return attention_uses_tensor_cores(a) ? (int)cudaErrorInvalidValue : 0;
  int e = encode_rows(a.dtype, a.q, a.q_enc, a.q_pos, a.qpos_bs, a.B, a.Lq, a.H, a.H, a.D, p, stream);
  if (e != 0) return e;
  return encode_rows(a.dtype, a.k, a.k_enc, a.k_pos, a.kpos_bs, a.B, a.Lk, a.Hkv, encoded_k_heads(p.kind, a.H, a.Hkv),
                     a.D, p, stream);
}

}  // namespace

bool attention_uses_tensor_cores(const CudaAttnArgs& a) {
  return (a.dtype == DT_F16 || a.dtype == DT_BF16) && padded_head_dim(a.D, a.Dv) != 0;
}

size_t attention_smem_bytes(const CudaAttnArgs& a, bool backward) {
  if (!attention_uses_tensor_cores(a)) return scalar_smem_bytes(a, backward);
  const int hd = padded_head_dim(a.D, a.Dv);
  return backward ? tc_backward_smem_bytes(hd) : tc_forward_smem_bytes(hd);
}

int launch_attention_forward(const CudaAttnArgs& a, const EncParams& p, void* stream) {
  int e = encode_inputs(a, p, stream);
  if (e != 0) return e;
  if (attention_uses_tensor_cores(a)) return tc_forward(a, p, stream, vector_loads_ok(a, false));
  return scalar_forward(a, p, stream);
}

int launch_attention_backward(const CudaAttnArgs& a, const EncParams& p, void* stream) {
  int e = encode_inputs(a, p, stream);
  if (e != 0) return e;
  e = attention_uses_tensor_cores(a) ? tc_backward(a, p, stream, vector_loads_ok(a, true))
                                     : scalar_backward_main(a, p, stream);
  if (e != 0) return e;
  e = decode_rows(a.dtype, a.dq_rot, a.q, a.dq, a.q_pos, a.qpos_bs, a.B, a.Lq, a.H, a.H, a.D, p, a.dcos, a.dsin,
                  stream);
  if (e != 0) return e;
  return decode_rows(a.dtype, a.dk_rot, a.k, a.dk_h, a.k_pos, a.kpos_bs, a.B, a.Lk, a.H, a.Hkv, a.D, p, a.dcos,
                     a.dsin, stream);
}

}  // namespace fused_posenc
