// CUDA block epilogues: modulated RMSNorm, gated RMSNorm residual, per-head RMSNorm + RoPE, forward and backward.
// A "team" (one warp for rows up to 1024 elements, else the whole 256-thread block) owns a row: it reads the row
// once into registers (kVpt vectors of kVec elements per thread, 16-byte loads), reduces the statistics over the
// team, and writes the result. Per-element maths: dopsd/maths.h, shared with csrc/cpu/epilogues.cpp.
// Backward: every team walks a contiguous range of rows and keeps its weight / per-sample sums in registers,
// flushing them to its own fp32 partial slice (summed by the caller in a fixed order: no atomics).
#include <algorithm>

#include "dopsd/cuda_utils.cuh"
#include "dopsd/launch.h"
#include "dopsd/maths.h"

namespace dopsd::cuda {
namespace {

constexpr int kVpt = 4;  // vectors per thread: a warp team covers 1024 elements, a block team 8192

template <int TEAM>
struct Row {
  float v[kVpt][kVec];

  __device__ static int64_t elem(int k, int lane) { return (int64_t(k) * TEAM + lane) * kVec; }

  // Loads dim elements at off (zeros past dim); returns this thread's sum of squares.
  __device__ float load(Buf b, int64_t off, int64_t dim, bool vec_ok, int lane) {
    float sum_sq = 0.f;
#pragma unroll
    for (int k = 0; k < kVpt; ++k) {
      int64_t e = elem(k, lane);
      if (e < dim) {
        load_vec_masked(b, off + e, off + dim, vec_ok, v[k]);
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) v[k][j] = 0.f;
      }
#pragma unroll
      for (int j = 0; j < kVec; ++j) sum_sq += v[k][j] * v[k][j];
    }
    return sum_sq;
  }

  __device__ void store(Buf b, int64_t off, int64_t dim, bool vec_ok, int lane) const {
#pragma unroll
    for (int k = 0; k < kVpt; ++k)
      if (elem(k, lane) < dim) store_vec_masked(b, off + elem(k, lane), off + dim, vec_ok, v[k]);
  }

  __device__ void zero() {
#pragma unroll
    for (int k = 0; k < kVpt; ++k)
#pragma unroll
      for (int j = 0; j < kVec; ++j) v[k][j] = 0.f;
  }

  // dst[e] += v for this thread's elements (dst: a partial slice only this team writes)
  __device__ void add_to(float* dst, int64_t dim, int lane) const {
#pragma unroll
    for (int k = 0; k < kVpt; ++k)
#pragma unroll
      for (int j = 0; j < kVec; ++j)
        if (elem(k, lane) + j < dim) dst[elem(k, lane) + j] += v[k][j];
  }
};

// fp32 parameter row (weight, modulation, cos / sin) element, 0 past dim
__device__ __forceinline__ float param(const float* p, int64_t e, int64_t dim) { return e < dim ? p[e] : 0.f; }

template <int TEAM>
struct TeamIds {
  static constexpr int kTeams = kThreads / TEAM;
  int lane = int(threadIdx.x % TEAM);
  int64_t id = int64_t(blockIdx.x) * kTeams + threadIdx.x / TEAM;  // global team index
  int64_t count = int64_t(gridDim.x) * kTeams;
  // contiguous row range of this team when `rows` are split over all teams (the backward's partial slices)
  __device__ void range(int64_t rows, int64_t& r0, int64_t& r1) const {
    int64_t per = (rows + count - 1) / count;
    r0 = ::min(rows, id * per), r1 = ::min(rows, r0 + per);
  }
};

__device__ __forceinline__ int64_t sample_of(const int64_t* index, int64_t row) { return index ? index[row] : 0; }

// -------------------------------------------------------------------------------------------- modulated RMSNorm
template <int TEAM>
__global__ void __launch_bounds__(kThreads) mrn_fwd(ModulatedRmsArgs a, bool vin, bool vout) {
  TeamIds<TEAM> t;
  for (int64_t r = t.id; r < a.rows; r += t.count) {  // uniform per team
    Row<TEAM> x;
    float rstd = rms_rstd(team_sum<TEAM>(x.load(a.x.data, r * a.x.row_stride, a.dim, vin, t.lane)), a.dim, a.eps);
    const float* scale = a.scale + sample_of(a.sample_index, r) * a.dim;
#pragma unroll
    for (int k = 0; k < kVpt; ++k)
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        int64_t e = Row<TEAM>::elem(k, t.lane) + j;
        x.v[k][j] = modulated_rms(x.v[k][j], rstd, param(a.weight, e, a.dim), param(scale, e, a.dim));
      }
    x.store(a.out, r * a.dim, a.dim, vout, t.lane);
  }
}

