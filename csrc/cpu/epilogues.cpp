// CPU twins of the block epilogues: one row at a time (RMS statistics in fp32 over the row, then the per-element
// maths of dopsd/maths.h), backward partial sums in fixed row slices. Written for the compiler's vectoriser: an fp32
// row is read and written in place (other dtypes go through a row buffer), sums run in kLanes fixed lanes, and the
// per-element loops are plain loops over restrict pointers (CMakeLists.txt builds this file at -O3); the summation
// order is the same on every ISA. At bench_e2e's cpu-small shapes they run 1.9-2.8x the PyTorch reference's speed
// (bench/results/2026-12-06-cpu-ops/bench_epilogues.json), which made them CPU_AUTO's choice (ops/_dispatch.py).
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "dopsd/launch.h"
#include "dopsd/maths.h"

namespace dopsd::cpu {
namespace {

constexpr int kLanes = 16;

// sum over e < n of term(e): kLanes running sums (lane e % kLanes), then a fixed pairwise tree
template <class Term>
inline float lane_sum(int64_t n, Term term) {
  float acc[kLanes] = {};
  int64_t e = 0;
  for (; e + kLanes <= n; e += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += term(e + j);
  for (int j = 0; e + j < n; ++j) acc[j] += term(e + j);
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0];
}

bool rows_vec_ok(const RowsIn& r, int64_t dim) {
  return is_aligned(r.data.ptr) && r.row_stride % kVec == 0 && dim % kVec == 0;
}

// dim elements at offset off as fp32: the tensor's own memory when it is fp32, else converted into buf
const float* f32_row(Buf b, int64_t off, int64_t dim, bool vec_ok, float* buf) {
  if (b.dtype == DType::f32) return static_cast<const float*>(b.ptr) + off;
  for (int64_t e = 0; e < dim; e += kVec) {
    float v[kVec];
    load_vec_masked(b, off + e, off + dim, vec_ok, v);
    for (int j = 0; j < kVec && e + j < dim; ++j) buf[e + j] = v[j];
  }
  return buf;
}

// where an output row is computed: its own memory when fp32, else buf (put_row then converts it)
float* out_row(Buf b, int64_t off, float* buf) {
  return b.dtype == DType::f32 ? static_cast<float*>(b.ptr) + off : buf;
}

void put_row(Buf b, int64_t off, int64_t dim, bool vec_ok, const float* buf) {
  if (b.dtype == DType::f32) return;
  for (int64_t e = 0; e < dim; e += kVec) {
    float v[kVec] = {};
    for (int j = 0; j < kVec && e + j < dim; ++j) v[j] = buf[e + j];
    store_vec_masked(b, off + e, off + dim, vec_ok, v);
  }
}

float row_rstd(const float* x, int64_t dim, float eps) {
  return rms_rstd(lane_sum(dim, [x](int64_t e) { return x[e] * x[e]; }), dim, eps);
}

// Runs body(slice, first_row, end_row) for `partials` fixed contiguous row slices (deterministic sums).
template <class Body>
void for_row_slices(int64_t rows, int64_t partials, Body body) {
  int64_t per = (rows + partials - 1) / std::max<int64_t>(partials, 1);
  at::parallel_for(0, partials, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) body(p, std::min(rows, p * per), std::min(rows, (p + 1) * per));
  });
}

int64_t sample_of(const int64_t* sample_index, int64_t row) { return sample_index ? sample_index[row] : 0; }

// RMSNorm backward over one row, in place: g = dL/dxhat in, dL/dx out (xhat = x * rstd)
void rms_norm_dx_row(float* __restrict g, const float* __restrict x, float rstd, int64_t dim) {
  float mean = lane_sum(dim, [=](int64_t e) { return g[e] * (x[e] * rstd); }) / float(dim);
  for (int64_t e = 0; e < dim; ++e) g[e] = rms_norm_dx(g[e], x[e] * rstd, rstd, mean);
}

}  // namespace

int64_t row_partials(int64_t rows) { return std::clamp<int64_t>(rows, 1, 64); }

void modulated_rms_norm_fwd(const ModulatedRmsArgs& a) {
  bool vin = rows_vec_ok(a.x, a.dim), vout = is_aligned(a.out.ptr) && a.dim % kVec == 0;
  for_row_slices(a.rows, row_partials(a.rows), [&](int64_t, int64_t r0, int64_t r1) {
    std::vector<float> xbuf(a.dim), obuf(a.dim);
    const float* __restrict w = a.weight;
    for (int64_t r = r0; r < r1; ++r) {
      const float* __restrict x = f32_row(a.x.data, r * a.x.row_stride, a.dim, vin, xbuf.data());
      const float* __restrict scale = a.scale + sample_of(a.sample_index, r) * a.dim;
      float* __restrict out = out_row(a.out, r * a.dim, obuf.data());
      float rstd = row_rstd(x, a.dim, a.eps);
      for (int64_t e = 0; e < a.dim; ++e) out[e] = modulated_rms(x[e], rstd, w[e], scale[e]);
      put_row(a.out, r * a.dim, a.dim, vout, out);
    }
  });
}

