// Portable micro-kernels and the run-time choice between them and the AVX2+FMA copies.
#include "common/cpu_gemm.h"

#include <type_traits>

namespace lowrank {
#define LOWRANK_MICROKERNEL_NS portable
#include "common/cpu_microkernel.inc"
#undef LOWRANK_MICROKERNEL_NS

#if defined(LOWRANK_HAVE_AVX2_TU)
namespace avx2 {
void micro_kernel_f32(int64_t, const float*, const float*, float*, int64_t);
void micro_kernel_f64(int64_t, const double*, const double*, double*, int64_t);
void pack_transposed_f32(float*, const float*, int64_t, int64_t, int64_t, int64_t);
}  // namespace avx2
static bool cpu_has_avx2_fma() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
#endif

namespace detail {
MicroKernelF32 micro_kernel_f32() {
#if defined(LOWRANK_HAVE_AVX2_TU)
  if (cpu_has_avx2_fma()) return &avx2::micro_kernel_f32;
#endif
  return &portable::micro_kernel_f32;
}
MicroKernelF64 micro_kernel_f64() {
#if defined(LOWRANK_HAVE_AVX2_TU)
  if (cpu_has_avx2_fma()) return &avx2::micro_kernel_f64;
#endif
  return &portable::micro_kernel_f64;
}
PackTransposedF32 pack_transposed_f32() {
#if defined(LOWRANK_HAVE_AVX2_TU)
  if (cpu_has_avx2_fma()) return &avx2::pack_transposed_f32;
#endif
  return nullptr;
}
}  // namespace detail
}  // namespace lowrank