template <int TEAM>
__global__ void __launch_bounds__(kThreads) mrn_bwd(ModulatedRmsBwdArgs a, bool vg, bool vx, bool vout) {
  TeamIds<TEAM> t;
  int64_t r0, r1, cur = -1;
  t.range(a.rows, r0, r1);
  Row<TEAM> dw, ds;
  dw.zero();
  ds.zero();
  for (int64_t r = r0; r < r1; ++r) {
    Row<TEAM> x, dy;
    float rstd = rms_rstd(team_sum<TEAM>(x.load(a.x.data, r * a.x.row_stride, a.dim, vx, t.lane)), a.dim, a.eps);
    dy.load(a.grad.data, r * a.grad.row_stride, a.dim, vg, t.lane);
    int64_t sample = sample_of(a.sample_index, r);
    if (a.dscale && sample != cur) {  // per-sample sums: flush when the sample changes (any order is fine)
      if (cur >= 0) ds.add_to(a.dscale + (t.id * a.batch + cur) * a.dim, a.dim, t.lane);
      ds.zero();
      cur = sample;
    }
    const float* scale = a.scale + sample * a.dim;
    float dot = 0.f;
#pragma unroll
    for (int k = 0; k < kVpt; ++k)
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        int64_t e = Row<TEAM>::elem(k, t.lane) + j;
        float xhat = x.v[k][j] * rstd, mod = 1.f + param(scale, e, a.dim), w = param(a.weight, e, a.dim);
        float g = dy.v[k][j] * w * mod;
        dot += g * xhat;
        dw.v[k][j] += dy.v[k][j] * mod * xhat;
        ds.v[k][j] += dy.v[k][j] * xhat * w;
        dy.v[k][j] = g;
      }
    float mean = team_sum<TEAM>(dot) / float(a.dim);
#pragma unroll
    for (int k = 0; k < kVpt; ++k)
#pragma unroll
      for (int j = 0; j < kVec; ++j) dy.v[k][j] = rms_norm_dx(dy.v[k][j], x.v[k][j] * rstd, rstd, mean);
    dy.store(a.dx, r * a.dim, a.dim, vout, t.lane);
  }
  if (a.dscale && cur >= 0) ds.add_to(a.dscale + (t.id * a.batch + cur) * a.dim, a.dim, t.lane);
  if (a.dweight) dw.add_to(a.dweight + t.id * a.dim, a.dim, t.lane);
}

// ----------------------------------------------------------------------------------------------- gated residual
template <int TEAM>
__global__ void __launch_bounds__(kThreads) gr_fwd(GatedResidualArgs a, bool vx, bool va, bool vout) {
  TeamIds<TEAM> t;
  for (int64_t r = t.id; r < a.rows; r += t.count) {
    Row<TEAM> x, av;
    float rstd = rms_rstd(team_sum<TEAM>(av.load(a.a.data, r * a.a.row_stride, a.dim, va, t.lane)), a.dim, a.eps);
    x.load(a.x.data, r * a.x.row_stride, a.dim, vx, t.lane);
    const float* tg = a.tanh_gate + sample_of(a.sample_index, r) * a.dim;
#pragma unroll
    for (int k = 0; k < kVpt; ++k)
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        int64_t e = Row<TEAM>::elem(k, t.lane) + j;
        x.v[k][j] = gated_residual(x.v[k][j], av.v[k][j], rstd, param(a.weight, e, a.dim), param(tg, e, a.dim));
      }
    x.store(a.out, r * a.dim, a.dim, vout, t.lane);
  }
}

