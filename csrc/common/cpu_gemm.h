// CPU strided batched GEMM engine shared by every op family's CPU kernels.
//   for g < G:  C_g[M x N] = A_g[M x K] · B_g[K x N]
// Every operand element sits at ptr + g·gs + row·rs + col·cs (64-bit strides, any sign-free layout), so
// transposes, gathers by a fixed stride and the Monarch permutations are addressing, not copies.
// Blocking is GotoBLAS-style: a task owns an MC x NC tile of C in an fp32 (fp64) buffer, loops over K in
// KC slices, packs A into MR-row strips and B into NR-column strips (converting to the accumulation type),
// and runs a register-blocked micro-kernel (AVX2+FMA when the CPU has it). Tasks run on torch's thread pool.
#pragma once
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>

namespace lowrank {

constexpr int kGemmMR = 6;

template <typename T>
struct Operand {
  T* ptr;
  int64_t gs, rs, cs;  // group, row and column strides in elements
  T& at(int64_t g, int64_t r, int64_t c) const { return ptr[g * gs + r * rs + c * cs]; }
};

template <typename T>
Operand<T> operand(T* ptr, int64_t gs, int64_t rs, int64_t cs) {
  return Operand<T>{ptr, gs, rs, cs};
}

namespace detail {
using MicroKernelF32 = void (*)(int64_t, const float*, const float*, float*, int64_t);
using MicroKernelF64 = void (*)(int64_t, const double*, const double*, double*, int64_t);
MicroKernelF32 micro_kernel_f32();  // picked once by CPUID
MicroKernelF64 micro_kernel_f64();
inline void micro_kernel(int64_t kc, const float* a, const float* b, float* c, int64_t ldc) {
  static const MicroKernelF32 fn = micro_kernel_f32();
  fn(kc, a, b, c, ldc);
}
inline void micro_kernel(int64_t kc, const double* a, const double* b, double* c, int64_t ldc) {
  static const MicroKernelF64 fn = micro_kernel_f64();
  fn(kc, a, b, c, ldc);
}

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
template <typename T>
std::unique_ptr<T, FreeDeleter> aligned_buffer(int64_t n) {
  const size_t bytes = ((static_cast<size_t>(n) * sizeof(T) + 63) / 64) * 64;
  return std::unique_ptr<T, FreeDeleter>(static_cast<T*>(std::aligned_alloc(64, bytes)));
}
}  // namespace detail

// Pack rows [0, rows) x cols [0, cols) of a strided view into a k-major strip of width W (zero-padded):
// dst[k * W + w] = src(w, k). The loop order follows the smaller stride so reads stay in cache lines.
template <typename Acc, typename T>
void pack_strip(Acc* dst, const T* src, int64_t w_stride, int64_t k_stride, int64_t width, int64_t W, int64_t klen) {
  if (w_stride < k_stride) {
    for (int64_t k = 0; k < klen; ++k) {
      const T* s = src + k * k_stride;
      int64_t w = 0;
      for (; w < width; ++w) dst[k * W + w] = static_cast<Acc>(s[w * w_stride]);
      for (; w < W; ++w) dst[k * W + w] = Acc(0);
    }
  } else {
    for (int64_t w = 0; w < W; ++w) {
      if (w < width) {
        const T* s = src + w * w_stride;
        for (int64_t k = 0; k < klen; ++k) dst[k * W + w] = static_cast<Acc>(s[k * k_stride]);
      } else {
        for (int64_t k = 0; k < klen; ++k) dst[k * W + w] = Acc(0);
      }
    }
  }
}

// Acc: float or double. TA/TB/TC: storage types (float, double, c10::Half, c10::BFloat16).
// A task owns an MT x NC tile of C (MT = 4 MC rows) so one packed B slice serves 4 packed A blocks.
template <typename Acc, typename TA, typename TB, typename TC>
void strided_batched_gemm(int64_t G, int64_t M, int64_t N, int64_t K, Operand<const TA> A, Operand<const TB> B,
                          Operand<TC> C) {
  constexpr int64_t MR = kGemmMR;
  constexpr int64_t NR = 64 / sizeof(Acc);  // two 256-bit vectors
  constexpr int64_t MC = 16 * MR, MT = 4 * MC, NC = 16 * NR, KC = 256;
  if (G <= 0 || M <= 0 || N <= 0) return;
  const int64_t m_tiles = (M + MT - 1) / MT, n_tiles = (N + NC - 1) / NC;
  const int64_t tasks = G * m_tiles * n_tiles;
  torch::stable::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    auto a_buf = detail::aligned_buffer<Acc>(MC * KC);
    auto b_buf = detail::aligned_buffer<Acc>(KC * NC);
    auto c_buf = detail::aligned_buffer<Acc>(MT * NC);
    Acc* Ap = a_buf.get();
    Acc* Bp = b_buf.get();
    Acc* Cb = c_buf.get();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / (m_tiles * n_tiles);
      const int64_t m0 = (task / n_tiles) % m_tiles * MT, n0 = task % n_tiles * NC;
      const int64_t mlen = std::min(MT, M - m0), nlen = std::min(NC, N - n0);
      const int64_t n_strips = (nlen + NR - 1) / NR, ldc = n_strips * NR;
      std::memset(Cb, 0, sizeof(Acc) * ((mlen + MR - 1) / MR * MR) * ldc);  // incl. the last strip's slack rows
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t klen = std::min(KC, K - k0);
        for (int64_t st = 0; st < n_strips; ++st)
          pack_strip<Acc>(Bp + st * klen * NR, &B.at(g, k0, n0 + st * NR), B.cs, B.rs,
                          std::min(NR, nlen - st * NR), NR, klen);
        for (int64_t mb = 0; mb < mlen; mb += MC) {
          const int64_t mblen = std::min(MC, mlen - mb), m_strips = (mblen + MR - 1) / MR;
          for (int64_t st = 0; st < m_strips; ++st)
            pack_strip<Acc>(Ap + st * klen * MR, &A.at(g, m0 + mb + st * MR, k0), A.rs, A.cs,
                            std::min(MR, mblen - st * MR), MR, klen);
          for (int64_t sn = 0; sn < n_strips; ++sn)
            for (int64_t sm = 0; sm < m_strips; ++sm)
              detail::micro_kernel(klen, Ap + sm * klen * MR, Bp + sn * klen * NR,
                                   Cb + (mb + sm * MR) * ldc + sn * NR, ldc);
        }
      }
      for (int64_t r = 0; r < mlen; ++r) {
        TC* dst = &C.at(g, m0 + r, n0);
        const Acc* src = Cb + r * ldc;
        for (int64_t c = 0; c < nlen; ++c) dst[c * C.cs] = static_cast<TC>(src[c]);
      }
    }
  });
}

}  // namespace lowrank
