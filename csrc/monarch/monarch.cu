// CUDA kernels of lowrank::monarch_matmul and lowrank::monarch_matmul_backward.
//
// What: out = P·BD(w2)·P·BD(w1)·x (the 4-step formula in monarch_common.h), and its gradients, with the
// middle activation recomputed in the backward. Every step is one call of the strided batched GEMM in
// common/strided_gemm.cuh (groups = Monarch blocks; permutations are strides):
//   fp16 / bf16: mma.sync m16n8k16 tensor cores, fp32 accumulate, 128x128x32 (or 64x64x32 when that
//                tile count would not fill the GPU) CTA tiles, 4-stage cp.async pipeline;
//   fp32:        SIMT fp32 FMA (exact fp32, no TF32), 64x64x16 tiles.
// Forward, fp16 / bf16 with small blocks: one fused kernel (monarch_fused.cuh) instead of F1 + F2 -- each
// CTA keeps a BM-row tile of mid (BM = 64 / 32 / 16) in shared memory, so mid never touches HBM and both
// permutations are smem addressing. Used when p, q, r, s are multiples of 16 and <= 128, the
// l·max(r, s) x BM buffer plus two weight stages fit the opt-in shared memory for some BM >= 16, and x,
// w1, w2, out are 16-byte aligned (e.g. n = 4096 with 64 blocks of 64x64 -> BM = 16; n = 1024 with
// 32 blocks of 32x32 -> BM = 32 or 64); otherwise (and for fp32, and in the backward) the two GEMMs below.
// Weight gradients contract over the batch (K = B): when their output tiles are too few for the GPU, K
// is split, each split writes an fp32 slice of a workspace and a reduce kernel sums the slices into the
// weight's dtype (deterministic, no atomics).
//
// Middle activation layout: mid is stored as z, i.e. (B, l, r) with mid[b·N + c·r + a] = z[b, c, a]
// = y[b, a·l + c]. Step 1 writes it through a permuted epilogue (column u = i·q + j of y goes to
// (u mod l)·r + u div l), so that step 3's A operand (z_c = mid[:, c·r : c·r + r]) and the backward's
// dw2 operand are plain K- (resp. N-) contiguous tiles loaded with 16-byte cp.async. The alternative
// (natural (B, N) y, gathered in step 3 at stride l) would make step 3, the bigger read, a strided gather.
// mid is a (B, N) tensor of the input dtype from torch's caching allocator.
//
// Descriptor table (element strides; A(g, m, k), B(g, k, n), C(g, m, n); n = k·p, N = k·q, L = l·s;
// s_mn is the stride of m for A and of n for B):
//   GEMM            groups  M  N  K  | A: base gs s_mn s_k    | B: base gs  s_mn s_k | C: base gs rs cs
//   F1 y = x·w1^T    k      B  q  p  | x    p    n    1       | w1  q·p  p   1      | mid perm(l,q,r) rs N
//   F2 u = z·w2^T    l      B  s  r  | mid  r    N    1       | w2  s·r  r   1      | out  1   L   l
//   G1 dz = gu·w2    l      B  r  s  | gu   s    L    1       | w2  s·r  1   r      | dy   1   N   l
//   G2 dw2 = gu^T·z  l      s  r  B  | gu   s    1    L       | mid r    1   N      | dw2 s·r  r   1
//   G3 dx = dy·w1    k      B  p  q  | dy   q    N    1       | w1  q·p  1   p      | dx   p   n   1
//   G4 dw1 = dy^T·x  k      q  p  B  | dy   q    1    N       | x   p    1   n      | dw1 q·p  p   1
//   (the backward recomputes mid with F1 when weight gradients are asked for; dy is (B, N) natural,
//    dy[b, a·l + c] = dz[b, c, a]; gu is a (B, l, s) contiguous copy of g: gu[b, c, d] = g[b, d·l + c].)
//   "perm(l,q,r) rs N": C(i, b, j) -> mid[b·N + (u mod l)·r + u div l], u = i·q + j.
//
// cuBLAS layouts (opt-in with LOWRANK_CUBLAS=1 until they have run on a GPU; by default everything stays on
// the kernels above, the path the first GPU run verified). The first GPU run
// measured the mma.sync GEMM at a quarter of cuBLAS, so the big GEMMs are laid out with unit-stride
// operands and run on cuBLAS (common/cublas_gemm.cuh); what no stride can express is one transpose pass
// (common/transpose.cuh):
//   F1, mode "bycol" (l | q and q/l >= 16): the permuted epilogue becomes l cuBLAS calls, one per c, each
//       batched over the k blocks: rows j = j'·l + c of w1[i] (row stride l·p) give mid[b, c·r + i·q/l + j']
//       directly -- the first permutation is operand addressing, no copy;
//   F1, mode "natural" (small blocks): y natural (B, N) on cuBLAS, then one transpose (B, r, l) -> (B, l, r);
//   F2: u (B, l, s) on cuBLAS, then one transpose to out (B, s, l) (out[b, d·l + c] = u[b, c, d]);
//   G1: dz (B, l, r) on cuBLAS, then one transpose to dy natural; G2, G3, G4 have unit strides as listed.
// The fused forward is kept for blocks <= 64 (where it beat both cuBLAS paths in the first run).
// Env overrides for A/B runs: LOWRANK_MONARCH_F1=bycol|natural|epilogue, LOWRANK_MONARCH_FUSED=0|1.
//
// Assumptions: x, w1, w2 (and grad_out) are made contiguous; batch, n, N, L < 2^31 (offsets are int64);
// batch = 0 launches nothing (forward: empty output; backward: zero weight gradients).
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/shim_utils.h>

