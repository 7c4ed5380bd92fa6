// Monarch shape contract, shared by the CPU and CUDA kernels.
//   x (..., n), w1 (k, q, p) with k·p = n, w2 (l, s, r) with l·r = k·q = N; out (..., l·s).
//   y[b, i·q + j]   = Σ_t w1[i, j, t] · x[b, i·p + t]          (block-diagonal factor 1)
//   z[b, c, a]      = y[b, a·l + c]                             (permutation 'b (r l) -> b (l r)')
//   out[b, d·l + c] = Σ_a w2[c, d, a] · z[b, c, a]              (factor 2, output order 'b (l s) -> b (s l)')
#pragma once
#include <algorithm>
#include <vector>

#include "common/checks.h"

namespace lowrank {

struct MonarchDims {
  int64_t batch;       // product of x's leading dims
  int64_t n, k, q, p;  // input width and factor-1 blocks (k blocks of q x p)
  int64_t l, s, r;     // factor-2 blocks (l blocks of s x r)
  int64_t mid;         // N = k·q = l·r
  int64_t out;         // l·s
};

inline MonarchDims monarch_dims(const char* op, const Tensor& x, const Tensor& w1, const Tensor& w2) {
  LOWRANK_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension (..., n) (got a 0-D tensor)");
  check_dim(op, w1, "w1", 3, "(k, q, p)");
  check_dim(op, w2, "w2", 3, "(l, s, r)");
  check_float_dtype(op, x, "x");
  check_same_dtype(op, x, "x", w1, "w1");
  check_same_dtype(op, x, "x", w2, "w2");
  check_same_device(op, x, "x", w1, "w1");
  check_same_device(op, x, "x", w2, "w2");
  MonarchDims d;
  d.n = x.size(x.dim() - 1);
  d.k = w1.size(0), d.q = w1.size(1), d.p = w1.size(2);
  d.l = w2.size(0), d.s = w2.size(1), d.r = w2.size(2);
  LOWRANK_CHECK(d.k > 0 && d.q > 0 && d.p > 0 && d.l > 0 && d.s > 0 && d.r > 0, op,
                ": w1 and w2 must have no zero-sized dimension (got w1 of ", shape_str(w1), ", w2 of ", shape_str(w2),
                ")");
  LOWRANK_CHECK(d.k * d.p == d.n, op, ": x's last dimension must equal k·p = ", d.k * d.p, " for w1 of shape ",
                shape_str(w1), " (got ", d.n, ")");
  LOWRANK_CHECK(d.l * d.r == d.k * d.q, op, ": w2 must have l·r = k·q = ", d.k * d.q, " for w1 of shape ",
                shape_str(w1), " (got w2 of ", shape_str(w2), ", l·r = ", d.l * d.r, ")");
  d.mid = d.k * d.q;
  d.out = d.l * d.s;
  d.batch = d.n > 0 ? x.numel() / d.n : 0;
  return d;
}

// Whether every output depends on every input (the dense Monarch matrix has no structural zero): for each
// c < l the middle indices a·l + c (a < r) must meet all k blocks of factor 1. Not so when r < k, for instance.
// Where it fails, the kernels give the outputs of a token with a NaN or Inf input that do not depend on that
// input NaN too, which is what F.linear on the dense matrix gives (0·Inf = NaN): one non-finite rule for all.
inline bool monarch_dense_connected(const MonarchDims& d) {
  if (d.r < d.k) return false;
  std::vector<char> seen(static_cast<size_t>(d.k));
  for (int64_t c = 0; c < d.l; ++c) {
    std::fill(seen.begin(), seen.end(), 0);
    int64_t hit = 0;
    for (int64_t a = 0; a < d.r && hit < d.k; ++a) {
      char& s = seen[static_cast<size_t>((a * d.l + c) / d.q)];
      hit += !s;
      s = 1;
    }
    if (hit < d.k) return false;
  }
  return true;
}

}  // namespace lowrank
