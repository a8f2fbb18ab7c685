// CPU twins of the block epilogues: one row at a time (RMS statistics in fp32 over the row, then the per-element
// maths of dopsd/maths.h), 16-byte vectors along the row, backward partial sums in fixed row slices.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "dopsd/launch.h"
#include "dopsd/maths.h"

namespace dopsd::cpu {
namespace {

bool rows_vec_ok(const RowsIn& r, int64_t dim) {
  return is_aligned(r.data.ptr) && r.row_stride % kVec == 0 && dim % kVec == 0;
}

// Loads one row (dim elements at offset off) into buf, returning the sum of squares.
float load_row(Buf b, int64_t off, int64_t dim, bool vec_ok, float* buf) {
  float sum_sq = 0.f;
  for (int64_t e = 0; e < dim; e += kVec) {
    float v[kVec];
    load_vec_masked(b, off + e, off + dim, vec_ok, v);
    for (int j = 0; j < kVec && e + j < dim; ++j) buf[e + j] = v[j], sum_sq += v[j] * v[j];
  }
  return sum_sq;
}

void store_row(Buf b, int64_t off, int64_t dim, bool vec_ok, const float* buf) {
  for (int64_t e = 0; e < dim; e += kVec) {
    float v[kVec] = {};
    for (int j = 0; j < kVec && e + j < dim; ++j) v[j] = buf[e + j];
    store_vec_masked(b, off + e, off + dim, vec_ok, v);
  }
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

}  // namespace

int64_t row_partials(int64_t rows) { return std::clamp<int64_t>(rows, 1, 64); }

void modulated_rms_norm_fwd(const ModulatedRmsArgs& a) {
  bool vin = rows_vec_ok(a.x, a.dim), vout = is_aligned(a.out.ptr) && a.dim % kVec == 0;
  for_row_slices(a.rows, row_partials(a.rows), [&](int64_t, int64_t r0, int64_t r1) {
    std::vector<float> x(a.dim);
    for (int64_t r = r0; r < r1; ++r) {
      float rstd = rms_rstd(load_row(a.x.data, r * a.x.row_stride, a.dim, vin, x.data()), a.dim, a.eps);
      const float* scale = a.scale + sample_of(a.sample_index, r) * a.dim;
      for (int64_t e = 0; e < a.dim; ++e) x[e] = modulated_rms(x[e], rstd, a.weight[e], scale[e]);
      store_row(a.out, r * a.dim, a.dim, vout, x.data());
    }
  });
}

void modulated_rms_norm_bwd(const ModulatedRmsBwdArgs& a) {
  bool vg = rows_vec_ok(a.grad, a.dim), vx = rows_vec_ok(a.x, a.dim), vout = is_aligned(a.dx.ptr) && a.dim % kVec == 0;
  for_row_slices(a.rows, a.partials, [&](int64_t p, int64_t r0, int64_t r1) {
    std::vector<float> x(a.dim), dy(a.dim), g(a.dim);
    float* dw = a.dweight ? a.dweight + p * a.dim : nullptr;
    for (int64_t r = r0; r < r1; ++r) {
      float rstd = rms_rstd(load_row(a.x.data, r * a.x.row_stride, a.dim, vx, x.data()), a.dim, a.eps);
      load_row(a.grad.data, r * a.grad.row_stride, a.dim, vg, dy.data());
      int64_t sample = sample_of(a.sample_index, r);
      const float* scale = a.scale + sample * a.dim;
      float* ds = a.dscale ? a.dscale + (p * a.batch + sample) * a.dim : nullptr;
      float dot = 0.f;
      for (int64_t e = 0; e < a.dim; ++e) {
        float xhat = x[e] * rstd, mod = 1.f + scale[e];
        g[e] = dy[e] * a.weight[e] * mod;
        dot += g[e] * xhat;
        if (dw) dw[e] += dy[e] * mod * xhat;
        if (ds) ds[e] += dy[e] * xhat * a.weight[e];
      }
      for (int64_t e = 0; e < a.dim; ++e) g[e] = rms_norm_dx(g[e], x[e] * rstd, rstd, dot / float(a.dim));
      store_row(a.dx, r * a.dim, a.dim, vout, g.data());
    }
  });
}

void gated_residual_fwd(const GatedResidualArgs& a) {
  bool vx = rows_vec_ok(a.x, a.dim), va = rows_vec_ok(a.a, a.dim), vout = is_aligned(a.out.ptr) && a.dim % kVec == 0;
  for_row_slices(a.rows, row_partials(a.rows), [&](int64_t, int64_t r0, int64_t r1) {
    std::vector<float> x(a.dim), av(a.dim);
    for (int64_t r = r0; r < r1; ++r) {
      float rstd = rms_rstd(load_row(a.a.data, r * a.a.row_stride, a.dim, va, av.data()), a.dim, a.eps);
      load_row(a.x.data, r * a.x.row_stride, a.dim, vx, x.data());
      const float* tg = a.tanh_gate + sample_of(a.sample_index, r) * a.dim;
      for (int64_t e = 0; e < a.dim; ++e) x[e] = gated_residual(x[e], av[e], rstd, a.weight[e], tg[e]);
      store_row(a.out, r * a.dim, a.dim, vout, x.data());
    }
  });
}

void gated_residual_bwd(const GatedResidualBwdArgs& a) {
  bool vg = rows_vec_ok(a.grad, a.dim), va = rows_vec_ok(a.a, a.dim), vout = is_aligned(a.da.ptr) && a.dim % kVec == 0;
  for_row_slices(a.rows, a.partials, [&](int64_t p, int64_t r0, int64_t r1) {
    std::vector<float> av(a.dim), dy(a.dim), g(a.dim);
    float* dw = a.dweight ? a.dweight + p * a.dim : nullptr;
    for (int64_t r = r0; r < r1; ++r) {
      float rstd = rms_rstd(load_row(a.a.data, r * a.a.row_stride, a.dim, va, av.data()), a.dim, a.eps);
      load_row(a.grad.data, r * a.grad.row_stride, a.dim, vg, dy.data());
      int64_t sample = sample_of(a.sample_index, r);
      const float* tg = a.tanh_gate + sample * a.dim;
      float* dgate = a.dgate ? a.dgate + (p * a.batch + sample) * a.dim : nullptr;
      float dot = 0.f;
      for (int64_t e = 0; e < a.dim; ++e) {
        float ahat = av[e] * rstd;
        g[e] = dy[e] * tg[e] * a.weight[e];
        dot += g[e] * ahat;
        if (dw) dw[e] += dy[e] * tg[e] * ahat;
        if (dgate) dgate[e] += dy[e] * ahat * a.weight[e];
      }
      for (int64_t e = 0; e < a.dim; ++e) g[e] = rms_norm_dx(g[e], av[e] * rstd, rstd, dot / float(a.dim));
      store_row(a.da, r * a.dim, a.dim, vout, g.data());
    }
  });
}

void norm_rope_fwd(const NormRopeArgs& a) {
  int64_t hd = a.head_dim, half = hd / 2, rows = a.tokens * a.heads;
  bool vin = is_aligned(a.x.ptr) && a.stride_t % kVec == 0 && a.stride_h % kVec == 0 && hd % kVec == 0;
  bool vout = is_aligned(a.out.ptr) && hd % kVec == 0;
  for_row_slices(rows, row_partials(rows), [&](int64_t, int64_t r0, int64_t r1) {
    std::vector<float> x(hd);
    for (int64_t r = r0; r < r1; ++r) {
      int64_t t = r / a.heads, h = r % a.heads;
      float rstd = rms_rstd(load_row(a.x, t * a.stride_t + h * a.stride_h, hd, vin, x.data()), hd, a.eps);
      for (int64_t i = 0; i < half; ++i) {
        float c = a.cos[t * half + i], s = a.sin[t * half + i];
        rope(x[2 * i] * rstd * a.weight[2 * i], x[2 * i + 1] * rstd * a.weight[2 * i + 1], c, s, x[2 * i],
             x[2 * i + 1]);
      }
      store_row(a.out, r * hd, hd, vout, x.data());
    }
  });
}

void norm_rope_bwd(const NormRopeBwdArgs& a) {
  int64_t hd = a.head_dim, half = hd / 2, rows = a.tokens * a.heads;
  bool vg = is_aligned(a.grad.ptr) && a.grad_stride_t % kVec == 0 && a.grad_stride_h % kVec == 0 && hd % kVec == 0;
  bool vx = is_aligned(a.x.ptr) && a.stride_t % kVec == 0 && a.stride_h % kVec == 0 && hd % kVec == 0;
  bool vout = is_aligned(a.dx.ptr) && hd % kVec == 0;
  for_row_slices(rows, a.partials, [&](int64_t p, int64_t r0, int64_t r1) {
    std::vector<float> x(hd), dn(hd);
    float* dw = a.dweight ? a.dweight + p * hd : nullptr;
    for (int64_t r = r0; r < r1; ++r) {
      int64_t t = r / a.heads, h = r % a.heads;
      float rstd = rms_rstd(load_row(a.x, t * a.stride_t + h * a.stride_h, hd, vx, x.data()), hd, a.eps);
      load_row(a.grad, t * a.grad_stride_t + h * a.grad_stride_h, hd, vg, dn.data());
      for (int64_t i = 0; i < half; ++i)
        rope_inverse(dn[2 * i], dn[2 * i + 1], a.cos[t * half + i], a.sin[t * half + i], dn[2 * i], dn[2 * i + 1]);
      float dot = 0.f;
      for (int64_t e = 0; e < hd; ++e) {
        float xhat = x[e] * rstd;
        if (dw) dw[e] += dn[e] * xhat;
        dn[e] *= a.weight[e];  // dn is now g = dL/dxhat
        dot += dn[e] * xhat;
      }
      for (int64_t e = 0; e < hd; ++e) dn[e] = rms_norm_dx(dn[e], x[e] * rstd, rstd, dot / float(hd));
      store_row(a.dx, r * hd, hd, vout, dn.data());
    }
  });
}

}  // namespace dopsd::cpu
