// Storage types and conversions shared by the CUDA kernels and the CPU twins (no torch, no CUDA runtime needed
// on the host side). Every big tensor travels as a Buf: an address and a run-time dtype; values are converted to
// fp32 on load and rounded to nearest even once on store, on the host and on the device alike.
#pragma once
#include <cstdint>
#include <cstring>
#include <cmath>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define DOPSD_HD __host__ __device__ __forceinline__
#else
#define DOPSD_HD inline
#endif

namespace dopsd {

enum class DType : int32_t { f32 = 0, bf16 = 1, f16 = 2 };

struct Buf {
  void* ptr;
  DType dtype;
};

constexpr int kVec = 8;  // elements per vector access: 16 bytes of bf16/fp16, two 16-byte accesses of fp32

DOPSD_HD int elem_size(DType d) { return d == DType::f32 ? 4 : 2; }

DOPSD_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

DOPSD_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

DOPSD_HD float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

DOPSD_HD uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN (torch's canonical quiet NaN)
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

DOPSD_HD float f16_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  uint32_t sign = uint32_t(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {  // zero or subnormal: m * 2^-24, exact in fp32
    float v = float(m) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  if (e == 31) return bits_to_float(sign | 0x7f800000u | (m << 13));
  return bits_to_float(sign | ((e + 112u) << 23) | (m << 13));
#endif
}

DOPSD_HD uint16_t float_to_f16(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  uint32_t x = float_to_bits(f), a = x & 0x7fffffffu;
  uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  if (a > 0x7f800000u) return sign | 0x7e00;   // NaN
  if (a >= 0x47800000u) return sign | 0x7c00;  // >= 2^16 (and inf): overflow
  if (a <= 0x33000000u) return sign;           // <= 2^-25: rounds to zero (the tie goes to even 0)
  int e = int(a >> 23) - 127;
  uint32_t mant = (a & 0x7fffffu) | 0x800000u, r, rem, half;
  if (e < -14) {  // half subnormal: units of 2^-24
    int shift = -e - 1;
    r = mant >> shift, rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
  } else {        // normal: drop 13 mantissa bits; a carry rolls into the exponent (up to inf), as it should
    r = (uint32_t(e + 15) << 10) | ((mant >> 13) & 0x3ffu), rem = mant & 0x1fffu, half = 0x1000u;
  }
  if (rem > half || (rem == half && (r & 1u))) ++r;
  return sign | uint16_t(r);
#endif
}

DOPSD_HD float load(Buf b, int64_t i) {
  switch (b.dtype) {
    case DType::f32: return static_cast<const float*>(b.ptr)[i];
    case DType::bf16: return bf16_to_float(static_cast<const uint16_t*>(b.ptr)[i]);
    default: return f16_to_float(static_cast<const uint16_t*>(b.ptr)[i]);
  }
}

DOPSD_HD void store(Buf b, int64_t i, float v) {
  switch (b.dtype) {
    case DType::f32: static_cast<float*>(b.ptr)[i] = v; break;
    case DType::bf16: static_cast<uint16_t*>(b.ptr)[i] = float_to_bf16(v); break;
    default: static_cast<uint16_t*>(b.ptr)[i] = float_to_f16(v); break;
  }
}

struct alignas(16) Raw16 {
  uint32_t w[4];
};

DOPSD_HD Raw16 load16(const void* p) {
#if defined(__CUDA_ARCH__)
  uint4 v = *static_cast<const uint4*>(p);
  return Raw16{{v.x, v.y, v.z, v.w}};
#else
  Raw16 r;
  std::memcpy(&r, p, 16);
  return r;
#endif
}

DOPSD_HD void store16(void* p, Raw16 r) {
#if defined(__CUDA_ARCH__)
  *static_cast<uint4*>(p) = make_uint4(r.w[0], r.w[1], r.w[2], r.w[3]);
#else
  std::memcpy(p, &r, 16);
#endif
}

// kVec elements starting at element i; the address must be 16-byte aligned (callers check, see is_aligned).
DOPSD_HD void load_vec(Buf b, int64_t i, float v[kVec]) {
  if (b.dtype == DType::f32) {
    const float* p = static_cast<const float*>(b.ptr) + i;
    for (int h = 0; h < 2; ++h) {
      Raw16 r = load16(p + 4 * h);
      for (int j = 0; j < 4; ++j) v[4 * h + j] = bits_to_float(r.w[j]);
    }
    return;
  }
  Raw16 r = load16(static_cast<const uint16_t*>(b.ptr) + i);
  for (int j = 0; j < kVec; ++j) {
    uint16_t h = uint16_t(r.w[j / 2] >> (16 * (j % 2)));
    v[j] = b.dtype == DType::bf16 ? bf16_to_float(h) : f16_to_float(h);
  }
}

DOPSD_HD void store_vec(Buf b, int64_t i, const float v[kVec]) {
  if (b.dtype == DType::f32) {
    float* p = static_cast<float*>(b.ptr) + i;
    for (int h = 0; h < 2; ++h) store16(p + 4 * h, Raw16{{float_to_bits(v[4 * h]), float_to_bits(v[4 * h + 1]),
                                                          float_to_bits(v[4 * h + 2]), float_to_bits(v[4 * h + 3])}});
    return;
  }
  Raw16 r;
  for (int j = 0; j < 4; ++j) {
    uint16_t lo = b.dtype == DType::bf16 ? float_to_bf16(v[2 * j]) : float_to_f16(v[2 * j]);
    uint16_t hi = b.dtype == DType::bf16 ? float_to_bf16(v[2 * j + 1]) : float_to_f16(v[2 * j + 1]);
    r.w[j] = uint32_t(lo) | (uint32_t(hi) << 16);
  }
  store16(static_cast<uint16_t*>(b.ptr) + i, r);
}

// Loads kVec elements at i, zeros past n (scalar loads when the vector path is not allowed or the tail is short).
DOPSD_HD void load_vec_masked(Buf b, int64_t i, int64_t n, bool vec_ok, float v[kVec]) {
  if (vec_ok && i + kVec <= n) return load_vec(b, i, v);
  for (int j = 0; j < kVec; ++j) v[j] = i + j < n ? load(b, i + j) : 0.f;
}

DOPSD_HD void store_vec_masked(Buf b, int64_t i, int64_t n, bool vec_ok, const float v[kVec]) {
  if (vec_ok && i + kVec <= n) return store_vec(b, i, v);
  for (int j = 0; j < kVec; ++j)
    if (i + j < n) store(b, i + j, v[j]);
}

inline bool is_aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

DOPSD_HD float rsqrt_(float v) {
#if defined(__CUDA_ARCH__)
  return rsqrtf(v);
#else
  return 1.f / std::sqrt(v);
#endif
}

}  // namespace dopsd
