// AVX-512 (F, BW, VL, VBMI, VNNI) build of the CPU ifairy_linear W2A8 kernel (see ifairy_cpu_kernels.h); this
// file alone is compiled with those -m flags and is called only after a CPUID check in ifairy_cpu.cpp.
//
// Why it is faster than the AVX2 kernel: the weights are turned into u8 multipliers once per 64 weights and
// then every (token, sum) costs one vpdpbusd, which multiplies and sums 64 byte pairs into 16 int32 lanes.
//   Decode, 16 packed bytes = 64 weights: a broadcast load puts the 16 bytes in every 128-bit lane L, and
//   vpsrlvq shifts lane L's qwords right by 2·L bits, so byte k of lane L holds code L of packed byte k in its
//   low bits (the lane -> element order this gives is undone by laying the activations out in the same order,
//   once per call: avx512_elem); vpermb with a 64-entry table that repeats every 4 entries maps the code (the
//   bits above it are ignored by the period) to wA+1 or wB+1, where wA = ±1 on the real axis and 0 on the
//   imaginary one, wB the reverse. The +1 makes them unsigned, as vpdpbusd wants.
//   Why a shift and not vpmultishiftqb (the first version): vpermb and vpmultishiftqb both run on port 5
//   only, vpdpbusd on ports 0 and 5, vpsrlvq on port 0; with the shift a 16-byte step is 2 port-5 + 1 port-0
//   + 4 either-port instructions, which the scheduler balances better than 3 + 0 + 4.
//   Sums: A' = Σ (wA+1)·q_r = A + Σ q_r, and likewise B', C', D'; Σ q_r and Σ q_i are per token (qsum), so
//   A = A' − Σ q_r exactly. int32 lanes cannot lose the result: |A'| <= 254·in, and the op refuses in beyond
//   kMaxInt8In, where even wrapped partial sums (two's complement) come back to the exact A.
// Rows are walked in blocks of kRowBlock for each group of up to 4 tokens, so the group's activations stay in
// L1; one token processes 4 rows at once (16 accumulators), two tokens 2 rows, more tokens 1 row.
#include <immintrin.h>

#include "ifairy/ifairy_cpu_kernels.h"

namespace lowrank {
namespace ifairy {
namespace avx512 {
namespace {

constexpr int64_t kRowBlock = 8;

// vpsrlvq counts: the qwords of 128-bit lane L shift right by 2·L bits.
inline __m512i shift_counts() { return _mm512_setr_epi64(0, 0, 2, 2, 4, 4, 6, 6); }

// Code tables (64 entries, period 4): code 0 = -1, 1 = +1, 2 = -i, 3 = +i.
inline __m512i table(uint8_t c0, uint8_t c1, uint8_t c2, uint8_t c3) {
  return _mm512_set1_epi32(static_cast<int>(c0 | (c1 << 8) | (c2 << 16) | (static_cast<uint32_t>(c3) << 24)));
}

struct Tables {
  __m512i shifts = shift_counts();
  __m512i ta = table(0, 2, 1, 1);  // wA + 1
  __m512i tb = table(1, 1, 0, 2);  // wB + 1
};

// No std:: templates in this file: an inline function compiled here with AVX-512 could be the copy the
// linker keeps for the whole library.
inline __mmask16 live16(int64_t n) {  // the first min(max(n, 0), 16) lanes
  return n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : static_cast<__mmask16>((1u << n) - 1u);
}

inline __m512i load16(const uint8_t* p, int64_t left) {
  const __m128i v = left >= 16 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)) : _mm_maskz_loadu_epi8(live16(left), p);
  return _mm512_broadcast_i32x4(v);
}

// [Σ a, Σ b, Σ c, Σ d] of four 16-lane vectors, in 13 instructions instead of four separate reductions' ~36.
inline __m128i reduce4(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
  const __m512i abcd = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
  const __m256i half = _mm256_add_epi32(_mm512_castsi512_si256(abcd), _mm512_extracti64x4_epi64(abcd, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(half), _mm256_extracti128_si256(half, 1));
}

// [A', B', C', D'] of the row's last nbytes % 16 bytes (step `full`) for one token's activations q (q_r, then
// q_i at in_pad): one masked step with its own accumulators, so the main loop stays free of masks and branches.
inline __m128i tail_sums(const Int8Problem& p, const Tables& k, const uint8_t* row, int64_t full, const int8_t* q) {
  const __m128i bytes = _mm_maskz_loadu_epi8(live16(p.nbytes - 16 * full), row + 16 * full);
  const __m512i idx = _mm512_srlv_epi64(_mm512_broadcast_i32x4(bytes), k.shifts);
  const __m512i wa = _mm512_permutexvar_epi8(idx, k.ta), wb = _mm512_permutexvar_epi8(idx, k.tb);
  const __m512i xr = _mm512_loadu_si512(q + 64 * full), xi = _mm512_loadu_si512(q + p.in_pad + 64 * full);
  const __m512i z = _mm512_setzero_si512();
  return reduce4(_mm512_dpbusd_epi32(z, wa, xr), _mm512_dpbusd_epi32(z, wb, xi), _mm512_dpbusd_epi32(z, wa, xi),
                 _mm512_dpbusd_epi32(z, wb, xr));
}

// acc += the 4-byte dot products of u8 w and s8 x, in place. Inline asm instead of _mm512_dpbusd_epi32 because
// GCC 12 does not tie the intrinsic's accumulator to its output: with sixteen accumulators it copied each one
// to a fresh register every step and spilled half of them to the stack (1 KB of stores and reloads per step).
__attribute__((always_inline)) inline void dpbusd(__m512i& acc, __m512i w, __m512i x) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(x));
}

// One row's step of the one-token loop: its 16 bytes decoded, four vpdpbusd into its four accumulators.
__attribute__((always_inline)) inline void one_token_step(const Tables& k, const uint8_t* bytes16, __m512i xr,
                                                          __m512i xi, __m512i& a, __m512i& b, __m512i& c,
                                                          __m512i& d) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes16));
  const __m512i idx = _mm512_srlv_epi64(_mm512_broadcast_i32x4(bytes), k.shifts);
  const __m512i wa = _mm512_permutexvar_epi8(idx, k.ta);
  const __m512i wb = _mm512_permutexvar_epi8(idx, k.tb);
  dpbusd(a, wa, xr);
  dpbusd(b, wb, xi);
  dpbusd(c, wa, xi);
  dpbusd(d, wb, xr);
}

