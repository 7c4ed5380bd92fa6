// 8-bit blockwise Adam state of lowrank.adam_lowrank_8bit_: the two code maps and the input checks, shared by
// the CPU and CUDA kernels so both decode and encode bit for bit alike (and like lowrank.reference).
// The state is flattened and cut into blocks of kState8Block elements, each with one float32 absmax.
//   exp_avg (int8):     value = sign(k)·(|k|/127)²·absmax      k = sign(m)·rint(127·√(|m|/absmax))
//   exp_avg_sq (uint8): value = (k/255)⁴·absmax                k = rint(255·√√(v/absmax))
// Companding maps (power laws) rather than bitsandbytes' 256-entry dynamic table: the code is a closed form
// (no table search), reproduced exactly by IEEE ops in the pure-torch reference, and the range is as wide:
// m rounds to 0 below 1.6e-5 of its block's absmax, v below 1.5e-11 (√v below 3.8e-6 of √absmax), so Adam's
// denominator √v is almost never zeroed under a nonzero m (a linear map of v would zero √v below 0.044·√absmax).
// Every step is one correctly rounded IEEE op (no fused multiply-add): the device versions use the _rn
// intrinsics, which nvcc never contracts.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/checks.h"
#include "projection/projection_common.h"

#ifdef __CUDACC__
#define LOWRANK_HD __host__ __device__ __forceinline__
#else
#define LOWRANK_HD inline
#endif

namespace lowrank {

constexpr char kAdam8Op[] = "lowrank.adam_lowrank_8bit_";
constexpr int64_t kState8Block = 256;

namespace state8 {

LOWRANK_HD float mul(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
LOWRANK_HD float add(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
LOWRANK_HD float div(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
LOWRANK_HD float sqrt_rn(float a) {
#ifdef __CUDA_ARCH__
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}
LOWRANK_HD float round_even(float a) {
#ifdef __CUDA_ARCH__
  return rintf(a);
#else
  // to nearest, ties to even (torch.round), for 0 <= a < 2^22: adding 1.5·2^23 leaves no fraction bits, so the
  // sum is rounded to an integer in the default rounding mode and the subtraction is exact. Inline (std::nearbyint
  // is a libm call); IEEE semantics (no -ffast-math) keep the compiler from folding it back to a.
  constexpr float big = 12582912.f;
  return (a + big) - big;
#endif
}

LOWRANK_HD float decode_m(int8_t k, float absmax) {
  const float t = div(static_cast<float>(k < 0 ? -k : k), 127.f);
  const float v = mul(mul(t, t), absmax);
  return k < 0 ? -v : v;
}
LOWRANK_HD float decode_v(uint8_t k, float absmax) {
  const float t = div(static_cast<float>(k), 255.f), t2 = mul(t, t);
  return mul(mul(t2, t2), absmax);
}
// absmax is the block's max |m| (max v), so the ratio is in [0, 1] and k in [0, 127] ([0, 255]).
LOWRANK_HD int8_t encode_m(float m, float absmax) {
  if (!(absmax > 0.f)) return 0;
  const float k = round_even(mul(127.f, sqrt_rn(div(m < 0.f ? -m : m, absmax))));
  return static_cast<int8_t>(m < 0.f ? -k : k);
}
LOWRANK_HD uint8_t encode_v(float v, float absmax) {
  if (!(absmax > 0.f)) return 0;
  return static_cast<uint8_t>(round_even(mul(255.f, sqrt_rn(sqrt_rn(div(v, absmax))))));
}

// One Adam step of an element, the same float32 ops as adam_lowrank_ (each product rounded, then the sum).
LOWRANK_HD void adam_element(float& m, float& v, float g, float b1, float c1, float b2, float c2) {
  m = add(mul(m, b1), mul(c1, g));
  v = add(mul(v, b2), mul(c2, mul(g, g)));
}

}  // namespace state8

inline int64_t state8_blocks(int64_t numel) { return (numel + kState8Block - 1) / kState8Block; }

// exp_avg int8, exp_avg_sq uint8, both contiguous and of R's shape; the absmax vectors float32, contiguous,
// one entry per block of kState8Block; R float32, any strides; all on one device, the in-place ones distinct.
inline void check_adam8_args(const Tensor& m, const Tensor& m_absmax, const Tensor& v, const Tensor& v_absmax,
                             const Tensor& R) {
  const char* op = kAdam8Op;
  LOWRANK_CHECK(R.scalar_type() == ScalarType::Float, op, ": R must be float32 (got ",
                dtype_str(R.scalar_type()), ")");
  LOWRANK_CHECK(m.scalar_type() == ScalarType::Char, op, ": exp_avg must be int8, signed codes (got ",
                dtype_str(m.scalar_type()), ")");
  LOWRANK_CHECK(v.scalar_type() == ScalarType::Byte, op, ": exp_avg_sq must be uint8, unsigned codes (got ",
                dtype_str(v.scalar_type()), ")");
  check_same_device(op, R, "R", m, "exp_avg");
  check_same_device(op, R, "R", m_absmax, "exp_avg_absmax");
  check_same_device(op, R, "R", v, "exp_avg_sq");
  check_same_device(op, R, "R", v_absmax, "exp_avg_sq_absmax");
  check_moments_shape(op, R, m, v);
  LOWRANK_CHECK(m.is_contiguous(), op, ": exp_avg must be contiguous (it is updated in place)");
  LOWRANK_CHECK(v.is_contiguous(), op, ": exp_avg_sq must be contiguous (it is updated in place)");
  const int64_t blocks = state8_blocks(R.numel());
  const Tensor* absmaxes[2] = {&m_absmax, &v_absmax};
  const char* names[2] = {"exp_avg_absmax", "exp_avg_sq_absmax"};
  for (int i = 0; i < 2; ++i) {
    const Tensor& a = *absmaxes[i];
    LOWRANK_CHECK(a.scalar_type() == ScalarType::Float, op, ": ", names[i], " must be float32 (got ",
                  dtype_str(a.scalar_type()), ")");
    LOWRANK_CHECK(a.dim() == 1 && a.size(0) == blocks, op, ": ", names[i], " must be 1-D of length ", blocks,
                  ", one absmax per block of ", kState8Block, " elements of R (got shape ", shape_str(a), ")");
    LOWRANK_CHECK(a.is_contiguous(), op, ": ", names[i], " must be contiguous (it is updated in place)");
  }
  // every in-place tensor against every other argument: views that overlap count (a race, or a read of
  // half-updated state), not only the same tensor passed twice
  check_no_overlap(op, m, "exp_avg", v, "exp_avg_sq");
  check_no_overlap(op, m, "exp_avg", m_absmax, "exp_avg_absmax");
  check_no_overlap(op, m, "exp_avg", v_absmax, "exp_avg_sq_absmax");
  check_no_overlap(op, m, "exp_avg", R, "R");
  check_no_overlap(op, v, "exp_avg_sq", m_absmax, "exp_avg_absmax");
  check_no_overlap(op, v, "exp_avg_sq", v_absmax, "exp_avg_sq_absmax");
  check_no_overlap(op, v, "exp_avg_sq", R, "R");
  check_no_overlap(op, m_absmax, "exp_avg_absmax", v_absmax, "exp_avg_sq_absmax");
  check_no_overlap(op, m_absmax, "exp_avg_absmax", R, "R");
  check_no_overlap(op, v_absmax, "exp_avg_sq_absmax", R, "R");
}

}  // namespace lowrank
