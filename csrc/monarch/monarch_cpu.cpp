// Monarch forward and backward on the CPU, on the strided GEMM engine of common/cpu_gemm.h with both
// permutations folded into operand strides (no permute copies). Two schedules:
//   fused (every block dimension <= 128): factors packed once, each thread runs
//     every step on a tile of rows whose middle activations stay in L2; weight gradients are summed per
//     thread, then across threads;
//   two-pass (larger blocks): one batched GEMM per step over a (B, N) scratch.
// Middle activations are fp32 (fp64 for float64), so bf16/fp16 inputs keep full precision between the
// factors. monarch_matmul's backward recomputes the middle activation (only x, w1 and w2 are saved);
// the training pair monarch_matmul_forward_saving / monarch_matmul_backward_saved keeps it instead (one
// (B, N) tensor, as fly's bmm path keeps), which saves the recompute GEMM: a fifth of the backward's work.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <cmath>
#include <map>
#include <mutex>
#include <vector>

#include "common/cpu_dispatch.h"
#include "common/cpu_gemm.h"
#include "common/op_boundary.h"
#include "monarch/monarch_common.h"

namespace lowrank {
namespace {

constexpr char kFwd[] = "lowrank.monarch_matmul";
constexpr char kBwd[] = "lowrank.monarch_matmul_backward";
constexpr char kFwdSave[] = "lowrank.monarch_matmul_forward_saving";
constexpr char kBwdSaved[] = "lowrank.monarch_matmul_backward_saved";


// y = BD(w1)·x in the natural (B, N) layout: y[b, i·q + j] = Σ_t w1[i,j,t]·x[b, i·p + t].
template <typename Acc, typename T>
void factor1(const MonarchDims& d, const T* x, const T* w1, Acc* mid) {
  strided_batched_gemm<Acc, T, T, Acc>(d.k, d.batch, d.q, d.p, operand<const T>(x, d.p, d.n, 1),
                                       operand<const T>(w1, d.q * d.p, 1, d.p), operand<Acc>(mid, d.q, d.mid, 1));
}

// Small blocks (every block dimension <= 128): the factors are packed once, then each thread runs all
// steps on a tile of rows whose middle activations stay in cache. With small blocks the two-pass path
// would stream (B, N) scratches through memory and gather them at stride l. From 256 on, the two-pass
// path measured faster here (its weight-gradient GEMMs contract over the whole batch at once).
template <typename Acc>
bool fits_fused(const MonarchDims& d) {
  return std::max({d.p, d.q, d.r, d.s}) <= std::min<int64_t>(GemmWorkspace<Acc>::KC, 128);
}

// Both factors packed as GEMM B operands, once per call: w1 and w2 as used in the forward (transposed)
// and, for the backward, as they are.
template <typename Acc>
struct PackedFactors {
  int64_t panel1, panel2, panel1n, panel2n;
  std::unique_ptr<Acc, detail::FreeDeleter> buf;
  Acc *w1t, *w2t, *w1n, *w2n;
  template <typename T>
  PackedFactors(const MonarchDims& d, const T* w1, const T* w2, bool forward_only) {
    constexpr int64_t NR = GemmWorkspace<Acc>::NR;
    auto up = [](int64_t v) { return (v + NR - 1) / NR * NR; };
    panel1 = up(d.q) * d.p, panel2 = up(d.s) * d.r, panel1n = up(d.p) * d.q, panel2n = up(d.r) * d.s;
    const int64_t fwd = d.k * panel1 + d.l * panel2, bwd = forward_only ? 0 : d.k * panel1n + d.l * panel2n;
    buf = detail::aligned_buffer<Acc>(fwd + bwd);
    w1t = buf.get(), w2t = w1t + d.k * panel1, w1n = w2t + d.l * panel2, w2n = w1n + d.k * panel1n;
    // one task per block, so packing large factors for a short batch does not run on one thread
    torch::stable::parallel_for(0, d.k + d.l, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        if (t < d.k) {
          const auto blk = operand<const T>(w1 + t * d.q * d.p, 0, 1, d.p);  // (t, j) -> w1[i, j, t]
          pack_b<Acc>(w1t + t * panel1, d.p, d.q, blk);
          if (!forward_only) pack_b<Acc>(w1n + t * panel1n, d.q, d.p, operand<const T>(blk.ptr, 0, d.p, 1));
        } else {
          const int64_t c = t - d.k;
          const auto blk = operand<const T>(w2 + c * d.s * d.r, 0, 1, d.r);  // (a, e) -> w2[c, e, a]
          pack_b<Acc>(w2t + c * panel2, d.r, d.s, blk);
          if (!forward_only) pack_b<Acc>(w2n + c * panel2n, d.s, d.r, operand<const T>(blk.ptr, 0, d.r, 1));
        }
      }
    });
  }
};

