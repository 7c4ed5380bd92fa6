// AVX-512 (F, BW, VL, VBMI, VNNI) build of the CPU ifairy_linear W2A8 kernel (see ifairy_cpu_kernels.h); this
// file alone is compiled with those -m flags and is called only after a CPUID check in ifairy_cpu.cpp.
//
// Why it is faster than the AVX2 kernel: the weights are turned into u8 multipliers once per 64 weights and
// then every (token, sum) costs one vpdpbusd, which multiplies and sums 64 byte pairs into 16 int32 lanes.
//   Decode, one 64-byte chunk of a row = 256 weights: byte j holds elements 4j + p (p = 0..3) at bits 2p.
//   vpermb indexes its 64-entry table with the low 6 bits of each byte, so a table whose entry i depends only
//   on bits 2p..2p+1 of i reads code p straight from the loaded bytes for p = 0, 1, 2; code 3 (bits 6-7, which
//   vpermb ignores) is brought down by one vpsrlw by 6 and read with the p = 0 tables. Each table maps the
//   code to wA+1 or wB+1, where wA = ±1 on the real axis and 0 on the imaginary one, wB the reverse. The +1
//   makes them unsigned, as vpdpbusd wants. The activations are laid out to match, once per call: in each
//   chunk of 256 elements, vector p (bytes 64p..64p+63) holds elements 4j + p (avx512_pos).
//   Per 64 weights and token this is 2 vpermb (port 5) + 4 vpdpbusd (ports 0 and 5) + 1/4 vpsrlw (port 0):
//   6.25 uops on those two ports, where the previous decode (a 16-byte broadcast, vpsrlvq by 2·lane, then the
//   two lookups) took 7 (measured alone on this kind of Xeon: 16 vpdpbusd + 8 vpermb + 1 vpsrlw 13.2 cycles,
//   with 4 vpsrlvq instead 14.9). With the four-row reduction (reduce16) and the call's scratch kept between
//   calls (ifairy_cpu.cpp), a one-token 1536x1536 call went from 49-50 us to 45-48 us on one thread.
//   Sums: A' = Σ (wA+1)·q_r = A + Σ q_r, and likewise B', C', D'; Σ q_r and Σ q_i are per token (qsum), so
//   A = A' − Σ q_r exactly. int32 lanes cannot lose the result: |A'| <= 254·in, and the op refuses in beyond
//   kMaxInt8In, where even wrapped partial sums (two's complement) come back to the exact A.
//   A row's last chunk is loaded with a byte mask (bytes past the row read as 0, code −1); the activations
//   there are zero, so they add nothing.
// Software prefetch (one_token_4rows): while four rows run, the next four are prefetched, a cache line per row
// and chunk. A decode step streams every weight from memory once (a 700M model's 168 linears are 170 MB); the
// hardware prefetcher alone left the one-token loop waiting on memory: 168 700M-shaped linears, one thread,
// 39-40 ms -> 21-25 ms a pass. Weights already in L2 run as before.
// Rows are walked in blocks of kRowBlock for each group of up to 4 tokens, so the group's activations stay in
// L1; one token processes 4 rows at once (16 accumulators), two tokens 2 rows, more tokens 1 row.
#include <immintrin.h>

#include "ifairy/ifairy_cpu_kernels.h"

