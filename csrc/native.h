// Torch-facing declarations shared by bindings.cpp, cpu/ and the CUDA glue.
#pragma once

#include <torch/extension.h>

#include <tuple>

#include "fused_posenc/encoding_math.h"

namespace fused_posenc {

// KernelParams as tensors (empty tensors for the fields an encoding does not use).
struct EncTensors {
  int64_t kind = ENC_NONE;
  at::Tensor idx1, idx2, pair_turns, pair_scale;           // rotary / fope pairs; (P, 2) int64 turn fractions
  at::Tensor pair_scale_f64;                               // float64 copy (set for float64 inputs)
  at::Tensor fope_turns, fope_cos_coef, fope_sin_coef, fope_pad;  // (Dk, 2) int64 turn fractions, ...
  at::Tensor slopes;                                       // (Bs, H)
  int64_t tapa_split = 0;
  double tapa_phase_scale = 1.0, tapa_alpha = 0.0;
};

// Contiguous copies of the parameter tensors on `device` (int64 indices and turns, float32 values) and their raw view.
struct EncHolder {
  EncTensors t;
  EncParams p;
};
EncHolder make_enc(const EncTensors& in, const at::Device& device, int64_t headdim, int64_t nheads, int64_t batch,
                   bool want_f64);

// width in bytes of the explicit vectors the CPU kernels use (64 AVX-512, 32 AVX2, 16 SSE)
int cpu_vector_bytes();

// What turns q.k into the softmax's scores, besides the encoding: key n is visible to query m iff (causal) k_pos[n]
// <= q_pos[m] and (window_left >= 0) q_pos[m] - k_pos[n] <= window_left and (window_right >= 0) k_pos[n] - q_pos[m]
// <= window_right; softcap > 0: the encoding's score s (scale applied) becomes softcap tanh(s / softcap), before
// ALiBi's bias. The bindings check the values (window bounds >= -1, softcap finite and >= 0).
struct ScoreOpts {
  bool causal = false;
  int64_t window_left = -1, window_right = -1;
  double softcap = 0;
  double scale = 1;
};

// forward: out (B, Lq, H, Dv) in q's dtype, lse (B, H, Lq) float32 (float64 for float64 inputs)
std::tuple<at::Tensor, at::Tensor> cpu_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const at::Tensor& q_pos, const at::Tensor& k_pos, const EncHolder& enc,
                                               const ScoreOpts& o);
// backward: dq, dk, dv (input dtype), dcos_coef, dsin_coef ((H, Dk, P) float32, empty unless want_coef_grad);
// dslopes (ALiBi, when not null): set to dL/dslopes (B, H) float32
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpu_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& q_pos, const at::Tensor& k_pos, const EncHolder& enc,
    const ScoreOpts& o, bool want_coef_grad, at::Tensor* dslopes);

#ifdef FUSED_POSENC_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> cuda_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const at::Tensor& q_pos, const at::Tensor& k_pos,
                                                const EncHolder& enc, bool causal, double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cuda_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& q_pos, const at::Tensor& k_pos, const EncHolder& enc, bool causal,
    double scale, bool want_coef_grad);
#endif

}  // namespace fused_posenc