// Rows per tile so that `buffers` (rows, N) Acc tiles take about 1 MiB (L2-sized; fewer rows make the
// weight-gradient GEMMs, whose depth is the row count, pay more for their C updates).
template <typename Acc>
int64_t fused_rows(const MonarchDims& d, int64_t buffers) {
  using W = GemmWorkspace<Acc>;
  const int64_t rows = (1024 << 10) / (buffers * d.mid * int64_t(sizeof(Acc)));
  const int64_t threads = std::max<int64_t>(1, torch::stable::get_num_threads());
  const int64_t per_thread = (d.batch + threads - 1) / threads;  // a short batch still uses every thread
  const int64_t fair = (per_thread + W::MR - 1) / W::MR * W::MR;
  return std::clamp<int64_t>(std::min(rows / W::MR * W::MR, fair), W::MR, W::MT);
}

// mid rows [b0, b0 + nb) = BD(w1)·x, natural layout (rows, N)
template <typename Acc, typename T>
void fused_factor1(const MonarchDims& d, const PackedFactors<Acc>& pf, const T* x, int64_t b0, int64_t nb, Acc* mid,
                   GemmWorkspace<Acc>& ws) {
  for (int64_t i = 0; i < d.k; ++i)
    gemm_tile<Acc>(nb, d.q, d.p, operand<const T>(x + b0 * d.n + i * d.p, 0, d.n, 1), Operand<const T>{},
                   operand<Acc>(mid + i * d.q, 0, d.mid, 1), ws, pf.w1t + i * pf.panel1);
}

// mid_out, if given, receives the middle activation (B, N); otherwise it lives in a per-thread tile.
template <typename Acc, typename T>
void forward_fused(const MonarchDims& d, const T* x, const T* w1, const T* w2, T* out, Acc* mid_out) {
  using W = GemmWorkspace<Acc>;
  const PackedFactors<Acc> pf(d, w1, w2, /*forward_only=*/true);
  const int64_t rows = fused_rows<Acc>(d, 1), tiles = (d.batch + rows - 1) / rows;
  torch::stable::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    W ws;
    auto mid_buf = detail::aligned_buffer<Acc>(mid_out != nullptr ? 1 : rows * d.mid);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b0 = t * rows, nb = std::min(rows, d.batch - b0);
      Acc* mid = mid_out != nullptr ? mid_out + b0 * d.mid : mid_buf.get();
      fused_factor1(d, pf, x, b0, nb, mid, ws);
      for (int64_t c = 0; c < d.l; ++c)  // out[b, e·l + c] = Σ_a w2[c,e,a]·mid[b, a·l + c]
        gemm_tile<Acc>(nb, d.s, d.r, operand<const Acc>(mid + c, 0, d.mid, d.l), Operand<const T>{},
                       operand<T>(out + b0 * d.out + c, 0, d.out, d.l), ws, pf.w2t + c * pf.panel2);
    }
  });
}

