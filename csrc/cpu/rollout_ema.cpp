// CPU twins of rollout_step and ema_update: the loops of the CUDA kernels (16-byte vectors after a scalar head,
// fixed partial sums) over at::parallel_for, the per-element maths from dopsd/maths.h.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "dopsd/launch.h"
#include "dopsd/maths.h"

namespace dopsd::cpu {
namespace {

constexpr int64_t kSlice = 1 << 16;  // elements per rollout task

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Calls fn(i, n) over [start, end) in pieces of kVec elements: a scalar head up to the first multiple of kVec, then
// 16-byte vectors (when vec_ok) with a masked tail; n bounds the piece's valid elements.
template <class Fn>
void for_each_vec(int64_t start, int64_t end, bool vec_ok, Fn fn) {
  int64_t head = std::min(end, round_up(start, kVec));
  for (int64_t i = start; i < head; i += kVec) fn(i, head, false);
  for (int64_t i = head; i < end; i += kVec) fn(i, end, vec_ok);
}

}  // namespace

int64_t rollout_programs(int64_t total, int64_t batch) {
  return std::clamp<int64_t>(total / std::max<int64_t>(batch, 1) / kSlice, 1, 1024);
}

void rollout_step_fwd(const RolloutFwdArgs& a) {
  bool vec_ok = is_aligned(a.x.ptr) && is_aligned(a.out_s.ptr) && is_aligned(a.out_t.ptr) &&
                is_aligned(a.x_next.ptr) && (a.grad == nullptr || is_aligned(a.grad));
  Buf grad{a.grad, DType::f32};
  at::parallel_for(0, a.batch * a.programs, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      int64_t b = task / a.programs, p = task % a.programs;
      int64_t start = a.cu_seqlens[b], end = a.cu_seqlens[b + 1];
      int64_t piece = round_up((end - start + a.programs - 1) / a.programs, kVec);
      int64_t s0 = std::min(end, start + p * piece), s1 = std::min(end, s0 + piece);
      float step = a.step_coef[b], loss = a.loss_coef[b];
      double acc = 0.0;  // the GPU sums a tree of fp32 partials; the twin sums exactly enough not to add error
      for_each_vec(s0, s1, vec_ok, [&](int64_t i, int64_t n, bool vec) {
        float x[kVec], s[kVec], t[kVec], xn[kVec], g[kVec];
        load_vec_masked(a.x, i, n, vec, x);
        load_vec_masked(a.out_s, i, n, vec, s);
        load_vec_masked(a.out_t, i, n, vec, t);
        for (int j = 0; j < kVec; ++j) {
          xn[j] = euler_step(x[j], s[j], step);
          float d = loss_diff(s[j], t[j], loss);  // masked lanes load zeros: d = 0
          acc += double(d) * double(d);
          g[j] = loss_grad(d, loss);
        }
        store_vec_masked(a.x_next, i, n, vec, xn);
        if (a.grad) store_vec_masked(grad, i, n, vec, g);
      });
      a.partials[task] = float(acc);
    }
  });
  for (int64_t b = 0; b < a.batch; ++b) {
    float sum = 0.f;
    for (int64_t p = 0; p < a.programs; ++p) sum += a.partials[b * a.programs + p];
    a.sq_sum[b] = sum;
  }
}

void rollout_step_bwd(const RolloutBwdArgs& a) {
  bool vec_ok = is_aligned(a.grad) && is_aligned(a.out.ptr);
  Buf grad{const_cast<float*>(a.grad), DType::f32};
  at::parallel_for(0, a.batch * a.programs, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      int64_t b = task / a.programs, p = task % a.programs;
      int64_t start = a.cu_seqlens[b], end = a.cu_seqlens[b + 1];
      int64_t piece = round_up((end - start + a.programs - 1) / a.programs, kVec);
      int64_t s0 = std::min(end, start + p * piece), s1 = std::min(end, s0 + piece);
      float scale = a.grad_sq_sum[b];
      for_each_vec(s0, s1, vec_ok, [&](int64_t i, int64_t n, bool vec) {
        float g[kVec];
        load_vec_masked(grad, i, n, vec, g);
        for (float& v : g) v *= scale;
        store_vec_masked(a.out, i, n, vec, g);
      });
    }
  });
}

void ema_update(const EmaArgs& a) {
  LerpCoef coef = ema_lerp_coef(a.decay);
  at::parallel_for(0, a.chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const int64_t* row = a.table + c * kEmaRow;
      Buf teacher{reinterpret_cast<void*>(row[0]), DType::f32};
      Buf student{reinterpret_cast<void*>(row[1]), static_cast<DType>(row[2])};
      Buf lowp{reinterpret_cast<void*>(row[3]), static_cast<DType>(row[4])};
      int64_t n = row[5];
      bool vec_ok = is_aligned(teacher.ptr) && is_aligned(student.ptr) && (!lowp.ptr || is_aligned(lowp.ptr));
      for (int64_t i = 0; i < n; i += kVec) {
        float t[kVec], s[kVec];
        load_vec_masked(teacher, i, n, vec_ok, t);
        load_vec_masked(student, i, n, vec_ok, s);
        for (int j = 0; j < kVec; ++j) t[j] = ema_lerp(t[j], s[j], coef);
        store_vec_masked(teacher, i, n, vec_ok, t);
        if (lowp.ptr) store_vec_masked(lowp, i, n, vec_ok, t);
      }
    }
  });
}

}  // namespace dopsd::cpu
