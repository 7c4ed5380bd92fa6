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
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>

#include "common/checks.h"

namespace lowrank {

constexpr int kGemmMR = 6;

template <typename T>
struct Operand {
  T* ptr;
  int64_t gs, rs, cs;  // group, row and column strides in elements
  T& at(int64_t g, int64_t r, int64_t c) const { return ptr[g * gs + r * rs + c * cs]; }
  Operand shifted(int64_t g, int64_t r, int64_t c) const { return Operand{&at(g, r, c), gs, rs, cs}; }
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

// AVX2 transposing pack (float source with k stride 1, W = 6 or 16), or null where the CPU lacks AVX2.
using PackTransposedF32 = void (*)(float*, const float*, int64_t, int64_t, int64_t, int64_t);
PackTransposedF32 pack_transposed_f32();

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
template <typename T>
std::unique_ptr<T, FreeDeleter> aligned_buffer(int64_t n) {
  const size_t bytes = ((static_cast<size_t>(n) * sizeof(T) + 63) / 64) * 64;
  T* p = static_cast<T*>(std::aligned_alloc(64, bytes));
  if (p == nullptr)  // the op boundary (op_boundary.h) names the op; inside parallel_for torch reports it
    throw AllocError(concat("could not allocate a scratch buffer of ", bytes, " bytes (cpu)"));
  return std::unique_ptr<T, FreeDeleter>(p);
}
}  // namespace detail

// Pack a [width x klen] strided view into ceil(width / W) k-major strips of width W, zero-padded:
// strip t holds dst[t·klen·W + k·W + w] = src(t·W + w, k). The loop order follows the smaller stride, and
// when that is the w stride every source row segment is read once for all strips (rows of a large
// power-of-two stride would otherwise evict each other from the cache between strips).
template <int64_t W, typename Acc, typename T>
void pack_strips(Acc* dst, const T* src, int64_t w_stride, int64_t k_stride, int64_t width, int64_t klen) {
  const int64_t strips = (width + W - 1) / W;
  const int64_t padded = strips * W;
  if constexpr (std::is_same_v<Acc, float> && std::is_same_v<T, float> && (W == 6 || W == 16)) {
    static const detail::PackTransposedF32 fast = detail::pack_transposed_f32();
    if (fast != nullptr && k_stride == 1 && w_stride > 1) return fast(dst, src, w_stride, width, klen, W);
  }
  if (w_stride < k_stride) {
    for (int64_t k = 0; k < klen; ++k) {
      const T* s = src + k * k_stride;
      Acc* d = dst + k * W;
      for (int64_t t = 0; t < strips; ++t, d += klen * W) {
        const int64_t w0 = t * W, n = std::min(W, width - w0);
        if (w_stride == 1) {
          for (int64_t w = 0; w < n; ++w) d[w] = static_cast<Acc>(s[w0 + w]);
        } else {
          for (int64_t w = 0; w < n; ++w) d[w] = static_cast<Acc>(s[(w0 + w) * w_stride]);
        }
        for (int64_t w = n; w < W; ++w) d[w] = Acc(0);
      }
    }
  } else {
    for (int64_t w = 0; w < padded; ++w) {
      Acc* d = dst + (w / W) * klen * W + w % W;
      if (w < width) {
        const T* s = src + w * w_stride;
        for (int64_t k = 0; k < klen; ++k) d[k * W] = static_cast<Acc>(s[k * k_stride]);
      } else {
        for (int64_t k = 0; k < klen; ++k) d[k * W] = Acc(0);
      }
    }
  }
}

// Tile sizes and per-thread buffers. Acc: float or double.
template <typename Acc>
struct GemmWorkspace {
  static constexpr int64_t MR = kGemmMR;
  static constexpr int64_t NR = 64 / sizeof(Acc);  // two 256-bit vectors
  static constexpr int64_t MC = 16 * MR, MT = 2 * MC, NC = 64 * NR, KC = 256;
  // Buffers are allocated on first use: B's is never needed when B comes pre-packed, and the C tile's
  // size follows the largest tile asked for (rows may exceed MT when the caller asks).
  Acc* a_buffer() { return grow(a, a_size, MC * KC); }
  Acc* b_buffer() { return grow(b, b_size, KC * NC); }
  Acc* c_buffer(int64_t elems) { return grow(c, c_size, elems); }