// Backward on row tiles. Weight gradients are summed per thread in Acc and then across threads.
// mid_saved: the forward's middle activation (B, N), or null to recompute it per tile.
template <typename Acc, typename T>
void backward_fused(const MonarchDims& d, const T* g, const T* x, const T* w1, const T* w2, const Acc* mid_saved,
                    T* dx, T* dw1, T* dw2) {
  using W = GemmWorkspace<Acc>;
  const PackedFactors<Acc> pf(d, w1, w2, /*forward_only=*/false);
  const bool need_w = dw1 != nullptr;
  const bool recompute = need_w && mid_saved == nullptr;
  const int64_t rows = fused_rows<Acc>(d, recompute ? 2 : 1), tiles = (d.batch + rows - 1) / rows;
  const int64_t n1 = d.k * d.q * d.p, n2 = d.l * d.s * d.r, N = d.mid, m = d.out, l = d.l;
  // per-chunk partial sums keyed by the chunk's first tile, added in that order: bit-reproducible
  std::map<int64_t, std::vector<Acc>> partials;
  std::mutex dw_lock;
  torch::stable::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    W ws;
    auto buf = detail::aligned_buffer<Acc>(rows * N * (recompute ? 2 : 1));
    Acc* dy = buf.get();
    std::vector<Acc> dw(need_w ? n1 + n2 : 0, Acc(0));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b0 = t * rows, nb = std::min(rows, d.batch - b0);
      const T* gt = g + b0 * m;
      for (int64_t c = 0; c < l; ++c)  // dy[b, a·l + c] = Σ_e g[b, e·l + c]·w2[c,e,a]
        gemm_tile<Acc>(nb, d.r, d.s, operand<const T>(gt + c, 0, m, l), Operand<const T>{},
                       operand<Acc>(dy + c, 0, N, l), ws, pf.w2n + c * pf.panel2n);
      if (dx != nullptr)
        for (int64_t i = 0; i < d.k; ++i)  // dx[b, i·p + t] = Σ_j dy[b, i·q + j]·w1[i,j,t]
          gemm_tile<Acc>(nb, d.p, d.q, operand<const Acc>(dy + i * d.q, 0, N, 1), Operand<const T>{},
                         operand<T>(dx + b0 * d.n + i * d.p, 0, d.n, 1), ws, pf.w1n + i * pf.panel1n);
      if (!need_w) continue;
      const Acc* mid = mid_saved != nullptr ? mid_saved + b0 * N : dy + rows * N;
      if (recompute) fused_factor1(d, pf, x, b0, nb, dy + rows * N, ws);
      for (int64_t c = 0; c < l; ++c)  // dw2[c,e,a] += Σ_b g[b, e·l + c]·mid[b, a·l + c]
        gemm_tile<Acc>(d.s, d.r, nb, operand<const T>(gt + c, 0, l, m), operand<const Acc>(mid + c, 0, N, l),
                       operand<Acc>(dw.data() + n1 + c * d.s * d.r, 0, d.r, 1), ws, nullptr, true);
      for (int64_t i = 0; i < d.k; ++i)  // dw1[i,j,t] += Σ_b dy[b, i·q + j]·x[b, i·p + t]
        gemm_tile<Acc>(d.q, d.p, nb, operand<const Acc>(dy + i * d.q, 0, 1, N),
                       operand<const T>(x + b0 * d.n + i * d.p, 0, d.n, 1),
                       operand<Acc>(dw.data() + i * d.q * d.p, 0, d.p, 1), ws, nullptr, true);
    }
    if (need_w) {
      std::lock_guard<std::mutex> guard(dw_lock);
      partials.emplace(begin, std::move(dw));
    }
  });
  if (need_w) {
    std::vector<Acc> dw_total(n1 + n2, Acc(0));
    for (const auto& part : partials)
      for (int64_t e = 0; e < n1 + n2; ++e) dw_total[e] += part.second[e];
    for (int64_t e = 0; e < n1; ++e) dw1[e] = static_cast<T>(dw_total[e]);
    for (int64_t e = 0; e < n2; ++e) dw2[e] = static_cast<T>(dw_total[n1 + e]);
  }
}

// mid_out: null, or (B, N) to receive the middle activation
template <typename T>
void forward(const MonarchDims& d, const T* x, const T* w1, const T* w2, T* out, acc_t<T>* mid_out) {
  using Acc = acc_t<T>;
  if (fits_fused<Acc>(d)) return forward_fused<Acc>(d, x, w1, w2, out, mid_out);
  Tensor mid_t;
  Acc* mid = mid_out;
  if (mid == nullptr) {
    mid_t = lowrank::empty({d.batch, d.mid}, acc_scalar_type<Acc>());
    mid = static_cast<Acc*>(mid_t.data_ptr());
  }
  factor1<Acc>(d, x, w1, mid);
  // out[b, d·l + c] = Σ_a w2[c,d,a] · mid[b, a·l + c]
  strided_batched_gemm<Acc, Acc, T, T>(d.l, d.batch, d.s, d.r, operand<const Acc>(mid, 1, d.mid, d.l),
                                       operand<const T>(w2, d.s * d.r, 1, d.r), operand<T>(out, 1, d.out, d.l));
}