template <int TEAM>
__global__ void __launch_bounds__(kThreads) gr_bwd(GatedResidualBwdArgs a, bool vg, bool va, bool vout) {
  TeamIds<TEAM> t;
  int64_t r0, r1, cur = -1;
  t.range(a.rows, r0, r1);
  Row<TEAM> dw, dgate;
  dw.zero();
  dgate.zero();
  for (int64_t r = r0; r < r1; ++r) {
    Row<TEAM> av, dy;
    float rstd = rms_rstd(team_sum<TEAM>(av.load(a.a.data, r * a.a.row_stride, a.dim, va, t.lane)), a.dim, a.eps);
    dy.load(a.grad.data, r * a.grad.row_stride, a.dim, vg, t.lane);
    int64_t sample = sample_of(a.sample_index, r);
    if (a.dgate && sample != cur) {
      if (cur >= 0) dgate.add_to(a.dgate + (t.id * a.batch + cur) * a.dim, a.dim, t.lane);
      dgate.zero();
      cur = sample;
    }
    const float* tg = a.tanh_gate + sample * a.dim;
    float dot = 0.f;
#pragma unroll
    for (int k = 0; k < kVpt; ++k)
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        int64_t e = Row<TEAM>::elem(k, t.lane) + j;
        float ahat = av.v[k][j] * rstd, w = param(a.weight, e, a.dim), gate = param(tg, e, a.dim);
        float g = dy.v[k][j] * gate * w;
        dot += g * ahat;
        dw.v[k][j] += dy.v[k][j] * gate * ahat;
        dgate.v[k][j] += dy.v[k][j] * ahat * w;
        dy.v[k][j] = g;
      }
    float mean = team_sum<TEAM>(dot) / float(a.dim);
#pragma unroll
    for (int k = 0; k < kVpt; ++k)
#pragma unroll
      for (int j = 0; j < kVec; ++j) dy.v[k][j] = rms_norm_dx(dy.v[k][j], av.v[k][j] * rstd, rstd, mean);
    dy.store(a.da, r * a.dim, a.dim, vout, t.lane);
  }
  if (a.dgate && cur >= 0) dgate.add_to(a.dgate + (t.id * a.batch + cur) * a.dim, a.dim, t.lane);
  if (a.dweight) dw.add_to(a.dweight + t.id * a.dim, a.dim, t.lane);
}

// ------------------------------------------------------------------------------------------ per-head norm + RoPE
// One warp per (token, head) row of head_dim <= 1024; a vector of kVec elements holds kVec / 2 whole pairs.
__global__ void __launch_bounds__(kThreads) norm_rope_fwd_kernel(NormRopeArgs a, bool vin, bool vout) {
  TeamIds<32> t;
  const int64_t hd = a.head_dim, half = hd / 2;
  for (int64_t r = t.id; r < a.tokens * a.heads; r += t.count) {
    int64_t tok = r / a.heads, h = r % a.heads;
    Row<32> x;
    float rstd = rms_rstd(team_sum<32>(x.load(a.x, tok * a.stride_t + h * a.stride_h, hd, vin, t.lane)), hd, a.eps);
#pragma unroll
    for (int k = 0; k < kVpt; ++k)
#pragma unroll
      for (int j = 0; j < kVec; j += 2) {
        int64_t e = Row<32>::elem(k, t.lane) + j;
        float c = param(a.cos + tok * half, e / 2, half), s = param(a.sin + tok * half, e / 2, half);
        rope(x.v[k][j] * rstd * param(a.weight, e, hd), x.v[k][j + 1] * rstd * param(a.weight, e + 1, hd), c, s,
             x.v[k][j], x.v[k][j + 1]);
      }
    x.store(a.out, r * hd, hd, vout, t.lane);
  }
}

__global__ void __launch_bounds__(kThreads) norm_rope_bwd_kernel(NormRopeBwdArgs a, bool vg, bool vx, bool vout) {
  TeamIds<32> t;
  const int64_t hd = a.head_dim, half = hd / 2;
  int64_t r0, r1;
  t.range(a.tokens * a.heads, r0, r1);
  Row<32> dw;
  dw.zero();
  for (int64_t r = r0; r < r1; ++r) {
    int64_t tok = r / a.heads, h = r % a.heads;
    Row<32> x, dn;
    float rstd = rms_rstd(team_sum<32>(x.load(a.x, tok * a.stride_t + h * a.stride_h, hd, vx, t.lane)), hd, a.eps);
    dn.load(a.grad, tok * a.grad_stride_t + h * a.grad_stride_h, hd, vg, t.lane);
    float dot = 0.f;
#pragma unroll
    for (int k = 0; k < kVpt; ++k)
#pragma unroll
      for (int j = 0; j < kVec; j += 2) {
        int64_t e = Row<32>::elem(k, t.lane) + j;
        float c = param(a.cos + tok * half, e / 2, half), s = param(a.sin + tok * half, e / 2, half);
        rope_inverse(dn.v[k][j], dn.v[k][j + 1], c, s, dn.v[k][j], dn.v[k][j + 1]);
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          float xhat = x.v[k][j + q] * rstd;
          dw.v[k][j + q] += dn.v[k][j + q] * xhat;
          dn.v[k][j + q] *= param(a.weight, e + q, hd);  // now dL/dxhat
          dot += dn.v[k][j + q] * xhat;
        }
      }
    float mean = team_sum<32>(dot) / float(hd);
#pragma unroll
    for (int k = 0; k < kVpt; ++k)
#pragma unroll
      for (int j = 0; j < kVec; ++j) dn.v[k][j] = rms_norm_dx(dn.v[k][j], x.v[k][j] * rstd, rstd, mean);
    dn.store(a.dx, r * hd, hd, vout, t.lane);
  }
  if (a.dweight) dw.add_to(a.dweight + t.id * hd, hd, t.lane);
}

