// iFairy ops on the CPU: ifairy_quantize (PhaseQuant + packing), ifairy_dequantize, ifairy_linear and
// ifairy_linear_multi (several linears on one x in one call: one dispatch, one activation quantization).
//
// ifairy_linear with act_quant (W2A8): every token's real and imaginary parts are quantized once to int8
// (absmax, float32, round half to even) into a zero-padded scratch laid out for the chosen kernel; the integer
// kernel of ifairy_cpu_kernels.h (AVX-512 VBMI + VNNI, else AVX2, by CPUID, else the portable loop below; env
// LOWRANK_IFAIRY_CPU_KERNEL=avx2 or =portable caps the choice, read once per process) produces the exact
// int32 sums A, B, C, D per (token, row); the scales are applied in double at the end. act_quant=false: the
// activations stay floating point (fp32, fp64 for float64) and are added or subtracted per weight code (AVX2:
// 8 fp32 lanes, sign by XOR, axis by AND; deterministic for a given machine), or, from kFloatGemmTokens tokens
// on, multiplied on the GEMM engine against fp32 weight chunks decoded from the codes (linear_float_gemm).
// All are parallel over rows.
// Non-finite rule, every path: a token whose x_real or x_imag holds a NaN or ±Inf gets NaN in all its outputs
// (W2A8: that part's scale a is NaN and every output divides by it; float paths: nan_nonfinite_tokens).
// Quantize: parallel over rows; per-row sums of |w| (double) and counts are combined in row order, so the
// scales do not depend on the thread count. A NaN or Inf weight is refused.
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/util/shim_utils.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/op_boundary.h"
#include "common/cpu_dispatch.h"
#include "common/cpu_gemm.h"
#include "ifairy/ifairy_common.h"
#include "ifairy/ifairy_cpu_kernels.h"

