// SLTrain shape contract, shared by the CPU and CUDA kernels.
//   x (..., in), A (r, in), B (out, r), values (nnz,), indices (nnz,) int32/int64 flat row·in + col,
//   optional bias (out,);  y = x·(scale·B·A + S)ᵀ + bias with S.view(-1)[indices] = values.
// sltrain_dims checks shapes, dtypes and devices; index values are checked by the kernels (check=True).
#pragma once
#include <optional>

#include "common/checks.h"

namespace lowrank {

struct SLTrainDims {
  int64_t T;          // rows of x (product of its leading dims)
  int64_t in, out, r;
  int64_t nnz;
};

inline SLTrainDims sltrain_dims(const char* op, const Tensor& x, const Tensor& A, const Tensor& B, const Tensor& values,
                                const Tensor& indices, const std::optional<Tensor>& bias) {
  LOWRANK_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension (..., in) (got a 0-D tensor)");
  check_dim(op, A, "A", 2, "(r, in)");
  check_dim(op, B, "B", 2, "(out, r)");
  check_dim(op, values, "values", 1, "(nnz,)");
  check_dim(op, indices, "indices", 1, "(nnz,)");
  check_float_dtype(op, x, "x");
  check_same_dtype(op, x, "x", A, "A");
  check_same_dtype(op, x, "x", B, "B");
  check_same_dtype(op, x, "x", values, "values");
  const ScalarType it = indices.scalar_type();
  LOWRANK_CHECK(it == ScalarType::Int || it == ScalarType::Long, op, ": indices must be int32 or int64 (got ",
                dtype_str(it), ")");
  check_same_device(op, x, "x", A, "A");
  check_same_device(op, x, "x", B, "B");
  check_same_device(op, x, "x", values, "values");
  check_same_device(op, x, "x", indices, "indices");
  SLTrainDims d;
  d.in = x.size(x.dim() - 1);
  d.r = A.size(0);
  d.out = B.size(0);
  d.nnz = values.size(0);
  LOWRANK_CHECK(A.size(1) == d.in, op, ": A must be (r, in) with in = x's last dimension, ", d.in, " (got A of ",
                shape_str(A), ")");
  LOWRANK_CHECK(B.size(1) == d.r, op, ": B must be (out, r) with r = A.shape[0], ", d.r, " (got B of ", shape_str(B),
                ")");
  LOWRANK_CHECK(d.r > 0 && d.in > 0 && d.out > 0, op, ": A and B must have no zero-sized dimension (got A of ",
                shape_str(A), ", B of ", shape_str(B), ")");
  LOWRANK_CHECK(indices.size(0) == d.nnz, op, ": indices must have values' length, ", d.nnz, " (got ",
                indices.size(0), ")");
  if (bias.has_value()) {
    check_same_dtype(op, x, "x", *bias, "bias");
    check_same_device(op, x, "x", *bias, "bias");
    LOWRANK_CHECK(bias->dim() == 1 && bias->size(0) == d.out, op, ": bias must be (out,) = (", d.out, ",) (got ",
                  shape_str(*bias), ")");
  }
  d.T = x.numel() / d.in;
  return d;
}

}  // namespace lowrank
