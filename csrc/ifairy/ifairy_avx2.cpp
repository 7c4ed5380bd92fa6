// AVX2 build of the CPU ifairy_linear integer kernel (see ifairy_cpu_kernels.h); this file alone is compiled
// with -mavx2 -mfma and is called only after a CPUID check in ifairy_cpu.cpp.
//
// 32 weights a step: 8 packed bytes are broadcast and byte-shuffled so lane k holds the byte of element k,
// then AND + compare against per-lane bit masks give, per lane, "positive" and "imaginary axis" masks
// (no lookup table). _mm256_sign_epi8 applies the weight's sign to the int8 activations (q >= -127, so it
// never overflows), and _mm256_maddubs_epi16 with 0/1 axis masks sums pairs into int16 lanes: no multiply
// by a weight value anywhere. int16 lanes are widened to int32 every 64 steps (|lane| <= 254·64 < 2^15).
// Rows are walked in blocks of 8 for each group of up to 2 tokens, so the group's activations stay in L1.
// float_rows (act_quant=false, fp32): 8 weights a step, the sign applied by XOR of the sign bit and the
// axis chosen by AND masks, so again only additions.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "ifairy/ifairy_cpu_kernels.h"

namespace lowrank {
namespace ifairy {
namespace avx2 {
namespace {

struct Decoded {
  __m256i sgn;  // -1 for a positive code, +1 for a negative one (sums come out negated)
  __m256i mre;  // 1 where the weight is on the real axis (±1), else 0
  __m256i mim;  // 1 where it is on the imaginary axis (±i)
};

inline Decoded decode32(const uint8_t* p8) {
  int64_t v;
  std::memcpy(&v, p8, 8);
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3,  //
                                          4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7);
  const char h = static_cast<char>(0x80);
  const __m256i mpos = _mm256_setr_epi8(1, 4, 16, 64, 1, 4, 16, 64, 1, 4, 16, 64, 1, 4, 16, 64,  //
                                        1, 4, 16, 64, 1, 4, 16, 64, 1, 4, 16, 64, 1, 4, 16, 64);
  const __m256i maxis = _mm256_setr_epi8(2, 8, 32, h, 2, 8, 32, h, 2, 8, 32, h, 2, 8, 32, h,  //
                                         2, 8, 32, h, 2, 8, 32, h, 2, 8, 32, h, 2, 8, 32, h);
  const __m256i one = _mm256_set1_epi8(1);
  const __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi64x(v), spread);
  const __m256i pos = _mm256_cmpeq_epi8(_mm256_and_si256(b, mpos), mpos);
  const __m256i axis = _mm256_cmpeq_epi8(_mm256_and_si256(b, maxis), maxis);
  return Decoded{_mm256_or_si256(pos, one), _mm256_andnot_si256(axis, one), _mm256_and_si256(axis, one)};
}

inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// One row, NT tokens starting at t0.
template <int NT>
void row_tokens(const Int8Problem& p, int64_t r, int64_t t0) {
  const uint8_t* row = p.packed + r * p.nbytes;
  const int64_t steps = p.in_pad / 32;
  const int64_t full = p.nbytes / 8;  // steps whose 8 packed bytes all lie inside the row
  const __m256i ones16 = _mm256_set1_epi16(1);
  __m256i acc32[NT][4];
  __m256i acc16[NT][4];
  for (int t = 0; t < NT; ++t)
    for (int k = 0; k < 4; ++k) acc32[t][k] = acc16[t][k] = _mm256_setzero_si256();
  const int8_t* qr[NT];
  const int8_t* qi[NT];
  for (int t = 0; t < NT; ++t) {
    qr[t] = p.q + (t0 + t) * 2 * p.in_pad;
    qi[t] = qr[t] + p.in_pad;
  }
  for (int64_t s0 = 0; s0 < steps; s0 += 64) {
    const int64_t s1 = std::min(steps, s0 + 64);
    for (int64_t s = s0; s < s1; ++s) {
      // the next row's line at this offset, once per 64 bytes: a one-token decode streams every row from
      // memory once (see the AVX-512 kernel's prefetch)
      if ((s & 7) == 0) _mm_prefetch(reinterpret_cast<const char*>(row + p.nbytes + s * 8), _MM_HINT_T0);
      Decoded w;
      if (s < full) {
        w = decode32(row + s * 8);
      } else {  // the row's last bytes: copy what exists (activations beyond in are zero)
        uint8_t tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        const int64_t left = p.nbytes - s * 8;
        if (left > 0) std::memcpy(tail, row + s * 8, static_cast<size_t>(std::min<int64_t>(left, 8)));
        w = decode32(tail);
      }
      for (int t = 0; t < NT; ++t) {
        const __m256i xr = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qr[t] + s * 32));
        const __m256i xi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qi[t] + s * 32));
        const __m256i sr = _mm256_sign_epi8(xr, w.sgn);
        const __m256i si = _mm256_sign_epi8(xi, w.sgn);
        acc16[t][0] = _mm256_add_epi16(acc16[t][0], _mm256_maddubs_epi16(w.mre, sr));  // A
        acc16[t][1] = _mm256_add_epi16(acc16[t][1], _mm256_maddubs_epi16(w.mim, si));  // B
        acc16[t][2] = _mm256_add_epi16(acc16[t][2], _mm256_maddubs_epi16(w.mre, si));  // C
        acc16[t][3] = _mm256_add_epi16(acc16[t][3], _mm256_maddubs_epi16(w.mim, sr));  // D
      }
    }
    for (int t = 0; t < NT; ++t)
      for (int k = 0; k < 4; ++k) {
        acc32[t][k] = _mm256_add_epi32(acc32[t][k], _mm256_madd_epi16(acc16[t][k], ones16));
        acc16[t][k] = _mm256_setzero_si256();
      }
  }
  for (int t = 0; t < NT; ++t) {
    int32_t* dst = p.sums + ((t0 + t) * p.out + r) * 4;
    for (int k = 0; k < 4; ++k) dst[k] = -hsum(acc32[t][k]);
  }
}