namespace lowrank {
namespace ifairy {
namespace {

constexpr char kQuant[] = "lowrank.ifairy_quantize";
constexpr char kDequant[] = "lowrank.ifairy_dequantize";
constexpr char kLinear[] = "lowrank.ifairy_linear";
constexpr char kMulti[] = "lowrank.ifairy_linear_multi";

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
  std::vector<uint8_t> nonfinite(static_cast<size_t>(out), 0);
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
          if (!(std::fabs(x) <= std::numeric_limits<F>::max() && std::fabs(y) <= std::numeric_limits<F>::max()))
            nonfinite[r] = 1;  // false for NaN too
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
  // a NaN or Inf weight would give a NaN, Inf or silently clamped scale for the whole layer: refuse
  for (int64_t r = 0; r < out; ++r)
    LOWRANK_CHECK(!nonfinite[r], kQuant, ": w_real and w_imag must be finite (got a NaN or Inf in row ", r, ")");
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

// The kernels the CPU can run: AVX-512 VBMI + VNNI (W2A8 only), AVX2, or portable. Env
// LOWRANK_IFAIRY_CPU_KERNEL=portable or =avx2 caps the choice (tests use it to cover every kernel on one
// machine); read once per process.
enum class Isa { kPortable, kAvx2, kAvx512 };

Isa pick_isa() {
  const char* env = std::getenv("LOWRANK_IFAIRY_CPU_KERNEL");
  const bool portable = env != nullptr && std::strcmp(env, "portable") == 0;
  const bool cap_avx2 = env != nullptr && std::strcmp(env, "avx2") == 0;
  if (portable) return Isa::kPortable;
#if defined(LOWRANK_HAVE_AVX512_TU)
  if (!cap_avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi") &&
      __builtin_cpu_supports("avx512vnni"))
    return Isa::kAvx512;
#endif
  (void)cap_avx2;
#if defined(LOWRANK_HAVE_AVX2_TU)
  if (__builtin_cpu_supports("avx2")) return Isa::kAvx2;
#endif
  return Isa::kPortable;
}

Isa isa() {
  static const Isa chosen = pick_isa();
  return chosen;
}

bool use_avx2() { return isa() != Isa::kPortable; }

Int8RowsKernel int8_kernel() {
#if defined(LOWRANK_HAVE_AVX512_TU)
  if (isa() == Isa::kAvx512) return &avx512::int8_rows;
#endif
#if defined(LOWRANK_HAVE_AVX2_TU)
  if (isa() == Isa::kAvx2) return &avx2::int8_rows;
#endif
  return &int8_rows_portable;
}

// parallel_for, or a direct call when it would run one task anyway (one thread, or no more than one grain):
// torch_parallel_for costs about 1,900 instructions a call, a fixed cost a one-token decode pays per linear.
template <class F>
void parallel_rows(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (end - begin <= grain || torch::stable::get_num_threads() <= 1) {
    if (begin < end) f(begin, end);
    return;
  }
  torch::stable::parallel_for(begin, end, grain, f);
}

// Per-token int8 quantization of both parts into q (T, 2, in_pad), zero padded, in the kernel's lane order;
// a (T, 2) = [a_r, a_i] and qsum (T, 2) = [Σ q_r, Σ q_i]. A part holding a NaN or ±Inf gets a = NaN and q = 0,
// so the token's outputs, which all divide by both a_r and a_i, are NaN.
template <typename T>
void quantize_acts(const T* xr, const T* xi, int64_t Tn, int64_t in, int64_t in_pad, bool lanes512, int8_t* q,
                   float* a_out, int32_t* qsum) {
  parallel_rows(0, Tn, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int part = 0; part < 2; ++part) {
        const T* x = (part == 0 ? xr : xi) + t * in;
        int8_t* dst = q + (2 * t + part) * in_pad;
        const int64_t k = 2 * t + part;
#if defined(LOWRANK_HAVE_AVX512_TU)
        if constexpr (std::is_same_v<T, float>) {
          if (lanes512) {
            float m;
            if (avx512::absmax(x, in, &m)) {
              a_out[k] = act_scale(m);
              qsum[k] = avx512::quantize_token(x, in, in_pad, a_out[k], dst);
            } else {
              a_out[k] = std::numeric_limits<float>::quiet_NaN();
              qsum[k] = 0;
              std::memset(dst, 0, static_cast<size_t>(in_pad));
            }
            continue;
          }
        }
#endif
        float m = 0.f;
        bool finite = true;
        for (int64_t j = 0; j < in; ++j) {
          const float v = std::fabs(static_cast<float>(x[j]));
          finite = finite && v <= std::numeric_limits<float>::max();  // false for NaN and Inf
          m = std::max(m, v);
        }
        std::memset(dst, 0, static_cast<size_t>(in_pad));
        if (!finite) {
          a_out[k] = std::numeric_limits<float>::quiet_NaN();
          qsum[k] = 0;
          continue;
        }
        const float a = act_scale(m);
        int32_t sum = 0;
        for (int64_t j = 0; j < in; ++j) {
          // act_quant for the finite values that reach here, with comparisons where fmin / fmax were calls
          const float r = std::nearbyint(static_cast<float>(x[j]) * a);
          const int32_t v = static_cast<int32_t>(r < -128.f ? -128.f : (r > 127.f ? 127.f : r));
          sum += v;
          const int64_t at = lanes512 ? avx512_pos(j) : j;
          dst[at] = static_cast<int8_t>(v);
        }
        a_out[k] = a;
        qsum[k] = sum;
      }
  });
}

// One linear of a call: its packed weight, scales and outputs (the many-linear op shares x among several).
template <typename T>
struct Linear {
  const uint8_t* packed;
  int64_t out, nbytes;
  float s_re, s_im;
  T* yr;
  T* yi;
};

constexpr size_t kActAlign = 64;
struct AlignedDelete {
  void operator()(int8_t* p) const { ::operator delete[](p, std::align_val_t(kActAlign)); }
};

// The W2A8 call's scratch (int8 activations, their scales and sums, the int32 row sums), kept per thread
// between calls while small: allocating and freeing it was about 1,000 instructions of a decode call's fixed
// cost. A prefill-sized request gets its own buffers, freed at the end of the call.
struct W2A8Scratch {
  static constexpr size_t kKeep = size_t(1) << 20;  // bytes kept per thread
  std::unique_ptr<int8_t[], AlignedDelete> q;
  size_t q_cap = 0;
  std::unique_ptr<int32_t[]> sums;
  size_t sums_cap = 0;
  std::vector<float> a;
  std::vector<int32_t> qsum;
};

class ScratchLease {
 public:
  ScratchLease(size_t q_bytes, size_t sums_n, size_t tokens2) {
    static thread_local W2A8Scratch kept;
    const bool small = q_bytes <= W2A8Scratch::kKeep && sums_n * sizeof(int32_t) <= W2A8Scratch::kKeep;
    s_ = small ? &kept : &own_;
    if (s_->q_cap < q_bytes) {
      s_->q.reset(static_cast<int8_t*>(::operator new[](q_bytes, std::align_val_t(kActAlign))));
      s_->q_cap = q_bytes;
    }
    if (s_->sums_cap < sums_n) {
      s_->sums.reset(new int32_t[sums_n]);
      s_->sums_cap = sums_n;
    }
    s_->a.resize(tokens2);
    s_->qsum.resize(tokens2);
  }
  W2A8Scratch* operator->() { return s_; }

