// lowrank.adam_lowrank_8bit_ on the CPU: adam_lowrank_ on blockwise 8-bit moments (maps in state8bit.h).
// One task per block of kState8Block elements: decode both moments, take the float32 Adam step (N written
// from these float32 moments), take the new absmax of each moment, encode. The state is read and written
// once; the float32 moments live only in two block-sized stack buffers.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <algorithm>

#include "projection/state8bit.h"

namespace lowrank {
namespace {

Tensor adam_lowrank_8bit_cpu(Tensor exp_avg, Tensor exp_avg_absmax, Tensor exp_avg_sq, Tensor exp_avg_sq_absmax,
                             Tensor R, double beta1, double beta2, double eps) {
  check_adam8_args(exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax, R);
  STD_TORCH_CHECK(R.is_cpu(), kAdam8Op, ": the CPU kernel got a tensor on ", device_name(R));
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
  torch::stable::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    float m[kState8Block], v[kState8Block];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t i0 = blk * kState8Block, len = std::min(kState8Block, numel - i0);
      const float am = ma[blk], av = va[blk];
      float new_am = 0.f, new_av = 0.f;
      for (int64_t i = 0; i < len; ++i) {
        m[i] = state8::decode_m(mq[i0 + i], am);
        v[i] = state8::decode_v(vq[i0 + i], av);
        state8::adam_element(m[i], v[i], g[i0 + i], b1, c1, b2, c2);
        out[i0 + i] = m[i] / (std::sqrt(v[i]) + e);
        new_am = std::max(new_am, std::fabs(m[i]));
        new_av = std::max(new_av, v[i]);
      }
      for (int64_t i = 0; i < len; ++i) {
        mq[i0 + i] = state8::encode_m(m[i], new_am);
        vq[i0 + i] = state8::encode_v(v[i], new_av);
      }
      ma[blk] = new_am;
      va[blk] = new_av;
    }
  });
  return N;
}

}  // namespace
}  // namespace lowrank

STABLE_TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("adam_lowrank_8bit_", TORCH_BOX(&lowrank::adam_lowrank_8bit_cpu));
}