namespace lowrank {
namespace ifairy {
namespace avx512 {
namespace {

constexpr int64_t kRowBlock = 8;
constexpr int64_t kChunk = 64;  // packed bytes a step: 256 weights

// Code tables: entry i = f(code at bits 2p of i), f given for code 0 = -1, 1 = +1, 2 = -i, 3 = +i; built at
// compile time (building them per call was about 1,500 instructions of a decode call).
struct TableBytes {
  alignas(64) uint8_t v[6][64];
};
constexpr TableBytes make_tables() {
  constexpr uint8_t fa[4] = {0, 2, 1, 1};  // wA + 1
  constexpr uint8_t fb[4] = {1, 1, 0, 2};  // wB + 1
  TableBytes t{};
  for (int p = 0; p < 3; ++p)
    for (int i = 0; i < 64; ++i) {
      t.v[p][i] = fa[(i >> (2 * p)) & 3];
      t.v[3 + p][i] = fb[(i >> (2 * p)) & 3];
    }
  return t;
}
alignas(64) constexpr TableBytes kTableBytes = make_tables();

struct Tables {
  // wA + 1 and wB + 1 of the code at bits 2p, p = 0, 1, 2 (p = 3 uses p = 0 after the shift)
  __m512i ta[3] = {_mm512_load_si512(kTableBytes.v[0]), _mm512_load_si512(kTableBytes.v[1]),
                   _mm512_load_si512(kTableBytes.v[2])};
  __m512i tb[3] = {_mm512_load_si512(kTableBytes.v[3]), _mm512_load_si512(kTableBytes.v[4]),
                   _mm512_load_si512(kTableBytes.v[5])};
};

// No std:: templates in this file: an inline function compiled here with AVX-512 could be the copy the
// linker keeps for the whole library.
inline __mmask16 live16(int64_t n) {  // the first min(max(n, 0), 16) lanes
  return n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : static_cast<__mmask16>((1u << n) - 1u);
}

inline __mmask64 live64(int64_t n) {  // the first min(max(n, 0), 64) bytes
  return n >= 64 ? ~__mmask64(0) : n <= 0 ? __mmask64(0) : static_cast<__mmask64>((uint64_t(1) << n) - 1u);
}

// A row's chunk s: 64 bytes, or the `left` that remain (zeros after them).
inline __m512i load_chunk(const uint8_t* row, int64_t s, int64_t nbytes) {
  const int64_t left = nbytes - kChunk * s;
  return left >= kChunk ? _mm512_loadu_si512(row + kChunk * s) : _mm512_maskz_loadu_epi8(live64(left), row + kChunk * s);
}

// [Σ a, Σ b, Σ c, Σ d] of four 16-lane vectors, in 13 instructions instead of four separate reductions' ~36.
inline __m128i reduce4(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
  const __m512i abcd = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
  const __m256i half = _mm256_add_epi32(_mm512_castsi512_si256(abcd), _mm512_extracti64x4_epi64(abcd, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(half), _mm256_extracti128_si256(half, 1));
}

// Per 128-bit lane [Σa, Σb, Σc, Σd] partials of four vectors (sums of the lane's own elements).
inline __m512i lanes4(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
  return _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
}

// The sixteen sums of four rows' accumulators, [A0, B0, C0, D0, A1, ..., D3], in one vector: 45 instructions
// where four reduce4 and their stores took about 90 (about 10 % of a 1536-wide decode).
inline __m512i reduce16(__m512i a0, __m512i b0, __m512i c0, __m512i d0, __m512i a1, __m512i b1, __m512i c1,
                        __m512i d1, __m512i a2, __m512i b2, __m512i c2, __m512i d2, __m512i a3, __m512i b3,
                        __m512i c3, __m512i d3) {
  const __m512i r0 = lanes4(a0, b0, c0, d0), r1 = lanes4(a1, b1, c1, d1);
  const __m512i r2 = lanes4(a2, b2, c2, d2), r3 = lanes4(a3, b3, c3, d3);
  // [r0 L0+L1, r0 L2+L3, r1 L0+L1, r1 L2+L3] and the same of rows 2, 3 (L: 128-bit lane)
  const __m512i r01 = _mm512_add_epi32(_mm512_shuffle_i32x4(r0, r1, 0x88), _mm512_shuffle_i32x4(r0, r1, 0xDD));
  const __m512i r23 = _mm512_add_epi32(_mm512_shuffle_i32x4(r2, r3, 0x88), _mm512_shuffle_i32x4(r2, r3, 0xDD));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(r01, r23, 0x88), _mm512_shuffle_i32x4(r01, r23, 0xDD));
}

// acc += the 4-byte dot products of u8 w and s8 x, in place. Inline asm instead of _mm512_dpbusd_epi32 because
// GCC 12 does not tie the intrinsic's accumulator to its output: with sixteen accumulators it copied each one
// to a fresh register every step and spilled half of them to the stack (1 KB of stores and reloads per step).
__attribute__((always_inline)) inline void dpbusd(__m512i& acc, __m512i w, __m512i x) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(x));
}

// Code p of a chunk's bytes `raw` (raw3 = raw >> 6 per 16-bit word: code 3 in the low bits) as wA+1, wB+1.
template <int P>
__attribute__((always_inline)) inline void decode(const Tables& k, __m512i raw, __m512i raw3, __m512i& wa, __m512i& wb) {
  const __m512i idx = P == 3 ? raw3 : raw;
  wa = _mm512_permutexvar_epi8(idx, k.ta[P == 3 ? 0 : P]);
  wb = _mm512_permutexvar_epi8(idx, k.tb[P == 3 ? 0 : P]);
}

// One row's chunk at one token: code p of its 64 bytes against activation vector p (q_r at xr, q_i at xi, the
// chunk's 256 bytes each), four vpdpbusd per p into the row's four accumulators.
template <int P>
__attribute__((always_inline)) inline void one_token_pos(const Tables& k, __m512i raw, __m512i raw3, const int8_t* xr,
                                                         const int8_t* xi, __m512i& a, __m512i& b, __m512i& c,
                                                         __m512i& d) {
  __m512i wa, wb;
  decode<P>(k, raw, raw3, wa, wb);
  const __m512i vr = _mm512_load_si512(xr + 64 * P), vi = _mm512_load_si512(xi + 64 * P);
  dpbusd(a, wa, vr);
  dpbusd(b, wb, vi);
  dpbusd(c, wa, vi);
  dpbusd(d, wb, vr);
}

__attribute__((always_inline)) inline void one_token_chunk(const Tables& k, __m512i raw, const int8_t* xr,
                                                           const int8_t* xi, __m512i& a, __m512i& b, __m512i& c,
                                                           __m512i& d) {
  const __m512i raw3 = _mm512_srli_epi16(raw, 6);
  one_token_pos<0>(k, raw, raw3, xr, xi, a, b, c, d);
  one_token_pos<1>(k, raw, raw3, xr, xi, a, b, c, d);
  one_token_pos<2>(k, raw, raw3, xr, xi, a, b, c, d);
  one_token_pos<3>(k, raw, raw3, xr, xi, a, b, c, d);
}

// The row's [A, B, C, D] from its accumulated A', B', C', D': minus Σq_r, Σq_i, Σq_i, Σq_r. The lanes may
// wrap (see the top), the exact result does not.
inline void store_one_token(const Int8Problem& p, int64_t r, int64_t t, __m512i a, __m512i b, __m512i c, __m512i d) {
  const int32_t sr = p.qsum[2 * t], si = p.qsum[2 * t + 1];
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p.sums + (t * p.out + r) * 4),
                   _mm_sub_epi32(reduce4(a, b, c, d), _mm_setr_epi32(sr, si, si, sr)));
}

