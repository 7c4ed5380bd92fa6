// SLTrain linear on the CPU, two paths of the research notes, chosen per shape by their multiply-add count
// (env LOWRANK_SLTRAIN_CPU_PATH=materialize|lowrank forces one, for tests):
//  (a) materialize W = scale·B·A + S in an fp32 (fp64) scratch — scale is the GEMM's alpha, S one scatter —
//      then y = x·Wᵀ (Wᵀ is addressing). Backward: recompute W for dx, reuse the scratch for G = dyᵀ·x, then
//      dvalues (a gather), dA = scale·Bᵀ·G, dB = scale·G·Aᵀ. Best when tokens ≫ r.
//  (b) low-rank + sparse: y = scale·(x·Aᵀ)·Bᵀ + x·Sᵀ, with the sparse term run on token-major transposes of
//      the activations, so every nonzero is one vectorizable axpy over a chunk of tokens (dvalues one dot
//      product over tokens). Best when tokens ≲ r or the support is sparse enough: r(in+out) + nnz < in·out
//      is SLTrain's premise.
// Nothing of size out·in outlives a call.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#include "common/cpu_dispatch.h"
#include "common/cpu_gemm.h"
#include "common/op_boundary.h"
#include "sltrain/sltrain_common.h"

namespace lowrank {
namespace {

constexpr char kFwd[] = "lowrank.sltrain_linear";
constexpr char kBwd[] = "lowrank.sltrain_linear_backward";

// check=True: range, then uniqueness, in O(nnz) memory and O(nnz log nnz) time whatever out·in is: a bitmap
// of out·in bits when that is at most 64 bytes per index (a dense enough support: one pass), else a sort of
// (value, position) pairs (16 bytes per index). Both report the smallest position whose value appeared
// earlier (as the CUDA check does).
template <typename I>
void validate_indices_typed(const char* op, const I* idx, int64_t nnz, int64_t size) {
  for (int64_t k = 0; k < nnz; ++k) {
    const int64_t v = static_cast<int64_t>(idx[k]);
    LOWRANK_CHECK(v >= 0 && v < size, op, ": indices must lie in [0, out·in) = [0, ", size, ") (got indices[", k,
                  "] = ", v, ")");
  }
  int64_t dup = -1;
  if (size / 8 <= 64 * nnz) {
    std::vector<uint64_t> seen(static_cast<size_t>((size + 63) / 64), 0);
    for (int64_t k = 0; k < nnz && dup < 0; ++k) {
      const int64_t v = static_cast<int64_t>(idx[k]);
      uint64_t& word = seen[static_cast<size_t>(v >> 6)];
      const uint64_t bit = uint64_t(1) << (v & 63);
      if (word & bit) dup = k;
      word |= bit;
    }
  } else {
    std::vector<std::pair<int64_t, int64_t>> order(static_cast<size_t>(nnz));
    for (int64_t k = 0; k < nnz; ++k) order[k] = {static_cast<int64_t>(idx[k]), k};
    std::sort(order.begin(), order.end());
    for (size_t i = 1; i < order.size(); ++i)
      if (order[i].first == order[i - 1].first && (dup < 0 || order[i].second < dup)) dup = order[i].second;
  }
  LOWRANK_CHECK(dup < 0, op, ": indices must be unique (got indices[", dup, "] = ", static_cast<int64_t>(idx[dup]),
                ", a value that appears at an earlier position)");
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


enum class Path { kMaterialize, kLowRank };

Path choose_path(const SLTrainDims& d) {
  if (const char* env = std::getenv("LOWRANK_SLTRAIN_CPU_PATH")) {
    if (std::strcmp(env, "materialize") == 0) return Path::kMaterialize;
    if (std::strcmp(env, "lowrank") == 0) return Path::kLowRank;
  }
  // multiply-adds of the forward; a sparse multiply-add (a scattered row, no register blocking) measured
  // about 8x the cost of a GEMM one on the development machine
  const double materialize = double(d.out) * d.in * d.r + double(d.T) * d.out * d.in;
  const double lowrank = double(d.T) * d.r * (d.in + d.out) + 8.0 * double(d.T) * d.nnz;
  return lowrank < materialize ? Path::kLowRank : Path::kMaterialize;
}

// dst[c·rows + r] = src[r·cols + c] (Acc), in 32 x 32 blocks.
template <typename Acc, typename T>
void transpose_to(Acc* dst, const T* src, int64_t rows, int64_t cols) {
  constexpr int64_t kB = 32;
  torch::stable::parallel_for(0, (cols + kB - 1) / kB, 1, [&](int64_t begin, int64_t end) {
    for (int64_t cb = begin * kB; cb < std::min(cols, end * kB); cb += kB)
      for (int64_t rb = 0; rb < rows; rb += kB)
        for (int64_t c = cb; c < std::min(cols, cb + kB); ++c)
          for (int64_t r = rb; r < std::min(rows, rb + kB); ++r) dst[c * rows + r] = static_cast<Acc>(src[r * cols + c]);
  });
}

// dst[r·cols + c] = src[c·rows + r] (+ bias[c]), converting to T.
template <typename Acc, typename T>
void transpose_from(T* dst, const Acc* src, int64_t rows, int64_t cols, const T* bias) {
  constexpr int64_t kB = 32;
  torch::stable::parallel_for(0, (rows + kB - 1) / kB, 1, [&](int64_t begin, int64_t end) {
    for (int64_t rb = begin * kB; rb < std::min(rows, end * kB); rb += kB)
      for (int64_t cb = 0; cb < cols; cb += kB)
        for (int64_t r = rb; r < std::min(rows, rb + kB); ++r)
          for (int64_t c = cb; c < std::min(cols, cb + kB); ++c)
            dst[r * cols + c] = static_cast<T>(src[c * rows + r] + (bias ? static_cast<Acc>(bias[c]) : Acc(0)));
  });
}

// The support as (row, col) pairs; row -1 marks an out-of-range index (ignored).
struct Support {
  std::vector<int64_t> row, col;
};
Support decode_support(const Tensor& indices, const SLTrainDims& d) {
  Support s;
  s.row.resize(static_cast<size_t>(d.nnz));
  s.col.resize(static_cast<size_t>(d.nnz));
  for_each_index(indices, d.nnz, d.out * d.in, [&](int64_t k, int64_t v) {
    s.row[k] = v >= 0 ? v / d.in : -1;
    s.col[k] = v >= 0 ? v % d.in : 0;
  });
  return s;
}

// dstT[row_k, :] += v_k · srcT[col_k, :] over token-major (·, T) arrays (or with rows and cols swapped),
// parallel over token chunks so no two threads touch one element.
template <typename Acc, typename T>
void sparse_axpy(Acc* dstT, const Acc* srcT, const std::vector<int64_t>& dst_of, const std::vector<int64_t>& src_of,
                 const std::vector<int64_t>& valid, const T* values, int64_t nnz, int64_t tokens) {
  constexpr int64_t kChunk = 256;
  torch::stable::parallel_for(0, (tokens + kChunk - 1) / kChunk, 1, [&](int64_t begin, int64_t end) {
    const int64_t t0 = begin * kChunk, t1 = std::min(tokens, end * kChunk);
    for (int64_t k = 0; k < nnz; ++k) {
      if (valid[k] < 0) continue;
      const Acc v = static_cast<Acc>(values[k]);
      Acc* __restrict dst = dstT + dst_of[k] * tokens;
      const Acc* __restrict src = srcT + src_of[k] * tokens;
      for (int64_t t = t0; t < t1; ++t) dst[t] += v * src[t];
    }
  });
}

// Path (b) backward. h = dy·B (T, r), u = x·Aᵀ (T, r):
//   dx = scale·h·A + dy·S;  dA = scale·hᵀ·x;  dB = scale·dyᵀ·u;  dvalues_k = Σ_t dy[t, row_k]·x[t, col_k].
template <typename Acc, typename T>
void lowrank_backward(const SLTrainDims& d, const T* g, const T* x, const T* A, const T* B, const T* values,
                      const Tensor& indices, double scale, T* dx, T* dA, T* dB, T* dv) {
  if (d.T == 0) {  // sums over no tokens
    for (int64_t e = 0; dA && e < d.r * d.in; ++e) dA[e] = T(0);
    for (int64_t e = 0; dB && e < d.out * d.r; ++e) dB[e] = T(0);
    for (int64_t e = 0; dv && e < d.nnz; ++e) dv[e] = T(0);
    return;
  }
  const Support sup = decode_support(indices, d);
  auto scratch = [&](int64_t n) { return lowrank::empty({n}, acc_scalar_type<Acc>()); };
  Tensor h_t = scratch(d.T * d.r), gT_t = scratch(d.out * d.T), xT_t = scratch(d.in * d.T);
  Acc* h = static_cast<Acc*>(h_t.data_ptr());
  Acc* gT = static_cast<Acc*>(gT_t.data_ptr());
  Acc* xT = static_cast<Acc*>(xT_t.data_ptr());
  if (dx || dA)  // h[t, j] = Σ_o g[t, o]·B[o, j]
    strided_batched_gemm<Acc, T, T, Acc>(1, d.T, d.r, d.out, operand<const T>(g, 0, d.out, 1),
                                         operand<const T>(B, 0, d.r, 1), operand<Acc>(h, 0, d.r, 1));
  if (dx || dv) transpose_to(gT, g, d.T, d.out);
  if (dv) transpose_to(xT, x, d.T, d.in);
  if (dx) {
    Tensor dxT_t = scratch(d.in * d.T);
    Acc* dxT = static_cast<Acc*>(dxT_t.data_ptr());
    // dxᵀ[i, t] = scale·Σ_j A[j, i]·h[t, j];  dxᵀ[col_k] += v_k·gᵀ[row_k]
    strided_batched_gemm<Acc, T, Acc, Acc>(1, d.in, d.T, d.r, operand<const T>(A, 0, 1, d.in),
                                           operand<const Acc>(h, 0, 1, d.r), operand<Acc>(dxT, 0, d.T, 1), Acc(scale));
    sparse_axpy<Acc>(dxT, gT, sup.col, sup.row, sup.row, values, d.nnz, d.T);
    transpose_from(dx, dxT, d.T, d.in, static_cast<const T*>(nullptr));
  }
  if (dA) {
    // dA[j, i] = scale·Σ_t h[t, j]·x[t, i];  dB[o, j] = scale·Σ_t g[t, o]·u[t, j], u = x·Aᵀ
    strided_batched_gemm<Acc, Acc, T, T>(1, d.r, d.in, d.T, operand<const Acc>(h, 0, 1, d.r),
                                         operand<const T>(x, 0, d.in, 1), operand<T>(dA, 0, d.in, 1), Acc(scale));
    Tensor u_t = scratch(d.T * d.r);
    Acc* u = static_cast<Acc*>(u_t.data_ptr());
    strided_batched_gemm<Acc, T, T, Acc>(1, d.T, d.r, d.in, operand<const T>(x, 0, d.in, 1),
                                         operand<const T>(A, 0, 1, d.in), operand<Acc>(u, 0, d.r, 1));
    strided_batched_gemm<Acc, T, Acc, T>(1, d.out, d.r, d.T, operand<const T>(g, 0, 1, d.out),
                                         operand<const Acc>(u, 0, d.r, 1), operand<T>(dB, 0, d.r, 1), Acc(scale));
  }
  if (dv) {
    torch::stable::parallel_for(0, d.nnz, 256, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        if (sup.row[k] < 0) {
          dv[k] = T(0);
          continue;
        }
        const Acc* a = gT + sup.row[k] * d.T;
        const Acc* b = xT + sup.col[k] * d.T;
        Acc part[8] = {};  // 8 independent sums so the compiler can vectorize the reduction
        int64_t t = 0;
        for (; t + 8 <= d.T; t += 8)
          for (int j = 0; j < 8; ++j) part[j] += a[t + j] * b[t + j];
        Acc acc = 0;
        for (; t < d.T; ++t) acc += a[t] * b[t];
        for (int j = 0; j < 8; ++j) acc += part[j];
        dv[k] = static_cast<T>(acc);
      }
    });
  }
}

// Rows of x (T, in) holding a NaN or an Inf, ascending.
template <typename T>
std::vector<int64_t> nonfinite_rows(const T* x, int64_t T_, int64_t in) {
  std::vector<char> bad(static_cast<size_t>(T_), 0);
  torch::stable::parallel_for(0, T_, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* row = x + t * in;
      bool finite = true;
      for (int64_t i = 0; i < in; ++i) finite &= is_finite_value(row[i]);
      bad[t] = !finite;
    }
  });
  std::vector<int64_t> rows;
  for (int64_t t = 0; t < T_; ++t)
    if (bad[t]) rows.push_back(t);
  return rows;
}