void modulated_rms_norm_bwd(const ModulatedRmsBwdArgs& a) {
  bool vg = rows_vec_ok(a.grad, a.dim), vx = rows_vec_ok(a.x, a.dim), vout = is_aligned(a.dx.ptr) && a.dim % kVec == 0;
  for_row_slices(a.rows, a.partials, [&](int64_t p, int64_t r0, int64_t r1) {
    std::vector<float> xbuf(a.dim), dybuf(a.dim), gbuf(a.dim);
    const float* __restrict w = a.weight;
    float* __restrict dw = a.dweight ? a.dweight + p * a.dim : nullptr;
    for (int64_t r = r0; r < r1; ++r) {
      const float* __restrict x = f32_row(a.x.data, r * a.x.row_stride, a.dim, vx, xbuf.data());
      const float* __restrict dy = f32_row(a.grad.data, r * a.grad.row_stride, a.dim, vg, dybuf.data());
      int64_t sample = sample_of(a.sample_index, r);
      const float* __restrict scale = a.scale + sample * a.dim;
      float* __restrict ds = a.dscale ? a.dscale + (p * a.batch + sample) * a.dim : nullptr;
      float* __restrict g = out_row(a.dx, r * a.dim, gbuf.data());
      float rstd = row_rstd(x, a.dim, a.eps);
      if (dw)
        for (int64_t e = 0; e < a.dim; ++e) dw[e] += dy[e] * (1.f + scale[e]) * (x[e] * rstd);
      if (ds)
        for (int64_t e = 0; e < a.dim; ++e) ds[e] += dy[e] * (x[e] * rstd) * w[e];
      for (int64_t e = 0; e < a.dim; ++e) g[e] = dy[e] * w[e] * (1.f + scale[e]);
      rms_norm_dx_row(g, x, rstd, a.dim);
      put_row(a.dx, r * a.dim, a.dim, vout, g);
    }
  });
}

void gated_residual_fwd(const GatedResidualArgs& a) {
  bool vx = rows_vec_ok(a.x, a.dim), va = rows_vec_ok(a.a, a.dim), vout = is_aligned(a.out.ptr) && a.dim % kVec == 0;
  for_row_slices(a.rows, row_partials(a.rows), [&](int64_t, int64_t r0, int64_t r1) {
    std::vector<float> xbuf(a.dim), abuf(a.dim), obuf(a.dim);
    const float* __restrict w = a.weight;
    for (int64_t r = r0; r < r1; ++r) {
      const float* __restrict x = f32_row(a.x.data, r * a.x.row_stride, a.dim, vx, xbuf.data());
      const float* __restrict av = f32_row(a.a.data, r * a.a.row_stride, a.dim, va, abuf.data());
      const float* __restrict tg = a.tanh_gate + sample_of(a.sample_index, r) * a.dim;
      float* __restrict out = out_row(a.out, r * a.dim, obuf.data());
      float rstd = row_rstd(av, a.dim, a.eps);
      for (int64_t e = 0; e < a.dim; ++e) out[e] = gated_residual(x[e], av[e], rstd, w[e], tg[e]);
      put_row(a.out, r * a.dim, a.dim, vout, out);
    }
  });
}

