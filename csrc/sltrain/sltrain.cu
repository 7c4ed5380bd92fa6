// CUDA kernels of lowrank::sltrain_linear and lowrank::sltrain_linear_backward.
//
// What: y = x·Wᵀ + bias with W = scale·B·A + S (S.view(-1)[indices] = values), and its gradients; the
// official SLTrain algorithm ("path (a)" of shared/research/sltrain.md §3): materialize W in an (out, in)
// scratch of the input dtype, then dense GEMMs. W is never saved: the backward recomputes it, and one
// out·in scratch serves first as W (for dx) and then as G = dyᵀ·x (for dA, dB and dvalues).
// Every GEMM is one call of the strided batched GEMM in common/strided_gemm.cuh (groups = 1):
//   fp16 / bf16: mma.sync tensor cores, fp32 accumulate; fp32: SIMT fp32 FMA (exact fp32, no TF32).
// scale is the GEMM epilogue's alpha (F1, B3, B4); the bias is added in F2's epilogue (fp32, before the
// store). The weight-gradient GEMMs (B2, B3, B4) may split K over an fp32 workspace reduced into the output
// (deterministic, no atomics).
//
// Descriptor table (element strides; A(m, k) = a[m·s_mn + k·s_k], B(k, n) = b[n·s_mn + k·s_k],
// C(m, n) = c[m·rs + n·cs]; x is (T, in), dy (T, out), A (r, in), B (out, r), W / G (out, in)):
//   GEMM                      M    N    K   | A-op: base s_mn s_k | B-op: base s_mn s_k | C: base rs  cs | alpha
//   F1 W  = scale·B·A         out  in   r   |       B    r    1   |       A    1    in  |    W    in  1  | scale
//   F2 y  = x·Wᵀ (+ bias)     T    out  in  |       x    in   1   |       W    in   1   |    y    out 1  | 1
//   B1 dx = dy·W              T    in   out |       dy   out  1   |       W    1    in  |    dx   in  1  | 1
//   B2 G  = dyᵀ·x             out  in   T   |       dy   1    out |       x    1    in  |    G    in  1  | 1 (split-K)
//   B3 dA = scale·Bᵀ·G        r    in   out |       B    1    r   |       G    1    in  |    dA   in  1  | scale (split-K)
//   B4 dB = scale·G·Aᵀ        out  r    in  |       G    in   1   |       A    in   1   |    dB   r   1  | scale (split-K)
//   (all groups = 1, group strides 0.)
// Scatter / gather (guarded: an index outside [0, out·in) is skipped, so bad indices never touch memory
// outside W / G):  W.view(-1)[idx[k]] += values[k] (atomicAdd, so duplicates sum like index_add);
//                  dvalues[k] = G.view(-1)[idx[k]]  (0 for an out-of-range index).
// grad_bias[j] = Σ_t dy[t, j]: column sums, T split over blockIdx.y into an fp32 workspace, summed by the
// split-K reduce kernel (fp32 accumulation, deterministic).
// Index check (check=True, forward only): a radix sort of (index, position) pairs, O(nnz) memory; the
// smallest out-of-range position and the smallest position repeating an earlier value are recorded with
// atomicMin; one 16-byte copy + stream sync brings both back; errors name the position and value.
//
// G is stored in the input dtype (as the official code does) because B3 and B4 read it as a 16-bit tensor-
// core operand; its accumulation is fp32 (in registers, or in the split-K workspace).
//
// Assumptions: x, A, B, values, indices, bias, grad_out are made contiguous; GEMM dims < 2^31 (checked by
// the runner), offsets int64. T = 0: forward returns the empty (..., out) output (after the index check);
// backward returns dx with 0 rows and zero weight / value / bias gradients.
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/shim_utils.h>

#include <cub/device/device_radix_sort.cuh>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "common/cuda_dispatch.cuh"
#include "common/gemm_runner.cuh"
#include "common/op_boundary.h"
#include "common/strided_gemm.cuh"
#include "sltrain/sltrain_common.h"