// ------------------------------------------------------------------------------------------------------ launch
bool rows_vec_ok(const RowsIn& r, int64_t dim) {
  return is_aligned(r.data.ptr) && r.row_stride % kVec == 0 && dim % kVec == 0;
}
bool out_vec_ok(const Buf& b, int64_t dim) { return is_aligned(b.ptr) && dim % kVec == 0; }

bool warp_team(int64_t dim) { return dim <= 32 * kVec * kVpt; }

int teams_per_block(int64_t dim) { return warp_team(dim) ? kThreads / 32 : 1; }

// forward: a persistent grid of at most 8 blocks per SM, rows strided over the teams
unsigned fwd_blocks(int64_t rows, int64_t dim) {
  return unsigned(std::clamp<int64_t>(ceil_div(rows, teams_per_block(dim)), 1, 8 * sm_count(current_device())));
}

}  // namespace

int64_t row_partials(int64_t rows, int64_t dim, int device) {
  // backward: two blocks per SM (or fewer when rows are few); one partial slice per team
  int64_t blocks = std::clamp<int64_t>(ceil_div(rows, 4 * teams_per_block(dim)), 1, 2 * sm_count(device));
  return blocks * teams_per_block(dim);
}

void modulated_rms_norm_fwd(const ModulatedRmsArgs& a, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  bool vin = rows_vec_ok(a.x, a.dim), vout = out_vec_ok(a.out, a.dim);
  if (warp_team(a.dim)) mrn_fwd<32><<<fwd_blocks(a.rows, a.dim), kThreads, 0, s>>>(a, vin, vout);
  else mrn_fwd<kThreads><<<fwd_blocks(a.rows, a.dim), kThreads, 0, s>>>(a, vin, vout);
}

void modulated_rms_norm_bwd(const ModulatedRmsBwdArgs& a, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  bool vg = rows_vec_ok(a.grad, a.dim), vx = rows_vec_ok(a.x, a.dim), vout = out_vec_ok(a.dx, a.dim);
  unsigned blocks = unsigned(a.partials / teams_per_block(a.dim));
  if (warp_team(a.dim)) mrn_bwd<32><<<blocks, kThreads, 0, s>>>(a, vg, vx, vout);
  else mrn_bwd<kThreads><<<blocks, kThreads, 0, s>>>(a, vg, vx, vout);
}

void gated_residual_fwd(const GatedResidualArgs& a, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  bool vx = rows_vec_ok(a.x, a.dim), va = rows_vec_ok(a.a, a.dim), vout = out_vec_ok(a.out, a.dim);
  if (warp_team(a.dim)) gr_fwd<32><<<fwd_blocks(a.rows, a.dim), kThreads, 0, s>>>(a, vx, va, vout);
  else gr_fwd<kThreads><<<fwd_blocks(a.rows, a.dim), kThreads, 0, s>>>(a, vx, va, vout);
}

void gated_residual_bwd(const GatedResidualBwdArgs& a, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  bool vg = rows_vec_ok(a.grad, a.dim), va = rows_vec_ok(a.a, a.dim), vout = out_vec_ok(a.da, a.dim);
  unsigned blocks = unsigned(a.partials / teams_per_block(a.dim));
  if (warp_team(a.dim)) gr_bwd<32><<<blocks, kThreads, 0, s>>>(a, vg, va, vout);
  else gr_bwd<kThreads><<<blocks, kThreads, 0, s>>>(a, vg, va, vout);
}

void norm_rope_fwd(const NormRopeArgs& a, void* stream) {
  int64_t hd = a.head_dim;
  bool vin = is_aligned(a.x.ptr) && a.stride_t % kVec == 0 && a.stride_h % kVec == 0 && hd % kVec == 0;
  norm_rope_fwd_kernel<<<fwd_blocks(a.tokens * a.heads, hd), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      a, vin, out_vec_ok(a.out, hd));
}

void norm_rope_bwd(const NormRopeBwdArgs& a, void* stream) {
  int64_t hd = a.head_dim;
  bool vg = is_aligned(a.grad.ptr) && a.grad_stride_t % kVec == 0 && a.grad_stride_h % kVec == 0 && hd % kVec == 0;
  bool vx = is_aligned(a.x.ptr) && a.stride_t % kVec == 0 && a.stride_h % kVec == 0 && hd % kVec == 0;
  norm_rope_bwd_kernel<<<unsigned(a.partials / teams_per_block(hd)), kThreads, 0,
                         static_cast<cudaStream_t>(stream)>>>(a, vg, vx, out_vec_ok(a.dx, hd));
}

}  // namespace dopsd::cuda