 private:
  std::unique_ptr<Acc, detail::FreeDeleter> a, b, c;
  int64_t a_size = 0, b_size = 0, c_size = 0;
  static Acc* grow(std::unique_ptr<Acc, detail::FreeDeleter>& buf, int64_t& size, int64_t elems) {
    if (elems > size) buf = detail::aligned_buffer<Acc>(size = elems);
    return buf.get();
  }
};

// Row stride of a C tile buffer holding `width` columns: rounded up to NR, plus one NR strip when the
// row pitch is a multiple of 1 KiB, so that the micro-kernel's 6 C rows fall in different L1 sets (a
// 4 KiB pitch puts all 12 of their lines in one 8-way set: conflict misses on every call).
template <typename Acc>
int64_t c_buffer_ld(int64_t width) {
  constexpr int64_t NR = GemmWorkspace<Acc>::NR;
  const int64_t ld = (width + NR - 1) / NR * NR;
  return (ld * int64_t(sizeof(Acc))) % 1024 == 0 ? ld + NR : ld;
}

// Pack a whole K x N operand (K <= KC, N <= NC) once, for gemm_tile calls that reuse it.
template <typename Acc, typename TB>
void pack_b(Acc* dst, int64_t K, int64_t N, Operand<const TB> B) {
  constexpr int64_t NR = GemmWorkspace<Acc>::NR;
  pack_strips<NR, Acc>(dst, B.ptr, B.cs, B.rs, N, K);
}

// One C tile, serially: C[mlen x nlen] = A[mlen x K] · B[K x nlen] (operands already offset to the tile),
// nlen <= NC (mlen above MT grows the workspace's C buffer). A task owns the whole tile in an Acc buffer,
// so one packed B slice serves up to several packed A blocks. packed_b, if given, is B already packed: per KC slice of K, ceil(nlen / NR)
// strips of klen x NR (pack_b's layout when K <= KC). accumulate: C += alpha·A·B, else C = alpha·A·B.
// TA/TB/TC: storage types (float, double, c10::Half, c10::BFloat16).
template <typename Acc, typename TA, typename TB, typename TC>
void gemm_tile(int64_t mlen, int64_t nlen, int64_t K, Operand<const TA> A, Operand<const TB> B, Operand<TC> C,
               GemmWorkspace<Acc>& ws, const Acc* packed_b = nullptr, bool accumulate = false, Acc alpha = Acc(1)) {
  using W = GemmWorkspace<Acc>;
  constexpr int64_t MR = W::MR, NR = W::NR, MC = W::MC, KC = W::KC;
  Acc* Ap = ws.a_buffer();
  const int64_t n_strips = (nlen + NR - 1) / NR, ldb = n_strips * NR, ldc = c_buffer_ld<Acc>(nlen);
  Acc* Cb = ws.c_buffer((mlen + MR - 1) / MR * MR * ldc);
  std::memset(Cb, 0, sizeof(Acc) * ((mlen + MR - 1) / MR * MR) * ldc);  // incl. the last strip's slack rows
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t klen = std::min(KC, K - k0);
    const Acc* Bp = packed_b == nullptr ? nullptr : packed_b + (k0 / KC) * KC * ldb;
    if (Bp == nullptr) {
      Acc* Bw = ws.b_buffer();
      pack_strips<NR, Acc>(Bw, &B.at(0, k0, 0), B.cs, B.rs, nlen, klen);
      Bp = Bw;
    }
    for (int64_t mb = 0; mb < mlen; mb += MC) {
      const int64_t mblen = std::min(MC, mlen - mb), m_strips = (mblen + MR - 1) / MR;
      pack_strips<MR, Acc>(Ap, &A.at(0, mb, k0), A.rs, A.cs, mblen, klen);
      for (int64_t sn = 0; sn < n_strips; ++sn)
        for (int64_t sm = 0; sm < m_strips; ++sm)
          detail::micro_kernel(klen, Ap + sm * klen * MR, Bp + sn * klen * NR, Cb + (mb + sm * MR) * ldc + sn * NR,
                               ldc);
    }
  }
  for (int64_t r = 0; r < mlen; ++r) {
    TC* dst = &C.at(0, r, 0);
    const Acc* src = Cb + r * ldc;
    if (accumulate) {
      for (int64_t c = 0; c < nlen; ++c)
        dst[c * C.cs] = static_cast<TC>(static_cast<Acc>(dst[c * C.cs]) + alpha * src[c]);
    } else {
      for (int64_t c = 0; c < nlen; ++c) dst[c * C.cs] = static_cast<TC>(alpha * src[c]);
    }
  }
}

// Run fn(worker, task) for task < n on torch's thread pool, each worker taking the next task from a shared
// counter: tasks of unequal cost, or a worker whose core is busy elsewhere, then cost no idle wait at the
// end (a static split into equal ranges would). fn(worker, ...) may keep per-worker state in
// make_state(), built once per worker.
template <typename MakeState, typename Fn>
void parallel_tasks(int64_t n, MakeState&& make_state, Fn&& fn) {
  if (n <= 0) return;
  const int64_t workers = std::min<int64_t>(n, std::max<int64_t>(1, torch::stable::get_num_threads()));
  std::atomic<int64_t> next{0};
  auto run = [&]() {
    if (next.load(std::memory_order_relaxed) >= n) return;  // nothing left (e.g. run inline, nested)
    auto state = make_state();
    for (int64_t t = next.fetch_add(1, std::memory_order_relaxed); t < n;
         t = next.fetch_add(1, std::memory_order_relaxed))
      fn(state, t);
  };
  if (workers == 1) return run();
  torch::stable::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) run();
  });
}