namespace lowrank {
namespace {

constexpr char kFwd[] = "lowrank.sltrain_linear";
constexpr char kBwd[] = "lowrank.sltrain_linear_backward";

using namespace cuda_glue;

// Grid size of a grid-stride loop over n items, 256 threads a block.
unsigned grid_for(int64_t n, int sms) {
  const int64_t blocks = std::min<int64_t>((n + 255) / 256, static_cast<int64_t>(sms) * 16);
  return static_cast<unsigned>(std::max<int64_t>(blocks, 1));
}

// ------------------------------------------------------------------------------------------ kernels
// Index check, pass 1: keys[k] = idx[k] (int64), pos[k] = k; bad[0] = smallest out-of-range position.
template <typename I>
__global__ void index_keys_kernel(const I* __restrict__ idx, int64_t nnz, int64_t total, int64_t* __restrict__ keys,
                                  int64_t* __restrict__ pos, unsigned long long* bad) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < nnz; k += step) {
    const int64_t i = static_cast<int64_t>(idx[k]);
    keys[k] = i;
    pos[k] = k;
    if (i < 0 || i >= total) atomicMin(&bad[0], static_cast<unsigned long long>(k));
  }
}

// Pass 2, over (key, position) pairs sorted by key (a stable radix sort keeps positions ascending within a
// key): bad[1] = smallest position whose value appeared at an earlier position.
__global__ void adjacent_duplicates_kernel(const int64_t* __restrict__ keys, const int64_t* __restrict__ pos,
                                           int64_t nnz, unsigned long long* bad) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x + 1; i < nnz; i += step)
    if (keys[i] == keys[i - 1]) atomicMin(&bad[1], static_cast<unsigned long long>(pos[i]));
}

// W.view(-1)[idx[k]] += values[k], skipping out-of-range indices.
template <typename T, typename I>
__global__ void scatter_add_kernel(T* __restrict__ w, const T* __restrict__ values, const I* __restrict__ idx,
                                   int64_t nnz, int64_t total) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < nnz; k += step) {
    const int64_t i = static_cast<int64_t>(idx[k]);
    if (i >= 0 && i < total) atomicAdd(w + i, values[k]);
  }
}

// dv[k] = G.view(-1)[idx[k]] (0 for an out-of-range index).
template <typename T, typename I>
__global__ void gather_kernel(T* __restrict__ dv, const T* __restrict__ g, const I* __restrict__ idx, int64_t nnz,
                              int64_t total) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < nnz; k += step) {
    const int64_t i = static_cast<int64_t>(idx[k]);
    dv[k] = (i >= 0 && i < total) ? g[i] : sgemm::from_f32<T>(0.f);
  }
}

// Column sums of dy (rows x cols), rows split in chunks of rows_per_split over blockIdx.y:
// ws[split·cols + j] = Σ_{t in chunk} dy[t, j] (fp32). Block (32, 8): 32 columns, 8 row lanes.
constexpr int kColX = 32, kColY = 8;
template <typename T>
__global__ void __launch_bounds__(kColX* kColY) colsum_kernel(const T* __restrict__ dy, float* __restrict__ ws,
                                                               int64_t rows, int64_t cols, int64_t rows_per_split) {
  __shared__ float red[kColY][kColX + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColX + tx;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t r1 = min(rows, r0 + rows_per_split);
  float acc = 0.f;
  if (col < cols)
    for (int64_t t = r0 + ty; t < r1; t += kColY) acc += sgemm::to_f32<T>(dy[t * cols + col]);
  red[ty][tx] = acc;
  __syncthreads();
  if (ty == 0 && col < cols) {
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < kColY; ++j) s += red[j][tx];
    ws[static_cast<int64_t>(blockIdx.y) * cols + col] = s;
  }
}

// ------------------------------------------------------------------------------------- host helpers

template <typename F>
void dispatch_index(const Tensor& indices, F&& f) {
  if (indices.scalar_type() == ScalarType::Int)
    f(int32_t{});
  else
    f(int64_t{});
}