// mid_saved: null (recompute), or the forward's (B, N) middle activation
template <typename T>
void backward(const MonarchDims& d, const T* g, const T* x, const T* w1, const T* w2, const acc_t<T>* mid_saved,
              T* dx, T* dw1, T* dw2) {
  using Acc = acc_t<T>;
  if (fits_fused<Acc>(d)) return backward_fused<Acc>(d, g, x, w1, w2, mid_saved, dx, dw1, dw2);
  const int64_t B = d.batch, N = d.mid, m = d.out, l = d.l;
  auto dy_t = lowrank::empty({B, N}, acc_scalar_type<Acc>());
  Acc* dy = static_cast<Acc*>(dy_t.data_ptr());
  // dy[b, a·l + c] = Σ_d g[b, d·l + c] · w2[c,d,a]
  strided_batched_gemm<Acc, T, T, Acc>(l, B, d.r, d.s, operand<const T>(g, 1, m, l),
                                       operand<const T>(w2, d.s * d.r, d.r, 1), operand<Acc>(dy, 1, N, l));
  if (dw2 != nullptr) {
    Tensor mid_t;
    const Acc* mid = mid_saved;
    if (mid == nullptr) {
      mid_t = lowrank::empty({B, N}, acc_scalar_type<Acc>());
      factor1<Acc>(d, x, w1, static_cast<Acc*>(mid_t.data_ptr()));
      mid = static_cast<const Acc*>(mid_t.data_ptr());
    }
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

// Rows of x (batch, n) with a NaN or Inf get NaN in every output that came out finite (see
// monarch_dense_connected: only outputs that do not depend on the non-finite input can).
template <typename T>
void poison_nonfinite_rows(const MonarchDims& d, const T* x, T* out) {
  torch::stable::parallel_for(0, d.batch, 64, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      bool finite = true;
      for (int64_t i = 0; i < d.n; ++i) finite &= is_finite_value(x[b * d.n + i]);
      if (finite) continue;
      for (int64_t o = 0; o < d.out; ++o)
        if (is_finite_value(out[b * d.out + o])) out[b * d.out + o] = static_cast<T>(NAN);
    }
  });
}

Tensor monarch_matmul_cpu(Tensor x, Tensor w1, Tensor w2) {
  const MonarchDims d = monarch_dims(kFwd, x, w1, w2);
  LOWRANK_CHECK(x.is_cpu(), kFwd, ": the CPU kernel got a tensor on ", device_name(x));
  x = lowrank::contiguous(x, "x");
  w1 = lowrank::contiguous(w1, "w1");
  w2 = lowrank::contiguous(w2, "w2");
  Tensor out = lowrank::new_empty(x, out_shape_like(x, d.out));
  if (d.batch == 0) return out;
  dispatch_float(x.scalar_type(), kFwd, [&](auto tag) {
    using T = decltype(tag);
    forward<T>(d, static_cast<const T*>(x.data_ptr()), static_cast<const T*>(w1.data_ptr()),
               static_cast<const T*>(w2.data_ptr()), static_cast<T*>(out.data_ptr()), nullptr);
    if (!monarch_dense_connected(d)) poison_nonfinite_rows(d, static_cast<const T*>(x.data_ptr()), static_cast<T*>(out.data_ptr()));
  });
  return out;
}

// monarch_matmul's output and the middle activation y (x's leading dims, k·q) in the accumulation dtype.
std::tuple<Tensor, Tensor> monarch_matmul_forward_saving_cpu(Tensor x, Tensor w1, Tensor w2) {
  const MonarchDims d = monarch_dims(kFwdSave, x, w1, w2);
  LOWRANK_CHECK(x.is_cpu(), kFwdSave, ": x must be a CPU tensor, only the CPU keeps the middle activation (got x on ",
                device_name(x), "; use monarch_matmul, whose backward recomputes it)");
  x = lowrank::contiguous(x, "x");
  w1 = lowrank::contiguous(w1, "w1");
  w2 = lowrank::contiguous(w2, "w2");
  Tensor out = lowrank::new_empty(x, out_shape_like(x, d.out));
  Tensor mid = lowrank::new_empty(x, out_shape_like(x, d.mid), companion_type(x.scalar_type()));
  if (d.batch == 0) return {out, mid};
  dispatch_float(x.scalar_type(), kFwdSave, [&](auto tag) {
    using T = decltype(tag);
    forward<T>(d, static_cast<const T*>(x.data_ptr()), static_cast<const T*>(w1.data_ptr()),
               static_cast<const T*>(w2.data_ptr()), static_cast<T*>(out.data_ptr()),
               static_cast<acc_t<T>*>(mid.data_ptr()));
    if (!monarch_dense_connected(d)) poison_nonfinite_rows(d, static_cast<const T*>(x.data_ptr()), static_cast<T*>(out.data_ptr()));
  });
  return {out, mid};
}