#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "common/gemm_runner.cuh"
#include "common/op_boundary.h"
#include "common/strided_gemm.cuh"
#include "common/transpose.cuh"
#include "monarch/monarch_common.h"
#include "monarch/monarch_fused.cuh"

namespace lowrank {
namespace {

constexpr char kFwd[] = "lowrank.monarch_matmul";
constexpr char kBwd[] = "lowrank.monarch_matmul_backward";

using namespace cuda_glue;

void check_sizes(const char* op, const MonarchDims& d) {
  const int64_t imax = std::numeric_limits<int32_t>::max();
  LOWRANK_CHECK(d.batch <= imax && d.n <= imax && d.mid <= imax && d.out <= imax, op,
                ": x's rows and every width must stay below 2^31 on CUDA (got rows=", d.batch, ", n=", d.n,
                ", k·q=", d.mid, ", l·s=", d.out, ")");
}

int elem_bytes(const Tensor& t) { return t.scalar_type() == ScalarType::Float ? 4 : 2; }

const char* env(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? v : nullptr;
}

enum class F1Mode { kEpilogue, kByCol, kNatural };

F1Mode f1_mode(const MonarchDims& d) {
  if (!cublas_gemm::enabled()) return F1Mode::kEpilogue;
  static const char* forced = env("LOWRANK_MONARCH_F1");
  const bool bycol_ok = d.q % d.l == 0;
  if (forced != nullptr) {
    if (std::strcmp(forced, "epilogue") == 0) return F1Mode::kEpilogue;
    if (std::strcmp(forced, "natural") == 0) return F1Mode::kNatural;
    if (std::strcmp(forced, "bycol") == 0 && bycol_ok) return F1Mode::kByCol;
  }
  return bycol_ok && d.q / d.l >= 16 ? F1Mode::kByCol : F1Mode::kNatural;
}

void transpose_last2(const char* op, const Tensor& src, const Tensor& dst, int64_t B, int64_t R, int64_t C) {
  check_cuda(transpose::transpose_last2(src.const_data_ptr(), dst.mutable_data_ptr(), B, R, C, elem_bytes(src),
                                        current_stream(src.get_device_index())),
             op, "transpose launch");
}

// F1: mid (B, l, r) = z, the permuted output of the first block-diagonal factor.
void step1(const char* op, const GemmRunner& R, const MonarchDims& d, const Tensor& x, const Tensor& w1,
           const Tensor& mid) {
  switch (f1_mode(d)) {
    case F1Mode::kByCol: {
      const int64_t ql = d.q / d.l;
      const int eb = elem_bytes(x);
      for (int64_t c = 0; c < d.l; ++c) {
        Operand b = operand(w1, d.q * d.p, d.l * d.p, 1);  // rows j' · l + c of every block
        b.ptr = static_cast<const char*>(b.ptr) + c * d.p * eb;
        Output o = output(mid, ql, d.mid, 1);  // mid[b, c·r + i·q/l + j']
        o.ptr = static_cast<char*>(o.ptr) + c * d.r * eb;
        R.run(operand(x, d.p, d.n, 1), b, o, d.batch, ql, d.p, d.k);
      }
      return;
    }
    case F1Mode::kNatural: {
      const Tensor y = lowrank::new_empty(x, {d.batch, d.mid});
      R.run(operand(x, d.p, d.n, 1), operand(w1, d.q * d.p, d.p, 1), output(y, d.q, d.mid, 1), d.batch, d.q, d.p,
            d.k);
      transpose_last2(op, y, mid, d.batch, d.r, d.l);  // z[b, c, a] = y[b, a·l + c]
      return;
    }
    case F1Mode::kEpilogue: {
      Output c = output(mid, 0, d.mid, 0);
      c.perm_l = static_cast<int>(d.l);
      c.perm_q = static_cast<int>(d.q);
      c.perm_r = static_cast<int>(d.r);
      R.run(operand(x, d.p, d.n, 1), operand(w1, d.q * d.p, d.p, 1), c, d.batch, d.q, d.p, d.k);
      return;
    }
  }
}

// The fused forward where it is the measured winner: blocks <= 64 with cuBLAS on, any plan without it.
bool fused_allowed(const MonarchDims& d) {
  static const char* forced = env("LOWRANK_MONARCH_FUSED");
  if (forced != nullptr) return std::strcmp(forced, "0") != 0;
  if (!cublas_gemm::enabled()) return true;
  return std::max(std::max(d.p, d.q), std::max(d.r, d.s)) <= 64;
}

int smem_optin(int32_t device_index) {
  int v = 0;
  const cudaError_t e = cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device_index);
  if (e != cudaSuccess || v <= 0) {
    (void)cudaGetLastError();
    return 48 * 1024;
  }
  return v;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Fused forward (monarch_fused.cuh) when the dtype is 16-bit, the blocks are small (p, q, r, s multiples
// of 16 and <= 128), the mid tile of at least 16 rows fits shared memory, and every pointer is 16-byte
// aligned. Returns false (nothing launched) otherwise.
bool try_fused_forward(const char* op, const MonarchDims& d, const Tensor& x, const Tensor& w1, const Tensor& w2,
                       const Tensor& out) {
  const ScalarType st = x.scalar_type();
  if (st != ScalarType::Half && st != ScalarType::BFloat16) return false;
  if (!aligned16(x.const_data_ptr()) || !aligned16(w1.const_data_ptr()) || !aligned16(w2.const_data_ptr()) ||
      !aligned16(out.const_data_ptr()))
    return false;
  const int32_t dev = x.get_device_index();
  const mfused::Plan pl =
      mfused::plan_fused(d.batch, d.k, d.q, d.p, d.l, d.s, d.r, num_sms(dev), smem_optin(dev));
  if (!pl.ok) return false;
  mfused::Plan plc = pl;
  plc.P.x = x.const_data_ptr();
  plc.P.w1 = w1.const_data_ptr();
  plc.P.w2 = w2.const_data_ptr();
  plc.P.out = out.mutable_data_ptr();
  const cudaStream_t stream = current_stream(dev);
  const cudaError_t e = st == ScalarType::Half ? mfused::launch_fused<__half>(plc, smem_optin(dev), stream)
                                               : mfused::launch_fused<__nv_bfloat16>(plc, smem_optin(dev), stream);
  check_cuda(e, op, "fused forward launch");
  return true;
}


void forward_into(const char* op, const MonarchDims& d, const Tensor& xc, const Tensor& w1c, const Tensor& w2c,
                  const Tensor& out);

// One block per row (grid-stride): a row of x with a NaN or Inf gets NaN in every output that came out finite
// (see monarch_dense_connected: only outputs that do not depend on the non-finite input can).
template <typename T>
__global__ void poison_nonfinite_rows_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t batch, int64_t n,
                                             int64_t n_out) {
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    int bad = 0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) bad |= !isfinite(sgemm::to_f32<T>(x[b * n + i]));
    if (!__syncthreads_or(bad)) continue;
    for (int64_t o = threadIdx.x; o < n_out; o += blockDim.x)
      if (isfinite(sgemm::to_f32<T>(out[b * n_out + o]))) out[b * n_out + o] = sgemm::from_f32<T>(__int_as_float(0x7fc00000));
  }
}