// check=True: every index in [0, out·in) and no duplicates, by a radix sort of (index, position) pairs:
// O(nnz) memory (about 40·nnz bytes) whatever out·in is. One 16-byte device-to-host copy + stream sync.
void validate_indices(const char* op, const SLTrainDims& d, const Tensor& idx, int sms, cudaStream_t stream) {
  if (d.nnz == 0) return;
  const int64_t total = d.out * d.in;
  LOWRANK_CHECK(d.nnz <= std::numeric_limits<int32_t>::max(), op,
                ": indices must have fewer than 2^31 entries when check=True on CUDA (got ", d.nnz, ")");
  const int n = static_cast<int>(d.nnz);
  Tensor buf = lowrank::new_empty(idx, {4 * d.nnz}, ScalarType::Long);  // keys, positions, sorted keys, sorted positions
  int64_t* keys = static_cast<int64_t*>(buf.mutable_data_ptr());
  int64_t *pos = keys + d.nnz, *skeys = keys + 2 * d.nnz, *spos = keys + 3 * d.nnz;
  Tensor bad = lowrank::new_empty(idx, {2}, ScalarType::Long);
  auto* badp = static_cast<unsigned long long*>(bad.mutable_data_ptr());
  check_cuda(cudaMemsetAsync(badp, 0xff, 2 * sizeof(unsigned long long), stream), op, "index check (memset)");
  dispatch_index(idx, [&](auto tag) {
    using I = decltype(tag);
    index_keys_kernel<I><<<grid_for(d.nnz, sms), 256, 0, stream>>>(static_cast<const I*>(idx.const_data_ptr()), d.nnz,
                                                                    total, keys, pos, badp);
  });
  check_cuda(cudaGetLastError(), op, "index check launch");
  size_t temp_bytes = 0;
  check_cuda(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, keys, skeys, pos, spos, n, 0, 64, stream), op,
             "index check (sort size)");
  Tensor temp = lowrank::new_empty(idx, {static_cast<int64_t>(temp_bytes) + 1}, ScalarType::Byte);
  check_cuda(cub::DeviceRadixSort::SortPairs(temp.mutable_data_ptr(), temp_bytes, keys, skeys, pos, spos, n, 0, 64,
                                             stream),
             op, "index check (sort)");
  if (d.nnz > 1) {
    adjacent_duplicates_kernel<<<grid_for(d.nnz - 1, sms), 256, 0, stream>>>(skeys, spos, d.nnz, badp);
    check_cuda(cudaGetLastError(), op, "index check launch");
  }
  unsigned long long h[2] = {0, 0};
  check_cuda(cudaMemcpyAsync(h, bad.const_data_ptr(), sizeof(h), cudaMemcpyDeviceToHost, stream), op,
             "index check (copy)");
  check_cuda(cudaStreamSynchronize(stream), op, "index check (sync)");
  const unsigned long long none = std::numeric_limits<unsigned long long>::max();
  if (h[0] == none && h[1] == none) return;
  const bool range = h[0] != none;
  const int64_t k = static_cast<int64_t>(range ? h[0] : h[1]);
  int64_t v = 0;
  const size_t isz = idx.scalar_type() == ScalarType::Int ? 4 : 8;
  const char* src = static_cast<const char*>(idx.const_data_ptr()) + static_cast<size_t>(k) * isz;
  if (isz == 4) {
    int32_t v32 = 0;
    check_cuda(cudaMemcpyAsync(&v32, src, 4, cudaMemcpyDeviceToHost, stream), op, "index check (copy)");
    check_cuda(cudaStreamSynchronize(stream), op, "index check (sync)");
    v = v32;
  } else {
    check_cuda(cudaMemcpyAsync(&v, src, 8, cudaMemcpyDeviceToHost, stream), op, "index check (copy)");
    check_cuda(cudaStreamSynchronize(stream), op, "index check (sync)");
  }
  LOWRANK_CHECK(!range, op, ": indices must lie in [0, out·in) = [0, ", total, ") (got indices[", k, "] = ", v, ")");
  LOWRANK_CHECK(false, op, ": indices must be unique (got indices[", k, "] = ", v,
                ", a value that appears at an earlier position)");
}

// F1 + scatter: W (out, in) = scale·B·A, then W.view(-1)[idx] += values.
void compute_weight(const GemmRunner& R, const SLTrainDims& d, const Tensor& A, const Tensor& B,
                    const Tensor& values, const Tensor& idx, double scale, const Tensor& W) {
  R.run1(operand(B, d.r, 1), operand(A, 1, d.in), output(W, d.in, 1), d.out, d.in, d.r, static_cast<float>(scale));
  if (d.nnz == 0) return;
  const int64_t total = d.out * d.in;
  dispatch_cuda_float(R.op, R.st, [&](auto ttag) {
    using T = decltype(ttag);
    dispatch_index(idx, [&](auto itag) {
      using I = decltype(itag);
      scatter_add_kernel<T, I><<<grid_for(d.nnz, R.sms), 256, 0, R.stream>>>(
          static_cast<T*>(W.mutable_data_ptr()), static_cast<const T*>(values.const_data_ptr()),
          static_cast<const I*>(idx.const_data_ptr()), d.nnz, total);
    });
  });
  check_cuda(cudaGetLastError(), R.op, "scatter launch");
}

