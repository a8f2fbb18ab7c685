// CUDA rollout_step (fused Euler step + per-sample squared error + its gradient) and multi-tensor ema_update.
// Per-element maths: dopsd/maths.h, shared with the CPU twins in csrc/cpu/rollout_ema.cpp.
#include <algorithm>

#include "dopsd/cuda_utils.cuh"
#include "dopsd/launch.h"
#include "dopsd/maths.h"

namespace dopsd::cuda {
namespace {

// [body, body_end): the 16-byte aligned part of segment [start, end) (empty when the vector path is off)
__device__ __forceinline__ void vector_body(int64_t start, int64_t end, bool vec_ok, int64_t& body, int64_t& body_end) {
  body = vec_ok ? ::min(end, (start + kVec - 1) / kVec * kVec) : end;
  body_end = vec_ok ? ::max(body, end / kVec * kVec) : end;
}

// Grid (B, P): block (b, p) walks segment b with a stride of P blocks; 16-byte vectors on the aligned body, the
// scalar head / tail by block p == 0 (all elements scalar over the P blocks when a buffer is misaligned).
// Writes one fp32 partial sum per block: partials[b, p] (no atomics).
__global__ void __launch_bounds__(kThreads) rollout_fwd_kernel(RolloutFwdArgs a, bool vec_ok) {
  const int64_t b = blockIdx.x, p = blockIdx.y, P = gridDim.y;
  const int64_t start = a.cu_seqlens[b], end = a.cu_seqlens[b + 1];
  const float step = a.step_coef[b], loss = a.loss_coef[b];
  const Buf grad{a.grad, DType::f32};
  int64_t body, body_end;
  vector_body(start, end, vec_ok, body, body_end);
  float acc = 0.f;
  for (int64_t i = body + (p * kThreads + threadIdx.x) * kVec; i < body_end; i += P * kThreads * kVec) {
    float x[kVec], s[kVec], t[kVec], xn[kVec], g[kVec];
    load_vec(a.x, i, x);
    load_vec(a.out_s, i, s);
    load_vec(a.out_t, i, t);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      xn[j] = euler_step(x[j], s[j], step);
      float d = loss_diff(s[j], t[j], loss);
      acc += d * d;
      g[j] = loss_grad(d, loss);
    }
    store_vec(a.x_next, i, xn);
    if (a.grad) store_vec(grad, i, g);
  }
  auto scalar = [&](int64_t i) {
    float s = load(a.out_s, i), d = loss_diff(s, load(a.out_t, i), loss);
    store(a.x_next, i, euler_step(load(a.x, i), s, step));
    acc += d * d;
    if (a.grad) store(grad, i, loss_grad(d, loss));
  };
  if (!vec_ok) {  // misaligned buffers: every element scalar, over all P blocks
    for (int64_t i = start + p * kThreads + threadIdx.x; i < end; i += P * kThreads) scalar(i);
  } else if (p == 0) {  // at most kVec - 1 elements on each side of the vector body
    for (int64_t i = start + threadIdx.x; i < body; i += kThreads) scalar(i);
    for (int64_t i = body_end + threadIdx.x; i < end; i += kThreads) scalar(i);
  }
  acc = team_sum<kThreads>(acc);
  if (threadIdx.x == 0) a.partials[b * P + p] = acc;
}

__global__ void row_sum_kernel(const float* partials, float* out, int64_t batch, int64_t P) {
  int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (b >= batch) return;
  float s = 0.f;
  for (int64_t p = 0; p < P; ++p) s += partials[b * P + p];  // fixed order
  out[b] = s;
}

__global__ void __launch_bounds__(kThreads) rollout_bwd_kernel(RolloutBwdArgs a, bool vec_ok) {
  const int64_t b = blockIdx.x, p = blockIdx.y, P = gridDim.y;
  const int64_t start = a.cu_seqlens[b], end = a.cu_seqlens[b + 1];
  const float scale = a.grad_sq_sum[b];
  const Buf grad{const_cast<float*>(a.grad), DType::f32};
  int64_t body, body_end;
  vector_body(start, end, vec_ok, body, body_end);
  for (int64_t i = body + (p * kThreads + threadIdx.x) * kVec; i < body_end; i += P * kThreads * kVec) {
    float g[kVec];
    load_vec(grad, i, g);
#pragma unroll
    for (int j = 0; j < kVec; ++j) g[j] *= scale;
    store_vec(a.out, i, g);
  }
  if (!vec_ok) {
    for (int64_t i = start + p * kThreads + threadIdx.x; i < end; i += P * kThreads) store(a.out, i, a.grad[i] * scale);
  } else if (p == 0) {
    for (int64_t i = start + threadIdx.x; i < body; i += kThreads) store(a.out, i, a.grad[i] * scale);
    for (int64_t i = body_end + threadIdx.x; i < end; i += kThreads) store(a.out, i, a.grad[i] * scale);
  }
}

// Persistent grid over the chunk table: block c handles chunks c, c + grid, ...; each chunk is one tensor piece
// of at most kEmaChunk elements with its own dtypes, so one launch covers every parameter.
__global__ void __launch_bounds__(kThreads) ema_kernel(EmaArgs a, LerpCoef coef) {
  for (int64_t c = blockIdx.x; c < a.chunks; c += gridDim.x) {
    const int64_t* row = a.table + c * kEmaRow;
    const Buf teacher{reinterpret_cast<void*>(row[0]), DType::f32};
    const Buf student{reinterpret_cast<void*>(row[1]), static_cast<DType>(row[2])};
    const Buf lowp{reinterpret_cast<void*>(row[3]), static_cast<DType>(row[4])};
    const int64_t n = row[5];
    const bool vec_ok = ((row[0] | row[1] | row[3]) & 15) == 0;
    for (int64_t i = int64_t(threadIdx.x) * kVec; i < n; i += kThreads * kVec) {
      float t[kVec], s[kVec];
      load_vec_masked(teacher, i, n, vec_ok, t);
      load_vec_masked(student, i, n, vec_ok, s);
#pragma unroll
      for (int j = 0; j < kVec; ++j) t[j] = ema_lerp(t[j], s[j], coef);
      store_vec_masked(teacher, i, n, vec_ok, t);
      if (lowp.ptr) store_vec_masked(lowp, i, n, vec_ok, t);
    }
  }
}

bool all_aligned(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (p && !is_aligned(p)) return false;
  return true;
}

}  // namespace

