// iFairy ops on the CPU: ifairy_quantize (PhaseQuant + packing), ifairy_dequantize and ifairy_linear.
//
// ifairy_linear with act_quant (W2A8): every token's real and imaginary parts are quantized once to int8
// (absmax, float32, round half to even) into a zero-padded scratch; the integer kernel of
// ifairy_cpu_kernels.h (AVX2 when CPUID says so, else the portable loop below; env
// LOWRANK_IFAIRY_CPU_KERNEL=portable forces the latter, read once per process) produces the exact int32
// sums A, B, C, D per (token, row) by adding and subtracting activations only; the scales are applied in
// double at the end. act_quant=false: the activations stay floating point (fp32, fp64 for float64) and are
// added or subtracted per weight code (AVX2: 8 fp32 lanes, sign by XOR, axis by AND; deterministic for a
// given machine), or, from kFloatGemmTokens tokens on, multiplied on the GEMM engine against fp32 weight
// chunks decoded from the codes (linear_float_gemm). Both are parallel over rows.
// Quantize: parallel over rows; per-row sums of |w| (double) and counts are combined in row order, so the
// scales do not depend on the thread count.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/cpu_dispatch.h"
#include "common/cpu_gemm.h"
#include "common/op_boundary.h"
#include "ifairy/ifairy_common.h"
#include "ifairy/ifairy_cpu_kernels.h"

namespace lowrank {
namespace ifairy {
namespace {

constexpr char kQuant[] = "lowrank.ifairy_quantize";
constexpr char kDequant[] = "lowrank.ifairy_dequantize";
constexpr char kLinear[] = "lowrank.ifairy_linear";

// ------------------------------------------------------------------------------------------ quantize
std::tuple<Tensor, Tensor> quantize_cpu(Tensor w_real, Tensor w_imag) {
  check_quantize_inputs(kQuant, w_real, w_imag);
  LOWRANK_CHECK(w_real.is_cpu(), kQuant, ": the CPU kernel got a tensor on ", device_name(w_real));
  const Tensor wr = torch::stable::contiguous(w_real), wi = torch::stable::contiguous(w_imag);
  const int64_t out = wr.size(0), in = wr.size(1), nb = packed_width(in);
  Tensor packed = torch::stable::new_empty(wr, {out, nb}, ScalarType::Byte);
  Tensor scales = torch::stable::new_empty(wr, {2}, ScalarType::Float);
  std::vector<double> sum_re(static_cast<size_t>(out)), sum_im(static_cast<size_t>(out));
  std::vector<int64_t> cnt_re(static_cast<size_t>(out));
  uint8_t* pk = static_cast<uint8_t*>(packed.data_ptr());
  dispatch_float(wr.scalar_type(), kQuant, [&](auto tag) {
    using T = decltype(tag);
    using F = acc_t<T>;  // comparisons in fp32 (exact for 16-bit inputs) or fp64
    const T* a = static_cast<const T*>(wr.data_ptr());
    const T* b = static_cast<const T*>(wi.data_ptr());
    torch::stable::parallel_for(0, out, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        double sre = 0, sim = 0;
        int64_t cre = 0;
        uint8_t* prow = pk + r * nb;
        std::memset(prow, 0, static_cast<size_t>(nb));
        for (int64_t j = 0; j < in; ++j) {
          const F x = static_cast<F>(a[r * in + j]), y = static_cast<F>(b[r * in + j]);
          const uint32_t c = phase_code(x, y);
          prow[j >> 2] = static_cast<uint8_t>(prow[j >> 2] | (c << (2 * (j & 3))));
          if (c & 2u) {
            sim += std::fabs(static_cast<double>(y));
          } else {
            sre += std::fabs(static_cast<double>(x));
            ++cre;
          }
        }
        sum_re[r] = sre, sum_im[r] = sim, cnt_re[r] = cre;
      }
    });
  });
  double sre = 0, sim = 0;
  int64_t cre = 0;
  for (int64_t r = 0; r < out; ++r) sre += sum_re[r], sim += sum_im[r], cre += cnt_re[r];
  float* s = static_cast<float*>(scales.data_ptr());
  s[0] = axis_scale(sre, cre);
  s[1] = axis_scale(sim, out * in - cre);
  return {packed, scales};
}

// ---------------------------------------------------------------------------------------- dequantize
std::tuple<Tensor, Tensor> dequantize_cpu(Tensor packed, Tensor scales, int64_t in) {
  check_dequantize_inputs(kDequant, packed, scales, in);
  LOWRANK_CHECK(packed.is_cpu(), kDequant, ": the CPU kernel got a tensor on ", device_name(packed));
  const Tensor pk = torch::stable::contiguous(packed), sc = torch::stable::contiguous(scales);
  const int64_t out = pk.size(0), nb = pk.size(1);
  Tensor wr = torch::stable::new_empty(pk, {out, in}, ScalarType::Float);
  Tensor wi = torch::stable::new_empty(pk, {out, in}, ScalarType::Float);
  const float s_re = static_cast<const float*>(sc.data_ptr())[0], s_im = static_cast<const float*>(sc.data_ptr())[1];
  const uint8_t* p = static_cast<const uint8_t*>(pk.data_ptr());
  float* a = static_cast<float*>(wr.data_ptr());
  float* b = static_cast<float*>(wi.data_ptr());
  torch::stable::parallel_for(0, out, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t j = 0; j < in; ++j) {
        const uint32_t c = (p[r * nb + (j >> 2)] >> (2 * (j & 3))) & 3u;
        const float v_re = c == 1u ? s_re : (c == 0u ? -s_re : 0.f);
        const float v_im = c == 3u ? s_im : (c == 2u ? -s_im : 0.f);
        a[r * in + j] = v_re;
        b[r * in + j] = v_im;
      }
  });
  return {wr, wi};
}

