// lowrank.adam_lowrank_8bit_ on the CPU: adam_lowrank_ on blockwise 8-bit moments (maps in state8bit.h).
// Per block of kState8Block elements: decode both moments (a 256-entry table per map, the values of
// state8::decode_* at absmax 1), take the float32 Adam step (N written from these float32 moments), take the new
// absmax of each moment, encode. The state is read and written once; the float32 moments live only in two
// block-sized stack buffers. Results equal state8bit.h's scalar functions bit for bit.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/op_boundary.h"
#include "projection/state8bit.h"

namespace lowrank {
namespace {

// Decoded value of every code at absmax 1, by the very ops of state8::decode_*: code k at absmax a decodes to
// table[k]·a, bit for bit, without a division per element.
struct DecodeTables {
  float m[256], v[256];
  DecodeTables() {
    for (int k = 0; k < 256; ++k) {
      m[k] = state8::decode_m(static_cast<int8_t>(k), 1.f);  // k >= 128: the negative codes
      v[k] = state8::decode_v(static_cast<uint8_t>(k), 1.f);
    }
  }
};

// The loops of one block are kept simple (no branches, no mixed element types) so that they vectorize.
void adam8_block(int8_t* __restrict mq, uint8_t* __restrict vq, float* __restrict ma, float* __restrict va,
                 const float* __restrict g, float* __restrict out, int64_t len, const DecodeTables& tab, float b1,
                 float c1, float b2, float c2, float e) {
  float m[kState8Block], v[kState8Block];
  const float am = *ma, av = *va;
  for (int64_t i = 0; i < len; ++i) {
    m[i] = state8::mul(tab.m[static_cast<uint8_t>(mq[i])], am);
    v[i] = state8::mul(tab.v[vq[i]], av);
  }
  for (int64_t i = 0; i < len; ++i) {
    state8::adam_element(m[i], v[i], g[i], b1, c1, b2, c2);
    out[i] = m[i] / (std::sqrt(v[i]) + e);
  }
  // the maxima on the bit patterns: for non-negative floats (|m|, and v >= +0) integer order is float order, and
  // an integer max reduction vectorizes where a float one (NaN rules) does not
  uint32_t bits_am = 0, bits_av = 0;
  for (int64_t i = 0; i < len; ++i) {
    uint32_t a, b;
    std::memcpy(&a, &m[i], 4);
    std::memcpy(&b, &v[i], 4);
    a &= 0x7fffffffu;
    bits_am = a > bits_am ? a : bits_am;
    bits_av = b > bits_av ? b : bits_av;
  }
  float new_am, new_av;
  std::memcpy(&new_am, &bits_am, 4);
  std::memcpy(&new_av, &bits_av, 4);
  // encode (state8::encode_*, written out so the loops vectorize); an all-zero block keeps zero codes
  if (new_am > 0.f) {
    for (int64_t i = 0; i < len; ++i) {
      const float k = state8::round_even(127.f * std::sqrt(std::fabs(m[i]) / new_am));
      mq[i] = static_cast<int8_t>(static_cast<int32_t>(std::copysign(k, m[i])));
    }
  } else {
    for (int64_t i = 0; i < len; ++i) mq[i] = 0;
  }
  if (new_av > 0.f) {
    for (int64_t i = 0; i < len; ++i)
      vq[i] = static_cast<uint8_t>(static_cast<int32_t>(state8::round_even(255.f * std::sqrt(std::sqrt(v[i] / new_av)))));
  } else {
    for (int64_t i = 0; i < len; ++i) vq[i] = 0;
  }
  *ma = new_am;
  *va = new_av;
}

Tensor adam_lowrank_8bit_cpu(Tensor exp_avg, Tensor exp_avg_absmax, Tensor exp_avg_sq, Tensor exp_avg_sq_absmax,
                             Tensor R, double beta1, double beta2, double eps) {
  check_adam8_args(exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax, R);
  LOWRANK_CHECK(R.is_cpu(), kAdam8Op, ": the CPU kernel got a tensor on ", device_name(R));
  R = torch::stable::contiguous(R);
  Tensor N = torch::stable::new_empty(R, R.sizes());
  const int64_t numel = R.numel(), blocks = state8_blocks(numel);
  // rounded to float like adam_lowrank_ rounds them
  const float b1 = static_cast<float>(beta1), c1 = static_cast<float>(1.0 - beta1);
  const float b2 = static_cast<float>(beta2), c2 = static_cast<float>(1.0 - beta2), e = static_cast<float>(eps);
  int8_t* mq = static_cast<int8_t*>(exp_avg.data_ptr());
  uint8_t* vq = static_cast<uint8_t*>(exp_avg_sq.data_ptr());
  float* ma = static_cast<float*>(exp_avg_absmax.data_ptr());
  float* va = static_cast<float*>(exp_avg_sq_absmax.data_ptr());
  const float* g = static_cast<const float*>(R.data_ptr());
  float* out = static_cast<float*>(N.data_ptr());
  static const DecodeTables tables;
  torch::stable::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t i0 = blk * kState8Block;
      adam8_block(mq + i0, vq + i0, ma + blk, va + blk, g + i0, out + i0, std::min(kState8Block, numel - i0),
                  tables, b1, c1, b2, c2, e);
    }
  });
  return N;
}

}  // namespace
}  // namespace lowrank

STABLE_TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("adam_lowrank_8bit_", LOWRANK_BOX(lowrank::kAdam8Op, lowrank::adam_lowrank_8bit_cpu));
}
