// Host-side glue shared by the CUDA op files (error checks, the current stream and the SM count come from
// common/cuda_dispatch.cuh) and GemmRunner, which runs
// one strided batched GEMM on torch's stream: on cuBLAS (common/cublas_gemm.cuh) when LOWRANK_CUBLAS=1 and
// every operand has a unit stride in one dimension, else on common/strided_gemm.cuh (any strides,
// permuted epilogues) with torch-allocated split-K workspace. Everything is inline: each .cu file includes it.
#pragma once
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/shim_utils.h>

#include <cuda_runtime.h>

#include <limits>

#include "common/checks.h"
#include "common/cublas_gemm.cuh"
#include "common/cuda_dispatch.cuh"
#include "common/strided_gemm.cuh"

namespace lowrank {
namespace cuda_glue {

using sgemm::Operand;
using sgemm::Output;
using sgemm::Problem;

// Operand / output descriptors: (group stride,) stride of M (or N), stride of K (or column).
inline Operand operand(const Tensor& t, int64_t gs, int64_t s_mn, int64_t s_k) {
  return Operand{t.const_data_ptr(), gs, s_mn, s_k, 0};
}
inline Operand operand(const Tensor& t, int64_t s_mn, int64_t s_k) { return operand(t, 0, s_mn, s_k); }
inline Output output(const Tensor& t, int64_t gs, int64_t rs, int64_t cs) {
  return Output{t.mutable_data_ptr(), gs, rs, cs, 0, 0, 0, 0, 0};
}
inline Output output(const Tensor& t, int64_t rs, int64_t cs) { return output(t, 0, rs, cs); }

// C_g = alpha·A_g·B_g (+ bias[n]) for g < groups, dtype st. When the output is a whole dense tensor
// (allow_split with c_tensor), K may be split over an fp32 workspace reduced into it.
struct GemmRunner {
  const char* op;
  ScalarType st;
  int32_t device;
  int sms;
  cudaStream_t stream;
  Tensor like;  // for workspace allocation (device)

  // grouped, alpha = 1, no bias (Monarch)
  void run(const Operand& a, const Operand& b, Output c, int64_t M, int64_t N, int64_t K, int64_t groups,
           bool allow_split = false, const Tensor* c_tensor = nullptr) const {
    launch(a, b, c, M, N, K, groups, 1.f, nullptr, allow_split, c_tensor);
  }
  // one group, with alpha and an optional per-column bias (SLTrain)
  void run1(const Operand& a, const Operand& b, Output c, int64_t M, int64_t N, int64_t K, float alpha = 1.f,
            const void* bias = nullptr, bool allow_split = false, const Tensor* c_tensor = nullptr) const {
    launch(a, b, c, M, N, K, 1, alpha, bias, allow_split, c_tensor);
  }

 private:
  void launch(const Operand& a, const Operand& b, Output c, int64_t M, int64_t N, int64_t K, int64_t groups,
              float alpha, const void* bias, bool allow_split, const Tensor* c_tensor) const {
    if (M == 0 || N == 0 || groups == 0) return;
    const int64_t imax = std::numeric_limits<int32_t>::max();
    // K gets headroom: split-K adds up to one k_per_split (rounded to the 32-wide K step) to a K offset
    LOWRANK_CHECK(M <= imax && N <= imax && K <= imax - 64 && groups <= imax, op,
                  ": a GEMM dimension exceeds 2^31 - 1 (M=", M, ", N=", N, ", K=", K, ", groups=", groups, ")");
    const bool f32 = st == ScalarType::Float;
    if (f32 || st == ScalarType::Half || st == ScalarType::BFloat16) {
      const cudaDataType_t cdt = f32 ? CUDA_R_32F : st == ScalarType::Half ? CUDA_R_16F : CUDA_R_16BF;
      if (cublas_gemm::try_gemm(op, device, stream, cdt, f32 ? 4 : 2, a, b, c, M, N, K, groups, alpha, bias)) return;
    }
    const sgemm::Plan plan = sgemm::plan_gemm(f32, M, N, K, groups, sms, allow_split && c_tensor != nullptr);
    Problem P;
    P.a = a;
    P.b = b;
    P.M = static_cast<int>(M);
    P.N = static_cast<int>(N);
    P.K = static_cast<int>(K);
    P.groups = static_cast<int>(groups);
    P.alpha = alpha;
    P.bias = bias;
    Tensor ws = like;
    const int64_t elems = groups * M * N;  // only meaningful for a dense output
    if (plan.splits > 1) {
      ws = lowrank::new_empty(like, {plan.splits * elems}, ScalarType::Float);
      c.ptr = ws.mutable_data_ptr();
      c.f32 = 1;
      c.split_stride = elems;
    }
    P.c = c;
    cudaError_t e = cudaSuccess;
    dispatch_cuda_float(op, st, [&](auto tag) { e = sgemm::launch_gemm<decltype(tag)>(P, plan, stream); });
    check_cuda(e, op, "strided GEMM launch");
    if (plan.splits > 1) {
      const float* wsp = static_cast<const float*>(ws.const_data_ptr());
      void* dst = c_tensor->mutable_data_ptr();
      dispatch_cuda_float(op, st, [&](auto tag) {
        using T = decltype(tag);
        e = sgemm::launch_splitk_reduce<T>(wsp, static_cast<T*>(dst), elems, plan.splits, stream);
      });
      check_cuda(e, op, "split-K reduce launch");
    }
    // ws (if any) is released to the caching allocator on the current stream, after the reduce is queued.
  }
};

inline GemmRunner make_runner(const char* op, const Tensor& x) {
  const int32_t dev = x.get_device_index();
  return GemmRunner{op, x.scalar_type(), dev, num_sms(dev), current_stream(dev), x};
}

}  // namespace cuda_glue
}  // namespace lowrank
