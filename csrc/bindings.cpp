// The one binding file of fused_posenc._C: parameter packing, input checks, dispatch to CPU / CUDA.
#include <torch/extension.h>

#include "native.h"

namespace fused_posenc {

namespace {

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_pos,
                  const at::Tensor& k_pos) {
  auto val = [](bool ok, const std::string& msg) {
    if (!ok) throw pybind11::value_error(msg);
  };
  val(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "fused_posenc._C: q, k, v must be 4-D (batch, seqlen, heads, headdim)");
  val(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "fused_posenc._C: q, k, v must share a dtype");
  val(q.device() == k.device() && q.device() == v.device(), "fused_posenc._C: q, k, v must be on one device");
  val(k.size(0) == q.size(0) && v.size(0) == q.size(0), "fused_posenc._C: batch sizes differ");
  val(k.size(3) == q.size(3), "fused_posenc._C: k's headdim must equal q's");
  val(v.size(1) == k.size(1) && v.size(2) == k.size(2), "fused_posenc._C: v must have k's seqlen and heads");
  val(k.size(2) > 0 && q.size(2) % k.size(2) == 0, "fused_posenc._C: nheads must be divisible by nheads_kv");
  val(q_pos.dim() == 2 && q_pos.size(1) == q.size(1) && (q_pos.size(0) == 1 || q_pos.size(0) == q.size(0)),
      "fused_posenc._C: q_pos must be (1 or batch, seqlen_q)");
  val(k_pos.dim() == 2 && k_pos.size(1) == k.size(1) && (k_pos.size(0) == 1 || k_pos.size(0) == q.size(0)),
      "fused_posenc._C: k_pos must be (1 or batch, seqlen_k)");
  val(!q_pos.is_floating_point() && !k_pos.is_floating_point(), "fused_posenc._C: positions must be integer tensors");
  auto st = q.scalar_type();
  if (st != at::kFloat && st != at::kDouble && st != at::kHalf && st != at::kBFloat16)
    throw pybind11::type_error("fused_posenc._C: dtype must be float16, bfloat16, float32 or float64");
}

}  // namespace

