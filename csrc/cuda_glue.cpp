// Torch-facing glue of the CUDA kernels (compiled only when the extension is built with CUDA):
// contiguous inputs, output buffers, the current stream, then the torch-free launchers of cuda/.
#ifdef FUSED_POSENC_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/attention_kernels.h"
#include "native.h"

namespace fused_posenc {

namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DT_F32;
    case at::kHalf: return DT_F16;
    case at::kBFloat16: return DT_BF16;
    default: throw pybind11::type_error("fused_posenc._C: the CUDA kernels take float16, bfloat16 or float32");
  }
}

CudaAttnArgs base_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_pos,
                       const at::Tensor& k_pos, bool causal, double scale) {
  CudaAttnArgs a;
  a.dtype = dtype_code(q);
  a.q = q.data_ptr(); a.k = k.data_ptr(); a.v = v.data_ptr();
  a.q_pos = q_pos.data_ptr<int64_t>(); a.k_pos = k_pos.data_ptr<int64_t>();
  a.B = (int)q.size(0); a.Lq = (int)q.size(1); a.H = (int)q.size(2); a.D = (int)q.size(3);
  a.Lk = (int)k.size(1); a.Hkv = (int)k.size(2); a.Dv = (int)v.size(3);
  a.qpos_bs = q_pos.size(0) == 1 ? 0 : a.Lq;
  a.kpos_bs = k_pos.size(0) == 1 ? 0 : a.Lk;
  a.scale = (float)scale;
  a.causal = causal;
  return a;
}

void check(int err, const char* what) {
  TORCH_CHECK(err == 0, "fused_posenc CUDA ", what, " failed: ", cudaGetErrorString((cudaError_t)err));
}

// The kernels keep whole rows of the tiles in shared memory: refuse head dims this GPU cannot hold. (fp16 / bf16 with
// max(D, Dv) <= kMaxTensorCoreHeadDim run the tensor-core kernels: 31..103 KiB forward, 36..84 KiB backward, which
// fits sm_80 / sm_87 / sm_90 (163 / 227 KiB opt-in) but NOT the forward at padded head dim 128 on sm_86 / sm_89
// (99 KiB opt-in): refused here, with the message below; larger head dims and fp32 run the scalar kernels, whose
// shared memory grows with the head dim.)
void check_smem(const CudaAttnArgs& a, bool backward) {
  int dev = 0, limit = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  int major = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  TORCH_CHECK(!attention_uses_tensor_cores(a) || major >= 8, "fused_posenc CUDA: the float16 / bfloat16 kernels use ",
              "sm_80 tensor-core instructions (mma.sync, cp.async); this GPU is sm_", major, "x; use backend='triton'");
  const size_t need = attention_smem_bytes(a, backward);
  TORCH_CHECK(need <= (size_t)limit, "fused_posenc CUDA ", backward ? "backward" : "forward", ": headdim=", a.D,
              ", headdim_v=", a.Dv, " needs ", need / 1024, " KiB of shared memory per block, this GPU allows ",
              limit / 1024, " KiB (the tensor-core kernels take float16 / bfloat16 with head dims <= ",
              kMaxTensorCoreHeadDim, "); use backend='triton' for these head dims");
}

