// The one binding file of fused_posenc._C: parameter packing, input checks, dispatch to CPU / CUDA.
#include <torch/extension.h>

#include <cstdio>

#include "native.h"

namespace fused_posenc {

namespace {

void val(bool ok, const std::string& msg) {
  if (!ok) throw pybind11::value_error("fused_posenc._C: " + msg);
}

std::string num_str(double x) {
  char b[32];
  std::snprintf(b, sizeof(b), "%.9g", x);
  return b;
}

std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + (t.dim() == 1 ? ",)" : ")");
}

// Positions must lie in [-2^62, 2^62) (fused_posenc.encodings.angles.POSITION_LIMIT): distances stay exact in int64
// and every table span fits. Checked here for CPU tensors (CUDA callers check asynchronously in Python).
void check_positions(const char* name, const at::Tensor& pos) {
  const auto st = pos.scalar_type();
  if (st != at::kLong && st != at::kInt && st != at::kShort && st != at::kChar && st != at::kByte)
    throw pybind11::type_error(std::string("fused_posenc._C: ") + name + " must be an int64/int32/int16/int8/uint8 tensor");
  if (pos.is_cuda() || pos.numel() == 0 || st != at::kLong) return;
  const auto mm = at::aminmax(pos);
  const int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
  val(lo >= -(int64_t(1) << 62) && hi < (int64_t(1) << 62),
      std::string(name) + " must lie in [-2^62, 2^62), got values in [" + std::to_string(lo) + ", " +
          std::to_string(hi) + "]");
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_pos,
                  const at::Tensor& k_pos) {
  val(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-D (batch, seqlen, heads, headdim)");
  val(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "q, k, v must share a dtype");
  val(q.device() == k.device() && q.device() == v.device(), "q, k, v must be on one device");
  val(q.numel() > 0 && k.numel() > 0 && v.numel() > 0, "q, k, v must not be empty");
  val(k.size(0) == q.size(0) && v.size(0) == q.size(0), "batch sizes differ");
  val(k.size(3) == q.size(3), "k's headdim must equal q's");
  val(v.size(1) == k.size(1) && v.size(2) == k.size(2), "v must have k's seqlen and heads");
  val(k.size(2) > 0 && q.size(2) % k.size(2) == 0, "nheads must be divisible by nheads_kv");
  val(q_pos.dim() == 2 && q_pos.size(1) == q.size(1) && (q_pos.size(0) == 1 || q_pos.size(0) == q.size(0)),
      "q_pos must be (1 or batch, seqlen_q), got " + shape_str(q_pos));
  val(k_pos.dim() == 2 && k_pos.size(1) == k.size(1) && (k_pos.size(0) == 1 || k_pos.size(0) == q.size(0)),
      "k_pos must be (1 or batch, seqlen_k), got " + shape_str(k_pos));
  check_positions("q_pos", q_pos);
  check_positions("k_pos", k_pos);
  auto st = q.scalar_type();
  if (st != at::kFloat && st != at::kDouble && st != at::kHalf && st != at::kBFloat16)
    throw pybind11::type_error("fused_posenc._C: dtype must be float16, bfloat16, float32 or float64");
}

bool given(const at::Tensor& t) { return t.defined() && t.numel() > 0; }

}  // namespace

EncHolder make_enc(const EncTensors& in, const at::Device& device, int64_t headdim, int64_t nheads, int64_t batch,
                   bool want_f64) {
  EncHolder e;
  e.t = in;
  auto f32 = [&](const at::Tensor& t) { return given(t) ? t.to(device, at::kFloat).contiguous() : t; };
  auto i64 = [&](const at::Tensor& t) { return given(t) ? t.to(device, at::kLong).contiguous() : t; };
  e.t.idx1 = i64(in.idx1); e.t.idx2 = i64(in.idx2);
  e.t.pair_turns = i64(in.pair_turns); e.t.pair_scale = f32(in.pair_scale);
  e.t.fope_turns = i64(in.fope_turns); e.t.fope_cos_coef = f32(in.fope_cos_coef);
  e.t.fope_sin_coef = f32(in.fope_sin_coef); e.t.fope_pad = f32(in.fope_pad);
  e.t.slopes = f32(in.slopes);
  EncParams& p = e.p;
  p.kind = (int)in.kind;
  val(p.kind >= ENC_NONE && p.kind <= ENC_TAPA, "unknown encoding kind " + std::to_string(in.kind));
  const int64_t P = headdim / 2;
  p.npairs = (int)P;
  if (is_rotation(p.kind)) {
    val(headdim % 2 == 0, "rotation encodings need an even headdim");
    val(given(e.t.idx1) && e.t.idx1.numel() == P && given(e.t.idx2) && e.t.idx2.numel() == P,
        "idx1/idx2 must have headdim/2 entries");
    if (!e.t.idx1.is_cuda()) {  // on CUDA this check would sync: the Python layer builds the indices itself
      auto mx = std::max(e.t.idx1.max().item<int64_t>(), e.t.idx2.max().item<int64_t>());
      auto mn = std::min(e.t.idx1.min().item<int64_t>(), e.t.idx2.min().item<int64_t>());
      val(mn >= 0 && mx < headdim, "pair indices out of range");
    }
    p.idx1 = e.t.idx1.data_ptr<int64_t>();
    p.idx2 = e.t.idx2.data_ptr<int64_t>();
  }
  if (p.kind == ENC_ROTARY) {
    val(given(e.t.pair_turns) && e.t.pair_turns.dim() == 2 && e.t.pair_turns.size(0) == P && e.t.pair_turns.size(1) == 2,
        "pair_turns must be (headdim/2, 2), got " + shape_str(e.t.pair_turns));
    val(given(e.t.pair_scale) && e.t.pair_scale.numel() == P, "pair_scale must have headdim/2 entries");
    p.pair_turns = e.t.pair_turns.data_ptr<int64_t>();
    p.pair_scale = e.t.pair_scale.data_ptr<float>();
    if (want_f64) {  // float64 inputs: the scale in float64, as the reference uses it
      e.t.pair_scale_f64 = in.pair_scale.to(device, at::kDouble).contiguous();
      p.pair_scale_f64 = e.t.pair_scale_f64.data_ptr<double>();
    }
  } else if (p.kind == ENC_FOPE) {
    val(given(e.t.fope_turns) && e.t.fope_turns.dim() == 2 && e.t.fope_turns.size(1) == 2,
        "fope_turns must be (Dk, 2), got " + shape_str(e.t.fope_turns));
    const int64_t dk = e.t.fope_turns.size(0);
    for (const at::Tensor* c : {&e.t.fope_cos_coef, &e.t.fope_sin_coef})
      val(given(*c) && c->dim() == 3 && c->size(0) == nheads && c->size(1) == dk && c->size(2) == P,
          "fope coefficients must be (nheads, Dk, headdim/2) = (" + std::to_string(nheads) + ", " + std::to_string(dk) +
              ", " + std::to_string(P) + "), got " + shape_str(*c));
    val(given(e.t.fope_pad) && e.t.fope_pad.numel() == P, "fope_pad must have headdim/2 entries");
    p.fope_dk = (int)dk;
    p.fope_turns = e.t.fope_turns.data_ptr<int64_t>();
    p.fope_cos_coef = e.t.fope_cos_coef.data_ptr<float>();
    p.fope_sin_coef = e.t.fope_sin_coef.data_ptr<float>();
    p.fope_pad = e.t.fope_pad.data_ptr<float>();
  } else if (p.kind == ENC_ALIBI) {
    val(given(e.t.slopes) && e.t.slopes.dim() == 2 && e.t.slopes.size(1) == nheads &&
            (e.t.slopes.size(0) == 1 || e.t.slopes.size(0) == batch),
        "slopes must be (1 or batch, nheads) = (1 or " + std::to_string(batch) + ", " + std::to_string(nheads) +
            "), got " + shape_str(e.t.slopes));
    p.slopes = e.t.slopes.data_ptr<float>();
    p.slopes_batch = (int)e.t.slopes.size(0);
  } else if (p.kind == ENC_TAPA) {
    val(in.tapa_split >= 1 && in.tapa_split < headdim, "tapa_split must be in [1, headdim)");
    val(std::isfinite(in.tapa_phase_scale) && std::isfinite(in.tapa_alpha) && in.tapa_alpha >= 0,
        "tapa_phase_scale must be finite and tapa_alpha finite and >= 0");
    p.tapa_split = (int)in.tapa_split;
    p.tapa_phase_scale = in.tapa_phase_scale;
    p.tapa_alpha = in.tapa_alpha;
  }
  return e;
}

namespace {

EncTensors pack(int64_t kind, at::Tensor idx1, at::Tensor idx2, at::Tensor pair_turns, at::Tensor pair_scale,
                at::Tensor fope_turns, at::Tensor cos_coef, at::Tensor sin_coef, at::Tensor fope_pad, at::Tensor slopes,
                int64_t tapa_split, double tapa_phase_scale, double tapa_alpha) {
  EncTensors t;
  t.kind = kind; t.idx1 = idx1; t.idx2 = idx2; t.pair_turns = pair_turns; t.pair_scale = pair_scale;
  t.fope_turns = fope_turns; t.fope_cos_coef = cos_coef; t.fope_sin_coef = sin_coef; t.fope_pad = fope_pad;
  t.slopes = slopes; t.tapa_split = tapa_split; t.tapa_phase_scale = tapa_phase_scale; t.tapa_alpha = tapa_alpha;
  return t;
}

void check_scale(double scale) {
  val(std::isfinite(scale) && scale > 0 && static_cast<float>(scale) > 0.f && std::isfinite(static_cast<float>(scale)),
      "scale must be a positive number that float32 represents");
}

// causal, the window (each bound >= 0, or -1: unbounded), the soft cap (0: none) and the scale, checked
ScoreOpts score_opts(bool causal, int64_t window_left, int64_t window_right, double softcap, double scale) {
  check_scale(scale);
  val(window_left >= -1, "window_left must be >= 0, or -1 for unbounded, got " + std::to_string(window_left));
  val(window_right >= -1, "window_right must be >= 0, or -1 for unbounded, got " + std::to_string(window_right));
  val(softcap == 0 || (std::isfinite(softcap) && softcap > 0 && static_cast<float>(softcap) > 0.f &&
                       std::isfinite(static_cast<float>(softcap))),
      "softcap must be 0 (no capping) or a positive number that float32 represents, got " + num_str(softcap));
  ScoreOpts o;
  o.causal = causal;
  o.window_left = window_left;
  o.window_right = window_right;
  o.softcap = softcap;
  o.scale = scale;
  return o;
}

// The CUDA kernels know only the causal rule and the scale.
void check_cuda_opts(const ScoreOpts& o) {
  val(o.window_left < 0 && o.window_right < 0 && o.softcap == 0,
      "the CUDA kernels support neither a sliding window (window_left / window_right) nor softcap; use "
      "backend='triton' or 'torch'");
}

// The GIL is released around the kernels (and their preparation): calls from several Python threads overlap.
std::vector<at::Tensor> forward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor q_pos, at::Tensor k_pos,
                                bool causal, int64_t window_left, int64_t window_right, double softcap, double scale,
                                int64_t kind, at::Tensor idx1, at::Tensor idx2, at::Tensor pair_turns,
                                at::Tensor pair_scale, at::Tensor fope_turns, at::Tensor cos_coef, at::Tensor sin_coef,
                                at::Tensor fope_pad, at::Tensor slopes, int64_t tapa_split, double tapa_phase_scale,
                                double tapa_alpha) {
  check_inputs(q, k, v, q_pos, k_pos);
  const ScoreOpts o = score_opts(causal, window_left, window_right, softcap, scale);
  if (q.is_cuda()) check_cuda_opts(o);
  auto enc = make_enc(pack(kind, idx1, idx2, pair_turns, pair_scale, fope_turns, cos_coef, sin_coef, fope_pad, slopes,
                           tapa_split, tapa_phase_scale, tapa_alpha),
                      q.device(), q.size(3), q.size(2), q.size(0), q.scalar_type() == at::kDouble && !q.is_cuda());
  pybind11::gil_scoped_release nogil;
  at::NoGradGuard ng;
  if (q.is_cuda()) {
#ifdef FUSED_POSENC_WITH_CUDA
    auto r = cuda_forward(q, k, v, q_pos.to(q.device()), k_pos.to(q.device()), enc, causal, scale);
    return {std::get<0>(r), std::get<1>(r)};
#else
    throw pybind11::value_error("fused_posenc._C was built without CUDA");
#endif
  }
  auto r = cpu_forward(q, k, v, q_pos, k_pos, enc, o);
  return {std::get<0>(r), std::get<1>(r)};
}

std::vector<at::Tensor> backward(at::Tensor dout, at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor out,
                                 at::Tensor lse, at::Tensor q_pos, at::Tensor k_pos, bool causal,
                                 int64_t window_left, int64_t window_right, double softcap, double scale, int64_t kind,
                                 at::Tensor idx1, at::Tensor idx2, at::Tensor pair_turns, at::Tensor pair_scale,
                                 at::Tensor fope_turns, at::Tensor cos_coef, at::Tensor sin_coef, at::Tensor fope_pad,
                                 at::Tensor slopes, int64_t tapa_split, double tapa_phase_scale, double tapa_alpha,
                                 bool want_coef_grad, bool want_slope_grad) {
  check_inputs(q, k, v, q_pos, k_pos);
  const ScoreOpts o = score_opts(causal, window_left, window_right, softcap, scale);
  if (q.is_cuda()) check_cuda_opts(o);
  const int64_t B = q.size(0), Lq = q.size(1), H = q.size(2), Dv = v.size(3);
  const std::vector<int64_t> out_shape{B, Lq, H, Dv}, lse_shape{B, H, Lq};
  val(out.sizes() == at::IntArrayRef(out_shape) && out.device() == q.device() && out.is_floating_point(),
      "out must be a floating (batch, seqlen_q, nheads, headdim_v) tensor on q's device, got " + shape_str(out));
  val(dout.sizes() == at::IntArrayRef(out_shape) && dout.device() == q.device() && dout.is_floating_point(),
      "dout must be a floating tensor of out's shape (batch, seqlen_q, nheads, headdim_v), got " + shape_str(dout) +
          " " + std::string(c10::toString(dout.scalar_type())));
  val(lse.sizes() == at::IntArrayRef(lse_shape) && lse.device() == q.device() && lse.is_floating_point(),
      "lse must be a floating (batch, nheads, seqlen_q) tensor on q's device, got " + shape_str(lse));
  auto enc = make_enc(pack(kind, idx1, idx2, pair_turns, pair_scale, fope_turns, cos_coef, sin_coef, fope_pad, slopes,
                           tapa_split, tapa_phase_scale, tapa_alpha),
                      q.device(), q.size(3), q.size(2), q.size(0), q.scalar_type() == at::kDouble && !q.is_cuda());
  pybind11::gil_scoped_release nogil;
  at::NoGradGuard ng;
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> r;
  at::Tensor dslopes;
  if (q.is_cuda()) {
    if (want_slope_grad) throw pybind11::value_error("fused_posenc._C: the CUDA kernels have no ALiBi slope gradient");
#ifdef FUSED_POSENC_WITH_CUDA
    r = cuda_backward(dout, q, k, v, out, lse, q_pos.to(q.device()), k_pos.to(q.device()), enc, causal, scale,
                      want_coef_grad);
#else
    throw pybind11::value_error("fused_posenc._C was built without CUDA");
#endif
  } else {
    r = cpu_backward(dout, q, k, v, out, lse, q_pos, k_pos, enc, o, want_coef_grad,
                     want_slope_grad && enc.p.kind == ENC_ALIBI ? &dslopes : nullptr);
  }
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r), std::get<4>(r), dslopes};
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
  m.def("backward", &fused_posenc::backward, "attention backward -> [dq, dk, dv, dcos_coef, dsin_coef, dslopes]");
  m.def("cpu_vector_bytes", &fused_posenc::cpu_vector_bytes,
        "width in bytes of the CPU kernels' explicit vectors (64 AVX-512, 32 AVX2, 16 SSE)");
  m.def("has_cuda", &fused_posenc::has_cuda, "whether the extension was built with CUDA kernels");
}