void gated_residual_bwd(const GatedResidualBwdArgs& a) {
  bool vg = rows_vec_ok(a.grad, a.dim), va = rows_vec_ok(a.a, a.dim), vout = is_aligned(a.da.ptr) && a.dim % kVec == 0;
  for_row_slices(a.rows, a.partials, [&](int64_t p, int64_t r0, int64_t r1) {
    std::vector<float> abuf(a.dim), dybuf(a.dim), gbuf(a.dim);
    const float* __restrict w = a.weight;
    float* __restrict dw = a.dweight ? a.dweight + p * a.dim : nullptr;
    for (int64_t r = r0; r < r1; ++r) {
      const float* __restrict av = f32_row(a.a.data, r * a.a.row_stride, a.dim, va, abuf.data());
      const float* __restrict dy = f32_row(a.grad.data, r * a.grad.row_stride, a.dim, vg, dybuf.data());
      int64_t sample = sample_of(a.sample_index, r);
      const float* __restrict tg = a.tanh_gate + sample * a.dim;
      float* __restrict dgate = a.dgate ? a.dgate + (p * a.batch + sample) * a.dim : nullptr;
      float* __restrict g = out_row(a.da, r * a.dim, gbuf.data());
      float rstd = row_rstd(av, a.dim, a.eps);
      if (dw)
        for (int64_t e = 0; e < a.dim; ++e) dw[e] += dy[e] * tg[e] * (av[e] * rstd);
      if (dgate)
        for (int64_t e = 0; e < a.dim; ++e) dgate[e] += dy[e] * (av[e] * rstd) * w[e];
      for (int64_t e = 0; e < a.dim; ++e) g[e] = dy[e] * tg[e] * w[e];
      rms_norm_dx_row(g, av, rstd, a.dim);
      put_row(a.da, r * a.dim, a.dim, vout, g);
    }
  });
}

void norm_rope_fwd(const NormRopeArgs& a) {
  int64_t hd = a.head_dim, half = hd / 2, rows = a.tokens * a.heads;
  bool vin = is_aligned(a.x.ptr) && a.stride_t % kVec == 0 && a.stride_h % kVec == 0 && hd % kVec == 0;
  bool vout = is_aligned(a.out.ptr) && hd % kVec == 0;
  for_row_slices(rows, row_partials(rows), [&](int64_t, int64_t r0, int64_t r1) {
    std::vector<float> xbuf(hd), obuf(hd);
    const float* __restrict w = a.weight;
    for (int64_t r = r0; r < r1; ++r) {
      int64_t t = r / a.heads, h = r % a.heads;
      const float* __restrict x = f32_row(a.x, t * a.stride_t + h * a.stride_h, hd, vin, xbuf.data());
      const float* __restrict cos = a.cos + t * half;
      const float* __restrict sin = a.sin + t * half;
      float* __restrict out = out_row(a.out, r * hd, obuf.data());
      float rstd = row_rstd(x, hd, a.eps);
      for (int64_t i = 0; i < half; ++i)
        rope(x[2 * i] * rstd * w[2 * i], x[2 * i + 1] * rstd * w[2 * i + 1], cos[i], sin[i], out[2 * i],
             out[2 * i + 1]);
      put_row(a.out, r * hd, hd, vout, out);
    }
  });
}

void norm_rope_bwd(const NormRopeBwdArgs& a) {
  int64_t hd = a.head_dim, half = hd / 2, rows = a.tokens * a.heads;
  bool vg = is_aligned(a.grad.ptr) && a.grad_stride_t % kVec == 0 && a.grad_stride_h % kVec == 0 && hd % kVec == 0;
  bool vx = is_aligned(a.x.ptr) && a.stride_t % kVec == 0 && a.stride_h % kVec == 0 && hd % kVec == 0;
  bool vout = is_aligned(a.dx.ptr) && hd % kVec == 0;
  for_row_slices(rows, a.partials, [&](int64_t p, int64_t r0, int64_t r1) {
    std::vector<float> xbuf(hd), dybuf(hd), gbuf(hd);
    const float* __restrict w = a.weight;
    float* __restrict dw = a.dweight ? a.dweight + p * hd : nullptr;
    for (int64_t r = r0; r < r1; ++r) {
      int64_t t = r / a.heads, h = r % a.heads;
      const float* __restrict x = f32_row(a.x, t * a.stride_t + h * a.stride_h, hd, vx, xbuf.data());
      const float* __restrict dy = f32_row(a.grad, t * a.grad_stride_t + h * a.grad_stride_h, hd, vg, dybuf.data());
      const float* __restrict cos = a.cos + t * half;
      const float* __restrict sin = a.sin + t * half;
      float* __restrict g = out_row(a.dx, r * hd, gbuf.data());
      float rstd = row_rstd(x, hd, a.eps);
      for (int64_t i = 0; i < half; ++i)  // dL/d(normed): the inverse rotation
        rope_inverse(dy[2 * i], dy[2 * i + 1], cos[i], sin[i], g[2 * i], g[2 * i + 1]);
      if (dw)
        for (int64_t e = 0; e < hd; ++e) dw[e] += g[e] * (x[e] * rstd);
      for (int64_t e = 0; e < hd; ++e) g[e] *= w[e];  // g = dL/dxhat
      rms_norm_dx_row(g, x, rstd, hd);
      put_row(a.dx, r * hd, hd, vout, g);
    }
  });
}

}  // namespace dopsd::cpu