 private:
  W2A8Scratch own_;
  W2A8Scratch* s_;
};

// W2A8 of every linear in `ls` on the same x: the activations are quantized once.
template <typename T>
void linear_w2a8(int64_t Tn, int64_t in, const T* xr, const T* xi, const std::vector<Linear<T>>& ls) {
  const bool lanes512 = isa() == Isa::kAvx512;
  const int64_t pad = lanes512 ? kActPadAvx512 : kActPad;
  const int64_t in_pad = (in + pad - 1) / pad * pad;
  int64_t most = 0;
  for (const Linear<T>& l : ls) most = std::max(most, l.out);
  // q and sums are written in full before they are read: left uninitialized (zeroing sums was 0.3 us a call).
  // q is 64-byte aligned, so that the AVX-512 kernel's 64-byte activation loads never straddle cache lines.
  ScratchLease scratch(static_cast<size_t>(Tn * 2 * in_pad), static_cast<size_t>(Tn * most * 4),
                       static_cast<size_t>(Tn * 2));
  int8_t* const q = scratch->q.get();
  int32_t* const sums_p = scratch->sums.get();
  const float* const a = scratch->a.data();
  quantize_acts(xr, xi, Tn, in, in_pad, lanes512, q, scratch->a.data(), scratch->qsum.data());
  static const Int8RowsKernel kernel = int8_kernel();
  for (const Linear<T>& l : ls) {
    const Int8Problem p{l.packed, l.nbytes, l.out, q, in_pad, Tn, sums_p, scratch->qsum.data()};
    // about in·T int8 operations a row; keep tasks large enough to amortize the pool
    const int64_t grain = std::max<int64_t>(8, (int64_t(1) << 16) / std::max<int64_t>(1, in * Tn));
    const double sr = l.s_re, si = l.s_im;
    parallel_rows(0, l.out, grain, [&](int64_t r0, int64_t r1) {
      kernel(p, r0, r1);
      for (int64_t t = 0; t < Tn; ++t) {  // this task's rows of every token, while their sums are in cache
        const double ar = a[2 * t], ai = a[2 * t + 1];
        T* yr = l.yr + t * l.out;
        T* yi = l.yi + t * l.out;
        const int32_t* s = &sums_p[t * l.out * 4];
#if defined(LOWRANK_HAVE_AVX512_TU)
        if constexpr (std::is_same_v<T, float>) {
          if (lanes512) {
            avx512::outputs_f32(s, r0, r1, sr, si, ar, ai, yr, yi);
            continue;
          }
        }
#endif
        for (int64_t r = r0; r < r1; ++r) {
          yr[r] = static_cast<T>(static_cast<acc_t<T>>(sr * s[4 * r] / ar + si * s[4 * r + 1] / ai));
          yi[r] = static_cast<T>(static_cast<acc_t<T>>(-sr * s[4 * r + 2] / ai + si * s[4 * r + 3] / ar));
        }
      }
    });
  }
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

// The float paths' side of the non-finite rule: every output of a token whose input holds a NaN or ±Inf is
// NaN (the add/subtract kernels skip the weights of the other axis, so 0·NaN would not reach every output).
template <typename T>
bool all_finite(const T* xr, const T* xi, int64_t Tn, int64_t in) {
  for (int64_t k = 0; k < Tn * in; ++k)
    if (!(std::fabs(static_cast<acc_t<T>>(xr[k])) <= std::numeric_limits<acc_t<T>>::max() &&
          std::fabs(static_cast<acc_t<T>>(xi[k])) <= std::numeric_limits<acc_t<T>>::max()))
      return false;
  return true;
}

template <typename T>
void nan_nonfinite_tokens(const T* xr, const T* xi, int64_t Tn, int64_t in, int64_t out, T* yr, T* yi) {
  const T nan = static_cast<T>(std::numeric_limits<acc_t<T>>::quiet_NaN());
  for (int64_t t = 0; t < Tn; ++t)
    if (!all_finite(xr + t * in, xi + t * in, 1, in)) {
      std::fill(yr + t * out, yr + (t + 1) * out, nan);
      std::fill(yi + t * out, yi + (t + 1) * out, nan);
    }
}

// An uninitialized contiguous CPU tensor of x's dtype. aoti_torch_empty_strided is a direct call, while
// torch::stable::new_empty goes through the boxed dispatcher: measured (callgrind) 6.8K instructions a tensor,
// a quarter of a small call's fixed cost.
Tensor empty_cpu_like(const char* op, const Tensor& x, const std::vector<int64_t>& shape) {
  std::vector<int64_t> strides(shape.size());
  int64_t stride = 1, numel = 1;
  for (size_t k = shape.size(); k-- > 0;) {
    strides[k] = stride;
    stride *= std::max<int64_t>(shape[k], 1);
    numel *= shape[k];
  }
  int32_t dtype = 0, device_type = 0;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_dtype(x.get(), &dtype));
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_type(x.get(), &device_type));
  AtenTensorHandle out = nullptr;
  const AOTITorchError err = aoti_torch_empty_strided(static_cast<int64_t>(shape.size()), shape.data(),
                                                      strides.data(), dtype, device_type, 0, &out);
  LOWRANK_CHECK(err == TORCH_SUCCESS, op, ": could not allocate an output of ", numel, " elements");
  return Tensor(out);
}