// y[t, :] = x[t, :]·Wᵀ (+ bias) for the given rows only, with W materialized like the materializing path does.
template <typename Acc, typename T>
void dense_rows(const SLTrainDims& d, const std::vector<int64_t>& rows, const T* x, const T* A, const T* B,
                const T* values, const Tensor& indices, double scale, const T* bias, T* y) {
  const int64_t n = static_cast<int64_t>(rows.size());
  Tensor w_t = lowrank::empty({d.out, d.in}, acc_scalar_type<Acc>());
  Tensor xb_t = lowrank::empty({n, d.in}, acc_scalar_type<Acc>()), yb_t = lowrank::empty({n, d.out}, acc_scalar_type<Acc>());
  Acc* w = static_cast<Acc*>(w_t.data_ptr());
  Acc* xb = static_cast<Acc*>(xb_t.data_ptr());
  Acc* yb = static_cast<Acc*>(yb_t.data_ptr());
  materialize<Acc>(d, A, B, values, indices, scale, w);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i < d.in; ++i) xb[j * d.in + i] = static_cast<Acc>(x[rows[j] * d.in + i]);
  strided_batched_gemm<Acc, Acc, Acc, Acc>(1, n, d.out, d.in, operand<const Acc>(xb, 0, d.in, 1),
                                           operand<const Acc>(w, 0, 1, d.in), operand<Acc>(yb, 0, d.out, 1));
  for (int64_t j = 0; j < n; ++j)
    for (int64_t o = 0; o < d.out; ++o)
      y[rows[j] * d.out + o] = static_cast<T>(yb[j * d.out + o] + (bias ? static_cast<Acc>(bias[o]) : Acc(0)));
}

