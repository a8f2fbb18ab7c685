// Torch-facing side of the native ops: checks, output allocation and the schema registration under the
// `dopsd_C` namespace (csrc/README.md says why not `dopsd`). One function per op serves both dispatch keys and
// calls dopsd::cpu:: or dopsd::cuda:: (csrc/include/dopsd/launch.h) on raw pointers.
// narrow ATen includes (not ATen/ATen.h): half the compile time of the install's slowest file
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <c10/core/ScalarType.h>
#include <torch/library.h>

#include "dopsd/launch.h"
#include "dopsd/maths.h"

#ifdef DOPSD_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define DOPSD_CUDA_CALL(like, fn, args)                                                \
  {                                                                                    \
    c10::cuda::CUDAGuard guard((like).device());                                       \
    cuda::fn(args, c10::cuda::getCurrentCUDAStream((like).get_device()).stream());     \
  }
#else
#define DOPSD_CUDA_CALL(like, fn, args) TORCH_CHECK(false, "dopsd_C: built without CUDA kernels");
#endif
#define DOPSD_RUN(like, fn, args) \
  if ((like).is_cuda()) {         \
    DOPSD_CUDA_CALL(like, fn, args) \
  } else {                        \
    cpu::fn(args);                \
  }

namespace dopsd {
namespace {

using at::Tensor;
using std::optional;

DType dtype_of(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kBFloat16: return DType::bf16;
    case at::kHalf: return DType::f16;
    default: TORCH_CHECK(false, "dopsd_C: ", name, " must be fp32, bf16 or fp16, got ", t.scalar_type());
  }
}

Buf buf(const Tensor& t, const char* name) { return Buf{t.data_ptr(), dtype_of(t, name)}; }

// (rows, D) with unit stride along D; a copy only when that does not hold
Tensor unit_last(const Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

RowsIn rows_in(const Tensor& t, const char* name) {
  TORCH_CHECK(!t.is_cuda() || t.size(1) <= cuda::kMaxRow, "dopsd_C: rows of ", t.size(1), " elements: the CUDA "
              "epilogues hold at most ", cuda::kMaxRow, " (use the triton backend)");
  return RowsIn{buf(t, name), t.stride(0)};
}

const float* f32_ptr(const Tensor& t) { return t.data_ptr<float>(); }

// z_image.RMSNorm's output dtype: a half weight's, else fp32 promoted with the weight
at::ScalarType rms_norm_dtype(at::ScalarType w) {
  return (w == at::kHalf || w == at::kBFloat16) ? w : c10::promoteTypes(at::kFloat, w);
}

int64_t programs_for(const Tensor& like, int64_t total, int64_t batch) {
#ifdef DOPSD_WITH_CUDA
  if (like.is_cuda()) return cuda::rollout_programs(total, batch, like.get_device());
#endif
  return cpu::rollout_programs(total, batch);
}

int64_t partials_for(const Tensor& like, int64_t rows, int64_t dim) {
#ifdef DOPSD_WITH_CUDA
  if (like.is_cuda()) return cuda::row_partials(rows, dim, like.get_device());
#endif
  return cpu::row_partials(rows);
}

// Per-sample modulation (B, D) as fp32 contiguous rows, and the int64 sample index when B > 1 (else nullptr).
struct Modulation {
  Tensor rows, index;
  const int64_t* index_ptr() const { return index.defined() ? index.data_ptr<int64_t>() : nullptr; }
};

Modulation modulation(const Tensor& v, const optional<Tensor>& sample_index, const Tensor& x, const char* name) {
  TORCH_CHECK(v.dim() == 2 && v.size(1) == x.size(1), "dopsd_C: ", name, " must be (B, ", x.size(1), ")");
  Modulation m{v.to(at::kFloat).contiguous(), Tensor()};
  if (v.size(0) > 1) {
    TORCH_CHECK(sample_index.has_value() && sample_index->scalar_type() == at::kLong &&
                    sample_index->numel() == x.size(0),
                "dopsd_C: ", name, " has B > 1 rows: sample_index must be int64 (T,)");
    m.index = sample_index->contiguous();
  }
  return m;
}

Tensor sum_partials(const Tensor& partials, at::ScalarType dtype) { return partials.sum(0).to(dtype); }

// ------------------------------------------------------------------------------------------------ rollout_step
std::tuple<Tensor, Tensor, Tensor> rollout_step(const Tensor& x_in, const Tensor& s_in, const Tensor& t_in,
                                                const Tensor& cu_in, const Tensor& step_in, const Tensor& loss_in,
                                                bool compute_grad) {
  Tensor x = x_in.contiguous(), s = s_in.contiguous(), t = t_in.contiguous(), cu = cu_in.contiguous();
  TORCH_CHECK(x.dim() == 1 && s.sizes() == x.sizes() && t.sizes() == x.sizes(), "dopsd_C: x, out_s, out_t: (total,)");
  TORCH_CHECK(cu.scalar_type() == at::kInt && cu.dim() == 1, "dopsd_C: cu_seqlens must be int32 (B+1,)");
  int64_t batch = cu.numel() - 1, total = x.numel();
  Tensor step = step_in.to(at::kFloat).contiguous(), loss = loss_in.to(at::kFloat).contiguous();
  TORCH_CHECK(step.numel() == batch && loss.numel() == batch, "dopsd_C: step_coef, loss_coef must be (B,)");
  Tensor x_next = at::empty_like(x);
  Tensor sq_sum = at::empty({batch}, x.options().dtype(at::kFloat));
  Tensor grad = at::empty({compute_grad ? total : 0}, x.options().dtype(at::kFloat));
  if (batch <= 0) return {x_next, sq_sum, grad};
  int64_t programs = programs_for(x, total, batch);
  Tensor partials = at::empty({batch, programs}, x.options().dtype(at::kFloat));
  RolloutFwdArgs a{buf(x, "x"), buf(s, "out_s"), buf(t, "out_t"), buf(x_next, "x"),
                   compute_grad ? grad.data_ptr<float>() : nullptr, cu.data_ptr<int32_t>(), f32_ptr(step),
                   f32_ptr(loss), partials.data_ptr<float>(), sq_sum.data_ptr<float>(), batch, programs};
  DOPSD_RUN(x, rollout_step_fwd, a)
  return {x_next, sq_sum, grad};
}

Tensor rollout_step_backward(const Tensor& grad_in, const Tensor& cu_in, const Tensor& gss_in, at::ScalarType dtype) {
  Tensor grad = grad_in.contiguous(), cu = cu_in.contiguous(), gss = gss_in.to(at::kFloat).contiguous();
  TORCH_CHECK(grad.scalar_type() == at::kFloat && grad.dim() == 1, "dopsd_C: grad must be fp32 (total,)");
  int64_t batch = cu.numel() - 1;
  Tensor out = at::empty(grad.sizes(), grad.options().dtype(dtype));
  if (batch <= 0 || grad.numel() == 0) return out;
  RolloutBwdArgs a{grad.data_ptr<float>(), cu.data_ptr<int32_t>(), f32_ptr(gss), buf(out, "dtype"), batch,
                   programs_for(grad, grad.numel(), batch)};
  DOPSD_RUN(grad, rollout_step_bwd, a)
  return out;
}

// -------------------------------------------------------------------------------------------------- ema_update
void ema_update(at::TensorList teacher, at::TensorList student, at::TensorList teacher_lowp, double decay) {
  TORCH_CHECK(student.size() == teacher.size() && (teacher_lowp.empty() || teacher_lowp.size() == teacher.size()),
              "dopsd_C: teacher, student (and teacher_lowp) must match one to one");
  if (teacher.empty()) return;
  std::vector<int64_t> rows;
  for (size_t i = 0; i < teacher.size(); ++i) {
    const Tensor& t = teacher[i];
    const Tensor& s = student[i];
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && s.is_contiguous() && s.sizes() == t.sizes() &&
                    s.device() == t.device() && t.device() == teacher[0].device(),
                "dopsd_C: tensor ", i, ": contiguous fp32 teacher and same-shape contiguous student on one device");
    Tensor low = teacher_lowp.empty() ? Tensor() : teacher_lowp[i];
    TORCH_CHECK(!low.defined() || (low.is_contiguous() && low.sizes() == t.sizes() && low.device() == t.device()),
                "dopsd_C: teacher_lowp[", i, "] must be contiguous, same shape and device");
    auto s_dtype = int64_t(dtype_of(s, "student"));
    auto l_dtype = low.defined() ? int64_t(dtype_of(low, "teacher_lowp")) : 0;
    for (int64_t off = 0; off < t.numel(); off += kEmaChunk) {
      auto at_ = [&](const Tensor& v) { return reinterpret_cast<int64_t>(static_cast<char*>(v.data_ptr()) +
                                                                        off * v.element_size()); };
      rows.insert(rows.end(), {at_(t), at_(s), s_dtype, low.defined() ? at_(low) : 0, l_dtype,
                               std::min(kEmaChunk, t.numel() - off)});
    }
  }
  int64_t chunks = int64_t(rows.size()) / kEmaRow;
  if (chunks == 0) return;
  Tensor table = at::from_blob(rows.data(), {chunks, kEmaRow}, at::kLong);
  const Tensor& like = teacher[0];
  if (like.is_cuda()) table = table.to(like.device());  // pageable memory: the copy is done when .to returns
  EmaArgs a{table.data_ptr<int64_t>(), chunks, decay};
  DOPSD_RUN(like, ema_update, a)
}

// -------------------------------------------------------------------------------------------------- epilogues
Tensor modulated_rms_norm(const Tensor& x_in, const Tensor& weight, const Tensor& scale,
                          const optional<Tensor>& sample_index, double eps) {
  Tensor x = unit_last(x_in);
  TORCH_CHECK(x.dim() == 2 && weight.numel() == x.size(1), "dopsd_C: x (T, D), weight (D,)");
  Modulation m = modulation(scale, sample_index, x, "scale");
  Tensor w = weight.to(at::kFloat).contiguous();
  Tensor out = at::empty(x.sizes(), x.options().dtype(c10::promoteTypes(rms_norm_dtype(weight.scalar_type()),
                                                                          scale.scalar_type())));
  if (x.size(0) == 0) return out;
  ModulatedRmsArgs a{rows_in(x, "x"), buf(out, "output"), f32_ptr(w), f32_ptr(m.rows), m.index_ptr(), x.size(0),
                     x.size(1), scale.size(0), float(eps)};
  DOPSD_RUN(x, modulated_rms_norm_fwd, a)
  return out;
}

std::tuple<Tensor, Tensor, Tensor> modulated_rms_norm_backward(const Tensor& grad_in, const Tensor& x_in,
                                                               const Tensor& weight, const Tensor& scale,
                                                               const optional<Tensor>& sample_index, double eps,
                                                               bool need_weight, bool need_scale) {
  Tensor x = unit_last(x_in), grad = unit_last(grad_in);
  TORCH_CHECK(x.dim() == 2 && grad.sizes() == x.sizes() && weight.numel() == x.size(1),
              "dopsd_C: grad, x (T, D), weight (D,)");
  Modulation m = modulation(scale, sample_index, x, "scale");
  Tensor w = weight.to(at::kFloat).contiguous();
  int64_t rows = x.size(0), dim = x.size(1), batch = scale.size(0), parts = partials_for(x, rows, dim);
  auto f32 = x.options().dtype(at::kFloat);
  Tensor dx = at::empty(x.sizes(), x.options());
  Tensor dw = need_weight ? at::zeros({parts, dim}, f32) : Tensor();
  Tensor ds = need_scale ? at::zeros({parts, batch, dim}, f32) : Tensor();
  if (rows > 0) {
    ModulatedRmsBwdArgs a{rows_in(grad, "grad"), rows_in(x, "x"), buf(dx, "x"), f32_ptr(w), f32_ptr(m.rows),
                          m.index_ptr(), need_weight ? dw.data_ptr<float>() : nullptr,
                          need_scale ? ds.data_ptr<float>() : nullptr, rows, dim, batch, parts, float(eps)};
    DOPSD_RUN(x, modulated_rms_norm_bwd, a)
  }
  return {dx, need_weight ? sum_partials(dw, weight.scalar_type()) : weight.new_empty({0}),
          need_scale ? sum_partials(ds, scale.scalar_type()) : scale.new_empty({0})};
}

Tensor gated_residual(const Tensor& x_in, const Tensor& a_in, const Tensor& weight, const Tensor& gate,
                      const optional<Tensor>& sample_index, double eps) {
  Tensor x = unit_last(x_in), a = unit_last(a_in);
  TORCH_CHECK(x.dim() == 2 && a.sizes() == x.sizes() && weight.numel() == x.size(1),
              "dopsd_C: x, a (T, D), weight (D,)");
  Modulation m = modulation(gate, sample_index, x, "gate");
  Tensor tanh_gate = m.rows.tanh(), w = weight.to(at::kFloat).contiguous();
  auto dtype = c10::promoteTypes(x.scalar_type(), c10::promoteTypes(gate.scalar_type(),
                                                                     rms_norm_dtype(weight.scalar_type())));
  Tensor out = at::empty(x.sizes(), x.options().dtype(dtype));
  if (x.size(0) == 0) return out;
  GatedResidualArgs args{rows_in(x, "x"), rows_in(a, "a"), buf(out, "output"), f32_ptr(w), f32_ptr(tanh_gate),
                         m.index_ptr(), x.size(0), x.size(1), gate.size(0), float(eps)};
  DOPSD_RUN(x, gated_residual_fwd, args)
  return out;
}

std::tuple<Tensor, Tensor, Tensor> gated_residual_backward(const Tensor& grad_in, const Tensor& a_in,
                                                           const Tensor& weight, const Tensor& gate,
                                                           const optional<Tensor>& sample_index, double eps,
                                                           bool need_weight, bool need_gate) {
  Tensor a = unit_last(a_in), grad = unit_last(grad_in);
  TORCH_CHECK(a.dim() == 2 && grad.sizes() == a.sizes() && weight.numel() == a.size(1),
              "dopsd_C: grad, a (T, D), weight (D,)");
  Modulation m = modulation(gate, sample_index, a, "gate");
  Tensor tanh_gate = m.rows.tanh(), w = weight.to(at::kFloat).contiguous();
  int64_t rows = a.size(0), dim = a.size(1), batch = gate.size(0), parts = partials_for(a, rows, dim);
  auto f32 = a.options().dtype(at::kFloat);
  Tensor da = at::empty(a.sizes(), a.options());
  Tensor dw = need_weight ? at::zeros({parts, dim}, f32) : Tensor();
  Tensor dg = need_gate ? at::zeros({parts, batch, dim}, f32) : Tensor();
  if (rows > 0) {
    GatedResidualBwdArgs args{rows_in(grad, "grad"), rows_in(a, "a"), buf(da, "a"), f32_ptr(w), f32_ptr(tanh_gate),
                              m.index_ptr(), need_weight ? dw.data_ptr<float>() : nullptr,
                              need_gate ? dg.data_ptr<float>() : nullptr, rows, dim, batch, parts, float(eps)};
    DOPSD_RUN(a, gated_residual_bwd, args)
  }
  // d tanh(gate) / d gate, applied once to the per-sample sums
  Tensor dgate = need_gate ? dg.sum(0).mul(tanh_gate.mul(tanh_gate).neg_().add_(1)).to(gate.scalar_type())
                           : gate.new_empty({0});
  return {da, need_weight ? sum_partials(dw, weight.scalar_type()) : weight.new_empty({0}), dgate};
}

NormRopeArgs norm_rope_args(const Tensor& x, const Tensor& out, const Tensor& w, const Tensor& cos, const Tensor& sin,
                            double eps) {
  return NormRopeArgs{buf(x, "q/k"), x.stride(0), x.stride(1), buf(out, "output"), f32_ptr(w), f32_ptr(cos),
                      f32_ptr(sin), x.size(0), x.size(1), x.size(2), float(eps)};
}

void check_qk(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(2) % 2 == 0,
              "dopsd_C: q, k must be (T, H, head_dim) with one T and an even head_dim");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat &&
                  cos.numel() == q.size(0) * q.size(2) / 2 && sin.numel() == cos.numel(),
              "dopsd_C: cos / sin must be fp32 (T, head_dim / 2)");
  TORCH_CHECK(!q.is_cuda() || q.size(2) <= cuda::kMaxHeadDim, "dopsd_C: head_dim ", q.size(2), " > ",
              cuda::kMaxHeadDim, " on CUDA (use the triton backend)");
}