// Rotary / FoPE: scratch for the prologue's encoded copies of q and k (input dtype); the tensors must outlive the
// launch, which the caller's stack frame guarantees (the stream orders their reuse by the caching allocator).
void encoded_scratch(CudaAttnArgs& a, const EncParams& p, const at::Tensor& q, at::Tensor& q_enc, at::Tensor& k_enc) {
  if (!is_rotation(p.kind)) return;
  q_enc = at::empty({a.B, a.Lq, a.H, a.D}, q.options());
  k_enc = at::empty({a.B, a.Lk, encoded_k_heads(p.kind, a.H, a.Hkv), a.D}, q.options());
  a.q_enc = q_enc.data_ptr();
  a.k_enc = k_enc.data_ptr();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cuda_forward(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                                const at::Tensor& q_pos_in, const at::Tensor& k_pos_in,
                                                const EncHolder& enc, bool causal, double scale) {
  c10::cuda::CUDAGuard guard(q_in.device());
  auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  auto q_pos = q_pos_in.to(at::kLong).contiguous(), k_pos = k_pos_in.to(at::kLong).contiguous();
  auto out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  auto lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  CudaAttnArgs a = base_args(q, k, v, q_pos, k_pos, causal, scale);
  a.out = out.data_ptr();
  a.lse = lse.data_ptr<float>();
  at::Tensor q_enc, k_enc;
  encoded_scratch(a, enc.p, q, q_enc, k_enc);
  check_smem(a, false);
  check(launch_attention_forward(a, enc.p, c10::cuda::getCurrentCUDAStream().stream()), "forward");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cuda_backward(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const at::Tensor& q_pos_in, const at::Tensor& k_pos_in,
    const EncHolder& enc, bool causal, double scale, bool want_coef_grad) {
  c10::cuda::CUDAGuard guard(q_in.device());
  auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  auto dout = dout_in.to(q.scalar_type()).contiguous();
  auto lse = lse_in.to(at::kFloat).contiguous();
  auto q_pos = q_pos_in.to(at::kLong).contiguous(), k_pos = k_pos_in.to(at::kLong).contiguous();
  const int64_t B = q.size(0), Lq = q.size(1), H = q.size(2), D = q.size(3), Lk = k.size(1), Hkv = k.size(2),
                Dv = v.size(3), G = H / Hkv;
  auto f32 = q.options().dtype(at::kFloat);
  auto delta = (dout.to(at::kFloat) * out_in.to(at::kFloat)).sum(-1).contiguous();  // (B, Lq, H)
  auto dq_rot = at::zeros({B, Lq, H, D}, f32);
  auto dk_rot = at::empty({B, Lk, H, D}, f32);
  auto dv_h = at::empty({B, Lk, H, Dv}, f32);
  auto dq = at::empty({B, Lq, H, D}, f32);
  auto dk_h = at::empty({B, Lk, H, D}, f32);
  const bool coef = want_coef_grad && enc.p.kind == ENC_FOPE;
  at::Tensor dA, dB;
  if (coef) {
    dA = at::zeros({H, enc.p.fope_dk, enc.p.npairs}, f32);
    dB = at::zeros({H, enc.p.fope_dk, enc.p.npairs}, f32);
  }
  CudaAttnArgs a = base_args(q, k, v, q_pos, k_pos, causal, scale);
  a.dout = dout.data_ptr();
  a.lse = lse.data_ptr<float>();
  a.delta = delta.data_ptr<float>();
  a.dq_rot = dq_rot.data_ptr<float>();
  a.dk_rot = dk_rot.data_ptr<float>();
  a.dv_h = dv_h.data_ptr<float>();
  a.dq = dq.data_ptr<float>();
  a.dk_h = dk_h.data_ptr<float>();
  a.dcos = coef ? dA.data_ptr<float>() : nullptr;
  a.dsin = coef ? dB.data_ptr<float>() : nullptr;
  at::Tensor q_enc, k_enc;
  encoded_scratch(a, enc.p, q, q_enc, k_enc);
  check_smem(a, true);
  check(launch_attention_backward(a, enc.p, c10::cuda::getCurrentCUDAStream().stream()), "backward");
  const auto dt = q.scalar_type();
  auto dk = dk_h.view({B, Lk, Hkv, G, D}).sum(3).to(dt);
  auto dv = dv_h.view({B, Lk, Hkv, G, Dv}).sum(3).to(dt);
  return {dq.to(dt), dk, dv, coef ? dA : at::Tensor(), coef ? dB : at::Tensor()};
}

}  // namespace fused_posenc
#endif  // FUSED_POSENC_WITH_CUDA
