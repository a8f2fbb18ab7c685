// Raw-pointer entry points of every op: dopsd::cpu:: (csrc/cpu, at::parallel_for) and dopsd::cuda:: (csrc/cuda,
// nvcc). csrc/ops.cpp checks and allocates the torch tensors once, fills these structs and calls one or the other.
// No torch and no CUDA headers here, so the .cu files compile with nvcc alone (the CI check).
#pragma once
#include <cstdint>

#include "common.h"

namespace dopsd {

struct RolloutFwdArgs {
  Buf x, out_s, out_t, x_next;  // (total,), x_next in x's dtype
  float* grad;                  // (total,) fp32 d sq_sum / d out_s, or nullptr
  const int32_t* cu_seqlens;    // (B+1,)
  const float *step_coef, *loss_coef;
  float* partials;              // (B, programs) fp32 scratch
  float* sq_sum;                // (B,) fp32
  int64_t batch, programs;
};

struct RolloutBwdArgs {
  const float* grad;          // (total,) fp32 from the forward
  const int32_t* cu_seqlens;  // (B+1,)
  const float* grad_sq_sum;   // (B,)
  Buf out;                    // (total,)
  int64_t batch, programs;
};

// ema_update: one int64 row per chunk of at most kEmaChunk elements:
// [teacher addr, student addr, student dtype, lowp addr or 0, lowp dtype, n]
constexpr int kEmaRow = 6;
constexpr int64_t kEmaChunk = 8192;
struct EmaArgs {
  const int64_t* table;
  int64_t chunks;
  double decay;
};

// Row-wise epilogues over (rows, D) with a row stride; modulation rows (B, D) are fp32 and contiguous, picked by
// sample_index (nullptr when B == 1). Backward partial sums: `partials` slices, each (D,) or (B, D) fp32 zeroed.
struct RowsIn {
  Buf data;
  int64_t row_stride;
};

struct ModulatedRmsArgs {
  RowsIn x;
  Buf out;                    // contiguous (T, D)
  const float *weight, *scale;
  const int64_t* sample_index;
  int64_t rows, dim, batch;
  float eps;
};

struct ModulatedRmsBwdArgs {
  RowsIn grad, x;
  Buf dx;                     // contiguous
  const float *weight, *scale;
  const int64_t* sample_index;
  float *dweight, *dscale;    // (partials, D), (partials, B, D) fp32, or nullptr when not asked
  int64_t rows, dim, batch, partials;
  float eps;
};

struct GatedResidualArgs {
  RowsIn x, a;
  Buf out;
  const float *weight, *tanh_gate;
  const int64_t* sample_index;
  int64_t rows, dim, batch;
  float eps;
};

struct GatedResidualBwdArgs {
  RowsIn grad, a;
  Buf da;
  const float *weight, *tanh_gate;
  const int64_t* sample_index;
  float *dweight, *dgate;     // dgate: sum of dy * ahat * w per sample, before the (1 - tanh^2) factor
  int64_t rows, dim, batch, partials;
  float eps;
};

// One of q or k: (T, H, head_dim) with token / head strides; out contiguous; cos/sin fp32 (T, head_dim / 2).
struct NormRopeArgs {
  Buf x;
  int64_t stride_t, stride_h;
  Buf out;
  const float *weight, *cos, *sin;
  int64_t tokens, heads, head_dim;
  float eps;
};

struct NormRopeBwdArgs {
  Buf grad;
  int64_t grad_stride_t, grad_stride_h;
  Buf x;
  int64_t stride_t, stride_h;
  Buf dx;
  const float *weight, *cos, *sin;
  float* dweight;             // (partials, head_dim) or nullptr
  int64_t tokens, heads, head_dim, partials;
  float eps;
};

#define DOPSD_DECLARE_OPS(...)                                          \
  void rollout_step_fwd(const RolloutFwdArgs& a __VA_ARGS__);            \
  void rollout_step_bwd(const RolloutBwdArgs& a __VA_ARGS__);            \
  void ema_update(const EmaArgs& a __VA_ARGS__);                        \
  void modulated_rms_norm_fwd(const ModulatedRmsArgs& a __VA_ARGS__);   \
  void modulated_rms_norm_bwd(const ModulatedRmsBwdArgs& a __VA_ARGS__); \
  void gated_residual_fwd(const GatedResidualArgs& a __VA_ARGS__);      \
  void gated_residual_bwd(const GatedResidualBwdArgs& a __VA_ARGS__);   \
  void norm_rope_fwd(const NormRopeArgs& a __VA_ARGS__);                \
  void norm_rope_bwd(const NormRopeBwdArgs& a __VA_ARGS__);

namespace cpu {
DOPSD_DECLARE_OPS()
int64_t row_partials(int64_t rows);                     // backward partial slices for `rows` rows
int64_t rollout_programs(int64_t total, int64_t batch);  // programs per segment
}  // namespace cpu

namespace cuda {
constexpr int64_t kMaxRow = 8192;      // longest epilogue row (D) the CUDA kernels hold in registers
constexpr int64_t kMaxHeadDim = 1024;  // longest qk_norm_rope head (one warp per head)
DOPSD_DECLARE_OPS(, void* stream)  // stream: a cudaStream_t
int64_t row_partials(int64_t rows, int64_t dim, int device);
int64_t rollout_programs(int64_t total, int64_t batch, int device);
}  // namespace cuda

#undef DOPSD_DECLARE_OPS

}  // namespace dopsd
