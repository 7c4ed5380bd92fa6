// dtype dispatch for the CPU kernels: calls f with a value of the storage type.
#pragma once
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <cmath>
#include <type_traits>

#include "common/checks.h"

namespace lowrank {

template <typename F>
void dispatch_float(ScalarType st, const char* op, F&& f) {
  switch (st) {
    case ScalarType::Float: return f(float{});
    case ScalarType::Double: return f(double{});
    case ScalarType::Half: return f(c10::Half{});
    case ScalarType::BFloat16: return f(c10::BFloat16{});
    default: LOWRANK_CHECK(false, op, ": unsupported dtype (got ", dtype_str(st), ")");
  }
}

// Accumulation type of a storage type: fp64 for float64, fp32 otherwise.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// NaN / Inf test of a storage value (a double is tested as a double: a float cast would overflow to Inf).
template <typename T>
bool is_finite_value(T v) {
  if constexpr (std::is_same_v<T, double>)
    return std::isfinite(v);
  else
    return std::isfinite(static_cast<float>(v));
}

template <typename Acc>
constexpr ScalarType acc_scalar_type() {
  return sizeof(Acc) == 8 ? ScalarType::Double : ScalarType::Float;
}

}  // namespace lowrank
