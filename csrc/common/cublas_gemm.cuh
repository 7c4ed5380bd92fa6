// cuBLAS back end of GemmRunner: one strided batched GEMM C_g = alpha·A_g·B_g (+ bias[n]) through
// cublasGemmStridedBatchedEx, when every operand has a unit stride in one of its two dimensions (the
// layouts cuBLAS can address). fp32 accumulation (CUBLAS_COMPUTE_32F: plain fp32 for float32 -- no TF32,
// as torch's default). Deterministic: cuBLAS gives bit-identical results run to run on one GPU model.
//
// Why: the hand-written mma.sync GEMM of strided_gemm.cuh reached 140-210 TFLOP/s on an H200 (first GPU
// run, bench/results/h200-2026-11-27-run1), a quarter of cuBLAS's wgmma kernels. The op files lay out
// their intermediates so that the big GEMMs have unit-stride operands and come here; strided_gemm.cuh
// stays the path for permuted (non-unit) addressing, and the only path unless LOWRANK_CUBLAS=1.
//
// One handle per (thread, device), with its own 32 MiB workspace (so calls never allocate: safe under
// CUDA graph capture), bound to torch's current stream at every call.
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <unordered_map>

#include "common/checks.h"
#include "common/strided_gemm.cuh"

namespace lowrank {
namespace cublas_gemm {

// LOWRANK_CUBLAS=1 turns the cuBLAS back end on. It is OFF by default until it has run on a GPU: the
// hand-written path is the one the first GPU run verified (431 CUDA tests, compute-sanitizer); this one
// was written after that run and has only been compiled. bench/gpu_check.sh tests and times both.
inline bool enabled() {
  static const bool on = [] {
    const char* v = std::getenv("LOWRANK_CUBLAS");
    return v != nullptr && (std::strcmp(v, "1") == 0 || std::strcmp(v, "on") == 0);
  }();
  return on;
}

inline void check(cublasStatus_t s, const char* op, const char* what) {
  LOWRANK_CHECK(s == CUBLAS_STATUS_SUCCESS, op, ": cuBLAS ", what, " failed: ", cublasGetStatusName(s), " (",
                int(s), ")");
}

// One handle and one 32 MiB workspace per (thread, device), bound to `stream`. cublasSetStream resets the
// handle to cuBLAS's default workspace pool, so the workspace is set again after it on every call.
inline cublasHandle_t handle(int32_t device, cudaStream_t stream, const char* op) {
  constexpr size_t kWorkspace = size_t(32) << 20;
  struct Bound {
    cublasHandle_t h;
    void* ws;
  };
  thread_local std::unordered_map<int32_t, Bound> handles;
  auto it = handles.find(device);
  if (it == handles.end()) {
    Bound b{nullptr, nullptr};
    check(cublasCreate(&b.h), op, "handle creation");
    const cudaError_t e = cudaMalloc(&b.ws, kWorkspace);
    LOWRANK_CHECK(e == cudaSuccess, op, ": cudaMalloc of the cuBLAS workspace failed: ", cudaGetErrorString(e));
    it = handles.emplace(device, b).first;
  }
  check(cublasSetStream(it->second.h, stream), op, "set stream");
  check(cublasSetWorkspace(it->second.h, it->second.ws, kWorkspace), op, "workspace");
  return it->second.h;
}

// How cuBLAS (column-major) addresses an R x C matrix whose element (i, j) sits at i·s_r + j·s_c.
struct ColMajor {
  bool ok = false;
  cublasOperation_t op = CUBLAS_OP_N;
  int ld = 1;
};

inline ColMajor as_colmajor(int64_t R, int64_t C, int64_t s_r, int64_t s_c) {
  const int64_t imax = std::numeric_limits<int>::max();
  ColMajor m;
  if (s_r == 1 && (C == 1 || s_c >= std::max<int64_t>(R, 1))) {
    const int64_t ld = C == 1 ? std::max<int64_t>(R, 1) : s_c;
    if (ld <= imax) m = ColMajor{true, CUBLAS_OP_N, static_cast<int>(ld)};
  } else if (s_c == 1 && (R == 1 || s_r >= std::max<int64_t>(C, 1))) {
    // stored as the C x R column-major matrix, used transposed
    const int64_t ld = R == 1 ? std::max<int64_t>(C, 1) : s_r;
    if (ld <= imax) m = ColMajor{true, CUBLAS_OP_T, static_cast<int>(ld)};
  }
  return m;
}

static __global__ void fill_bias_kernel(const void* bias, void* c, int64_t M, int64_t N, int64_t rs, int64_t cs,
                                 int elem_bytes) {
  const int64_t total = M * N;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < total; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = t / N, n = t % N;
    char* dst = static_cast<char*>(c) + (m * rs + n * cs) * elem_bytes;
    const char* src = static_cast<const char*>(bias) + n * elem_bytes;
    if (elem_bytes == 4)
      *reinterpret_cast<uint32_t*>(dst) = *reinterpret_cast<const uint32_t*>(src);
    else
      *reinterpret_cast<uint16_t*>(dst) = *reinterpret_cast<const uint16_t*>(src);
  }
}

// Runs the GEMM on cuBLAS and returns true, or returns false (nothing launched) when the layouts or sizes
// are outside what cuBLAS addresses. dtype: CUDA_R_32F / CUDA_R_16F / CUDA_R_16BF for A, B and C.
inline bool try_gemm(const char* op, int32_t device, cudaStream_t stream, cudaDataType_t dtype, int elem_bytes,
                     const sgemm::Operand& a, const sgemm::Operand& b, const sgemm::Output& c, int64_t M, int64_t N,
                     int64_t K, int64_t groups, float alpha, const void* bias) {
  if (!enabled()) return false;
  const int64_t imax = std::numeric_limits<int>::max();
  if (M <= 0 || N <= 0 || K <= 0 || groups <= 0) return false;
  if (M > imax || N > imax || K > imax || groups > imax) return false;
  if (c.f32 != 0 || c.perm_l != 0) return false;
  if (bias != nullptr && groups != 1) return false;

  // cuBLAS computes C' = op(A')·op(B') in column-major.
  ColMajor ca, cb;
  int64_t m_, n_, ldc;
  const void *pa, *pb;
  long long sa, sb;
  if (c.cs == 1 && (M == 1 || c.rs >= N)) {  // C row-major: C^T (N x M) = B^T (N x K) · A^T (K x M)
    ca = as_colmajor(N, K, b.s_mn, b.s_k);
    cb = as_colmajor(K, M, a.s_k, a.s_mn);
    m_ = N, n_ = M, ldc = M == 1 ? N : c.rs;
    pa = b.ptr, pb = a.ptr, sa = b.gs, sb = a.gs;
  } else if (c.rs == 1 && (N == 1 || c.cs >= M)) {  // C column-major: C (M x N) = A (M x K) · B (K x N)
    ca = as_colmajor(M, K, a.s_mn, a.s_k);
    cb = as_colmajor(K, N, b.s_k, b.s_mn);
    m_ = M, n_ = N, ldc = N == 1 ? M : c.cs;
    pa = a.ptr, pb = b.ptr, sa = a.gs, sb = b.gs;
  } else {
    return false;
  }
  if (!ca.ok || !cb.ok || ldc > imax) return false;

  float beta = 0.f;
  if (bias != nullptr) {
    const int64_t total = M * N;
    const int threads = 256;
    const int blocks = static_cast<int>(std::min<int64_t>((total + threads - 1) / threads, 65535));
    fill_bias_kernel<<<blocks, threads, 0, stream>>>(bias, c.ptr, M, N, c.rs, c.cs, elem_bytes);
    const cudaError_t e = cudaGetLastError();
    LOWRANK_CHECK(e == cudaSuccess, op, ": bias fill launch failed: ", cudaGetErrorString(e));
    beta = 1.f;
  }
  cublasHandle_t h = handle(device, stream, op);
  check(cublasGemmStridedBatchedEx(h, ca.op, cb.op, static_cast<int>(m_), static_cast<int>(n_), static_cast<int>(K),
                                   &alpha, pa, dtype, ca.ld, sa, pb, dtype, cb.ld, sb, &beta, c.ptr, dtype,
                                   static_cast<int>(ldc), static_cast<long long>(c.gs), static_cast<int>(groups),
                                   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
        op, "GEMM");
  return true;
}

}  // namespace cublas_gemm
}  // namespace lowrank