void poison_nonfinite_rows(const char* op, const MonarchDims& d, const Tensor& xc, const Tensor& out) {
  const int dev = xc.get_device_index();
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(d.batch, int64_t(num_sms(dev)) * 8));
  dispatch_cuda_float(op, xc.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    poison_nonfinite_rows_kernel<T><<<grid, 256, 0, current_stream(dev)>>>(
        static_cast<const T*>(xc.const_data_ptr()), static_cast<T*>(out.mutable_data_ptr()), d.batch, d.n, d.out);
  });
  check_cuda(cudaGetLastError(), op, "non-finite row launch");
}

Tensor monarch_matmul_cuda(Tensor x, Tensor w1, Tensor w2) {
  const char* op = kFwd;
  const MonarchDims d = monarch_dims(op, x, w1, w2);
  LOWRANK_CHECK(x.is_cuda(), op, ": the CUDA kernel got a tensor on ", device_name(x));
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  check_sizes(op, d);  // before any copy: an expanded x past 2^31 rows is refused, not copied
  const Tensor xc = lowrank::contiguous(x, "x");
  const Tensor w1c = lowrank::contiguous(w1, "w1");
  const Tensor w2c = lowrank::contiguous(w2, "w2");
  Tensor out = lowrank::new_empty(xc, out_shape_like(x, d.out));
  if (d.batch == 0) return out;
  forward_into(op, d, xc, w1c, w2c, out);
  if (!monarch_dense_connected(d)) poison_nonfinite_rows(op, d, xc, out);
  return out;
}

