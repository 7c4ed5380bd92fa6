// Input validation of the projection ops (GaLore / Fira / DCT), shared by the CPU and CUDA kernels.
// G (m, n) is a gradient (W (m, n) a weight, same rules). Right side (left = false): P (r, n), R = G·Pᵀ (m, r),
// back(M) = M·P with M (m, r). Left side: P (m, r), R = Pᵀ·G (r, n), back(M) = P·M with M (r, n).
// The companions of G (P, M, residual_scale, Q, and the outputs R, sqnorms, scores) are float32, or float64
// iff G is float64 (CPU only).
#pragma once
#include <optional>

#include "common/checks.h"

namespace lowrank {

inline constexpr char kProjectOp[] = "lowrank.galore_project";
inline constexpr char kAdamOp[] = "lowrank.adam_lowrank_";
inline constexpr char kUpdateOp[] = "lowrank.galore_update_";
inline constexpr char kDctOp[] = "lowrank.dct_basis_";
inline constexpr char kScoresOp[] = "lowrank.basis_scores";

struct ProjDims {
  int64_t m, n, r;
  bool left;
};

// G (m, n) float and P (r, n) (right) / (m, r) (left) of G's companion dtype, 1 <= r <= n (right) / m (left).
inline ProjDims projection_dims(const char* op, const Tensor& G, const char* g_name, const Tensor& P, bool left) {
  check_dim(op, G, g_name, 2, "(m, n)");
  check_float_dtype(op, G, g_name);
  check_dim(op, P, "P", 2, left ? "(m, r) for a left projection" : "(r, n) for a right projection");
  check_companion_dtype(op, P, "P", G, g_name);
  check_same_device(op, G, g_name, P, "P");
  ProjDims d{G.size(0), G.size(1), left ? P.size(1) : P.size(0), left};
  if (left) {
    LOWRANK_CHECK(P.size(0) == d.m, op, ": P must be (m, r) for a left projection, m = ", g_name, ".shape[0] = ", d.m,
                  " (got P of ", shape_str(P), ")");
  } else {
    LOWRANK_CHECK(P.size(1) == d.n, op, ": P must be (r, n) for a right projection, n = ", g_name, ".shape[1] = ",
                  d.n, " (got P of ", shape_str(P), ")");
  }
  const int64_t dim = left ? d.m : d.n;
  LOWRANK_CHECK(d.r >= 1 && d.r <= dim, op, ": P's rank r (its ", left ? "columns" : "rows", ") must be in [1, ",
                left ? "m" : "n", " = ", dim, "] (got r = ", d.r, ")");
  return d;
}

inline void check_vector(const char* op, const Tensor& t, const char* name, int64_t len, const char* what) {
  LOWRANK_CHECK(t.dim() == 1 && t.size(0) == len, op, ": ", name, " must be 1-D of length ", len, ", ", what, " (got ",
                shape_str(t), ")");
}

// exp_avg, exp_avg_sq contiguous, R any strides; all one shape and one dtype (float32, float64 on CPU).
// exp_avg and exp_avg_sq have R's shape (the fp32 and the 8-bit Adam ops).
inline void check_moments_shape(const char* op, const Tensor& R, const Tensor& exp_avg, const Tensor& exp_avg_sq) {
  bool same = exp_avg.dim() == R.dim() && exp_avg_sq.dim() == R.dim();
  for (int64_t i = 0; same && i < R.dim(); ++i) same = exp_avg.size(i) == R.size(i) && exp_avg_sq.size(i) == R.size(i);
  LOWRANK_CHECK(same, op, ": exp_avg and exp_avg_sq must have R's shape ", shape_str(R), " (got ",
                shape_str(exp_avg), " and ", shape_str(exp_avg_sq), ")");
}

inline void check_adam_args(const Tensor& exp_avg, const Tensor& exp_avg_sq, const Tensor& R) {
  const char* op = kAdamOp;
  const ScalarType st = R.scalar_type();
  LOWRANK_CHECK(st == ScalarType::Float || st == ScalarType::Double, op,
                ": R must be float32, or float64 on CPU (got ", dtype_str(st), ")");
  LOWRANK_CHECK(!(st == ScalarType::Double && R.is_cuda()), op, ": R must be float32 (got float64 on CUDA)");
  check_same_dtype(op, R, "R", exp_avg, "exp_avg");
  check_same_dtype(op, R, "R", exp_avg_sq, "exp_avg_sq");
  check_same_device(op, R, "R", exp_avg, "exp_avg");
  check_same_device(op, R, "R", exp_avg_sq, "exp_avg_sq");
  check_moments_shape(op, R, exp_avg, exp_avg_sq);
  LOWRANK_CHECK(exp_avg.is_contiguous(), op, ": exp_avg must be contiguous (it is updated in place)");
  LOWRANK_CHECK(exp_avg_sq.is_contiguous(), op, ": exp_avg_sq must be contiguous (it is updated in place)");
  check_no_overlap(op, exp_avg, "exp_avg", exp_avg_sq, "exp_avg_sq");
  check_no_overlap(op, exp_avg, "exp_avg", R, "R");
  check_no_overlap(op, exp_avg_sq, "exp_avg_sq", R, "R");
}

// W (m, n) contiguous; M (m, r) right / (r, n) left of W's companion dtype; G optional (m, n) any float dtype;
// residual_scale optional, length m (right) / n (left), companion dtype; G and residual_scale both or neither.
inline ProjDims check_update_args(const Tensor& W, const Tensor& M, const Tensor& P, bool left,
                                  const std::optional<Tensor>& G, const std::optional<Tensor>& residual_scale) {
  const char* op = kUpdateOp;
  const ProjDims d = projection_dims(op, W, "W", P, left);
  LOWRANK_CHECK(W.is_contiguous(), op, ": W must be contiguous (it is updated in place)");
  check_dim(op, M, "M", 2, left ? "(r, n) for a left projection" : "(m, r) for a right projection");
  check_companion_dtype(op, M, "M", W, "W");
  check_same_device(op, W, "W", M, "M");
  const int64_t want0 = left ? d.r : d.m, want1 = left ? d.n : d.r;
  LOWRANK_CHECK(M.size(0) == want0 && M.size(1) == want1, op, ": M must be (", want0, ", ", want1, ") = ",
                left ? "(r, n)" : "(m, r)", " (got ", shape_str(M), ")");
  check_no_overlap(op, W, "W", M, "M");
  check_no_overlap(op, W, "W", P, "P");
  LOWRANK_CHECK(G.has_value() == residual_scale.has_value(), op,
                ": G and residual_scale must be passed together (got only ", G.has_value() ? "G" : "residual_scale",
                ")");
  if (G.has_value()) {
    check_dim(op, *G, "G", 2, "(m, n)");
    check_float_dtype(op, *G, "G");
    check_same_device(op, W, "W", *G, "G");
    LOWRANK_CHECK(G->size(0) == d.m && G->size(1) == d.n, op, ": G must have W's shape ", shape_str(W), " (got ",
                  shape_str(*G), ")");
    check_companion_dtype(op, *residual_scale, "residual_scale", W, "W");
    check_same_device(op, W, "W", *residual_scale, "residual_scale");
    check_no_overlap(op, W, "W", *G, "G");
    check_no_overlap(op, W, "W", *residual_scale, "residual_scale");
    check_vector(op, *residual_scale, "residual_scale", left ? d.n : d.m,
                 left ? "one factor per column of W for a left projection" : "one factor per row of W for a right projection");
  }
  return d;
}

// G (m, n) float, Q (k, k) of G's companion dtype with k = n (right) / m (left); returns k.
inline int64_t check_scores_args(const Tensor& G, const Tensor& Q, bool left) {
  const char* op = kScoresOp;
  check_dim(op, G, "G", 2, "(m, n)");
  check_float_dtype(op, G, "G");
  check_dim(op, Q, "Q", 2, left ? "(m, m) for left" : "(n, n) for right");
  check_companion_dtype(op, Q, "Q", G, "G");
  check_same_device(op, G, "G", Q, "Q");
  const int64_t k = left ? G.size(0) : G.size(1);
  LOWRANK_CHECK(Q.size(0) == k && Q.size(1) == k, op, ": Q must be (", k, ", ", k, ") = ",
                left ? "(m, m) for left" : "(n, n) for right", " (got ", shape_str(Q), ")");
  return k;
}

inline void check_dct_args(const Tensor& Q) {
  const char* op = kDctOp;
  check_dim(op, Q, "Q", 2, "(n, n)");
  const ScalarType st = Q.scalar_type();
  LOWRANK_CHECK(st == ScalarType::Float || st == ScalarType::Double, op, ": Q must be float32 or float64 (got ",
                dtype_str(st), ")");
  LOWRANK_CHECK(Q.size(0) == Q.size(1), op, ": Q must be square (n, n) (got ", shape_str(Q), ")");
  LOWRANK_CHECK(Q.is_contiguous(), op, ": Q must be contiguous (it is filled in place)");
}

}  // namespace lowrank
