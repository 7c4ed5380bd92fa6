// Input validation shared by every op and backend: each failure names the op, the argument and what
// was expected, and surfaces in Python as a RuntimeError (never a crash or a silent wrong result).
//
// Messages read `lowrank.<op>: <argument> <problem> (<what was given>)`. LOWRANK_CHECK throws a plain
// std::runtime_error with exactly that text: STD_TORCH_CHECK would prefix the C++ function name and this
// file's build-machine path, and the stable ABI's boxed-kernel path hands what() to Python unchanged.
// Allocations go through new_empty / empty / contiguous below, which throw AllocError (the size, shape,
// dtype and device); the registration wrapper LOWRANK_BOX (op_boundary.h) prefixes the op's name to it and
// to std::bad_alloc.
#pragma once
#include <torch/csrc/stable/device.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cstdint>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace lowrank {

using torch::stable::Tensor;
using torch::headeronly::ScalarType;

namespace detail {
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream oss;
  ((oss << args), ...);
  return std::move(oss).str();
}
}  // namespace detail

// An allocation that failed: what, how many bytes, on which device (the op's name is added at the boundary).
struct AllocError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace lowrank

#define LOWRANK_CHECK(cond, ...)                                                  \
  do {                                                                            \
    if (!(cond)) throw std::runtime_error(::lowrank::detail::concat(__VA_ARGS__)); \
  } while (0)

namespace lowrank {

inline std::string device_str(const Tensor& t) {
  const auto dev = t.device();
  const auto type = dev.type();
  std::string name = type == torch::headeronly::DeviceType::CPU    ? "cpu"
                     : type == torch::headeronly::DeviceType::CUDA ? "cuda"
                     : type == torch::headeronly::DeviceType::Meta ? "meta"
                                                                   : detail::concat("device type ", int(type));
  if (type != torch::headeronly::DeviceType::CPU && dev.index() >= 0) name += detail::concat(":", int(dev.index()));
  return name;
}

// Kept for the kernels' own "got a tensor on ..." messages.
inline std::string device_name(const Tensor& t) { return device_str(t); }

inline std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream oss;
  oss << "(";
  for (size_t i = 0; i < shape.size(); ++i) oss << (i ? ", " : "") << shape[i];
  oss << (shape.size() == 1 ? ",)" : ")");
  return std::move(oss).str();
}

inline std::string shape_str(const Tensor& t) { return shape_str(std::vector<int64_t>(t.sizes().begin(), t.sizes().end())); }

inline const char* dtype_str(ScalarType st) {
  switch (st) {
    case ScalarType::Float: return "float32";
    case ScalarType::Double: return "float64";
    case ScalarType::Half: return "float16";
    case ScalarType::BFloat16: return "bfloat16";
    case ScalarType::Int: return "int32";
    case ScalarType::Long: return "int64";
    case ScalarType::Byte: return "uint8";
    case ScalarType::Char: return "int8";
    case ScalarType::Short: return "int16";
    case ScalarType::Bool: return "bool";
    default: return torch::headeronly::toString(st);
  }
}

inline size_t dtype_size(ScalarType st) {
  switch (st) {
    case ScalarType::Double:
    case ScalarType::Long: return 8;
    case ScalarType::Half:
    case ScalarType::BFloat16: return 2;
    case ScalarType::Byte:
    case ScalarType::Char:
    case ScalarType::Bool: return 1;
    default: return 4;
  }
}

// --------------------------------------------------------------------------------------- allocation
namespace detail {
[[noreturn]] inline void throw_alloc(const std::vector<int64_t>& shape, ScalarType st, const std::string& device,
                                     const char* what) {
  double bytes = static_cast<double>(dtype_size(st));
  for (int64_t s : shape) bytes *= static_cast<double>(s);
  throw AllocError(concat("could not allocate ", what, " of ", static_cast<unsigned long long>(bytes), " bytes (",
                          shape_str(shape), " ", dtype_str(st), " on ", device, ")"));
}
}  // namespace detail

// torch::stable::new_empty / empty / contiguous that fail with an AllocError naming the size.
inline Tensor new_empty(const Tensor& like, torch::headeronly::IntHeaderOnlyArrayRef shape,
                        std::optional<ScalarType> dtype = std::nullopt) {
  try {
    return torch::stable::new_empty(like, shape, dtype);
  } catch (const std::exception&) {
    detail::throw_alloc(std::vector<int64_t>(shape.begin(), shape.end()), dtype.value_or(like.scalar_type()),
                        device_str(like), "a tensor");
  }
}

// A CPU scratch buffer.
inline Tensor empty(torch::headeronly::IntHeaderOnlyArrayRef shape, ScalarType dtype) {
  try {
    return torch::stable::empty(shape, dtype);
  } catch (const std::exception&) {
    detail::throw_alloc(std::vector<int64_t>(shape.begin(), shape.end()), dtype, "cpu", "a scratch buffer");
  }
}