void forward_into(const char* op, const MonarchDims& d, const Tensor& xc, const Tensor& w1c, const Tensor& w2c,
                  const Tensor& out) {
  if (fused_allowed(d) && try_fused_forward(op, d, xc, w1c, w2c, out)) return;
  const GemmRunner R = make_runner(op, xc);
  const Tensor mid = lowrank::new_empty(xc, {d.batch, d.mid});
  step1(op, R, d, xc, w1c, mid);
  // F2: out[b, d·l + c] = Σ_a w2[c, d, a] · z[b, c, a]
  if (cublas_gemm::enabled()) {  // u (B, l, s) on cuBLAS, then the interleave as one transpose
    const Tensor u = lowrank::new_empty(xc, {d.batch, d.out});
    R.run(operand(mid, d.r, d.mid, 1), operand(w2c, d.s * d.r, d.r, 1), output(u, d.s, d.out, 1), d.batch, d.s,
          d.r, d.l);
    transpose_last2(op, u, out, d.batch, d.l, d.s);
    return;
  }
  R.run(operand(mid, d.r, d.mid, 1), operand(w2c, d.s * d.r, d.r, 1), output(out, 1, d.out, d.l), d.batch, d.s,
        d.r, d.l);
}

std::tuple<Tensor, Tensor, Tensor> monarch_matmul_backward_cuda(Tensor grad_out, Tensor x, Tensor w1, Tensor w2,
                                                                bool need_grad_x, bool need_grad_w) {
  const char* op = kBwd;
  const MonarchDims d = monarch_dims(op, x, w1, w2);
  LOWRANK_CHECK(x.is_cuda(), op, ": the CUDA kernel got a tensor on ", device_name(x));
  check_grad_out(op, grad_out, x, d.out);
  check_sizes(op, d);
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  const Tensor xc = lowrank::contiguous(x, "x");
  const Tensor w1c = lowrank::contiguous(w1, "w1");
  const Tensor w2c = lowrank::contiguous(w2, "w2");
  const Tensor g = lowrank::contiguous(grad_out, "grad_out");

  Tensor dx = need_grad_x ? lowrank::new_empty(xc, x.sizes()) : lowrank::new_empty(xc, {0});
  Tensor dw1 = need_grad_w ? lowrank::new_empty(w1c, w1.sizes()) : lowrank::new_empty(w1c, {0});
  Tensor dw2 = need_grad_w ? lowrank::new_empty(w2c, w2.sizes()) : lowrank::new_empty(w2c, {0});
  if (!need_grad_x && !need_grad_w) return {dx, dw1, dw2};
  if (d.batch == 0) {
    if (need_grad_w) {
      torch::stable::zero_(dw1);
      torch::stable::zero_(dw2);
    }
    return {dx, dw1, dw2};
  }
  const GemmRunner R = make_runner(op, xc);

  // gu[b, c, d] = g[b, d·l + c], one contiguous copy so that G1 and G2 load it with 16-byte cp.async
  // instead of a stride-l scalar gather on the backward's two big reads.
  Tensor gu = g;
  if (cublas_gemm::enabled()) {
    gu = lowrank::new_empty(xc, {d.batch, d.out});
    transpose_last2(op, g, gu, d.batch, d.s, d.l);
  } else {
    gu = lowrank::contiguous(torch::stable::transpose(torch::stable::view(g, {d.batch, d.s, d.l}), 1, 2), "grad_out");
  }
  // G1: dy[b, a·l + c] = Σ_d gu[b, c, d] · w2[c, d, a]   (dy natural (B, N), input dtype)
  const Tensor dy = lowrank::new_empty(xc, {d.batch, d.mid});
  if (cublas_gemm::enabled()) {  // dz (B, l, r) on cuBLAS, then one transpose to dy
    const Tensor dz = lowrank::new_empty(xc, {d.batch, d.mid});
    R.run(operand(gu, d.s, d.out, 1), operand(w2c, d.s * d.r, 1, d.r), output(dz, d.r, d.mid, 1), d.batch, d.r,
          d.s, d.l);
    transpose_last2(op, dz, dy, d.batch, d.l, d.r);
  } else {
    R.run(operand(gu, d.s, d.out, 1), operand(w2c, d.s * d.r, 1, d.r), output(dy, 1, d.mid, d.l), d.batch, d.r,
          d.s, d.l);
  }

  if (need_grad_x) {
    // G3: dx[b, i·p + t] = Σ_j dy[b, i·q + j] · w1[i, j, t]
    R.run(operand(dy, d.q, d.mid, 1), operand(w1c, d.q * d.p, 1, d.p), output(dx, d.p, d.n, 1), d.batch, d.p, d.q,
          d.k);
  }
  if (need_grad_w) {
    const Tensor mid = lowrank::new_empty(xc, {d.batch, d.mid});
    step1(op, R, d, xc, w1c, mid);
    // G2: dw2[c, d, a] = Σ_b gu[b, c, d] · z[b, c, a]
    R.run(operand(gu, d.s, 1, d.out), operand(mid, d.r, 1, d.mid), output(dw2, d.s * d.r, d.r, 1), d.s, d.r,
          d.batch, d.l, /*allow_split=*/true, &dw2);
    // G4: dw1[i, j, t] = Σ_b dy[b, i·q + j] · x[b, i·p + t]
    R.run(operand(dy, d.q, 1, d.mid), operand(xc, d.p, 1, d.n), output(dw1, d.q * d.p, d.p, 1), d.q, d.p,
          d.batch, d.k, /*allow_split=*/true, &dw1);
  }
  return {dx, dw1, dw2};
}

}  // namespace
}  // namespace lowrank

STABLE_TORCH_LIBRARY_IMPL(lowrank, CUDA, m) {
  m.impl("monarch_matmul", LOWRANK_BOX(lowrank::kFwd, lowrank::monarch_matmul_cuda));
  m.impl("monarch_matmul_backward", LOWRANK_BOX(lowrank::kBwd, lowrank::monarch_matmul_backward_cuda));
}