// ------------------------------------------------------------------------------------ linear, W2A8
void int8_rows_portable(const Int8Problem& p, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = p.packed + r * p.nbytes;
    for (int64_t t = 0; t < p.T; ++t) {
      const int8_t* qr = p.q + t * 2 * p.in_pad;
      const int8_t* qi = qr + p.in_pad;
      int32_t A = 0, B = 0, C = 0, D = 0;
      for (int64_t k = 0; k < p.nbytes; ++k) {
        const uint32_t byte = row[k];
        for (int e = 0; e < 4; ++e) {  // elements past `in` meet zero activations
          const uint32_t c = (byte >> (2 * e)) & 3u;
          const int32_t xr = qr[4 * k + e], xi = qi[4 * k + e];
          const int32_t sr = (c & 1u) ? xr : -xr, si = (c & 1u) ? xi : -xi;
          if (c & 2u) {
            B += si, D += sr;
          } else {
            A += sr, C += si;
          }
        }
      }
      int32_t* dst = p.sums + (t * p.out + r) * 4;
      dst[0] = A, dst[1] = B, dst[2] = C, dst[3] = D;
    }
  }
}

// AVX2 when the CPU has it; env LOWRANK_IFAIRY_CPU_KERNEL=portable forces the portable loops (for tests).
bool use_avx2() {
  const char* env = std::getenv("LOWRANK_IFAIRY_CPU_KERNEL");
  if (env != nullptr && std::strcmp(env, "portable") == 0) return false;
#if defined(LOWRANK_HAVE_AVX2_TU)
  return __builtin_cpu_supports("avx2");
#else
  return false;
#endif
}

Int8RowsKernel pick_int8_kernel() {
#if defined(LOWRANK_HAVE_AVX2_TU)
  if (use_avx2()) return &avx2::int8_rows;
#endif
  return &int8_rows_portable;
}

// Per-token int8 quantization of both parts into q (T, 2, in_pad), zero padded; a_out (T, 2) = [a_r, a_i].
template <typename T>
void quantize_acts(const T* xr, const T* xi, int64_t Tn, int64_t in, int64_t in_pad, int8_t* q, float* a_out) {
  torch::stable::parallel_for(0, Tn, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int part = 0; part < 2; ++part) {
        const T* x = (part == 0 ? xr : xi) + t * in;
        float m = 0.f;
        for (int64_t j = 0; j < in; ++j) m = std::max(m, std::fabs(static_cast<float>(x[j])));
        const float a = act_scale(m);
        int8_t* dst = q + (2 * t + part) * in_pad;
        for (int64_t j = 0; j < in; ++j) dst[j] = static_cast<int8_t>(act_quant(static_cast<float>(x[j]), a));
        std::memset(dst + in, 0, static_cast<size_t>(in_pad - in));
        a_out[2 * t + part] = a;
      }
  });
}