// The row's [A, B, C, D] from its accumulated A', B', C', D': the last nbytes % 16 bytes added by tail_sums,
// minus Σq_r, Σq_i, Σq_i, Σq_r. The lanes may wrap (see the top), the exact result does not.
inline void store_one_token(const Int8Problem& p, const Tables& k, int64_t r, int64_t t, int64_t full, __m512i a,
                            __m512i b, __m512i c, __m512i d) {
  const uint8_t* row = p.packed + r * p.nbytes;
  const int8_t* q = p.q + t * 2 * p.in_pad;
  const int32_t sr = p.qsum[2 * t], si = p.qsum[2 * t + 1];
  __m128i total = reduce4(a, b, c, d);
  if (full * 16 < p.nbytes) total = _mm_add_epi32(total, tail_sums(p, k, row, full, q));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p.sums + (t * p.out + r) * 4),
                   _mm_sub_epi32(total, _mm_setr_epi32(sr, si, si, sr)));
}

// One token, four rows starting at r (the decode case): full 16-byte steps in a plain loop, the masked tail
// step added by store_one_token.
inline void one_token_4rows(const Int8Problem& p, const Tables& k, int64_t r, int64_t t) {
  const __m512i z = _mm512_setzero_si512();
  __m512i a0 = z, b0 = z, c0 = z, d0 = z, a1 = z, b1 = z, c1 = z, d1 = z;
  __m512i a2 = z, b2 = z, c2 = z, d2 = z, a3 = z, b3 = z, c3 = z, d3 = z;
  const uint8_t* row0 = p.packed + r * p.nbytes;
  const uint8_t* row1 = row0 + p.nbytes;
  const uint8_t* row2 = row1 + p.nbytes;
  const uint8_t* row3 = row2 + p.nbytes;
  const int8_t* qr = p.q + t * 2 * p.in_pad;
  const int8_t* qi = qr + p.in_pad;
  const int64_t full = p.nbytes / 16;
  for (int64_t s = 0; s < full; ++s) {
    const __m512i xr = _mm512_loadu_si512(qr + 64 * s), xi = _mm512_loadu_si512(qi + 64 * s);
    one_token_step(k, row0 + 16 * s, xr, xi, a0, b0, c0, d0);
    one_token_step(k, row1 + 16 * s, xr, xi, a1, b1, c1, d1);
    one_token_step(k, row2 + 16 * s, xr, xi, a2, b2, c2, d2);
    one_token_step(k, row3 + 16 * s, xr, xi, a3, b3, c3, d3);
  }
  store_one_token(p, k, r, t, full, a0, b0, c0, d0);
  store_one_token(p, k, r + 1, t, full, a1, b1, c1, d1);
  store_one_token(p, k, r + 2, t, full, a2, b2, c2, d2);
  store_one_token(p, k, r + 3, t, full, a3, b3, c3, d3);
}