// t itself when contiguous, else a contiguous copy. An expanded (zero-stride) input is copied at its full
// size; when that copy cannot be allocated the error names the argument, its shape and its strides.
inline Tensor contiguous(const Tensor& t, const char* name) {
  if (t.is_contiguous()) return t;
  try {
    return torch::stable::contiguous(t);
  } catch (const std::exception&) {
    const std::vector<int64_t> st(t.strides().begin(), t.strides().end());
    double bytes = static_cast<double>(t.element_size());
    for (int64_t i = 0; i < t.dim(); ++i) bytes *= static_cast<double>(t.size(i));
    throw AllocError(detail::concat(name, " could not be made contiguous: the copy needs ",
                                    static_cast<unsigned long long>(bytes), " bytes (", name, " of shape ",
                                    shape_str(t), ", strides ", shape_str(st), ", ", dtype_str(t.scalar_type()),
                                    " on ", device_str(t), "; an expanded input is copied at its full size)"));
  }
}

// ----------------------------------------------------------------------------------------- argument checks
inline bool is_float_dtype(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Half || t == ScalarType::BFloat16 || t == ScalarType::Double;
}

inline void check_dim(const char* op, const Tensor& t, const char* name, int64_t dim, const char* layout) {
  LOWRANK_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D ", layout, " (got a ", t.dim(),
                "-D tensor of shape ", shape_str(t), ")");
}

// float32 / float16 / bfloat16 everywhere, float64 on the CPU only.
inline void check_float_dtype(const char* op, const Tensor& t, const char* name) {
  const ScalarType st = t.scalar_type();
  LOWRANK_CHECK(is_float_dtype(st), op, ": ", name, " must be float32, float16 or bfloat16, or float64 on CPU (got ",
                dtype_str(st), ")");
  LOWRANK_CHECK(!(st == ScalarType::Double && t.is_cuda()), op, ": ", name,
                " must be float32, float16 or bfloat16 (got float64 on CUDA; float64 is CPU only)");
}

inline void check_same_dtype(const char* op, const Tensor& a, const char* an, const Tensor& b, const char* bn) {
  LOWRANK_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", bn, " must have ", an, "'s dtype (got ", an, " ",
                dtype_str(a.scalar_type()), ", ", bn, " ", dtype_str(b.scalar_type()), ")");
}

// Device type and index both compare (meta, cpu and cuda:i are all distinct).
inline void check_same_device(const char* op, const Tensor& a, const char* an, const Tensor& b, const char* bn) {
  LOWRANK_CHECK(a.device() == b.device(), op, ": ", bn, " must be on ", an, "'s device (got ", an, " on ",
                device_str(a), ", ", bn, " on ", device_str(b), ")");
}

// Byte ranges [first, last] the elements of a and b can occupy intersect (same device): a tensor updated in
// place must not share memory with one read in the same pass, whether passed twice or as a view.
inline bool may_overlap(const Tensor& a, const Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !(a.device() == b.device())) return false;
  auto range = [](const Tensor& t) {
    int64_t lo = 0, hi = 0;  // element offsets from data_ptr
    for (int64_t i = 0; i < t.dim(); ++i) (t.stride(i) < 0 ? lo : hi) += (t.size(i) - 1) * t.stride(i);
    const auto base = reinterpret_cast<uintptr_t>(t.data_ptr());
    const auto es = static_cast<int64_t>(t.element_size());
    return std::pair<uintptr_t, uintptr_t>(base + lo * es, base + (hi + 1) * es - 1);
  };
  const auto ra = range(a), rb = range(b);
  return ra.first <= rb.second && rb.first <= ra.second;
}

inline void check_no_overlap(const char* op, const Tensor& written, const char* wname, const Tensor& read,
                             const char* rname) {
  LOWRANK_CHECK(!may_overlap(written, read), op, ": ", rname, " must not share memory with ", wname, ", which is",
                " updated in place (got ", rname, " overlapping ", wname, "; pass a copy)");
}

// The accumulation ("companion") dtype of a float dtype: float64 for float64, float32 otherwise.
inline ScalarType companion_type(ScalarType st) {
  return st == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

inline const char* float_name(ScalarType st) { return dtype_str(st); }

// t must have ref's companion dtype.
inline void check_companion_dtype(const char* op, const Tensor& t, const char* name, const Tensor& ref,
                                  const char* ref_name) {
  const ScalarType want = companion_type(ref.scalar_type());
  LOWRANK_CHECK(t.scalar_type() == want, op, ": ", name, " must be ", float_name(want), ", float64 iff ", ref_name,
                " is float64 (got ", name, " ", dtype_str(t.scalar_type()), ", ", ref_name, " ",
                dtype_str(ref.scalar_type()), ")");
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
  check_same_dtype(op, x, "x", grad_out, "grad_out");
  check_same_device(op, x, "x", grad_out, "grad_out");
  LOWRANK_CHECK(has_shape_like(grad_out, x, last), op, ": grad_out must have the output's shape ",
                shape_str(out_shape_like(x, last)), " (x's leading dims, ", last, ") (got ", shape_str(grad_out), ")");
}

}  // namespace lowrank
