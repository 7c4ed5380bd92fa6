// Input validation shared by every op and backend: each failure names the op, the argument and what
// was expected, and surfaces in Python as a RuntimeError (never a crash or a silent wrong result).
#pragma once
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <string>
#include <vector>

namespace lowrank {

using torch::stable::Tensor;
using torch::headeronly::ScalarType;

inline const char* device_name(const Tensor& t) { return t.is_cuda() ? "cuda" : (t.is_cpu() ? "cpu" : "other"); }

inline bool is_float_dtype(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Half || t == ScalarType::BFloat16 || t == ScalarType::Double;
}

inline void check_dim(const char* op, const Tensor& t, const char* name, int64_t dim, const char* layout) {
  STD_TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D ", layout, ", got a ", t.dim(),
                  "-D tensor");
}

// float32 / float16 / bfloat16 everywhere, float64 on the CPU only.
inline void check_float_dtype(const char* op, const Tensor& t, const char* name) {
  const ScalarType st = t.scalar_type();
  STD_TORCH_CHECK(is_float_dtype(st), op, ": ", name, " must be float32, float16 or bfloat16 (float64 on CPU), got ",
                  torch::headeronly::toString(st));
  STD_TORCH_CHECK(!(st == ScalarType::Double && t.is_cuda()), op, ": ", name,
                  " is float64 on CUDA; the CUDA kernels take float32, float16 or bfloat16");
}

inline void check_same_dtype(const char* op, const Tensor& a, const char* an, const Tensor& b, const char* bn) {
  STD_TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", an, " and ", bn, " must have the same dtype, got ",
                  torch::headeronly::toString(a.scalar_type()), " and ", torch::headeronly::toString(b.scalar_type()));
}

inline void check_same_device(const char* op, const Tensor& a, const char* an, const Tensor& b, const char* bn) {
  const bool same = a.is_cuda() == b.is_cuda() && (!a.is_cuda() || a.get_device_index() == b.get_device_index());
  STD_TORCH_CHECK(same, op, ": ", an, " (", device_name(a), ") and ", bn, " (", device_name(b),
                  ") must be on the same device");
}

// The accumulation ("companion") dtype of a float dtype: float64 for float64, float32 otherwise.
inline ScalarType companion_type(ScalarType st) {
  return st == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

inline const char* float_name(ScalarType st) {
  return st == ScalarType::Double ? "float64" : st == ScalarType::Float ? "float32" : torch::headeronly::toString(st);
}

// t must have ref's companion dtype.
inline void check_companion_dtype(const char* op, const Tensor& t, const char* name, const Tensor& ref,
                                  const char* ref_name) {
  const ScalarType want = companion_type(ref.scalar_type());
  STD_TORCH_CHECK(t.scalar_type() == want, op, ": ", name, " must be ", float_name(want), " (", name,
                  " is float64 iff ", ref_name, " is float64, float32 otherwise), got ", float_name(t.scalar_type()));
}

// Shape of an op's output: x's leading dims followed by `last`.
inline std::vector<int64_t> out_shape_like(const Tensor& x, int64_t last) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = last;
  return shape;
}

inline bool has_shape_like(const Tensor& t, const Tensor& x, int64_t last) {
  const auto want = out_shape_like(x, last);
  bool ok = t.dim() == static_cast<int64_t>(want.size());
  for (int64_t i = 0; ok && i < t.dim(); ++i) ok = t.size(i) == want[static_cast<size_t>(i)];
  return ok;
}

// grad_out of a backward op: x's dtype and device, shape (x's leading dims, last).
inline void check_grad_out(const char* op, const Tensor& grad_out, const Tensor& x, int64_t last) {
  check_same_dtype(op, grad_out, "grad_out", x, "x");
  check_same_device(op, grad_out, "grad_out", x, "x");
  STD_TORCH_CHECK(has_shape_like(grad_out, x, last), op, ": grad_out must have the output's shape (x's leading dims, ",
                  last, ")");
}

}  // namespace lowrank