// grad_bias (out,) = Σ_t dy[t, :], fp32 accumulation.
void column_sum(const GemmRunner& R, const SLTrainDims& d, const Tensor& dy, const Tensor& db) {
  const int64_t xblocks = (d.out + kColX - 1) / kColX;
  int64_t splits = std::max<int64_t>(1, (4 * static_cast<int64_t>(R.sms) + xblocks - 1) / xblocks);
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, (d.T + 63) / 64));  // >= 64 rows a split
  splits = std::min<int64_t>(splits, 65535);
  const int64_t rps = (d.T + splits - 1) / splits;
  splits = (d.T + rps - 1) / rps;  // no empty trailing split
  LOWRANK_CHECK(xblocks <= std::numeric_limits<int32_t>::max(), R.op, ": out too large for the bias reduction");
  Tensor ws = lowrank::new_empty(dy, {splits * d.out}, ScalarType::Float);
  float* wsp = static_cast<float*>(ws.mutable_data_ptr());
  const dim3 grid(static_cast<unsigned>(xblocks), static_cast<unsigned>(splits));
  const dim3 block(kColX, kColY);
  cudaError_t e = cudaSuccess;
  dispatch_cuda_float(R.op, R.st, [&](auto ttag) {
    using T = decltype(ttag);
    colsum_kernel<T><<<grid, block, 0, R.stream>>>(static_cast<const T*>(dy.const_data_ptr()), wsp, d.T, d.out, rps);
    e = cudaGetLastError();
    if (e == cudaSuccess)
      e = sgemm::launch_splitk_reduce<T>(wsp, static_cast<T*>(db.mutable_data_ptr()), d.out,
                                         static_cast<int>(splits), R.stream);
  });
  check_cuda(e, R.op, "bias-gradient reduction launch");
}

// ------------------------------------------------------------------------------------------ ops
// The GEMM runner takes dimensions below 2^31; refused before any input is copied (an expanded x).
void check_sizes(const char* op, const SLTrainDims& d) {
  const int64_t imax = std::numeric_limits<int32_t>::max() - 64;
  LOWRANK_CHECK(d.T <= imax && d.in <= imax && d.out <= imax && d.r <= imax, op,
                ": x's rows, in, out and r must stay below 2^31 on CUDA (got rows=", d.T, ", in=", d.in, ", out=",
                d.out, ", r=", d.r, ")");
}

