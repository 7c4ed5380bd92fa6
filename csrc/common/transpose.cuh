// Batched transpose of the last two dimensions: dst (B, C, R) = src (B, R, C)^T, both contiguous, 2- or
// 4-byte elements (moved as raw bits). Used where a layout permutation cannot be an operand stride of a
// cuBLAS GEMM (Monarch's output interleave out[b, d·l + c] = u[b, c, d], and its backward mirror).
// Tiles of ti x tj elements (ti = min(R, 32), tj = 1024 / ti) go through shared memory, so both the reads
// (runs of tj along C) and the writes (runs of ti along R; whole dst rows when R <= 32) are coalesced,
// also for the small R (Monarch's l = 4) that a square 32x32 tile would leave mostly idle.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace lowrank {
namespace transpose {

template <typename E>
__global__ void __launch_bounds__(256) transpose_last2_kernel(const E* __restrict__ src, E* __restrict__ dst,
                                                              int64_t R, int64_t C, int ti, int tj,
                                                              int64_t tiles_i, int64_t tiles_j) {
  extern __shared__ unsigned char smem_raw[];
  E* tile = reinterpret_cast<E*>(smem_raw);  // [ti][tj + 1]
  const int64_t per_batch = tiles_i * tiles_j;
  const int64_t t = blockIdx.x;
  const int64_t b = t / per_batch;
  const int64_t rem = t % per_batch;
  const int64_t i0 = (rem / tiles_j) * ti, j0 = (rem % tiles_j) * tj;
  const int h = static_cast<int>(std::min<int64_t>(ti, R - i0));
  const int w = static_cast<int>(std::min<int64_t>(tj, C - j0));
  const E* s = src + b * R * C;
  E* d = dst + b * R * C;
  for (int f = threadIdx.x; f < h * w; f += blockDim.x) {
    const int ii = f / w, jj = f % w;
    tile[ii * (tj + 1) + jj] = s[(i0 + ii) * C + j0 + jj];
  }
  __syncthreads();
  for (int f = threadIdx.x; f < h * w; f += blockDim.x) {
    const int jj = f / h, ii = f % h;
    d[(j0 + jj) * R + i0 + ii] = tile[ii * (tj + 1) + jj];
  }
}

// dst[b, j, i] = src[b, i, j] for b < B, i < R, j < C. elem_bytes is 2 or 4.
inline cudaError_t transpose_last2(const void* src, void* dst, int64_t B, int64_t R, int64_t C, int elem_bytes,
                                   cudaStream_t stream) {
  if (B == 0 || R == 0 || C == 0) return cudaSuccess;
  const int ti = static_cast<int>(std::min<int64_t>(R, 32));
  const int tj = std::max(1, 1024 / ti);
  const int64_t tiles_i = (R + ti - 1) / ti, tiles_j = (C + tj - 1) / tj;
  const int64_t blocks = B * tiles_i * tiles_j;
  if (blocks > 2147483647LL) return cudaErrorInvalidConfiguration;
  const size_t smem = size_t(ti) * (tj + 1) * elem_bytes;
  if (elem_bytes == 4)
    transpose_last2_kernel<uint32_t><<<static_cast<unsigned>(blocks), 256, smem, stream>>>(
        static_cast<const uint32_t*>(src), static_cast<uint32_t*>(dst), R, C, ti, tj, tiles_i, tiles_j);
  else
    transpose_last2_kernel<uint16_t><<<static_cast<unsigned>(blocks), 256, smem, stream>>>(
        static_cast<const uint16_t*>(src), static_cast<uint16_t*>(dst), R, C, ti, tj, tiles_i, tiles_j);
  return cudaGetLastError();
}

}  // namespace transpose
}  // namespace lowrank
