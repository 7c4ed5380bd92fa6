// SLTrain linear on the CPU, path (a) of the research notes: materialize W = scale·B·A + S in an
// fp32 (fp64) scratch — the scale is the GEMM's alpha, the scatter of S one pass — then y = x·Wᵀ on the
// strided GEMM engine (Wᵀ is addressing). The backward recomputes W for dx, then reuses the same scratch
// for G = dyᵀ·x, from which dvalues (a gather), dA = scale·Bᵀ·G and dB = scale·G·Aᵀ follow. Nothing of
// size out·in outlives a call.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <vector>

#include "common/cpu_dispatch.h"
#include "common/cpu_gemm.h"
#include "sltrain/sltrain_common.h"

namespace lowrank {
namespace {

constexpr const char* kFwd = "lowrank.sltrain_linear";
constexpr const char* kBwd = "lowrank.sltrain_linear_backward";

template <typename I>
void validate_indices_typed(const char* op, const I* idx, int64_t nnz, int64_t size) {
  std::vector<uint64_t> seen(static_cast<size_t>((size + 63) / 64), 0);
  for (int64_t k = 0; k < nnz; ++k) {
    const int64_t v = static_cast<int64_t>(idx[k]);
    STD_TORCH_CHECK(v >= 0 && v < size, op, ": indices[", k, "] = ", v, " is out of range [0, out·in = ", size, ")");
    uint64_t& word = seen[static_cast<size_t>(v >> 6)];
    const uint64_t bit = uint64_t(1) << (v & 63);
    STD_TORCH_CHECK(!(word & bit), op, ": indices must be unique, ", v, " appears twice (at ", k, ")");
    word |= bit;
  }
}

void validate_indices(const char* op, const Tensor& indices, int64_t nnz, int64_t size) {
  if (indices.scalar_type() == ScalarType::Int)
    validate_indices_typed(op, static_cast<const int32_t*>(indices.data_ptr()), nnz, size);
  else
    validate_indices_typed(op, static_cast<const int64_t*>(indices.data_ptr()), nnz, size);
}

// Index k's flat position, or -1 when out of range (possible only with check=False): never touched.
template <typename F>
void for_each_index(const Tensor& indices, int64_t nnz, int64_t size, F&& f) {
  auto run = [&](auto* idx) {
    for (int64_t k = 0; k < nnz; ++k) {
      const int64_t v = static_cast<int64_t>(idx[k]);
      f(k, v >= 0 && v < size ? v : -1);
    }
  };
  if (indices.scalar_type() == ScalarType::Int)
    run(static_cast<const int32_t*>(indices.data_ptr()));
  else
    run(static_cast<const int64_t*>(indices.data_ptr()));
}

// W = scale·B·A + S into w (out, in), Acc.
template <typename Acc, typename T>
void materialize(const SLTrainDims& d, const T* A, const T* B, const T* values, const Tensor& indices, double scale,
                 Acc* w) {
  strided_batched_gemm<Acc, T, T, Acc>(1, d.out, d.in, d.r, operand<const T>(B, 0, d.r, 1),
                                       operand<const T>(A, 0, d.in, 1), operand<Acc>(w, 0, d.in, 1), Acc(scale));
  for_each_index(indices, d.nnz, d.out * d.in, [&](int64_t k, int64_t v) {
    if (v >= 0) w[v] += static_cast<Acc>(values[k]);
  });
}

Tensor contiguous_of(const Tensor& t) { return torch::stable::contiguous(t); }

Tensor sltrain_linear_cpu(Tensor x, Tensor A, Tensor B, Tensor values, Tensor indices, double scale,
                          std::optional<Tensor> bias, bool check) {
  const SLTrainDims d = sltrain_dims(kFwd, x, A, B, values, indices, bias);
  STD_TORCH_CHECK(x.is_cpu(), kFwd, ": the CPU kernel got a tensor on ", device_name(x));
  x = contiguous_of(x), A = contiguous_of(A), B = contiguous_of(B);
  values = contiguous_of(values), indices = contiguous_of(indices);
  if (check) validate_indices(kFwd, indices, d.nnz, d.out * d.in);
  Tensor y = torch::stable::new_empty(x, sltrain_out_shape(x, d.out));
  if (d.T == 0) return y;
  dispatch_float(x.scalar_type(), kFwd, [&](auto tag) {
    using T = decltype(tag);
    using Acc = acc_t<T>;
    auto ptr = [](const Tensor& t) { return static_cast<T*>(t.data_ptr()); };
    Tensor w_t = torch::stable::empty({d.out, d.in}, acc_scalar_type<Acc>());
    Acc* w = static_cast<Acc*>(w_t.data_ptr());
    materialize<Acc>(d, ptr(A), ptr(B), ptr(values), indices, scale, w);
    // y[t, o] = Σ_i x[t, i]·W[o, i]
    strided_batched_gemm<Acc, T, Acc, T>(1, d.T, d.out, d.in, operand<const T>(ptr(x), 0, d.in, 1),
                                         operand<const Acc>(w, 0, 1, d.in), operand<T>(ptr(y), 0, d.out, 1));
    if (bias.has_value()) {
      const Tensor b = contiguous_of(*bias);
      const T* bp = ptr(b);
      T* yp = ptr(y);
      torch::stable::parallel_for(0, d.T, 64, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t)
          for (int64_t o = 0; o < d.out; ++o)
            yp[t * d.out + o] = static_cast<T>(static_cast<Acc>(yp[t * d.out + o]) + static_cast<Acc>(bp[o]));
      });
    }
  });
  return y;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> sltrain_linear_backward_cpu(
    Tensor grad_out, Tensor x, Tensor A, Tensor B, Tensor values, Tensor indices, double scale, bool has_bias,
    bool need_grad_x, bool need_grad_lowrank, bool need_grad_values) {
  const SLTrainDims d = sltrain_dims(kBwd, x, A, B, values, indices, std::nullopt);
  check_sltrain_grad_out(kBwd, grad_out, x, d);
  grad_out = contiguous_of(grad_out), x = contiguous_of(x), A = contiguous_of(A), B = contiguous_of(B);
  values = contiguous_of(values), indices = contiguous_of(indices);
  auto empty0 = [](const Tensor& like) { return torch::stable::new_empty(like, {0}); };
  Tensor dx = need_grad_x ? torch::stable::new_empty(x, x.sizes()) : empty0(x);
  Tensor dA = need_grad_lowrank ? torch::stable::new_empty(A, A.sizes()) : empty0(A);
  Tensor dB = need_grad_lowrank ? torch::stable::new_empty(B, B.sizes()) : empty0(B);
  Tensor dv = need_grad_values ? torch::stable::new_empty(values, values.sizes()) : empty0(values);
  Tensor db = has_bias ? torch::stable::new_empty(x, {d.out}) : empty0(x);
  dispatch_float(x.scalar_type(), kBwd, [&](auto tag) {
    using T = decltype(tag);
    using Acc = acc_t<T>;
    auto ptr = [](const Tensor& t) { return static_cast<T*>(t.data_ptr()); };
    const T* g = ptr(grad_out);
    Tensor scratch_t = torch::stable::empty({d.out, d.in}, acc_scalar_type<Acc>());
    Acc* scratch = static_cast<Acc*>(scratch_t.data_ptr());
    if (need_grad_x && d.T > 0) {
      materialize<Acc>(d, ptr(A), ptr(B), ptr(values), indices, scale, scratch);
      // dx[t, i] = Σ_o g[t, o]·W[o, i]
      strided_batched_gemm<Acc, T, Acc, T>(1, d.T, d.in, d.out, operand<const T>(g, 0, d.out, 1),
                                           operand<const Acc>(scratch, 0, d.in, 1), operand<T>(ptr(dx), 0, d.in, 1));
    }
    if (need_grad_lowrank || need_grad_values) {
      // G[o, i] = Σ_t g[t, o]·x[t, i]   (K = T; zero when T = 0)
      strided_batched_gemm<Acc, T, T, Acc>(1, d.out, d.in, d.T, operand<const T>(g, 0, 1, d.out),
                                           operand<const T>(ptr(x), 0, d.in, 1), operand<Acc>(scratch, 0, d.in, 1));
      if (need_grad_values) {
        T* dvp = ptr(dv);
        for_each_index(indices, d.nnz, d.out * d.in,
                       [&](int64_t k, int64_t v) { dvp[k] = static_cast<T>(v >= 0 ? scratch[v] : Acc(0)); });
      }
      if (need_grad_lowrank) {
        // dA[j, i] = scale·Σ_o B[o, j]·G[o, i];  dB[o, j] = scale·Σ_i G[o, i]·A[j, i]
        strided_batched_gemm<Acc, T, Acc, T>(1, d.r, d.in, d.out, operand<const T>(ptr(B), 0, 1, d.r),
                                             operand<const Acc>(scratch, 0, d.in, 1), operand<T>(ptr(dA), 0, d.in, 1),
                                             Acc(scale));
        strided_batched_gemm<Acc, Acc, T, T>(1, d.out, d.r, d.in, operand<const Acc>(scratch, 0, d.in, 1),
                                             operand<const T>(ptr(A), 0, 1, d.in), operand<T>(ptr(dB), 0, d.r, 1),
                                             Acc(scale));
      }
    }
    if (has_bias) {
      T* dbp = ptr(db);
      torch::stable::parallel_for(0, d.out, 256, [&](int64_t begin, int64_t end) {
        std::vector<Acc> acc(static_cast<size_t>(end - begin), Acc(0));
        for (int64_t t = 0; t < d.T; ++t)
          for (int64_t o = begin; o < end; ++o) acc[o - begin] += static_cast<Acc>(g[t * d.out + o]);
        for (int64_t o = begin; o < end; ++o) dbp[o] = static_cast<T>(acc[o - begin]);
      });
    }
  });
  return {dx, dA, dB, dv, db};
}

}  // namespace
}  // namespace lowrank

STABLE_TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("sltrain_linear", TORCH_BOX(&lowrank::sltrain_linear_cpu));
  m.impl("sltrain_linear_backward", TORCH_BOX(&lowrank::sltrain_linear_backward_cpu));
}
