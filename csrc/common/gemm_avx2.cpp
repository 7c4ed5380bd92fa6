// AVX2+FMA build of the CPU GEMM micro-kernels (this file alone is compiled with -mavx2 -mfma; it is
// called only after a CPUID check in gemm_cpu.cpp).
#include "common/cpu_gemm.h"

#include <immintrin.h>
#include <type_traits>

namespace lowrank {
#define LOWRANK_MICROKERNEL_NS avx2
#define LOWRANK_MICROKERNEL_AVX2 1  // the intrinsics copy (a global -mavx2 alone must not pick it)
#include "common/cpu_microkernel.inc"
#undef LOWRANK_MICROKERNEL_AVX2
#undef LOWRANK_MICROKERNEL_NS
}  // namespace lowrank