Tensor sltrain_linear_cuda(Tensor x, Tensor A, Tensor B, Tensor values, Tensor indices, double scale,
                           std::optional<Tensor> bias, bool check) {
  const char* op = kFwd;
  const SLTrainDims d = sltrain_dims(op, x, A, B, values, indices, bias);
  LOWRANK_CHECK(x.is_cuda(), op, ": the CUDA kernel got a tensor on ", device_name(x));
  check_sizes(op, d);
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  // indices first: their check costs O(nnz) whatever the other inputs' size
  const Tensor ic = lowrank::contiguous(indices, "indices");
  const int32_t dev = x.get_device_index();
  if (check) validate_indices(op, d, ic, num_sms(dev), current_stream(dev));
  const Tensor xc = lowrank::contiguous(x, "x");
  const Tensor Ac = lowrank::contiguous(A, "A");
  const Tensor Bc = lowrank::contiguous(B, "B");
  const Tensor vc = lowrank::contiguous(values, "values");
  const GemmRunner R = make_runner(op, xc);
  Tensor y = lowrank::new_empty(xc, out_shape_like(x, d.out));
  if (d.T == 0) return y;
  std::optional<Tensor> bc;
  if (bias.has_value()) bc = lowrank::contiguous(*bias, "bias");
  const Tensor W = lowrank::new_empty(xc, {d.out, d.in});
  compute_weight(R, d, Ac, Bc, vc, ic, scale, W);
  // F2: y[t, j] = Σ_c x[t, c] · W[j, c] (+ bias[j])
  R.run1(operand(xc, d.in, 1), operand(W, d.in, 1), output(y, d.out, 1), d.T, d.out, d.in, 1.f,
        bc.has_value() ? bc->const_data_ptr() : nullptr);
  return y;  // W goes back to the caching allocator on the current stream, after F2 is queued
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> sltrain_linear_backward_cuda(
    Tensor grad_out, Tensor x, Tensor A, Tensor B, Tensor values, Tensor indices, double scale, bool has_bias,
    bool need_grad_x, bool need_grad_lowrank, bool need_grad_values) {
  const char* op = kBwd;
  const SLTrainDims d = sltrain_dims(op, x, A, B, values, indices, std::nullopt);
  LOWRANK_CHECK(x.is_cuda(), op, ": the CUDA kernel got a tensor on ", device_name(x));
  check_grad_out(op, grad_out, x, d.out);
  check_sizes(op, d);
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  const Tensor xc = lowrank::contiguous(x, "x");
  const Tensor Ac = lowrank::contiguous(A, "A");
  const Tensor Bc = lowrank::contiguous(B, "B");
  const Tensor vc = lowrank::contiguous(values, "values");
  const Tensor ic = lowrank::contiguous(indices, "indices");
  const Tensor dy = lowrank::contiguous(grad_out, "grad_out");

  const std::vector<int64_t> none{0};
  Tensor dx = need_grad_x ? lowrank::new_empty(xc, x.sizes()) : lowrank::new_empty(xc, none);
  Tensor dA = need_grad_lowrank ? lowrank::new_empty(xc, {d.r, d.in}) : lowrank::new_empty(xc, none);
  Tensor dB = need_grad_lowrank ? lowrank::new_empty(xc, {d.out, d.r}) : lowrank::new_empty(xc, none);
  Tensor dv = need_grad_values ? lowrank::new_empty(xc, {d.nnz}) : lowrank::new_empty(xc, none);
  Tensor db = has_bias ? lowrank::new_empty(xc, {d.out}) : lowrank::new_empty(xc, none);
  const bool need_g = need_grad_lowrank || need_grad_values;
  if (d.T == 0) {
    if (need_grad_lowrank) {
      torch::stable::zero_(dA);
      torch::stable::zero_(dB);
    }
    if (need_grad_values && d.nnz > 0) torch::stable::zero_(dv);
    if (has_bias) torch::stable::zero_(db);
    return {dx, dA, dB, dv, db};
  }
  const GemmRunner R = make_runner(op, xc);

  if (need_grad_x || need_g) {
    // One (out, in) scratch: W for dx, then G.
    Tensor scratch = lowrank::new_empty(xc, {d.out, d.in});
    if (need_grad_x) {
      compute_weight(R, d, Ac, Bc, vc, ic, scale, scratch);
      // B1: dx[t, c] = Σ_j dy[t, j] · W[j, c]
      R.run1(operand(dy, d.out, 1), operand(scratch, 1, d.in), output(dx, d.in, 1), d.T, d.in, d.out);
    }
    if (need_g) {
      // B2: G[j, c] = Σ_t dy[t, j] · x[t, c]   (overwrites W; stream order puts it after B1)
      R.run1(operand(dy, 1, d.out), operand(xc, 1, d.in), output(scratch, d.in, 1), d.out, d.in, d.T, 1.f, nullptr,
            /*allow_split=*/true, &scratch);
      if (need_grad_values && d.nnz > 0) {
        const int64_t total = d.out * d.in;
        dispatch_cuda_float(op, R.st, [&](auto ttag) {
          using T = decltype(ttag);
          dispatch_index(ic, [&](auto itag) {
            using I = decltype(itag);
            gather_kernel<T, I><<<grid_for(d.nnz, R.sms), 256, 0, R.stream>>>(
                static_cast<T*>(dv.mutable_data_ptr()), static_cast<const T*>(scratch.const_data_ptr()),
                static_cast<const I*>(ic.const_data_ptr()), d.nnz, total);
          });
        });
        check_cuda(cudaGetLastError(), op, "gather launch");
      }
      if (need_grad_lowrank) {
        const float s = static_cast<float>(scale);
        // B3: dA[a, c] = scale · Σ_j B[j, a] · G[j, c]
        R.run1(operand(Bc, 1, d.r), operand(scratch, 1, d.in), output(dA, d.in, 1), d.r, d.in, d.out, s, nullptr,
              /*allow_split=*/true, &dA);
        // B4: dB[j, a] = scale · Σ_c G[j, c] · A[a, c]
        R.run1(operand(scratch, d.in, 1), operand(Ac, d.in, 1), output(dB, d.r, 1), d.out, d.r, d.in, s, nullptr,
              /*allow_split=*/true, &dB);
      }
    }
  }
  if (has_bias) column_sum(R, d, dy, db);
  return {dx, dA, dB, dv, db};
}

}  // namespace
}  // namespace lowrank

STABLE_TORCH_LIBRARY_IMPL(lowrank, CUDA, m) {
  m.impl("sltrain_linear", LOWRANK_BOX(lowrank::kFwd, lowrank::sltrain_linear_cuda));
  m.impl("sltrain_linear_backward", LOWRANK_BOX(lowrank::kBwd, lowrank::sltrain_linear_backward_cuda));
}