// The linears of one call share x (one for ifairy_linear, several for ifairy_linear_multi).
std::vector<Tensor> run_linears(const LinearDims& xd, const Tensor& xr, const Tensor& xi, const std::vector<Tensor>& pk,
                                const std::vector<Tensor>& sc, const std::vector<LinearDims>& wd, bool act_quant) {
  std::vector<Tensor> ys;
  for (size_t i = 0; i < pk.size(); ++i) {
    const std::vector<int64_t> shape = out_shape_like(xr, wd[i].out);
    ys.push_back(empty_cpu_like(kLinear, xr, shape));
    ys.push_back(empty_cpu_like(kLinear, xr, shape));
  }
  if (xd.T == 0) return ys;
  dispatch_float(xr.scalar_type(), kLinear, [&](auto tag) {
    using T = decltype(tag);
    auto ptr = [](const Tensor& t) { return static_cast<T*>(t.data_ptr()); };
    const T* x_r = ptr(xr);
    const T* x_i = ptr(xi);
    std::vector<Linear<T>> ls;
    for (size_t i = 0; i < pk.size(); ++i) {
      if (wd[i].out == 0) continue;
      const float* s = static_cast<const float*>(sc[i].data_ptr());
      ls.push_back(Linear<T>{static_cast<const uint8_t*>(pk[i].data_ptr()), wd[i].out, wd[i].nbytes, s[0], s[1],
                             ptr(ys[2 * i]), ptr(ys[2 * i + 1])});
    }
    if (act_quant) {
      linear_w2a8<T>(xd.T, xd.in, x_r, x_i, ls);
      return;
    }
    for (const Linear<T>& l : ls) {
      LinearDims d = xd;
      d.out = l.out, d.nbytes = l.nbytes;
      if constexpr (std::is_same_v<T, double>) {
        linear_double(d, x_r, x_i, l.packed, l.s_re, l.s_im, l.yr, l.yi);
      } else if (d.T >= kFloatGemmTokens && float_gemm_allowed()) {
        linear_float_gemm<T>(d, x_r, x_i, l.packed, l.s_re, l.s_im, l.yr, l.yi);
      } else {
        linear_float<T>(d, x_r, x_i, l.packed, l.s_re, l.s_im, l.yr, l.yi);
      }
    }
    if (!all_finite(x_r, x_i, xd.T, xd.in))
      for (const Linear<T>& l : ls) nan_nonfinite_tokens(x_r, x_i, xd.T, xd.in, l.out, l.yr, l.yi);
  });
  return ys;
}

