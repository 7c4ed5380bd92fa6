// Monarch forward and backward on the CPU: every step is one call of the strided batched GEMM engine
// (common/cpu_gemm.h), with both permutations folded into operand strides — no permute copies.
// The middle activation lives in an fp32 (fp64 for float64) scratch of shape (B, N), so bf16/fp16 inputs
// keep full precision between the two factors. Backward recomputes it instead of saving it.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include "common/cpu_gemm.h"
#include "monarch/monarch_common.h"

namespace lowrank {
namespace {

constexpr const char* kFwd = "lowrank.monarch_matmul";
constexpr const char* kBwd = "lowrank.monarch_matmul_backward";

template <typename Acc>
constexpr ScalarType acc_scalar_type() {
  return sizeof(Acc) == 8 ? ScalarType::Double : ScalarType::Float;
}

// y = BD(w1)·x in the natural (B, N) layout: y[b, i·q + j] = Σ_t w1[i,j,t]·x[b, i·p + t].
template <typename Acc, typename T>
void factor1(const MonarchDims& d, const T* x, const T* w1, Acc* mid) {
  strided_batched_gemm<Acc, T, T, Acc>(d.k, d.batch, d.q, d.p, operand<const T>(x, d.p, d.n, 1),
                                       operand<const T>(w1, d.q * d.p, 1, d.p), operand<Acc>(mid, d.q, d.mid, 1));
}

template <typename T>
void forward(const MonarchDims& d, const T* x, const T* w1, const T* w2, T* out) {
  using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
  auto mid_t = torch::stable::empty({d.batch, d.mid}, acc_scalar_type<Acc>());
  Acc* mid = static_cast<Acc*>(mid_t.data_ptr());
  factor1<Acc>(d, x, w1, mid);
  // out[b, d·l + c] = Σ_a w2[c,d,a] · mid[b, a·l + c]
  strided_batched_gemm<Acc, Acc, T, T>(d.l, d.batch, d.s, d.r, operand<const Acc>(mid, 1, d.mid, d.l),
                                       operand<const T>(w2, d.s * d.r, 1, d.r), operand<T>(out, 1, d.out, d.l));
}

template <typename T>
void backward(const MonarchDims& d, const T* g, const T* x, const T* w1, const T* w2, T* dx, T* dw1, T* dw2) {
  using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const int64_t B = d.batch, N = d.mid, m = d.out, l = d.l;
  auto dy_t = torch::stable::empty({B, N}, acc_scalar_type<Acc>());
  Acc* dy = static_cast<Acc*>(dy_t.data_ptr());
  // dy[b, a·l + c] = Σ_d g[b, d·l + c] · w2[c,d,a]
  strided_batched_gemm<Acc, T, T, Acc>(l, B, d.r, d.s, operand<const T>(g, 1, m, l),
                                       operand<const T>(w2, d.s * d.r, d.r, 1), operand<Acc>(dy, 1, N, l));
  if (dw2 != nullptr) {
    auto mid_t = torch::stable::empty({B, N}, acc_scalar_type<Acc>());
    Acc* mid = static_cast<Acc*>(mid_t.data_ptr());
    factor1<Acc>(d, x, w1, mid);
    // dw2[c,d,a] = Σ_b g[b, d·l + c] · mid[b, a·l + c]
    strided_batched_gemm<Acc, T, Acc, T>(l, d.s, d.r, B, operand<const T>(g, 1, l, m),
                                         operand<const Acc>(mid, 1, N, l), operand<T>(dw2, d.s * d.r, d.r, 1));
    // dw1[i,j,t] = Σ_b dy[b, i·q + j] · x[b, i·p + t]
    strided_batched_gemm<Acc, Acc, T, T>(d.k, d.q, d.p, B, operand<const Acc>(dy, d.q, 1, N),
                                         operand<const T>(x, d.p, d.n, 1), operand<T>(dw1, d.q * d.p, d.p, 1));
  }
  if (dx != nullptr) {
    // dx[b, i·p + t] = Σ_j dy[b, i·q + j] · w1[i,j,t]
    strided_batched_gemm<Acc, Acc, T, T>(d.k, B, d.p, d.q, operand<const Acc>(dy, d.q, N, 1),
                                         operand<const T>(w1, d.q * d.p, d.p, 1), operand<T>(dx, d.p, d.n, 1));
  }
}

template <typename F>
void dispatch_float(ScalarType st, const char* op, F&& f) {
  switch (st) {
    case ScalarType::Float: return f(float{});
    case ScalarType::Double: return f(double{});
    case ScalarType::Half: return f(c10::Half{});
    case ScalarType::BFloat16: return f(c10::BFloat16{});
    default: STD_TORCH_CHECK(false, op, ": unsupported dtype ", torch::headeronly::toString(st));
  }
}

Tensor monarch_matmul_cpu(Tensor x, Tensor w1, Tensor w2) {
  const MonarchDims d = monarch_dims(kFwd, x, w1, w2);
  STD_TORCH_CHECK(x.is_cpu(), kFwd, ": the CPU kernel got a tensor on ", device_name(x));
  x = torch::stable::contiguous(x);
  w1 = torch::stable::contiguous(w1);
  w2 = torch::stable::contiguous(w2);
  Tensor out = torch::stable::new_empty(x, monarch_out_shape(x, d.out));
  if (d.batch == 0) return out;
  dispatch_float(x.scalar_type(), kFwd, [&](auto tag) {
    using T = decltype(tag);
    forward<T>(d, static_cast<const T*>(x.data_ptr()), static_cast<const T*>(w1.data_ptr()),
               static_cast<const T*>(w2.data_ptr()), static_cast<T*>(out.data_ptr()));
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> monarch_matmul_backward_cpu(Tensor grad_out, Tensor x, Tensor w1, Tensor w2,
                                                               bool need_grad_x, bool need_grad_w) {
  const MonarchDims d = monarch_dims(kBwd, x, w1, w2);
  check_same_dtype(kBwd, grad_out, "grad_out", x, "x");
  check_same_device(kBwd, grad_out, "grad_out", x, "x");
  const auto expect = monarch_out_shape(x, d.out);
  bool shape_ok = grad_out.dim() == static_cast<int64_t>(expect.size());
  for (size_t i = 0; shape_ok && i < expect.size(); ++i) shape_ok = grad_out.size(i) == expect[i];
  STD_TORCH_CHECK(shape_ok, kBwd, ": grad_out must have the output's shape (x's leading dims, l·s = ", d.out, ")");
  grad_out = torch::stable::contiguous(grad_out);
  x = torch::stable::contiguous(x);
  w1 = torch::stable::contiguous(w1);
  w2 = torch::stable::contiguous(w2);
  Tensor dx = need_grad_x ? torch::stable::new_empty(x, x.sizes()) : torch::stable::new_empty(x, {0});
  Tensor dw1 = need_grad_w ? torch::stable::new_empty(w1, w1.sizes()) : torch::stable::new_empty(w1, {0});
  Tensor dw2 = need_grad_w ? torch::stable::new_empty(w2, w2.sizes()) : torch::stable::new_empty(w2, {0});
  if (need_grad_w && d.batch == 0) {  // a sum over no rows
    torch::stable::zero_(dw1);
    torch::stable::zero_(dw2);
  }
  if (d.batch == 0 || (!need_grad_x && !need_grad_w)) return {dx, dw1, dw2};
  dispatch_float(x.scalar_type(), kBwd, [&](auto tag) {
    using T = decltype(tag);
    auto ptr = [](const Tensor& t) { return static_cast<T*>(t.data_ptr()); };
    backward<T>(d, ptr(grad_out), ptr(x), ptr(w1), ptr(w2), need_grad_x ? ptr(dx) : nullptr,
                need_grad_w ? ptr(dw1) : nullptr, need_grad_w ? ptr(dw2) : nullptr);
  });
  return {dx, dw1, dw2};
}

}  // namespace
}  // namespace lowrank

STABLE_TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("monarch_matmul", TORCH_BOX(&lowrank::monarch_matmul_cpu));
  m.impl("monarch_matmul_backward", TORCH_BOX(&lowrank::monarch_matmul_backward_cpu));
}
