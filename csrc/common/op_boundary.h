// The boundary between the dispatcher and a kernel: LOWRANK_BOX(op_name, kernel) is TORCH_BOX(kernel) with
// the kernel wrapped so that what escapes it reads `lowrank.<op>: ...` like every argument check:
//  * AllocError (common/checks.h: new_empty, empty, contiguous) gets the op's name in front;
//  * std::bad_alloc (a host std::vector or aligned buffer) becomes "out of host memory";
//  * a torch call that failed inside the stable ABI arrives as "<call> API call failed at <path>, line N"
//    (the shim keeps the original message to itself before torch 2.13): the path is dropped, the call kept.
// op_name must be a `constexpr char[]` (a template argument).
#pragma once
#include <torch/csrc/stable/library.h>

#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "common/checks.h"

namespace lowrank::detail {

[[noreturn]] inline void rethrow_at_boundary(const char* op) {
  try {
    throw;
  } catch (const AllocError& e) {
    throw std::runtime_error(concat(op, ": ", e.what()));
  } catch (const std::bad_alloc&) {
    throw std::runtime_error(concat(op, ": out of host memory (a scratch buffer could not be allocated)"));
  } catch (const std::runtime_error& e) {
    const std::string what = e.what();
    const size_t at = what.find(" API call failed at ");
    if (at == std::string::npos) throw;
    const std::string call = what.substr(0, what.find('('));
    throw std::runtime_error(concat(op, ": a torch runtime call failed (", call,
                                    "; often out of memory, the stable ABI does not pass the cause on)"));
  }
}

template <typename Sig>
struct Guarded;

template <typename R, typename... A>
struct Guarded<R(A...)> {
  template <R (*F)(A...), const char* Op>
  static R call(A... args) {
    try {
      return F(std::move(args)...);
    } catch (...) {
      rethrow_at_boundary(Op);
    }
  }
};

}  // namespace lowrank::detail

#define LOWRANK_BOX(op_name, func) \
  TORCH_BOX((&::lowrank::detail::Guarded<std::remove_pointer_t<decltype(&func)>>::template call<&func, op_name>))