std::tuple<Tensor, Tensor> qk_norm_rope(const Tensor& q_in, const Tensor& k_in, const Tensor& q_weight,
                                        const Tensor& k_weight, const Tensor& cos_in, const Tensor& sin_in,
                                        double eps) {
  Tensor q = unit_last(q_in), k = unit_last(k_in), cos = cos_in.contiguous(), sin = sin_in.contiguous();
  check_qk(q, k, cos, sin);
  Tensor qw = q_weight.to(at::kFloat).contiguous(), kw = k_weight.to(at::kFloat).contiguous();
  Tensor oq = at::empty(q.sizes(), q.options().dtype(rms_norm_dtype(q_weight.scalar_type())));
  Tensor ok = at::empty(k.sizes(), k.options().dtype(rms_norm_dtype(k_weight.scalar_type())));
  if (q.size(0) == 0) return {oq, ok};
  NormRopeArgs aq = norm_rope_args(q, oq, qw, cos, sin, eps), ak = norm_rope_args(k, ok, kw, cos, sin, eps);
  DOPSD_RUN(q, norm_rope_fwd, aq)
  DOPSD_RUN(k, norm_rope_fwd, ak)
  return {oq, ok};
}

std::tuple<Tensor, Tensor> norm_rope_backward(const Tensor& grad_in, const Tensor& x, const Tensor& weight,
                                              const Tensor& cos, const Tensor& sin, double eps, bool need_weight) {
  Tensor grad = unit_last(grad_in), w = weight.to(at::kFloat).contiguous();
  int64_t rows = x.size(0) * x.size(1), hd = x.size(2), parts = partials_for(x, rows, hd);
  Tensor dx = at::empty(x.sizes(), x.options());
  Tensor dw = need_weight ? at::zeros({parts, hd}, x.options().dtype(at::kFloat)) : Tensor();
  if (rows > 0) {
    NormRopeBwdArgs a{buf(grad, "grad"), grad.stride(0), grad.stride(1), buf(x, "q/k"), x.stride(0), x.stride(1),
                      buf(dx, "q/k"), f32_ptr(w), f32_ptr(cos), f32_ptr(sin),
                      need_weight ? dw.data_ptr<float>() : nullptr, x.size(0), x.size(1), hd, parts, float(eps)};
    DOPSD_RUN(x, norm_rope_bwd, a)
  }
  return {dx, need_weight ? sum_partials(dw, weight.scalar_type()) : weight.new_empty({0})};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> qk_norm_rope_backward(const Tensor& grad_q, const Tensor& grad_k,
                                                                 const Tensor& q_in, const Tensor& k_in,
                                                                 const Tensor& q_weight, const Tensor& k_weight,
                                                                 const Tensor& cos_in, const Tensor& sin_in, double eps,
                                                                 bool need_weight) {
  Tensor q = unit_last(q_in), k = unit_last(k_in), cos = cos_in.contiguous(), sin = sin_in.contiguous();
  check_qk(q, k, cos, sin);
  TORCH_CHECK(grad_q.sizes() == q.sizes() && grad_k.sizes() == k.sizes(), "dopsd_C: grad_q / grad_k shapes");
  auto [dq, dqw] = norm_rope_backward(grad_q, q, q_weight, cos, sin, eps, need_weight);
  auto [dk, dkw] = norm_rope_backward(grad_k, k, k_weight, cos, sin, eps, need_weight);
  return {dq, dk, dqw, dkw};
}

void register_kernels(torch::Library& m) {
  m.impl("rollout_step", &rollout_step);
  m.impl("rollout_step_backward", &rollout_step_backward);
  m.impl("ema_update", &ema_update);
  m.impl("modulated_rms_norm", &modulated_rms_norm);
  m.impl("modulated_rms_norm_backward", &modulated_rms_norm_backward);
  m.impl("gated_residual", &gated_residual);
  m.impl("gated_residual_backward", &gated_residual_backward);
  m.impl("qk_norm_rope", &qk_norm_rope);
  m.impl("qk_norm_rope_backward", &qk_norm_rope_backward);
}

}  // namespace
}  // namespace dopsd