Tensor sltrain_linear_cpu(Tensor x, Tensor A, Tensor B, Tensor values, Tensor indices, double scale,
                          std::optional<Tensor> bias, bool check) {
  const SLTrainDims d = sltrain_dims(kFwd, x, A, B, values, indices, bias);
  LOWRANK_CHECK(x.is_cpu(), kFwd, ": the CPU kernel got a tensor on ", device_name(x));
  // indices first: their check costs O(nnz log nnz) whatever the other inputs' size
  indices = lowrank::contiguous(indices, "indices");
  if (check) validate_indices(kFwd, indices, d.nnz, d.out * d.in);
  x = lowrank::contiguous(x, "x"), A = lowrank::contiguous(A, "A"), B = lowrank::contiguous(B, "B");
  values = lowrank::contiguous(values, "values");
  Tensor y = lowrank::new_empty(x, out_shape_like(x, d.out));
  if (d.T == 0) return y;
  dispatch_float(x.scalar_type(), kFwd, [&](auto tag) {
    using T = decltype(tag);
    using Acc = acc_t<T>;
    auto ptr = [](const Tensor& t) { return static_cast<T*>(t.data_ptr()); };
    if (choose_path(d) == Path::kLowRank) {
      const Support sup = decode_support(indices, d);
      auto scratch = [&](int64_t n) { return lowrank::empty({n}, acc_scalar_type<Acc>()); };
      Tensor xT_t = scratch(d.in * d.T), u_t = scratch(d.T * d.r), yT_t = scratch(d.out * d.T);
      Acc* xT = static_cast<Acc*>(xT_t.data_ptr());
      Acc* u = static_cast<Acc*>(u_t.data_ptr());
      Acc* yT = static_cast<Acc*>(yT_t.data_ptr());
      transpose_to(xT, ptr(x), d.T, d.in);
      // u = x·Aᵀ (T, r);  yᵀ = scale·B·uᵀ (out, T);  yᵀ[row_k] += v_k·xᵀ[col_k]
      strided_batched_gemm<Acc, T, T, Acc>(1, d.T, d.r, d.in, operand<const T>(ptr(x), 0, d.in, 1),
                                           operand<const T>(ptr(A), 0, 1, d.in), operand<Acc>(u, 0, d.r, 1));
      strided_batched_gemm<Acc, T, Acc, Acc>(1, d.out, d.T, d.r, operand<const T>(ptr(B), 0, d.r, 1),
                                             operand<const Acc>(u, 0, 1, d.r), operand<Acc>(yT, 0, d.T, 1), Acc(scale));
      sparse_axpy<Acc>(yT, xT, sup.row, sup.col, sup.row, ptr(values), d.nnz, d.T);
      const Tensor b = bias.has_value() ? lowrank::contiguous(*bias, "bias") : Tensor();
      transpose_from(ptr(y), yT, d.T, d.out, bias.has_value() ? static_cast<const T*>(b.data_ptr()) : nullptr);
      // x·Aᵀ spreads an Inf of x over r sums that B then mixes with both signs: NaN where x·Wᵀ gives ±Inf.
      // The (rare) tokens with a non-finite input are recomputed as x·Wᵀ, so both paths give F.linear's result.
      const std::vector<int64_t> rows = nonfinite_rows(ptr(x), d.T, d.in);
      if (!rows.empty())
        dense_rows<Acc>(d, rows, ptr(x), ptr(A), ptr(B), ptr(values), indices, scale,
                        bias.has_value() ? static_cast<const T*>(b.data_ptr()) : nullptr, ptr(y));
      return;
    }
    Tensor w_t = lowrank::empty({d.out, d.in}, acc_scalar_type<Acc>());
    Acc* w = static_cast<Acc*>(w_t.data_ptr());
    materialize<Acc>(d, ptr(A), ptr(B), ptr(values), indices, scale, w);
    // y[t, o] = Σ_i x[t, i]·W[o, i]
    strided_batched_gemm<Acc, T, Acc, T>(1, d.T, d.out, d.in, operand<const T>(ptr(x), 0, d.in, 1),
                                         operand<const Acc>(w, 0, 1, d.in), operand<T>(ptr(y), 0, d.out, 1));
    if (bias.has_value()) {
      const Tensor b = lowrank::contiguous(*bias, "bias");
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
  check_grad_out(kBwd, grad_out, x, d.out);
  grad_out = lowrank::contiguous(grad_out, "grad_out"), x = lowrank::contiguous(x, "x"), A = lowrank::contiguous(A, "A"), B = lowrank::contiguous(B, "B");
  values = lowrank::contiguous(values, "values"), indices = lowrank::contiguous(indices, "indices");
  auto empty0 = [](const Tensor& like) { return lowrank::new_empty(like, {0}); };
  Tensor dx = need_grad_x ? lowrank::new_empty(x, x.sizes()) : empty0(x);
  Tensor dA = need_grad_lowrank ? lowrank::new_empty(A, A.sizes()) : empty0(A);
  Tensor dB = need_grad_lowrank ? lowrank::new_empty(B, B.sizes()) : empty0(B);
  Tensor dv = need_grad_values ? lowrank::new_empty(values, values.sizes()) : empty0(values);
  Tensor db = has_bias ? lowrank::new_empty(x, {d.out}) : empty0(x);
  dispatch_float(x.scalar_type(), kBwd, [&](auto tag) {
    using T = decltype(tag);
    using Acc = acc_t<T>;
    auto ptr = [](const Tensor& t) { return static_cast<T*>(t.data_ptr()); };
    const T* g = ptr(grad_out);
    if (has_bias) {
      T* dbp = ptr(db);
      torch::stable::parallel_for(0, d.out, 256, [&](int64_t begin, int64_t end) {
        std::vector<Acc> acc(static_cast<size_t>(end - begin), Acc(0));
        for (int64_t t = 0; t < d.T; ++t)
          for (int64_t o = begin; o < end; ++o) acc[o - begin] += static_cast<Acc>(g[t * d.out + o]);
        for (int64_t o = begin; o < end; ++o) dbp[o] = static_cast<T>(acc[o - begin]);
      });
    }
    if (choose_path(d) == Path::kLowRank) {
      lowrank_backward<Acc>(d, g, ptr(x), ptr(A), ptr(B), ptr(values), indices, scale,
                            need_grad_x ? ptr(dx) : nullptr, need_grad_lowrank ? ptr(dA) : nullptr,
                            need_grad_lowrank ? ptr(dB) : nullptr, need_grad_values ? ptr(dv) : nullptr);
      return;
    }
    Tensor scratch_t = lowrank::empty({d.out, d.in}, acc_scalar_type<Acc>());
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
  });
  return {dx, dA, dB, dv, db};
}

}  // namespace
}  // namespace lowrank

STABLE_TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("sltrain_linear", LOWRANK_BOX(lowrank::kFwd, lowrank::sltrain_linear_cpu));
  m.impl("sltrain_linear_backward", LOWRANK_BOX(lowrank::kBwd, lowrank::sltrain_linear_backward_cpu));
}
