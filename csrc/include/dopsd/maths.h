// Per-element maths of every op, one copy for the CUDA kernels and the CPU twins: what is tested on the CPU is
// the arithmetic the GPU runs (only the loops and the order of the sums differ). fp32 in, fp32 out.
#pragma once
#include "common.h"

namespace dopsd {

// ---------------------------------------------------------------------------------------------- rollout_step
// x_next = x + step * out_s (FlowConvention.euler); d = loss * (out_s - out_t) (= x0_s - x0_t for the x0 loss)
DOPSD_HD float euler_step(float x, float out_s, float step) { return x + step * out_s; }
DOPSD_HD float loss_diff(float out_s, float out_t, float loss) { return loss * (out_s - out_t); }
// d (d^2) / d out_s
DOPSD_HD float loss_grad(float d, float loss) { return 2.f * loss * d; }

// ------------------------------------------------------------------------------------------------ ema_update
// torch.lerp(t, s, w) with a Scalar weight, bit for bit: for |w| < 0.5 t + w (s - t), else s - (1 - w)(s - t), each a
// fused multiply-add. coef is w or fp32(1 - w) (ema_lerp_coef).
struct LerpCoef {
  float coef;
  bool small;
};

inline LerpCoef ema_lerp_coef(double decay) {
  float w = static_cast<float>(1.0 - decay);
  bool small = std::fabs(w) < 0.5f;
  return {small ? w : 1.f - w, small};
}

DOPSD_HD float ema_lerp(float t, float s, LerpCoef c) {
  float d = s - t;
  return c.small ? fmaf(d, c.coef, t) : fmaf(-d, c.coef, s);
}

// ------------------------------------------------------------------------------------------------ epilogues
// RMSNorm statistics: rstd = 1 / sqrt(mean(x^2) + eps), from the row's sum of squares.
DOPSD_HD float rms_rstd(float sum_sq, int64_t n, float eps) { return rsqrt_(sum_sq / float(n) + eps); }

// modulated_rms_norm: RMSNorm(x) * w * (1 + scale)
DOPSD_HD float modulated_rms(float x, float rstd, float w, float scale) { return x * rstd * w * (1.f + scale); }

// gated_residual: x + tanh(gate) * RMSNorm(a) * w  (tanh_gate precomputed per sample)
DOPSD_HD float gated_residual(float x, float a, float rstd, float w, float tanh_gate) {
  return x + tanh_gate * (a * rstd * w);
}

// RoPE on the adjacent pair (re, im) = (2i, 2i+1): multiply by cos + i sin; the inverse rotation for the backward.
DOPSD_HD void rope(float re, float im, float c, float s, float& out_re, float& out_im) {
  out_re = re * c - im * s;
  out_im = re * s + im * c;
}
DOPSD_HD void rope_inverse(float re, float im, float c, float s, float& out_re, float& out_im) {
  out_re = re * c + im * s;
  out_im = im * c - re * s;
}

// RMSNorm backward: g = dL/dxhat, xhat = x * rstd, mean_g_xhat = mean over the row of g * xhat -> dL/dx.
DOPSD_HD float rms_norm_dx(float g, float xhat, float rstd, float mean_g_xhat) {
  return rstd * (g - xhat * mean_g_xhat);
}

}  // namespace dopsd