template <typename T>
void linear_w2a8(const LinearDims& d, const T* xr, const T* xi, const uint8_t* packed, float s_re, float s_im,
                 T* yr, T* yi) {
  const int64_t in_pad = (d.in + kActPad - 1) / kActPad * kActPad;
  std::vector<int8_t> q(static_cast<size_t>(d.T * 2 * in_pad));
  std::vector<float> a(static_cast<size_t>(d.T * 2));
  std::vector<int32_t> sums(static_cast<size_t>(d.T * d.out * 4));
  quantize_acts(xr, xi, d.T, d.in, in_pad, q.data(), a.data());
  static const Int8RowsKernel kernel = pick_int8_kernel();
  const Int8Problem p{packed, d.nbytes, d.out, q.data(), in_pad, d.T, sums.data()};
  // about in·T int8 operations a row; keep tasks large enough to amortize the pool
  const int64_t grain = std::max<int64_t>(8, (int64_t(1) << 16) / std::max<int64_t>(1, d.in * d.T));
  const double sr = s_re, si = s_im;
  torch::stable::parallel_for(0, d.out, grain, [&](int64_t r0, int64_t r1) {
    kernel(p, r0, r1);
    for (int64_t t = 0; t < d.T; ++t) {  // this task's rows of every token, while their sums are in cache
      const double ar = a[2 * t], ai = a[2 * t + 1];
      for (int64_t r = r0; r < r1; ++r) {
        const int32_t* s = &sums[(t * d.out + r) * 4];
        yr[t * d.out + r] = static_cast<T>(static_cast<acc_t<T>>(sr * s[0] / ar + si * s[1] / ai));
        yi[t * d.out + r] = static_cast<T>(static_cast<acc_t<T>>(-sr * s[2] / ai + si * s[3] / ar));
      }
    }
  });
}

// ---------------------------------------------------------------------------------- linear, float
void float_rows_portable(const FloatProblem& p, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = p.packed + r * p.nbytes;
    for (int64_t t = 0; t < p.T; ++t) {
      const float* xr = p.x + t * 2 * p.in_pad;
      const float* xi = xr + p.in_pad;
      float A = 0, B = 0, C = 0, D = 0;
      for (int64_t k = 0; k < p.nbytes; ++k) {
        const uint32_t byte = row[k];
        for (int e = 0; e < 4; ++e) {
          const int64_t j = 4 * k + e;  // < 4·nbytes <= in_pad (in rounded up to kFloatPad)
          const uint32_t c = (byte >> (2 * e)) & 3u;
          const float sr = (c & 1u) ? xr[j] : -xr[j], si = (c & 1u) ? xi[j] : -xi[j];
          if (c & 2u) {
            B += si, D += sr;
          } else {
            A += sr, C += si;
          }
        }
      }
      float* dst = p.sums + (t * p.out + r) * 4;
      dst[0] = A, dst[1] = B, dst[2] = C, dst[3] = D;
    }
  }
}

FloatRowsKernel pick_float_kernel() {
#if defined(LOWRANK_HAVE_AVX2_TU)
  if (use_avx2()) return &avx2::float_rows;
#endif
  return &float_rows_portable;
}

// fp32 accumulation (float32 / float16 / bfloat16 inputs).
template <typename T>
void linear_float(const LinearDims& d, const T* xr, const T* xi, const uint8_t* packed, float s_re, float s_im,
                  T* yr, T* yi) {
  const int64_t in_pad = (d.in + kFloatPad - 1) / kFloatPad * kFloatPad;
  std::vector<float> xs(static_cast<size_t>(d.T * 2 * in_pad), 0.f);
  torch::stable::parallel_for(0, d.T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t j = 0; j < d.in; ++j) {
        xs[(2 * t) * in_pad + j] = static_cast<float>(xr[t * d.in + j]);
        xs[(2 * t + 1) * in_pad + j] = static_cast<float>(xi[t * d.in + j]);
      }
  });
  std::vector<float> sums(static_cast<size_t>(d.T * d.out * 4));
  static const FloatRowsKernel kernel = pick_float_kernel();
  const FloatProblem p{packed, d.nbytes, d.out, xs.data(), in_pad, d.T, sums.data()};
  const int64_t grain = std::max<int64_t>(4, (int64_t(1) << 15) / std::max<int64_t>(1, d.in * d.T));
  torch::stable::parallel_for(0, d.out, grain, [&](int64_t r0, int64_t r1) {
    kernel(p, r0, r1);
    for (int64_t t = 0; t < d.T; ++t)  // this task's rows of every token, while their sums are in cache
      for (int64_t r = r0; r < r1; ++r) {
        const float* s = &sums[(t * d.out + r) * 4];
        yr[t * d.out + r] = static_cast<T>(s_re * s[0] + s_im * s[1]);
        yi[t * d.out + r] = static_cast<T>(s_im * s[3] - s_re * s[2]);
      }
  });
}

