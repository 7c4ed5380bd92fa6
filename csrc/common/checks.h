// Input validation shared by every op and backend: each failure names the op, the argument and what
// was expected, and surfaces in Python as a RuntimeError (never a crash or a silent wrong result).
#pragma once
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <string>

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

}  // namespace lowrank