// 8 weights a step for the fp32 path: 2 packed bytes broadcast to every 32-bit lane, lane k tests its bits.
struct DecodedF {
  __m256 flip;  // sign bit set where the code is negative
  __m256 imag;  // all ones where the weight is on the imaginary axis
};

inline DecodedF decode8(uint32_t two_bytes) {
  const __m256i b = _mm256_set1_epi32(static_cast<int>(two_bytes));
  const __m256i mpos = _mm256_setr_epi32(1, 4, 16, 64, 256, 1024, 4096, 16384);
  const __m256i maxis = _mm256_slli_epi32(mpos, 1);
  const __m256i pos = _mm256_cmpeq_epi32(_mm256_and_si256(b, mpos), mpos);
  const __m256i axis = _mm256_cmpeq_epi32(_mm256_and_si256(b, maxis), maxis);
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  return DecodedF{_mm256_castsi256_ps(_mm256_andnot_si256(pos, sign)), _mm256_castsi256_ps(axis)};
}

inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace

void float_rows(const FloatProblem& p, int64_t r0, int64_t r1) {
  const int64_t steps = p.in_pad / 8;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = p.packed + r * p.nbytes;
    for (int64_t t = 0; t < p.T; ++t) {
      const float* xr = p.x + t * 2 * p.in_pad;
      const float* xi = xr + p.in_pad;
      __m256 A = _mm256_setzero_ps(), B = A, C = A, D = A;
      for (int64_t s = 0; s < steps; ++s) {
        const uint32_t lo = row[2 * s];  // the row holds at least one byte of every step
        const uint32_t hi = 2 * s + 1 < p.nbytes ? row[2 * s + 1] : 0u;
        const DecodedF w = decode8(lo | (hi << 8));
        const __m256 vr = _mm256_xor_ps(_mm256_loadu_ps(xr + 8 * s), w.flip);
        const __m256 vi = _mm256_xor_ps(_mm256_loadu_ps(xi + 8 * s), w.flip);
        A = _mm256_add_ps(A, _mm256_andnot_ps(w.imag, vr));
        C = _mm256_add_ps(C, _mm256_andnot_ps(w.imag, vi));
        B = _mm256_add_ps(B, _mm256_and_ps(w.imag, vi));
        D = _mm256_add_ps(D, _mm256_and_ps(w.imag, vr));
      }
      float* dst = p.sums + (t * p.out + r) * 4;
      dst[0] = hsum_ps(A), dst[1] = hsum_ps(B), dst[2] = hsum_ps(C), dst[3] = hsum_ps(D);
    }
  }
}

void int8_rows(const Int8Problem& p, int64_t r0, int64_t r1) {
  constexpr int64_t kRowBlock = 8;
  for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
    const int64_t re = std::min(r1, rb + kRowBlock);
    int64_t t = 0;
    for (; t + 2 <= p.T; t += 2)
      for (int64_t r = rb; r < re; ++r) row_tokens<2>(p, r, t);
    if (t < p.T)
      for (int64_t r = rb; r < re; ++r) row_tokens<1>(p, r, t);
  }
}

}  // namespace avx2
}  // namespace ifairy
}  // namespace lowrank