EncHolder make_enc(const EncTensors& in, const at::Device& device, int64_t headdim, int64_t nheads, bool want_f64) {
  EncHolder e;
  e.t = in;
  auto f32 = [&](const at::Tensor& t) { return t.defined() && t.numel() ? t.to(device, at::kFloat).contiguous() : t; };
  auto i64 = [&](const at::Tensor& t) { return t.defined() && t.numel() ? t.to(device, at::kLong).contiguous() : t; };
  e.t.idx1 = i64(in.idx1); e.t.idx2 = i64(in.idx2);
  e.t.pair_freqs = f32(in.pair_freqs); e.t.pair_scale = f32(in.pair_scale);
  e.t.fope_freqs = f32(in.fope_freqs); e.t.fope_cos_coef = f32(in.fope_cos_coef);
  e.t.fope_sin_coef = f32(in.fope_sin_coef); e.t.fope_pad = f32(in.fope_pad);
  e.t.slopes = f32(in.slopes);
  EncParams& p = e.p;
  p.kind = (int)in.kind;
  if (p.kind < ENC_NONE || p.kind > ENC_TAPA) throw pybind11::value_error("fused_posenc._C: unknown encoding kind");
  const int64_t P = headdim / 2;
  p.npairs = (int)P;
  auto need = [](bool ok, const char* msg) {
    if (!ok) throw pybind11::value_error(std::string("fused_posenc._C: ") + msg);
  };
  if (is_rotation(p.kind)) {
    need(e.t.idx1.defined() && e.t.idx1.numel() == P && e.t.idx2.defined() && e.t.idx2.numel() == P,
         "idx1/idx2 must have headdim/2 entries");
    auto mx = std::max(e.t.idx1.max().item<int64_t>(), e.t.idx2.max().item<int64_t>());
    auto mn = std::min(e.t.idx1.min().item<int64_t>(), e.t.idx2.min().item<int64_t>());
    need(mn >= 0 && mx < headdim, "pair indices out of range");
    p.idx1 = e.t.idx1.data_ptr<int64_t>();
    p.idx2 = e.t.idx2.data_ptr<int64_t>();
  }
  if (p.kind == ENC_ROTARY) {
    need(e.t.pair_freqs.defined() && e.t.pair_freqs.numel() == P, "pair_freqs must have headdim/2 entries");
    need(e.t.pair_scale.defined() && e.t.pair_scale.numel() == P, "pair_scale must have headdim/2 entries");
    p.pair_freqs = e.t.pair_freqs.data_ptr<float>();
    p.pair_scale = e.t.pair_scale.data_ptr<float>();
    if (want_f64) {  // float64 inputs: float64 frequencies, as the reference uses them
      e.t.pair_freqs_f64 = in.pair_freqs.to(device, at::kDouble).contiguous();
      e.t.pair_scale_f64 = in.pair_scale.to(device, at::kDouble).contiguous();
      p.pair_freqs_f64 = e.t.pair_freqs_f64.data_ptr<double>();
      p.pair_scale_f64 = e.t.pair_scale_f64.data_ptr<double>();
    }
  } else if (p.kind == ENC_FOPE) {
    need(e.t.fope_freqs.defined() && e.t.fope_freqs.dim() == 1 && e.t.fope_freqs.numel() > 0, "fope_freqs must be (Dk,)");
    const int64_t dk = e.t.fope_freqs.numel();
    for (const at::Tensor* c : {&e.t.fope_cos_coef, &e.t.fope_sin_coef})
      need(c->defined() && c->dim() == 3 && c->size(0) == nheads && c->size(1) == dk && c->size(2) == P,
           "fope coefficients must be (nheads, Dk, headdim/2)");
    need(e.t.fope_pad.defined() && e.t.fope_pad.numel() == P, "fope_pad must have headdim/2 entries");
    p.fope_dk = (int)dk;
    p.fope_freqs = e.t.fope_freqs.data_ptr<float>();
    p.fope_cos_coef = e.t.fope_cos_coef.data_ptr<float>();
    p.fope_sin_coef = e.t.fope_sin_coef.data_ptr<float>();
    p.fope_pad = e.t.fope_pad.data_ptr<float>();
  } else if (p.kind == ENC_ALIBI) {
    need(e.t.slopes.defined() && e.t.slopes.dim() == 2 && e.t.slopes.size(1) == nheads, "slopes must be (Bs, nheads)");
    p.slopes = e.t.slopes.data_ptr<float>();
    p.slopes_batch = (int)e.t.slopes.size(0);
  } else if (p.kind == ENC_TAPA) {
    need(in.tapa_split >= 1 && in.tapa_split < headdim, "tapa_split must be in [1, headdim)");
    p.tapa_split = (int)in.tapa_split;
    p.tapa_phase_scale = in.tapa_phase_scale;
    p.tapa_alpha = in.tapa_alpha;
  }
  return e;
}