// One token, one row (the rows left over by one_token_4rows).
inline void one_token_1row(const Int8Problem& p, const Tables& k, int64_t r, int64_t t) {
  const __m512i z = _mm512_setzero_si512();
  __m512i a = z, b = z, c = z, d = z;
  const uint8_t* row = p.packed + r * p.nbytes;
  const int8_t* qr = p.q + t * 2 * p.in_pad;
  const int8_t* qi = qr + p.in_pad;
  const int64_t full = p.nbytes / 16;
  for (int64_t s = 0; s < full; ++s)
    one_token_step(k, row + 16 * s, _mm512_loadu_si512(qr + 64 * s), _mm512_loadu_si512(qi + 64 * s), a, b, c, d);
  store_one_token(p, k, r, t, full, a, b, c, d);
}

// Groups of NT >= 2 tokens (one row, NT = 4 or 3; two rows, NT = 2): the masked tail step stays in the loop.
// Measured faster at 2-128 tokens than the split loop of one_token_4rows (GCC allocates the two differently).
template <int R, int NT>
inline void rows_tokens(const Int8Problem& p, const Tables& k, int64_t r, int64_t t0) {
  const int64_t steps = p.in_pad / 64;
  __m512i acc[R][NT][4];
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < NT; ++t)
      for (int s = 0; s < 4; ++s) acc[i][t][s] = _mm512_setzero_si512();
  const uint8_t* row[R];
  for (int i = 0; i < R; ++i) row[i] = p.packed + (r + i) * p.nbytes;
  const int8_t* qr[NT];
  for (int t = 0; t < NT; ++t) qr[t] = p.q + (t0 + t) * 2 * p.in_pad;
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t left = p.nbytes - 16 * s;
    __m512i xr[NT], xi[NT];
    for (int t = 0; t < NT; ++t) {
      xr[t] = _mm512_loadu_si512(qr[t] + 64 * s);
      xi[t] = _mm512_loadu_si512(qr[t] + p.in_pad + 64 * s);
    }
    for (int i = 0; i < R; ++i) {
      const __m512i idx = _mm512_srlv_epi64(load16(row[i] + 16 * s, left), k.shifts);
      const __m512i wa = _mm512_permutexvar_epi8(idx, k.ta);
      const __m512i wb = _mm512_permutexvar_epi8(idx, k.tb);
      for (int t = 0; t < NT; ++t) {
        acc[i][t][0] = _mm512_dpbusd_epi32(acc[i][t][0], wa, xr[t]);
        acc[i][t][1] = _mm512_dpbusd_epi32(acc[i][t][1], wb, xi[t]);
        acc[i][t][2] = _mm512_dpbusd_epi32(acc[i][t][2], wa, xi[t]);
        acc[i][t][3] = _mm512_dpbusd_epi32(acc[i][t][3], wb, xr[t]);
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < NT; ++t) {
      const int32_t sr = p.qsum[2 * (t0 + t)], si = p.qsum[2 * (t0 + t) + 1];
      int32_t* dst = p.sums + ((t0 + t) * p.out + r + i) * 4;
      // unsigned: the lanes may wrap (see the top), the exact result does not
      dst[0] = static_cast<int32_t>(static_cast<uint32_t>(_mm512_reduce_add_epi32(acc[i][t][0])) - uint32_t(sr));
      dst[1] = static_cast<int32_t>(static_cast<uint32_t>(_mm512_reduce_add_epi32(acc[i][t][1])) - uint32_t(si));
      dst[2] = static_cast<int32_t>(static_cast<uint32_t>(_mm512_reduce_add_epi32(acc[i][t][2])) - uint32_t(si));
      dst[3] = static_cast<int32_t>(static_cast<uint32_t>(_mm512_reduce_add_epi32(acc[i][t][3])) - uint32_t(sr));
    }
}

template <int R, int NT>
inline void rows_of_block(const Int8Problem& p, const Tables& k, int64_t rb, int64_t re, int64_t t0) {
  int64_t r = rb;
  if constexpr (NT == 1) {
    for (; r + 4 <= re; r += 4) one_token_4rows(p, k, r, t0);
    for (; r < re; ++r) one_token_1row(p, k, r, t0);
  } else {
    for (; r + R <= re; r += R) rows_tokens<R, NT>(p, k, r, t0);
    for (; r < re; ++r) rows_tokens<1, NT>(p, k, r, t0);
  }
}

}  // namespace