// The schemas of the Python custom ops in dopsd_fast/ops/, verbatim (tests/csrc checks they stay equal).
TORCH_LIBRARY(dopsd_C, m) {
  // not an op: the torch this library was compiled against (CMakeLists.txt reads it from that torch's version.py);
  // dopsd_fast/ops/_dispatch.py uses the extension only when it equals the running torch's version
  m.def("torch_version() -> str", [] { return std::string(DOPSD_TORCH_VERSION); });
  m.def("rollout_step(Tensor x, Tensor out_s, Tensor out_t, Tensor cu_seqlens, Tensor step_coef, Tensor loss_coef, "
        "bool compute_grad) -> (Tensor, Tensor, Tensor)");
  m.def("rollout_step_backward(Tensor grad, Tensor cu_seqlens, Tensor grad_sq_sum, ScalarType dtype) -> Tensor");
  m.def("ema_update(Tensor(a0!)[] teacher, Tensor[] student, Tensor(a2!)[] teacher_lowp, float decay) -> ()");
  m.def("modulated_rms_norm(Tensor x, Tensor weight, Tensor scale, Tensor? sample_index, float eps) -> Tensor");
  m.def("modulated_rms_norm_backward(Tensor grad, Tensor x, Tensor weight, Tensor scale, Tensor? sample_index, "
        "float eps, bool need_weight, bool need_scale) -> (Tensor, Tensor, Tensor)");
  m.def("gated_residual(Tensor x, Tensor a, Tensor weight, Tensor gate, Tensor? sample_index, float eps) -> Tensor");
  m.def("gated_residual_backward(Tensor grad, Tensor a, Tensor weight, Tensor gate, Tensor? sample_index, float eps, "
        "bool need_weight, bool need_gate) -> (Tensor, Tensor, Tensor)");
  m.def("qk_norm_rope(Tensor q, Tensor k, Tensor q_weight, Tensor k_weight, Tensor cos, Tensor sin, float eps) -> "
        "(Tensor, Tensor)");
  m.def("qk_norm_rope_backward(Tensor grad_q, Tensor grad_k, Tensor q, Tensor k, Tensor q_weight, Tensor k_weight, "
        "Tensor cos, Tensor sin, float eps, bool need_weight) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dopsd_C, CPU, m) { dopsd::register_kernels(m); }

#ifdef DOPSD_WITH_CUDA
TORCH_LIBRARY_IMPL(dopsd_C, CUDA, m) { dopsd::register_kernels(m); }
#endif
