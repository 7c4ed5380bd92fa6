// dtype dispatch shared by the CUDA op files: calls f with a value of the element type (float, __half or
// __nv_bfloat16) of st, or raises a clear error naming the op for any other dtype.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/checks.h"

namespace lowrank {

template <typename F>
void dispatch_cuda_float(const char* op, ScalarType st, F&& f) {
  switch (st) {
    case ScalarType::Float: f(float{}); break;
    case ScalarType::Half: f(__half{}); break;
    case ScalarType::BFloat16: f(__nv_bfloat16{}); break;
    default: STD_TORCH_CHECK(false, op, ": unsupported dtype on CUDA (float32, float16 or bfloat16)");
  }
}

}  // namespace lowrank
