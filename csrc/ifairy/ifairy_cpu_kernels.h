// The integer inner kernel of the CPU ifairy_linear (W2A8), in a portable, an AVX2 (ifairy_avx2.cpp, compiled
// with -mavx2) and an AVX-512 VBMI + VNNI build (ifairy_avx512.cpp), chosen at run time by CPUID.
//
// For rows [r0, r1) of the packed weight and every token t it writes the four exact int32 sums
//   sums[(t·out + r)·4 + 0..3] = A, B, C, D:
//   A = Σ over ±1 weights of sign·q_r,  B = Σ over ±i of sign·q_i,
//   C = Σ over ±1 weights of sign·q_i,  D = Σ over ±i of sign·q_r,
// so that y_re = s_re·A/a_r + s_im·B/a_i and y_im = -s_re·C/a_i + s_im·D/a_r.
// Int8 activations: q + t·2·in_pad holds q_r of token t (in_pad int8, zero beyond in), then q_i. in_pad is a
// multiple of 32; the packed rows are read only within their nbytes = ceil(in/4) bytes. The AVX-512 kernel
// wants in_pad a multiple of 256, element j of a token part at byte avx512_pos(j) (in each 256-element chunk,
// the 64 elements 4i + p at bytes 64p + i: what one 64-byte chunk of a packed row multiplies, code p of byte i)
// and qsum[2t + 0/1] = Σ q_r, Σ q_i of token t.
#pragma once
#include <cstdint>

namespace lowrank {
namespace ifairy {

constexpr int64_t kActPad = 32;
constexpr int64_t kActPadAvx512 = 256;

// Where the AVX-512 kernel wants element j of a token part's activations (see ifairy_avx512.cpp).
constexpr int64_t avx512_pos(int64_t j) { return (j & ~int64_t(255)) + 64 * (j % 4) + (j % 256) / 4; }

struct Int8Problem {
  const uint8_t* packed;
  int64_t nbytes, out;
  const int8_t* q;
  int64_t in_pad, T;
  int32_t* sums;
  const int32_t* qsum;  // read by the AVX-512 kernel only
};

using Int8RowsKernel = void (*)(const Int8Problem& p, int64_t r0, int64_t r1);

// act_quant=false in fp32: the same four sums of the activations themselves (fp32, no multiplies).
// x + t·2·in_pad holds x_r of token t (in_pad floats, zero beyond in), then x_i; in_pad a multiple of 8.
constexpr int64_t kFloatPad = 8;

struct FloatProblem {
  const uint8_t* packed;
  int64_t nbytes, out;
  const float* x;
  int64_t in_pad, T;
  float* sums;
};

using FloatRowsKernel = void (*)(const FloatProblem& p, int64_t r0, int64_t r1);

namespace avx512 {
void int8_rows(const Int8Problem& p, int64_t r0, int64_t r1);
// max |x| of one token part into *m; false when the part holds a NaN or ±Inf
bool absmax(const float* x, int64_t in, float* m);
// q of one token part at scale a, in the kernel's lane order, zero padded to in_pad; returns Σ q
int32_t quantize_token(const float* x, int64_t in, int64_t in_pad, float a, int8_t* dst);
// y_re = s_re·A/a_r + s_im·B/a_i, y_im = -s_re·C/a_i + s_im·D/a_r for rows [r0, r1) of one token, in double,
// the same operations as the scalar epilogue; sums as the kernels write them (A, B, C, D per row)
void outputs_f32(const int32_t* sums, int64_t r0, int64_t r1, double s_re, double s_im, double a_r, double a_i,
                 float* yr, float* yi);
}

namespace avx2 {
void int8_rows(const Int8Problem& p, int64_t r0, int64_t r1);
void float_rows(const FloatProblem& p, int64_t r0, int64_t r1);
}

}  // namespace ifairy
}  // namespace lowrank