// Shared by both backward ops; mid: null (recompute) or the forward's saved middle activation.
std::tuple<Tensor, Tensor, Tensor> backward_impl(const char* op, Tensor grad_out, Tensor x, Tensor w1, Tensor w2,
                                                 const Tensor* mid, bool need_grad_x, bool need_grad_w) {
  const MonarchDims d = monarch_dims(op, x, w1, w2);
  check_grad_out(op, grad_out, x, d.out);
  Tensor mid_c;
  if (mid != nullptr) {
    check_companion_dtype(op, *mid, "mid", x, "x");
    check_same_device(op, x, "x", *mid, "mid");
    LOWRANK_CHECK(has_shape_like(*mid, x, d.mid), op, ": mid must have shape ", shape_str(out_shape_like(x, d.mid)),
                  " (x's leading dims, k·q), the middle activation monarch_matmul_forward_saving returned (got ",
                  shape_str(*mid), ")");
    mid_c = lowrank::contiguous(*mid, "mid");
  }
  LOWRANK_CHECK(x.is_cpu(), op, ": the CPU kernel got a tensor on ", device_name(x));
  grad_out = lowrank::contiguous(grad_out, "grad_out");
  x = lowrank::contiguous(x, "x");
  w1 = lowrank::contiguous(w1, "w1");
  w2 = lowrank::contiguous(w2, "w2");
  Tensor dx = need_grad_x ? lowrank::new_empty(x, x.sizes()) : lowrank::new_empty(x, {0});
  Tensor dw1 = need_grad_w ? lowrank::new_empty(w1, w1.sizes()) : lowrank::new_empty(w1, {0});
  Tensor dw2 = need_grad_w ? lowrank::new_empty(w2, w2.sizes()) : lowrank::new_empty(w2, {0});
  if (need_grad_w && d.batch == 0) {  // a sum over no rows
    torch::stable::zero_(dw1);
    torch::stable::zero_(dw2);
  }
  if (d.batch == 0 || (!need_grad_x && !need_grad_w)) return {dx, dw1, dw2};
  dispatch_float(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    auto ptr = [](const Tensor& t) { return static_cast<T*>(t.data_ptr()); };
    const auto* saved = mid != nullptr ? static_cast<const acc_t<T>*>(mid_c.data_ptr()) : nullptr;
    backward<T>(d, ptr(grad_out), ptr(x), ptr(w1), ptr(w2), saved, need_grad_x ? ptr(dx) : nullptr,
                need_grad_w ? ptr(dw1) : nullptr, need_grad_w ? ptr(dw2) : nullptr);
  });
  return {dx, dw1, dw2};
}

std::tuple<Tensor, Tensor, Tensor> monarch_matmul_backward_cpu(Tensor grad_out, Tensor x, Tensor w1, Tensor w2,
                                                               bool need_grad_x, bool need_grad_w) {
  return backward_impl(kBwd, grad_out, x, w1, w2, nullptr, need_grad_x, need_grad_w);
}

std::tuple<Tensor, Tensor, Tensor> monarch_matmul_backward_saved_cpu(Tensor grad_out, Tensor x, Tensor w1,
                                                                     Tensor w2, Tensor mid, bool need_grad_x,
                                                                     bool need_grad_w) {
  return backward_impl(kBwdSaved, grad_out, x, w1, w2, &mid, need_grad_x, need_grad_w);
}

}  // namespace
}  // namespace lowrank

STABLE_TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("monarch_matmul", LOWRANK_BOX(lowrank::kFwd, lowrank::monarch_matmul_cpu));
  m.impl("monarch_matmul_backward", LOWRANK_BOX(lowrank::kBwd, lowrank::monarch_matmul_backward_cpu));
  m.impl("monarch_matmul_forward_saving", LOWRANK_BOX(lowrank::kFwdSave, lowrank::monarch_matmul_forward_saving_cpu));
  m.impl("monarch_matmul_backward_saved", LOWRANK_BOX(lowrank::kBwdSaved, lowrank::monarch_matmul_backward_saved_cpu));
}