void int8_rows(const Int8Problem& p, int64_t r0, int64_t r1) {
  const Tables k;
  for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
    const int64_t re = r1 < rb + kRowBlock ? r1 : rb + kRowBlock;
    int64_t t = 0;
    for (; t + 4 <= p.T; t += 4) rows_of_block<1, 4>(p, k, rb, re, t);
    switch (p.T - t) {
      case 3: rows_of_block<1, 3>(p, k, rb, re, t); break;
      case 2: rows_of_block<2, 2>(p, k, rb, re, t); break;
      case 1: rows_of_block<4, 1>(p, k, rb, re, t); break;
      default: break;
    }
  }
}

bool absmax(const float* x, int64_t in, float* m_out) {
  // |x| > FLT_MAX is false for finite x and true for ±Inf; the unordered compare is also true for NaN.
  // Four running maxima over 64-float steps (a max is exact in any order): one chain was latency-bound.
  const __m512 big = _mm512_set1_ps(3.40282347e38f);
  __m512 m0 = _mm512_setzero_ps(), m1 = m0, m2 = m0, m3 = m0;
  __mmask16 bad = 0;
  int64_t j = 0;
  for (; j + 64 <= in; j += 64) {
    const __m512 v0 = _mm512_abs_ps(_mm512_loadu_ps(x + j)), v1 = _mm512_abs_ps(_mm512_loadu_ps(x + j + 16));
    const __m512 v2 = _mm512_abs_ps(_mm512_loadu_ps(x + j + 32)), v3 = _mm512_abs_ps(_mm512_loadu_ps(x + j + 48));
    bad |= _mm512_cmp_ps_mask(v0, big, _CMP_NLE_UQ) | _mm512_cmp_ps_mask(v1, big, _CMP_NLE_UQ) |
           _mm512_cmp_ps_mask(v2, big, _CMP_NLE_UQ) | _mm512_cmp_ps_mask(v3, big, _CMP_NLE_UQ);
    m0 = _mm512_max_ps(m0, v0), m1 = _mm512_max_ps(m1, v1), m2 = _mm512_max_ps(m2, v2), m3 = _mm512_max_ps(m3, v3);
  }
  for (; j < in; j += 16) {
    const __m512 v = _mm512_abs_ps(_mm512_maskz_loadu_ps(live16(in - j), x + j));
    bad |= _mm512_cmp_ps_mask(v, big, _CMP_NLE_UQ);
    m0 = _mm512_max_ps(m0, v);
  }
  *m_out = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
  return bad == 0;
}