// One token, four rows starting at r (the decode case): full chunks in a plain loop, then the masked last one.
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
  const int64_t full = p.nbytes / kChunk;
  // the next four rows (4·nbytes bytes after row0) are prefetched, four cache lines a chunk, while these run
  const char* next = reinterpret_cast<const char*>(row0 + 4 * p.nbytes);
  for (int64_t s = 0; s < full; ++s) {
    const int8_t* xr = qr + 4 * kChunk * s;
    const int8_t* xi = qi + 4 * kChunk * s;
    _mm_prefetch(next + 4 * kChunk * s, _MM_HINT_T0);
    _mm_prefetch(next + 4 * kChunk * s + 64, _MM_HINT_T0);
    _mm_prefetch(next + 4 * kChunk * s + 128, _MM_HINT_T0);
    _mm_prefetch(next + 4 * kChunk * s + 192, _MM_HINT_T0);
    one_token_chunk(k, _mm512_loadu_si512(row0 + kChunk * s), xr, xi, a0, b0, c0, d0);
    one_token_chunk(k, _mm512_loadu_si512(row1 + kChunk * s), xr, xi, a1, b1, c1, d1);
    one_token_chunk(k, _mm512_loadu_si512(row2 + kChunk * s), xr, xi, a2, b2, c2, d2);
    one_token_chunk(k, _mm512_loadu_si512(row3 + kChunk * s), xr, xi, a3, b3, c3, d3);
  }
  if (full * kChunk < p.nbytes) {
    const int8_t* xr = qr + 4 * kChunk * full;
    const int8_t* xi = qi + 4 * kChunk * full;
    one_token_chunk(k, load_chunk(row0, full, p.nbytes), xr, xi, a0, b0, c0, d0);
    one_token_chunk(k, load_chunk(row1, full, p.nbytes), xr, xi, a1, b1, c1, d1);
    one_token_chunk(k, load_chunk(row2, full, p.nbytes), xr, xi, a2, b2, c2, d2);
    one_token_chunk(k, load_chunk(row3, full, p.nbytes), xr, xi, a3, b3, c3, d3);
  }
  // the four rows' [A, B, C, D] are 16 consecutive int32 of sums: one reduction tree, one store
  const int32_t sr = p.qsum[2 * t], si = p.qsum[2 * t + 1];
  const __m512i q = _mm512_setr_epi32(sr, si, si, sr, sr, si, si, sr, sr, si, si, sr, sr, si, si, sr);
  _mm512_storeu_si512(p.sums + (t * p.out + r) * 4,
                      _mm512_sub_epi32(reduce16(a0, b0, c0, d0, a1, b1, c1, d1, a2, b2, c2, d2, a3, b3, c3, d3), q));
}

// One token, one row (the rows left over by one_token_4rows).
inline void one_token_1row(const Int8Problem& p, const Tables& k, int64_t r, int64_t t) {
  const __m512i z = _mm512_setzero_si512();
  __m512i a = z, b = z, c = z, d = z;
  const uint8_t* row = p.packed + r * p.nbytes;
  const int8_t* qr = p.q + t * 2 * p.in_pad;
  const int8_t* qi = qr + p.in_pad;
  const int64_t chunks = (p.nbytes + kChunk - 1) / kChunk;
  for (int64_t s = 0; s < chunks; ++s)
    one_token_chunk(k, load_chunk(row, s, p.nbytes), qr + 4 * kChunk * s, qi + 4 * kChunk * s, a, b, c, d);
  store_one_token(p, r, t, a, b, c, d);
}