int64_t rollout_programs(int64_t total, int64_t batch, int device) {
  // enough blocks for ~4 waves over the SMs, at most one per kThreads * kVec elements of a mean segment
  int64_t mean = ceil_div(std::max<int64_t>(total, 1), std::max<int64_t>(batch, 1));
  int64_t budget = std::max<int64_t>(1, 4 * sm_count(device) / std::max<int64_t>(batch, 1));
  return std::clamp<int64_t>(std::min(ceil_div(mean, kThreads * kVec), budget), 1, 1024);
}

void rollout_step_fwd(const RolloutFwdArgs& a, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  bool vec_ok = all_aligned({a.x.ptr, a.out_s.ptr, a.out_t.ptr, a.x_next.ptr, a.grad});
  rollout_fwd_kernel<<<dim3(unsigned(a.batch), unsigned(a.programs)), kThreads, 0, s>>>(a, vec_ok);
  row_sum_kernel<<<unsigned(ceil_div(a.batch, kThreads)), kThreads, 0, s>>>(a.partials, a.sq_sum, a.batch, a.programs);
}

void rollout_step_bwd(const RolloutBwdArgs& a, void* stream) {
  bool vec_ok = all_aligned({a.grad, a.out.ptr});
  rollout_bwd_kernel<<<dim3(unsigned(a.batch), unsigned(a.programs)), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      a, vec_ok);
}

void ema_update(const EmaArgs& a, void* stream) {
  unsigned blocks = unsigned(std::min<int64_t>(a.chunks, 4 * sm_count(current_device())));
  ema_kernel<<<blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(a, ema_lerp_coef(a.decay));
}

}  // namespace dopsd::cuda
