// Small pieces shared by every CUDA op file, kept apart from gemm_runner.cuh so that a file can have them
// without instantiating the GEMM kernels: dtype dispatch, fp32 <-> element conversions, and host glue
// (error checks, torch's current stream, the SM count).
#pragma once
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/headeronly/util/shim_utils.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/checks.h"

namespace lowrank {

// Calls f with a value of the element type (float, __half or __nv_bfloat16) of st, or raises a clear error
// naming the op for any other dtype.

template <typename F>
void dispatch_cuda_float(const char* op, ScalarType st, F&& f) {
  switch (st) {
    case ScalarType::Float: f(float{}); break;
    case ScalarType::Half: f(__half{}); break;
    case ScalarType::BFloat16: f(__nv_bfloat16{}); break;
    default: LOWRANK_CHECK(false, op, ": unsupported dtype on CUDA (float32, float16 or bfloat16)");
  }
}

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T>
__device__ __forceinline__ float to_f32(T v);
template <>
__device__ __forceinline__ float to_f32<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ float to_f32<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

namespace cuda_glue {

inline void check_cuda(cudaError_t e, const char* op, const char* what) {
  LOWRANK_CHECK(e == cudaSuccess, op, ": CUDA error in ", what, ": ", cudaGetErrorString(e));
}

inline cudaStream_t current_stream(int32_t device_index) {
  void* s = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device_index, &s));
  return static_cast<cudaStream_t>(s);
}

inline int num_sms(int32_t device_index) {
  int v = 0;
  const cudaError_t e = cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device_index);
  if (e != cudaSuccess || v <= 0) {
    (void)cudaGetLastError();
    return 132;
  }
  return v;
}

}  // namespace cuda_glue

}  // namespace lowrank