// Split `len` into ceil(len / max_tile) tiles of about equal size, each a multiple of `align` (the last one
// may be shorter): 256 rows with MT = 192 become 2 x 128, not 192 + 64. With workers > 1 the tile count is
// first rounded up to a multiple of it (1024 rows, at most 96 each, 2 workers: 12 tiles of 90, not 11 of 96
// that leave one worker a tile behind).
inline int64_t balanced_tile(int64_t len, int64_t max_tile, int64_t align, int64_t workers = 1) {
  int64_t tiles = std::max<int64_t>(1, (len + max_tile - 1) / max_tile);
  if (workers > 1) tiles = (tiles + workers - 1) / workers * workers;
  const int64_t even = (len + tiles - 1) / tiles;
  return std::min(max_tile, (even + align - 1) / align * align);
}

// Up to this many rows, strided_batched_gemm gives each task all M rows (see there).
constexpr int64_t kWholeM = 512;

// for g < G: C_g = alpha · A_g · B_g. B is packed once for the whole call (every task of a row range would
// otherwise repack it), then tasks of at most MT x NC tiles of C spread over torch's thread pool.
template <typename Acc, typename TA, typename TB, typename TC>
void strided_batched_gemm(int64_t G, int64_t M, int64_t N, int64_t K, Operand<const TA> A, Operand<const TB> B,
                          Operand<TC> C, Acc alpha = Acc(1)) {
  using W = GemmWorkspace<Acc>;
  if (G <= 0 || M <= 0 || N <= 0) return;
  const int64_t threads = std::max<int64_t>(1, torch::stable::get_num_threads());
  const int64_t nt_w = balanced_tile(N, W::NC, W::NR), n_tiles = (N + nt_w - 1) / nt_w;
  const int64_t whole_tasks = G * n_tiles;
  if (M <= kWholeM && whole_tasks >= threads && (whole_tasks % threads == 0 || whole_tasks >= 4 * threads)) {
    // Few rows and enough (group, column tile) tasks to keep every thread busy to the end: one task per
    // tile of all M rows, packing its B slices as it goes, so B is read once, straight into the cache that
    // uses it. (A whole-B pre-pack would write and re-read a B-sized copy, from memory for large B.)
    parallel_tasks(
        whole_tasks, [] { return std::make_unique<W>(); },
        [&](std::unique_ptr<W>& ws, int64_t task) {
          const int64_t g = task / n_tiles, n0 = task % n_tiles * nt_w;
          gemm_tile<Acc>(M, std::min(nt_w, N - n0), K, A.shifted(g, 0, 0), B.shifted(g, 0, n0),
                         C.shifted(g, 0, n0), *ws, nullptr, false, alpha);
        });
    return;
  }
  const int64_t mt = balanced_tile(M, W::MT, W::MR);
  const int64_t m_tiles = (M + mt - 1) / mt;
  const int64_t k_blocks = std::max<int64_t>(1, (K + W::KC - 1) / W::KC);
  const int64_t last_n = N - (n_tiles - 1) * nt_w;
  const int64_t group_size = (n_tiles - 1) * K * nt_w + K * ((last_n + W::NR - 1) / W::NR * W::NR);
  auto packed = detail::aligned_buffer<Acc>(std::max<int64_t>(1, G * group_size));
  auto panel = [&](int64_t g, int64_t nt) { return packed.get() + g * group_size + nt * K * nt_w; };
  parallel_tasks(
      G * n_tiles * k_blocks, [] { return 0; },
      [&](int, int64_t t) {
        const int64_t g = t / (n_tiles * k_blocks), nt = t / k_blocks % n_tiles, kb = t % k_blocks;
        const int64_t n0 = nt * nt_w, nlen = std::min(nt_w, N - n0), k0 = kb * W::KC;
        const int64_t ldc = (nlen + W::NR - 1) / W::NR * W::NR;
        if (k0 < K)
          pack_strips<W::NR, Acc>(panel(g, nt) + k0 * ldc, &B.at(g, k0, n0), B.cs, B.rs, nlen,
                                  std::min(W::KC, K - k0));
      });
  parallel_tasks(
      G * m_tiles * n_tiles, [] { return std::make_unique<W>(); },
      [&](std::unique_ptr<W>& ws, int64_t task) {
        const int64_t g = task / (m_tiles * n_tiles);
        const int64_t m0 = (task / n_tiles) % m_tiles * mt, nt = task % n_tiles, n0 = nt * nt_w;
        gemm_tile<Acc>(std::min(mt, M - m0), std::min(nt_w, N - n0), K, A.shifted(g, m0, 0), B.shifted(g, 0, n0),
                       C.shifted(g, m0, n0), *ws, panel(g, nt), false, alpha);
      });
}

}  // namespace lowrank