namespace {

EncTensors pack(int64_t kind, at::Tensor idx1, at::Tensor idx2, at::Tensor pair_freqs, at::Tensor pair_scale,
                at::Tensor fope_freqs, at::Tensor cos_coef, at::Tensor sin_coef, at::Tensor fope_pad, at::Tensor slopes,
                int64_t tapa_split, double tapa_phase_scale, double tapa_alpha) {
  EncTensors t;
  t.kind = kind; t.idx1 = idx1; t.idx2 = idx2; t.pair_freqs = pair_freqs; t.pair_scale = pair_scale;
  t.fope_freqs = fope_freqs; t.fope_cos_coef = cos_coef; t.fope_sin_coef = sin_coef; t.fope_pad = fope_pad;
  t.slopes = slopes; t.tapa_split = tapa_split; t.tapa_phase_scale = tapa_phase_scale; t.tapa_alpha = tapa_alpha;
  return t;
}

std::vector<at::Tensor> forward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor q_pos, at::Tensor k_pos,
                                bool causal, double scale, int64_t kind, at::Tensor idx1, at::Tensor idx2,
                                at::Tensor pair_freqs, at::Tensor pair_scale, at::Tensor fope_freqs,
                                at::Tensor cos_coef, at::Tensor sin_coef, at::Tensor fope_pad, at::Tensor slopes,
                                int64_t tapa_split, double tapa_phase_scale, double tapa_alpha) {
  check_inputs(q, k, v, q_pos, k_pos);
  auto enc = make_enc(pack(kind, idx1, idx2, pair_freqs, pair_scale, fope_freqs, cos_coef, sin_coef, fope_pad, slopes,
                           tapa_split, tapa_phase_scale, tapa_alpha),
                      q.device(), q.size(3), q.size(2), q.scalar_type() == at::kDouble && !q.is_cuda());
  at::NoGradGuard ng;
  if (q.is_cuda()) {
#ifdef FUSED_POSENC_WITH_CUDA
    auto r = cuda_forward(q, k, v, q_pos.to(q.device()), k_pos.to(q.device()), enc, causal, scale);
    return {std::get<0>(r), std::get<1>(r)};
#else
    throw pybind11::value_error("fused_posenc._C was built without CUDA");
#endif
  }
  auto r = cpu_forward(q, k, v, q_pos, k_pos, enc, causal, scale);
  return {std::get<0>(r), std::get<1>(r)};
}

std::vector<at::Tensor> backward(at::Tensor dout, at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor out,
                                 at::Tensor lse, at::Tensor q_pos, at::Tensor k_pos, bool causal, double scale,
                                 int64_t kind, at::Tensor idx1, at::Tensor idx2, at::Tensor pair_freqs,
                                 at::Tensor pair_scale, at::Tensor fope_freqs, at::Tensor cos_coef,
                                 at::Tensor sin_coef, at::Tensor fope_pad, at::Tensor slopes, int64_t tapa_split,
                                 double tapa_phase_scale, double tapa_alpha, bool want_coef_grad) {
  check_inputs(q, k, v, q_pos, k_pos);
  if (dout.sizes() != out.sizes()) throw pybind11::value_error("fused_posenc._C: dout must have out's shape");
  auto enc = make_enc(pack(kind, idx1, idx2, pair_freqs, pair_scale, fope_freqs, cos_coef, sin_coef, fope_pad, slopes,
                           tapa_split, tapa_phase_scale, tapa_alpha),
                      q.device(), q.size(3), q.size(2), q.scalar_type() == at::kDouble && !q.is_cuda());
  at::NoGradGuard ng;
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> r;
  if (q.is_cuda()) {
#ifdef FUSED_POSENC_WITH_CUDA
    r = cuda_backward(dout, q, k, v, out, lse, q_pos.to(q.device()), k_pos.to(q.device()), enc, causal, scale,
                      want_coef_grad);
#else
    throw pybind11::value_error("fused_posenc._C was built without CUDA");
#endif
  } else {
    r = cpu_backward(dout, q, k, v, out, lse, q_pos, k_pos, enc, causal, scale, want_coef_grad);
  }
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r), std::get<4>(r)};
}

bool has_cuda() {
#ifdef FUSED_POSENC_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace fused_posenc

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_posenc native kernels (C++ CPU, CUDA when built with it)";
  m.def("forward", &fused_posenc::forward, "attention forward -> [out, lse]");
  m.def("backward", &fused_posenc::backward, "attention backward -> [dq, dk, dv, dcos_coef, dsin_coef]");
  m.def("cpu_vector_bytes", &fused_posenc::cpu_vector_bytes,
        "width in bytes of the CPU kernels' explicit vectors (64 AVX-512, 32 AVX2, 16 SSE)");
  m.def("has_cuda", &fused_posenc::has_cuda, "whether the extension was built with CUDA kernels");
}