Tensor contiguous_if_needed(const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }

std::tuple<Tensor, Tensor> linear_cpu(Tensor x_real, Tensor x_imag, Tensor packed, Tensor scales, bool act_quant,
                                      std::optional<int64_t> in_features) {
  const LinearDims d = linear_dims(kLinear, x_real, x_imag, packed, scales, act_quant, in_features);
  LOWRANK_CHECK(x_real.is_cpu(), kLinear, ": the CPU kernel got a tensor on ", device_name(x_real));
  const std::vector<Tensor> ys =
      run_linears(d, contiguous_if_needed(x_real), contiguous_if_needed(x_imag), {contiguous_if_needed(packed)},
                  {contiguous_if_needed(scales)}, {d}, act_quant);
  return {ys[0], ys[1]};
}

std::vector<Tensor> linear_multi_cpu(Tensor x_real, Tensor x_imag, std::vector<Tensor> packed,
                                     std::vector<Tensor> scales, bool act_quant, std::optional<int64_t> in_features) {
  LinearDims xd{};
  const std::vector<LinearDims> wd = multi_dims(kMulti, x_real, x_imag, packed, scales, act_quant, in_features, &xd);
  LOWRANK_CHECK(x_real.is_cpu(), kMulti, ": the CPU kernel got a tensor on ", device_name(x_real));
  for (size_t i = 0; i < packed.size(); ++i) {
    packed[i] = contiguous_if_needed(packed[i]);
    scales[i] = contiguous_if_needed(scales[i]);
  }
  return run_linears(xd, contiguous_if_needed(x_real), contiguous_if_needed(x_imag), packed, scales, wd, act_quant);
}

}  // namespace
}  // namespace ifairy
}  // namespace lowrank

STABLE_TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("ifairy_quantize", LOWRANK_BOX(lowrank::ifairy::kQuant, lowrank::ifairy::quantize_cpu));
  m.impl("ifairy_dequantize", LOWRANK_BOX(lowrank::ifairy::kDequant, lowrank::ifairy::dequantize_cpu));
  m.impl("ifairy_linear", LOWRANK_BOX(lowrank::ifairy::kLinear, lowrank::ifairy::linear_cpu));
  m.impl("ifairy_linear_multi", LOWRANK_BOX(lowrank::ifairy::kMulti, lowrank::ifairy::linear_multi_cpu));
}
