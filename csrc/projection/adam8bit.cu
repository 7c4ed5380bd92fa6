// lowrank.adam_lowrank_8bit_ on CUDA: adam_lowrank_ on blockwise 8-bit moments (maps in state8bit.h).
// One thread block of kState8Block (256) threads per quantization block, grid-stride over the blocks; each
// thread owns one element: decode m and v, take the float32 Adam step, write N, then the block's new absmax
// of |m| and of v (warp shuffles, then the 8 warp results through shared memory), then encode. The state is
// read and written once (2 bytes + 8 bytes of absmax per 256 elements). Every float op is an _rn intrinsic,
// so the codes equal the CPU kernel's and the reference's bit for bit.
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/shim_utils.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/cuda_dispatch.cuh"
#include "common/op_boundary.h"
#include "projection/state8bit.h"

namespace lowrank {
namespace {

using namespace cuda_glue;

constexpr int kThreads = static_cast<int>(kState8Block);
static_assert(kThreads % 32 == 0 && kThreads <= 1024, "one thread per element of a quantization block");

// max over the thread block of two values given as float bit patterns (|m| and v >= +0, for which integer order is
// float order; the CPU kernel takes its maxima the same way, so a NaN poisons a block alike on both); every
// thread gets the result.
__device__ __forceinline__ uint2 block_max2(unsigned a, unsigned b) {
  __shared__ uint2 warp_max[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) {
    a = max(a, __shfl_xor_sync(0xffffffffu, a, off));
    b = max(b, __shfl_xor_sync(0xffffffffu, b, off));
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_max[warp] = make_uint2(a, b);
  __syncthreads();
  uint2 r = warp_max[0];
  for (int w = 1; w < kThreads / 32; ++w) r = make_uint2(max(r.x, warp_max[w].x), max(r.y, warp_max[w].y));
  __syncthreads();  // warp_max is reused by the next quantization block of this thread block
  return r;
}

__global__ void __launch_bounds__(kThreads) adam8_kernel(int8_t* __restrict__ mq, float* __restrict__ ma,
                                                         uint8_t* __restrict__ vq, float* __restrict__ va,
                                                         const float* __restrict__ g, float* __restrict__ out,
                                                         int64_t numel, int64_t blocks, float b1, float c1,
                                                         float b2, float c2, float eps) {
  for (int64_t blk = blockIdx.x; blk < blocks; blk += gridDim.x) {
    const int64_t i = blk * kState8Block + threadIdx.x;
    const bool live = i < numel;
    float m = 0.f, v = 0.f;
    if (live) {
      m = state8::decode_m(mq[i], ma[blk]);
      v = state8::decode_v(vq[i], va[blk]);
      state8::adam_element(m, v, g[i], b1, c1, b2, c2);
      out[i] = state8::div(m, state8::add(state8::sqrt_rn(v), eps));
    }
    // every thread has read ma[blk] / va[blk] before block_max2's first barrier, so thread 0 may overwrite them
    const uint2 bits = block_max2(__float_as_uint(m) & 0x7fffffffu, __float_as_uint(v));
    const float new_am = __uint_as_float(bits.x), new_av = __uint_as_float(bits.y);
    if (live) {
      mq[i] = state8::encode_m(m, new_am);
      vq[i] = state8::encode_v(v, new_av);
    }
    if (threadIdx.x == 0) {
      ma[blk] = new_am;
      va[blk] = new_av;
    }
  }
}

Tensor adam_lowrank_8bit_cuda(Tensor exp_avg, Tensor exp_avg_absmax, Tensor exp_avg_sq, Tensor exp_avg_sq_absmax,
                              Tensor R, double beta1, double beta2, double eps) {
  check_adam8_args(exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax, R);
  LOWRANK_CHECK(R.is_cuda(), kAdam8Op, ": the CUDA kernel got a tensor on ", device_name(R));
  torch::stable::accelerator::DeviceGuard guard(R.get_device_index());
  R = torch::stable::contiguous(R);
  Tensor N = torch::stable::new_empty(R, R.sizes());
  const int64_t numel = R.numel(), blocks = state8_blocks(numel);
  if (numel == 0) return N;
  const int dev = R.get_device_index();
  // enough resident blocks to fill the GPU (8 per SM of 256 threads); each loops over the rest
  const int grid = static_cast<int>(std::min<int64_t>(blocks, static_cast<int64_t>(num_sms(dev)) * 8));
  adam8_kernel<<<grid, kThreads, 0, current_stream(dev)>>>(
      static_cast<int8_t*>(exp_avg.mutable_data_ptr()), static_cast<float*>(exp_avg_absmax.mutable_data_ptr()),
      static_cast<uint8_t*>(exp_avg_sq.mutable_data_ptr()), static_cast<float*>(exp_avg_sq_absmax.mutable_data_ptr()),
      static_cast<const float*>(R.const_data_ptr()), static_cast<float*>(N.mutable_data_ptr()), numel, blocks,
      static_cast<float>(beta1), static_cast<float>(1.0 - beta1), static_cast<float>(beta2),
      static_cast<float>(1.0 - beta2), static_cast<float>(eps));
  check_cuda(cudaGetLastError(), kAdam8Op, "kernel launch");
  return N;
}

}  // namespace
}  // namespace lowrank

STABLE_TORCH_LIBRARY_IMPL(lowrank, CUDA, m) {
  m.impl("adam_lowrank_8bit_", LOWRANK_BOX(lowrank::kAdam8Op, lowrank::adam_lowrank_8bit_cuda));
}
