// iFairy (Fairy±i) shape contract and the scalar rules shared by the CPU and CUDA kernels.
//   Codes: 0 = -1, 1 = +1, 2 = -i, 3 = +i (bit 1 = imaginary axis, bit 0 = positive).
//   packed: uint8 (out, ceil(in/4)); element j of a row sits in byte j/4 at bits 2·(j%4), low bits first;
//   padding codes of the last byte are written 0 and ignored on read. scales: float32 [s_re, s_im].
//   ifairy_linear: y = W·conj(x) per token; x_real, x_imag (..., in) -> y_real, y_imag (..., out).
#pragma once
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "common/checks.h"

#if defined(__CUDACC__)
#define LOWRANK_HD __host__ __device__ __forceinline__
#else
#define LOWRANK_HD inline
#endif

namespace lowrank {
namespace ifairy {

constexpr float kScaleMin = 1e-5f;  // clamp of both weight scales and of the activation absmax

// PhaseQuant: the fourth root of unity nearest by phase, with iFairy's half-open sectors of
// phase = atan2(wi, wr) ∈ (-π, π]:  [-π/4, π/4) -> +1, [π/4, 3π/4) -> +i, [-3π/4, -π/4) -> -i, else -1.
// Written with exact comparisons (no atan2, so no rounding at the boundaries): 1+1i -> +i, 1-1i -> +1,
// -1+1i -> -1, -1-1i -> -i. Zero (of either sign) -> +1 as angle(0) = 0; NaN -> -1.
template <typename F>
LOWRANK_HD uint32_t phase_code(F wr, F wi) {
  if (wr > F(0) && wi < wr && wi >= -wr) return 1u;  // +1
  if (wi > F(0) && wr <= wi && wr > -wi) return 3u;  // +i
  if (wi < F(0) && wr >= wi && wr < -wi) return 2u;  // -i
  if (wr == F(0) && wi == F(0)) return 1u;           // angle(0) = 0
  return 0u;                                         // -1
}

// Per-token activation scale of iFairy's absmax int8 quantizer, 127 / max(absmax, 1e-5) in float32, rounded
// the way PyTorch evaluates iFairy's `127.0 / x.abs().max(...).clamp_(min=1e-5)`: Tensor.__rtruediv__ is
// reciprocal() then a multiply, fl(127·fl(1/m)), which can differ by one ulp from a correctly rounded 127/m
// (and then flip a rounding tie of x·a).
LOWRANK_HD float act_scale(float absmax) {
  const float m = absmax > kScaleMin ? absmax : kScaleMin;
#if defined(__CUDA_ARCH__)
  return __fmul_rn(127.f, __frcp_rn(m));
#else
  const float r = 1.f / m;  // two roundings (no fast-math here, so never merged into one division)
  return 127.f * r;
#endif
}

// The non-finite rule of W2A8: a part holding a NaN or ±Inf gets the scale a = NaN, and every output of its
// token divides by it. nan_max keeps a NaN through a max reduction (fmaxf would drop it).
LOWRANK_HD float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }
LOWRANK_HD float act_scale_or_nan(float absmax) {
  return absmax <= 3.40282347e38f ? act_scale(absmax) : __builtin_nanf("");  // false for NaN and Inf
}

// q = clamp(round_half_even(x·a), -128, 127) in float32. |x·a| <= 127 up to rounding, so q >= -127 in practice.
// (fmin/fmax also turn a NaN from a non-finite input into a defined value instead of an undefined cast.)
LOWRANK_HD int32_t act_quant(float x, float a) {
#if defined(__CUDA_ARCH__)
  const float r = fminf(fmaxf(rintf(x * a), -128.f), 127.f);
#else
  const float r = std::fmin(std::fmax(std::nearbyint(x * a), -128.f), 127.f);
#endif
  return static_cast<int32_t>(r);
}

inline int64_t packed_width(int64_t in) { return (in + 3) / 4; }

// W2A8 sums are int32: |A| <= 127·in (|q| <= 127 for every finite input), so in is capped where that fits.
constexpr int64_t kMaxInt8In = 2147483647 / 127;  // 16,909,320

struct LinearDims {
  int64_t T;    // tokens (product of x's leading dims)
  int64_t in;   // x's last dimension
  int64_t out;  // packed rows
  int64_t nbytes;  // packed row width, ceil(in/4)
};

inline void check_packed_scales(const char* op, const Tensor& packed, const Tensor& scales,
                                const std::string& pname = "packed", const std::string& sname = "scales") {
  check_dim(op, packed, pname.c_str(), 2, "(out, ceil(in/4)) uint8");
  LOWRANK_CHECK(packed.scalar_type() == ScalarType::Byte, op, ": ", pname, " must be uint8 (got ",
                dtype_str(packed.scalar_type()), ")");
  LOWRANK_CHECK(scales.scalar_type() == ScalarType::Float, op, ": ", sname, " must be float32 [s_re, s_im] (got ",
                dtype_str(scales.scalar_type()), ")");
  LOWRANK_CHECK(scales.numel() == 2, op, ": ", sname, " must hold 2 elements [s_re, s_im] (got ", scales.numel(),
                " elements, shape ", shape_str(scales), ")");
  check_same_device(op, packed, pname.c_str(), scales, sname.c_str());
}

// x's checks; fills T and in. in_features, when given, must equal x's last dimension: the packed width alone
// cannot tell in from the other values with the same ceil(in/4). W2A8 caps in at kMaxInt8In (int32 sums).
inline LinearDims x_dims(const char* op, const Tensor& xr, const Tensor& xi, bool act_quant,
                         std::optional<int64_t> in_features) {
  LOWRANK_CHECK(xr.dim() >= 1, op, ": x_real must have at least 1 dimension (..., in) (got a 0-D tensor)");
  bool same_shape = xr.dim() == xi.dim();
  for (int64_t d = 0; same_shape && d < xr.dim(); ++d) same_shape = xr.size(d) == xi.size(d);
  LOWRANK_CHECK(same_shape, op, ": x_imag must have x_real's shape (got x_real ", shape_str(xr), ", x_imag ",
                shape_str(xi), ")");
  check_float_dtype(op, xr, "x_real");
  check_same_dtype(op, xr, "x_real", xi, "x_imag");
  check_same_device(op, xr, "x_real", xi, "x_imag");
  LinearDims d;
  d.in = xr.size(xr.dim() - 1);
  LOWRANK_CHECK(!in_features.has_value() || *in_features == d.in, op,
                ": in_features must equal x_real's last dimension (got in_features ", in_features.value_or(0),
                ", x_real of shape ", shape_str(xr), ")");
  LOWRANK_CHECK(!act_quant || d.in <= kMaxInt8In, op, ": x_real's last dimension must be at most ", kMaxInt8In,
                " with act_quant=True, the exact int8 sums being int32 (got x_real of shape ", shape_str(xr), ")");
  d.T = 1;  // the leading dims' product (also when in = 0 and numel says nothing)
  for (int64_t k = 0; k + 1 < xr.dim(); ++k) d.T *= xr.size(k);
  d.out = d.nbytes = 0;
  return d;
}

// One weight's checks against x; returns the dims with its out and nbytes.
inline LinearDims weight_dims(const char* op, const LinearDims& x, const Tensor& xr, const Tensor& packed,
                              const Tensor& scales, const std::string& pname = "packed",
                              const std::string& sname = "scales") {
  check_packed_scales(op, packed, scales, pname, sname);
  check_same_device(op, xr, "x_real", packed, pname.c_str());
  LinearDims d = x;
  d.out = packed.size(0);
  d.nbytes = packed.size(1);
  LOWRANK_CHECK(d.nbytes == packed_width(d.in), op, ": ", pname, " must be (out, ceil(in/4)) = (out, ",
                packed_width(d.in), ") for in = x_real's last dimension (got ", pname, " of shape ", shape_str(packed),
                ", x_real of shape ", shape_str(xr), ")");
  return d;
}

inline LinearDims linear_dims(const char* op, const Tensor& xr, const Tensor& xi, const Tensor& packed,
                              const Tensor& scales, bool act_quant, std::optional<int64_t> in_features) {
  return weight_dims(op, x_dims(op, xr, xi, act_quant, in_features), xr, packed, scales);
}

// ifairy_linear_multi's checks (x, then every (packed[i], scales[i]) pair): x's dims and each weight's.
inline std::vector<LinearDims> multi_dims(const char* op, const Tensor& xr, const Tensor& xi,
                                          const std::vector<Tensor>& packed, const std::vector<Tensor>& scales,
                                          bool act_quant, std::optional<int64_t> in_features, LinearDims* x_out) {
  const LinearDims xd = x_dims(op, xr, xi, act_quant, in_features);
  LOWRANK_CHECK(packed.size() == scales.size(), op, ": packed and scales must be lists of the same length (got ",
                packed.size(), " and ", scales.size(), ")");
  std::vector<LinearDims> wd;
  for (size_t i = 0; i < packed.size(); ++i) {
    const std::string n = "[" + std::to_string(i) + "]";
    wd.push_back(weight_dims(op, xd, xr, packed[i], scales[i], "packed" + n, "scales" + n));
  }
  *x_out = xd;
  return wd;
}

inline void check_quantize_inputs(const char* op, const Tensor& wr, const Tensor& wi) {
  check_dim(op, wr, "w_real", 2, "(out, in)");
  check_dim(op, wi, "w_imag", 2, "(out, in)");
  LOWRANK_CHECK(wr.size(0) == wi.size(0) && wr.size(1) == wi.size(1), op,
                ": w_imag must have w_real's shape (got w_real ", shape_str(wr), ", w_imag ", shape_str(wi), ")");
  check_float_dtype(op, wr, "w_real");
  check_same_dtype(op, wr, "w_real", wi, "w_imag");
  check_same_device(op, wr, "w_real", wi, "w_imag");
}

inline void check_dequantize_inputs(const char* op, const Tensor& packed, const Tensor& scales, int64_t in) {
  check_packed_scales(op, packed, scales);
  LOWRANK_CHECK(in >= 0, op, ": in_features must be >= 0 (got ", in, ")");
  LOWRANK_CHECK(packed.size(1) == packed_width(in), op, ": packed must be (out, ceil(in_features/4)) = (out, ",
                packed_width(in), ") (got packed of shape ", shape_str(packed), ", in_features ", in, ")");
}

// Mean of |w| over the weights of one axis, clamped; an axis no weight was mapped to gets the clamp value.
LOWRANK_HD float axis_scale(double sum, int64_t count) {
  const double m = count > 0 ? sum / static_cast<double>(count) : 0.0;
  const float f = static_cast<float>(m);
  return f > kScaleMin ? f : kScaleMin;
}

}  // namespace ifairy
}  // namespace lowrank