// Float activations with many tokens: the add/subtract kernel above re-reads every token per weight code
// and loses to a blocked GEMM once a weight chunk is reused by a few dozen tokens, so from kFloatGemmTokens
// on the weight is decoded chunk by chunk into an fp32 (rows, 2·in) block [s_re·Wr | s_im·Wi] and multiplied
// on the shared GEMM engine: rows 0..T-1 of A = [x_re | x_im] give y_re, rows T..2T-1 = [-x_im | x_re] give
// y_im (y = W·conj(x)). Chunks of kGemmChunkRows rows bound the scratch; the result is deterministic and
// independent of the thread count (the engine's K order is fixed). LOWRANK_IFAIRY_CPU_FLOAT=adds keeps the
// add/subtract kernel at every token count (tests use it to cover both).
constexpr int64_t kFloatGemmTokens = 40;  // the crossover measured on the dev box (2048², 5460x2048)
constexpr int64_t kGemmChunkRows = 512;

bool float_gemm_allowed() {
  static const bool allowed = [] {
    const char* v = std::getenv("LOWRANK_IFAIRY_CPU_FLOAT");
    return !(v != nullptr && std::strcmp(v, "adds") == 0);
  }();
  return allowed;
}

template <typename T>
void linear_float_gemm(const LinearDims& d, const T* xr, const T* xi, const uint8_t* packed, float s_re,
                       float s_im, T* yr, T* yi) {
  const int64_t K = 2 * d.in, M = 2 * d.T;
  std::vector<float> a(static_cast<size_t>(M * K));
  torch::stable::parallel_for(0, d.T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* re_row = &a[t * K];
      float* im_row = &a[(d.T + t) * K];
      for (int64_t j = 0; j < d.in; ++j) {
        const float vr = static_cast<float>(xr[t * d.in + j]), vi = static_cast<float>(xi[t * d.in + j]);
        re_row[j] = vr, re_row[d.in + j] = vi;
        im_row[j] = -vi, im_row[d.in + j] = vr;
      }
    }
  });
  // one packed byte -> its 4 (Wr, Wi) values, scales included: the decode is a copy per byte
  float lut_r[256][4], lut_i[256][4];
  for (int b = 0; b < 256; ++b)
    for (int e = 0; e < 4; ++e) {
      const uint32_t code = (static_cast<uint32_t>(b) >> (2 * e)) & 3u;
      const float sign = (code & 1u) ? 1.f : -1.f;
      lut_r[b][e] = (code & 2u) ? 0.f : sign * s_re;
      lut_i[b][e] = (code & 2u) ? sign * s_im : 0.f;
    }
  const int64_t chunk = std::min(kGemmChunkRows, d.out);
  std::vector<float> w(static_cast<size_t>(chunk * K)), c(static_cast<size_t>(M * chunk));
  for (int64_t r0 = 0; r0 < d.out; r0 += chunk) {
    const int64_t rows = std::min(chunk, d.out - r0);
    torch::stable::parallel_for(0, rows, 16, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const uint8_t* row = packed + (r0 + q) * d.nbytes;
        float* wr = &w[q * K];
        float* wi = wr + d.in;
        const int64_t whole = d.in / 4;
        for (int64_t b = 0; b < whole; ++b) {
          std::memcpy(wr + 4 * b, lut_r[row[b]], sizeof(lut_r[0]));
          std::memcpy(wi + 4 * b, lut_i[row[b]], sizeof(lut_i[0]));
        }
        for (int64_t j = 4 * whole; j < d.in; ++j) {  // the last partial byte
          wr[j] = lut_r[row[j >> 2]][j & 3];
          wi[j] = lut_i[row[j >> 2]][j & 3];
        }
      }
    });
    // C (M x rows) = A (M x K) · chunkᵀ: B's element (k, n) is w[n·K + k]
    strided_batched_gemm<float>(1, M, rows, K, operand<const float>(a.data(), 0, K, 1),
                                operand<const float>(w.data(), 0, 1, K), operand<float>(c.data(), 0, rows, 1));
    for (int64_t t = 0; t < d.T; ++t)
      for (int64_t q = 0; q < rows; ++q) {
        yr[t * d.out + r0 + q] = static_cast<T>(c[t * rows + q]);
        yi[t * d.out + r0 + q] = static_cast<T>(c[(d.T + t) * rows + q]);
      }
  }
}