// Groups of NT >= 2 tokens (one row, NT = 4 or 3; two rows, NT = 2): the masked last chunk stays in the loop.
// With NT = 4 the tables are read from memory (vpermb's table operand): the sixteen accumulators, eight
// activation vectors and six tables did not fit in 32 registers, and GCC spilled 23 values a chunk (4 tokens
// ran 25 % slower than the previous kernel).
template <int P>
__attribute__((always_inline)) inline void decode_mem(const Tables& k, __m512i raw, __m512i raw3, __m512i& wa,
                                                      __m512i& wb) {
  const __m512i idx = P == 3 ? raw3 : raw;
  asm("vpermb %2, %1, %0" : "=v"(wa) : "v"(idx), "m"(k.ta[P == 3 ? 0 : P]));
  asm("vpermb %2, %1, %0" : "=v"(wb) : "v"(idx), "m"(k.tb[P == 3 ? 0 : P]));
}

template <int R, int NT, int P>
__attribute__((always_inline)) inline void rows_tokens_pos(const Tables& k, const __m512i (&raw)[R],
                                                           const __m512i (&raw3)[R], const int8_t* const (&qr)[NT],
                                                           int64_t in_pad, int64_t off, __m512i (&acc)[R][NT][4]) {
  for (int i = 0; i < R; ++i) {
    __m512i wa, wb;
    if constexpr (NT == 4)
      decode_mem<P>(k, raw[i], raw3[i], wa, wb);
    else
      decode<P>(k, raw[i], raw3[i], wa, wb);
    for (int t = 0; t < NT; ++t) {
      const __m512i xr = _mm512_load_si512(qr[t] + off + 64 * P);
      const __m512i xi = _mm512_load_si512(qr[t] + in_pad + off + 64 * P);
      dpbusd(acc[i][t][0], wa, xr);
      dpbusd(acc[i][t][1], wb, xi);
      dpbusd(acc[i][t][2], wa, xi);
      dpbusd(acc[i][t][3], wb, xr);
    }
  }
}

template <int R, int NT>
inline void rows_tokens(const Int8Problem& p, const Tables& k, int64_t r, int64_t t0) {
  const int64_t chunks = (p.nbytes + kChunk - 1) / kChunk;
  __m512i acc[R][NT][4];
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < NT; ++t)
      for (int s = 0; s < 4; ++s) acc[i][t][s] = _mm512_setzero_si512();
  const uint8_t* row[R];
  for (int i = 0; i < R; ++i) row[i] = p.packed + (r + i) * p.nbytes;
  const int8_t* qr[NT];
  for (int t = 0; t < NT; ++t) qr[t] = p.q + (t0 + t) * 2 * p.in_pad;
  for (int64_t s = 0; s < chunks; ++s) {
    __m512i raw[R], raw3[R];
    for (int i = 0; i < R; ++i) {
      raw[i] = load_chunk(row[i], s, p.nbytes);
      raw3[i] = _mm512_srli_epi16(raw[i], 6);
    }
    const int64_t off = 4 * kChunk * s;
    rows_tokens_pos<R, NT, 0>(k, raw, raw3, qr, p.in_pad, off, acc);
    rows_tokens_pos<R, NT, 1>(k, raw, raw3, qr, p.in_pad, off, acc);
    rows_tokens_pos<R, NT, 2>(k, raw, raw3, qr, p.in_pad, off, acc);
    rows_tokens_pos<R, NT, 3>(k, raw, raw3, qr, p.in_pad, off, acc);
  }
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < NT; ++t) store_one_token(p, r + i, t0 + t, acc[i][t][0], acc[i][t][1], acc[i][t][2], acc[i][t][3]);
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
  // undoes that and gathers the block's elements by position p = element % 4 into 16-byte lane p, and four
  // 16-byte stores put lane p where the kernel reads vector p of the 256-element chunk (avx512_pos). Σ q is
  // summed from the int8 block by vpdpbusd with ones (|q| <= 128 and in <= kMaxInt8In: no overflow).
  alignas(64) static const struct Order {
    uint8_t v[64];
    Order() {
      for (int l = 0; l < 64; ++l) {
        const int e = 4 * (l % 16) + l / 16;  // element of the block for lane l / 16, slot l % 16
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
    const __m512i lanes = _mm512_permutexvar_epi8(perm, block);
    int8_t* at = dst + (b & ~int64_t(255)) + 16 * ((b / 64) % 4);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(at), _mm512_castsi512_si128(lanes));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(at + 64), _mm512_extracti32x4_epi32(lanes, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(at + 128), _mm512_extracti32x4_epi32(lanes, 2));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(at + 192), _mm512_extracti32x4_epi32(lanes, 3));
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