int32_t quantize_token(const float* x, int64_t in, int64_t in_pad, float a, int8_t* dst) {
  // q = clamp(round_half_even(fl(x·a)), -128, 127): vcvtps2dq rounds to nearest even, and the two signed
  // saturating packs (int32 -> int16 -> int8) are that clamp. Why packs: narrowing each 16 lanes with vpmovdb
  // and inserting them cost about 3x more (0.75 cycles an element). The packs interleave the four 16-float
  // quarters of a 64-block per 128-bit lane (byte 16·i + 4·k + j holds element 16·k + 4·i + j); one vpermb
  // undoes that and puts the kernel's lane order. Σ q is summed from the int8 block by vpdpbusd with ones
  // (|q| <= 128 and in <= kMaxInt8In: no overflow).
  alignas(64) static const struct Order {
    uint8_t v[64];
    Order() {
      for (int l = 0; l < 64; ++l) {
        const int e = avx512_elem(l);
        v[l] = static_cast<uint8_t>(16 * ((e % 16) / 4) + 4 * (e / 16) + e % 4);
      }
    }
  } order;
  const __m512i perm = _mm512_loadu_si512(order.v);
  const __m512 va = _mm512_set1_ps(a);
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i sum = _mm512_setzero_si512();
  auto quarter = [&](int64_t j0) {  // 16 elements from j0 (zeros past in) as int32
    const __m512 v = j0 + 16 <= in ? _mm512_loadu_ps(x + j0) : _mm512_maskz_loadu_ps(live16(in - j0), x + j0);
    return _mm512_cvt_roundps_epi32(_mm512_mul_ps(v, va), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  };
  for (int64_t b = 0; b < in_pad; b += 64) {
    const __m512i ab = _mm512_packs_epi32(quarter(b), quarter(b + 16));
    const __m512i cd = _mm512_packs_epi32(quarter(b + 32), quarter(b + 48));
    const __m512i block = _mm512_packs_epi16(ab, cd);
    sum = _mm512_dpbusd_epi32(sum, ones, block);
    _mm512_storeu_si512(dst + b, _mm512_permutexvar_epi8(perm, block));
  }
  return _mm512_reduce_add_epi32(sum);
}

namespace {

// RN(n / d) of 8 lanes, d > 0 or NaN, y ≈ 1/d: the same double as _mm512_div_pd(n, d), mostly without the
// divider. Why: the epilogue's four divisions per row were 5 us of a 2048-row decode (vdivpd zmm occupies the
// divider 16 cycles). q1 is Markstein's quotient (one FMA correction of n·y); it is kept only where it is
// provably the correctly rounded quotient, the other lanes take the division:
//   r1 = RN(n − q1·d) and h = d·ulp(q1)/2 is exact (d times a power of two), so |r1| < h implies
//   |n − q1·d| < h (rounding is monotonic and h representable), i.e. |n/d − q1| < ulp(q1)/2; when q1 is not a
//   power of two its neighbours are q1 ± ulp(q1), so q1 is the unique nearest double to n/d. Zero, NaN and
//   ±Inf quotients and powers of two fail the test and are divided.
inline __m512d quotient(__m512d n, __m512d d, __m512d y) {
  const __m512d q0 = _mm512_mul_pd(n, y);
  const __m512d q1 = _mm512_fmadd_pd(_mm512_fnmadd_pd(q0, d, n), y, q0);
  const __m512d r1 = _mm512_fnmadd_pd(q1, d, n);
  const __m512d h = _mm512_scalef_pd(d, _mm512_sub_pd(_mm512_getexp_pd(q1), _mm512_set1_pd(53.0)));
  const __mmask8 proven = _mm512_cmp_pd_mask(_mm512_abs_pd(r1), h, _CMP_LT_OQ) &
                          _mm512_test_epi64_mask(_mm512_castpd_si512(q1), _mm512_set1_epi64(0x000FFFFFFFFFFFFFLL));
  return proven == 0xFF ? q1 : _mm512_mask_div_pd(q1, static_cast<__mmask8>(~proven), n, d);
}

}  // namespace

void outputs_f32(const int32_t* sums, int64_t r0, int64_t r1, double s_re, double s_im, double a_r, double a_i,
                 float* yr, float* yi) {
  // the scalar epilogue's operations in the same order, 8 rows at a time (exact same doubles: the divisions
  // by quotient() above)
  const __m512i ab = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
  const __m512i cd = _mm512_add_epi32(ab, _mm512_set1_epi32(2));
  const __m512d sr = _mm512_set1_pd(s_re), si = _mm512_set1_pd(s_im), nsr = _mm512_set1_pd(-s_re);
  const __m512d ar = _mm512_set1_pd(a_r), ai = _mm512_set1_pd(a_i);
  const __m512d yar = _mm512_set1_pd(1.0 / a_r), yai = _mm512_set1_pd(1.0 / a_i);
  int64_t r = r0;
  for (; r + 8 <= r1; r += 8) {
    const __m512i lo = _mm512_loadu_si512(sums + 4 * r), hi = _mm512_loadu_si512(sums + 4 * r + 16);
    const __m512i vab = _mm512_permutex2var_epi32(lo, ab, hi), vcd = _mm512_permutex2var_epi32(lo, cd, hi);
    const __m512d A = _mm512_cvtepi32_pd(_mm512_castsi512_si256(vab));
    const __m512d B = _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(vab, 1));
    const __m512d C = _mm512_cvtepi32_pd(_mm512_castsi512_si256(vcd));
    const __m512d D = _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(vcd, 1));
    const __m512d re = _mm512_add_pd(quotient(_mm512_mul_pd(sr, A), ar, yar), quotient(_mm512_mul_pd(si, B), ai, yai));
    const __m512d im = _mm512_add_pd(quotient(_mm512_mul_pd(nsr, C), ai, yai), quotient(_mm512_mul_pd(si, D), ar, yar));
    _mm256_storeu_ps(yr + r, _mm512_cvtpd_ps(re));
    _mm256_storeu_ps(yi + r, _mm512_cvtpd_ps(im));
  }
  for (; r < r1; ++r) {
    const int32_t* q = sums + 4 * r;
    yr[r] = static_cast<float>(s_re * q[0] / a_r + s_im * q[1] / a_i);
    yi[r] = static_cast<float>(-s_re * q[2] / a_i + s_im * q[3] / a_r);
  }
}

}  // namespace avx512
}  // namespace ifairy
}  // namespace lowrank