// float64: the same sums in double, scalar.
void linear_double(const LinearDims& d, const double* xr, const double* xi, const uint8_t* packed, float s_re,
                   float s_im, double* yr, double* yi) {
  torch::stable::parallel_for(0, d.out, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* row = packed + r * d.nbytes;
      for (int64_t t = 0; t < d.T; ++t) {
        const double* a = xr + t * d.in;
        const double* b = xi + t * d.in;
        double A = 0, B = 0, C = 0, D = 0;
        for (int64_t j = 0; j < d.in; ++j) {
          const uint32_t c = (row[j >> 2] >> (2 * (j & 3))) & 3u;
          const double sr = (c & 1u) ? a[j] : -a[j], si = (c & 1u) ? b[j] : -b[j];
          if (c & 2u) {
            B += si, D += sr;
          } else {
            A += sr, C += si;
          }
        }
        yr[t * d.out + r] = double(s_re) * A + double(s_im) * B;
        yi[t * d.out + r] = double(s_im) * D - double(s_re) * C;
      }
    }
  });
}

std::tuple<Tensor, Tensor> linear_cpu(Tensor x_real, Tensor x_imag, Tensor packed, Tensor scales, bool act_quant) {
  const LinearDims d = linear_dims(kLinear, x_real, x_imag, packed, scales);
  LOWRANK_CHECK(x_real.is_cpu(), kLinear, ": the CPU kernel got a tensor on ", device_name(x_real));
  const Tensor xr = torch::stable::contiguous(x_real), xi = torch::stable::contiguous(x_imag);
  const Tensor pk = torch::stable::contiguous(packed), sc = torch::stable::contiguous(scales);
  Tensor yr = torch::stable::new_empty(xr, out_shape_like(xr, d.out));
  Tensor yi = torch::stable::new_empty(xr, out_shape_like(xr, d.out));
  if (d.T == 0 || d.out == 0) return {yr, yi};
  const float* s = static_cast<const float*>(sc.data_ptr());
  const uint8_t* p = static_cast<const uint8_t*>(pk.data_ptr());
  dispatch_float(xr.scalar_type(), kLinear, [&](auto tag) {
    using T = decltype(tag);
    auto ptr = [](const Tensor& t) { return static_cast<T*>(t.data_ptr()); };
    if (act_quant) {
      linear_w2a8<T>(d, ptr(xr), ptr(xi), p, s[0], s[1], ptr(yr), ptr(yi));
    } else if constexpr (std::is_same_v<T, double>) {
      linear_double(d, ptr(xr), ptr(xi), p, s[0], s[1], ptr(yr), ptr(yi));
    } else if (d.T >= kFloatGemmTokens && float_gemm_allowed()) {
      linear_float_gemm<T>(d, ptr(xr), ptr(xi), p, s[0], s[1], ptr(yr), ptr(yi));
    } else {
      linear_float<T>(d, ptr(xr), ptr(xi), p, s[0], s[1], ptr(yr), ptr(yi));
    }
  });
  return {yr, yi};
}

}  // namespace
}  // namespace ifairy
}  // namespace lowrank

STABLE_TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("ifairy_quantize", LOWRANK_BOX(lowrank::ifairy::kQuant, lowrank::ifairy::quantize_cpu));
  m.impl("ifairy_dequantize", LOWRANK_BOX(lowrank::ifairy::kDequant, lowrank::ifairy::dequantize_cpu));
  m.impl("ifairy_linear", LOWRANK_BOX(lowrank::ifairy::kLinear, lowrank::ifairy::linear_cpu));
}
