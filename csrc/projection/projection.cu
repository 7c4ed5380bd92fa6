// CUDA kernels of the projection ops (GaLore / Fira / DCT). Every product runs on one tiled fp32 GEMM
// engine (sim_gemm_kernel below) whose epilogue is chosen at compile time:
//   C (M x N) = A (M x K) · B (K x N),  A(i, k) = a[i·a_rs + k·a_ks] (element type TA, converted to fp32 on
//   load), B(k, j) = b[k·b_ks + j·b_ns] (fp32), fp32 FMA accumulation (exact fp32 products, no TF32).
//   Tile 128 x 128 x 8, 256 threads, 8 x 8 outputs per thread (rows ty·4 + {0..3} and 64 + ty·4 + {0..3},
//   columns likewise with tx), register prefetch of the next K slice into double-buffered shared memory.
//   Loads map threads along whichever of an operand's dims has stride 1 (coalesced), zero-fill outside
//   [0, M) x [k_begin, k_end) / [k_begin, k_end) x [0, N); all offsets int64; M, N, K < 2^31 (host check).
// Ops as GEMMs (rows of A are G's rows for a right projection and G's columns for a left one, addressing
// only, so both sides are one code path):
//   galore_project  A = G or Gᵀ, B = Pᵀ or P, K = n or m (split over blockIdx.z when the row tiles do not fill
//                   the GPU; each split writes an fp32 slice, a second kernel adds the slices in split order).
//                   The blocks of output column tile 0 also sum the squares of their A tile from shared
//                   memory: sqnorms come from the same read of G (per split, added in the same reduce).
//   galore_update_  A = M or P, B = P or M, K = r; the epilogue reads W (and G, residual_scale) and writes
//                   W = decay·(W - C - s ⊙ G) in place (SIMT: 4 consecutive columns per 16 / 8-byte access).
//                   Each W element belongs to exactly one thread of one block: no races.
//   basis_scores    A = G or Gᵀ, B = Qᵀ, K = k; the epilogue reduces |C| over the tile's rows (registers, then
//                   16 partial rows in shared memory added in order) into partial[m_tile][col]; a second
//                   kernel adds the m-tile partials in order. Deterministic, no atomics.
//   adam_lowrank_   elementwise, grid-stride.   dct_basis_  one thread per element, cospi in double of
//                   (i·(2j+1) mod 4n) / 2n, exact integer reduction.
// Tensor cores (mma.sync m16n8k8, fp32 accumulate) where a 16-bit type is involved, at fp32-level accuracy:
//   galore_project, bf16 / fp16 G: G is exact in 16 bits, P enters as hi + mid + lo 16-bit terms (three
//     products; fp16: |P| < 1023, see kBScale; an orthonormal P qualifies). galore-torch instead rounds P.
//   galore_update_, bf16 W: M and P both as three bf16 terms, six term products (error ~ an fp32 GEMM's).
// fp32 G / W, fp16 W and basis_scores run SIMT fp32 FMA (exact fp32 products, no TF32); with the environment
// variable LOWRANK_PROJECTION_FP32_TC=1, fp32 G (project) and fp32 W (update) take the six-product bf16 split too.
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/shim_utils.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "common/gemm_runner.cuh"
#include "common/op_boundary.h"
#include "projection/projection_common.h"

namespace lowrank {
namespace {

using namespace cuda_glue;

constexpr int kBM = 128, kBN = 128, kBK = 8, kThreads = 256;
constexpr int kLoads = kBM * kBK / kThreads;  // elements of each operand tile loaded per thread
static_assert(kBM == kBN && kThreads % kBK == 0 && kThreads % kBM == 0, "tile shape");
constexpr int kPadM = kBM + 4, kPadN = kBN + 4;  // row pitch of the k-major smem tiles (bank spread)

enum Epilogue : int { kEpiProject = 0, kEpiUpdate = 1, kEpiScores = 2 };

// plain load (W is read here and written by the same thread later), converted to fp32
template <typename T>
__device__ __forceinline__ float ld_f32(const T* p) {
  return to_f32<T>(*p);
}

struct GemmArgs {
  const void* a;
  int64_t a_rs, a_ks;
  const float* b;
  int64_t b_ks, b_ns;
  int M, N, K, k_per_split;
};

struct EpiArgs {
  // project: C(i, j) of split s -> out[s·split_stride + i·o_rs + j·o_cs]; sq[s·sq_split_stride + i]
  float* out;
  int64_t o_rs, o_cs, split_stride;
  float* sq;
  int64_t sq_split_stride;
  // update: W (M, N) contiguous (ld = N), G likewise, scale per row (scale_per_col = 0) or per column
  void* w;
  const void* g;
  const float* scale;
  int scale_per_col;
  float decay;
  // scores: partial[m_tile·N + j]
  float* partial;
};

// 4 consecutive elements as fp32; vector access when the caller guarantees alignment.
template <typename T>
__device__ __forceinline__ void load4(const T* p, float (&v)[4]) {
  if constexpr (std::is_same<T, float>::value) {
    const float4 x = *reinterpret_cast<const float4*>(p);
    v[0] = x.x, v[1] = x.y, v[2] = x.z, v[3] = x.w;
  } else {
    const uint2 x = *reinterpret_cast<const uint2*>(p);
    T h[4];
    memcpy(h, &x, sizeof(x));
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = ld_f32(&h[j]);
  }
}
template <typename T>
__device__ __forceinline__ void store4(T* p, const float (&v)[4]) {
  if constexpr (std::is_same<T, float>::value) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
    T h[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) h[j] = from_f32<T>(v[j]);
    uint2 x;
    memcpy(&x, h, sizeof(x));
    *reinterpret_cast<uint2*>(p) = x;
  }
}

// Two fp32 values as one register of 16-bit elements (lo = the lower k index), rounded to nearest.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t r;
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    memcpy(&r, &v, sizeof(r));
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    memcpy(&r, &v, sizeof(r));
  }
  return r;
}

template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t r) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    __nv_bfloat162 v;
    memcpy(&v, &r, sizeof(r));
    return __bfloat1622float2(v);
  } else {
    __half2 v;
    memcpy(&v, &r, sizeof(r));
    return __half22float2(v);
  }
}

// x = hi + mid + lo in T (each term the rounding of what the previous ones left; the residuals are exact in
// fp32), so a product with 16-bit A done as three tensor-core products keeps fp32-level accuracy in x.
template <typename T>
__device__ __forceinline__ void split3(float x0, float x1, uint32_t (&out)[3]) {
#pragma unroll
  for (int s = 0; s < 3; ++s) {
    out[s] = pack2<T>(x0, x1);
    const float2 v = unpack2<T>(out[s]);
    x0 -= v.x, x1 -= v.y;
  }
}

// D = A·B + D, m16n8k8, 16-bit inputs, fp32 accumulate. Fragments (g = lane / 4, t = lane % 4):
//   a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1]; b0 = B[2t, 2t+1][g]; c0,c1 = C[g][2t, 2t+1], c2,c3 = C[g+8][2t, 2t+1].
template <typename T>
__device__ __forceinline__ void mma_16816_k8(float& c0, float& c1, float& c2, float& c3, uint32_t a0, uint32_t a1,
                                             uint32_t b0) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, "
                 "{%0, %1, %2, %3};\n"
                 : "+f"(c0), "+f"(c1), "+f"(c2), "+f"(c3)
                 : "r"(a0), "r"(a1), "r"(b0));
  } else {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, "
                 "{%0, %1, %2, %3};\n"
                 : "+f"(c0), "+f"(c1), "+f"(c2), "+f"(c3)
                 : "r"(a0), "r"(a1), "r"(b0));
  }
}

// TA: A's element type. TW / TG: W's and G's types (update only; TG = void: no residual term).
// kFp32Tc: fp32 G (project) / fp32 W (update) also on tensor cores with the three-term bf16 split of both operands
// (env LOWRANK_PROJECTION_FP32_TC=1; default SIMT).
template <typename TA, int kEpi, typename TW, typename TG, bool kFp32Tc>
__global__ void __launch_bounds__(kThreads, 2) sim_gemm_kernel(GemmArgs p, EpiArgs e) {
  __shared__ __align__(16) float smem[2 * kBK * kPadM + 2 * kBK * kPadN];
  float* As = smem;                      // [2][kBK][kPadM]
  float* Bs = smem + 2 * kBK * kPadM;    // [2][kBK][kPadN]
  // 16-bit A in galore_project: tensor cores, A exact, B (P, fp32) as the sum of three 16-bit terms (split3), so R
  // keeps fp32-level accuracy (galore-torch instead rounds P to 16 bits); 8 warps as 2 (M) x 4 (N), each 64 x 32 =
  // 4 x 4 mma tiles. Otherwise SIMT fp32: 16 x 16 threads, 8 x 8 outputs each.
  // galore_update_ with bf16 W: tensor cores too, both fp32 operands (M, P) as three bf16 terms and the six term
  // products with weight >= 2^-16·(hi·hi) (hi·hi, hi·mid, mid·hi, hi·lo, mid·mid, lo·hi): fp32-level back(M).
  // (fp16 W stays on SIMT: fp16's exponent range cannot hold the terms of a small M.)
  constexpr bool kMmaProject = !std::is_same<TA, float>::value && kEpi == kEpiProject;
  constexpr bool kSplitA =
      (kEpi == kEpiUpdate && (std::is_same<TW, __nv_bfloat16>::value || (kFp32Tc && std::is_same<TW, float>::value))) ||
      (kEpi == kEpiProject && kFp32Tc && std::is_same<TA, float>::value);
  constexpr bool kMma = kMmaProject || kSplitA;
  using TM = std::conditional_t<kMmaProject, TA, __nv_bfloat16>;  // the mma input type
  // fp16 B is split after a 2^6 scale (undone on acc before the epilogue; both exact) so the smallest term stays
  // clear of fp16's subnormals for |P| ~ 1/sqrt(n); this needs |P| < 1023.
  constexpr float kBScale = kMmaProject && std::is_same<TA, __half>::value ? 64.f : 1.f;
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int lane = tid & 31, wm = (tid >> 5) & 1, wn = tid >> 6, lg = lane >> 2, lt = lane & 3;
  const int n0 = blockIdx.x * kBN, m0 = blockIdx.y * kBM, split = blockIdx.z;
  const int64_t k_begin = static_cast<int64_t>(split) * p.k_per_split;
  const int64_t k_end = std::min<int64_t>(p.K, k_begin + p.k_per_split);
  const TA* a = static_cast<const TA*>(p.a);
  const bool a_kfast = p.a_ks == 1, b_kfast = p.b_ks == 1;
  const bool want_sq = kEpi == kEpiProject && e.sq != nullptr && blockIdx.x == 0;

  float acc[8][8];
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
  float sq = 0.f;  // thread tid < kBM: Σ A(m0 + tid, k)² over this split's K range

  float ra[kLoads], rb[kLoads];
  // element l (< kLoads) of this thread's share of a tile: (row or col within the tile, k within the tile),
  // consecutive threads along the operand's stride-1 dim
  auto a_pos = [&](int l, int& ii, int& kk) {
    if (a_kfast) {
      kk = tid % kBK, ii = tid / kBK + (kThreads / kBK) * l;
    } else {
      ii = tid % kBM, kk = tid / kBM + (kThreads / kBM) * l;
    }
  };
  auto b_pos = [&](int l, int& jj, int& kk) {
    if (b_kfast) {
      kk = tid % kBK, jj = tid / kBK + (kThreads / kBK) * l;
    } else {
      jj = tid % kBN, kk = tid / kBN + (kThreads / kBN) * l;
    }
  };
  auto fetch = [&](int64_t k0) {
#pragma unroll
    for (int l = 0; l < kLoads; ++l) {
      int ii, kk;
      a_pos(l, ii, kk);
      const int64_t row = m0 + ii, k = k0 + kk;
      ra[l] = (row < p.M && k < k_end) ? ld_f32(a + row * p.a_rs + k * p.a_ks) : 0.f;
      int jj, kb;
      b_pos(l, jj, kb);
      const int64_t col = n0 + jj, kb_g = k0 + kb;
      rb[l] = (col < p.N && kb_g < k_end) ? __ldg(p.b + kb_g * p.b_ks + col * p.b_ns) : 0.f;
    }
  };
  auto stash = [&](int buf) {
#pragma unroll
    for (int l = 0; l < kLoads; ++l) {
      int ii, kk;
      a_pos(l, ii, kk);
      As[(buf * kBK + kk) * kPadM + ii] = ra[l];
      int jj, kb;
      b_pos(l, jj, kb);
      Bs[(buf * kBK + kb) * kPadN + jj] = rb[l];
    }
  };

  if (k_begin < k_end) {
    fetch(k_begin);
    stash(0);
    __syncthreads();
    int cur = 0;
    for (int64_t k0 = k_begin; k0 < k_end; k0 += kBK) {
      const bool has_next = k0 + kBK < k_end;
      if (has_next) fetch(k0 + kBK);
      const float* as = As + cur * kBK * kPadM;
      const float* bs = Bs + cur * kBK * kPadN;
      if (want_sq && tid < kBM) {
#pragma unroll
        for (int kk = 0; kk < kBK; ++kk) {
          const float v = as[kk * kPadM + tid];
          sq = fmaf(v, v, sq);
        }
      }
      if constexpr (kMma) {
        static_assert(kBK == 8, "one m16n8k8 step per K tile");
        uint32_t bf[4][3];
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
          const int c = wn * 32 + ni * 8 + lg;
          split3<TM>(bs[(2 * lt) * kPadN + c] * kBScale, bs[(2 * lt + 1) * kPadN + c] * kBScale, bf[ni]);
        }
#pragma unroll
        for (int mi = 0; mi < 4; ++mi) {
          const int r = wm * 64 + mi * 16 + lg;
          float (&c)[8] = acc[2 * mi];
          float (&d)[8] = acc[2 * mi + 1];
          if constexpr (kSplitA) {
            uint32_t a0[3], a1[3];
            split3<TM>(as[(2 * lt) * kPadM + r], as[(2 * lt + 1) * kPadM + r], a0);
            split3<TM>(as[(2 * lt) * kPadM + r + 8], as[(2 * lt + 1) * kPadM + r + 8], a1);
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
              // This K step's term products (a, b) with a + b <= 2, smallest first, into a zeroed local
              // accumulator, added to the running one with one round-to-nearest fp32 add: tensor cores
              // truncate inside their accumulation (Fasi et al. 2021), so chaining every K step through the
              // MMA accumulator would let that one-sided error grow with K.
              float t0 = 0.f, t1 = 0.f, t2 = 0.f, t3 = 0.f;
              mma_16816_k8<TM>(t0, t1, t2, t3, a0[2], a1[2], bf[ni][0]);
              mma_16816_k8<TM>(t0, t1, t2, t3, a0[1], a1[1], bf[ni][1]);
              mma_16816_k8<TM>(t0, t1, t2, t3, a0[0], a1[0], bf[ni][2]);
              mma_16816_k8<TM>(t0, t1, t2, t3, a0[1], a1[1], bf[ni][0]);
              mma_16816_k8<TM>(t0, t1, t2, t3, a0[0], a1[0], bf[ni][1]);
              mma_16816_k8<TM>(t0, t1, t2, t3, a0[0], a1[0], bf[ni][0]);
              c[2 * ni] += t0, c[2 * ni + 1] += t1, d[2 * ni] += t2, d[2 * ni + 1] += t3;
            }
          } else {
            const uint32_t a0 = pack2<TM>(as[(2 * lt) * kPadM + r], as[(2 * lt + 1) * kPadM + r]);
            const uint32_t a1 = pack2<TM>(as[(2 * lt) * kPadM + r + 8], as[(2 * lt + 1) * kPadM + r + 8]);
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
              float t0 = 0.f, t1 = 0.f, t2 = 0.f, t3 = 0.f;  // per-K-step accumulator, as above
#pragma unroll
              for (int s = 2; s >= 0; --s)  // smallest term first
                mma_16816_k8<TM>(t0, t1, t2, t3, a0, a1, bf[ni][s]);
              c[2 * ni] += t0, c[2 * ni + 1] += t1, d[2 * ni] += t2, d[2 * ni + 1] += t3;
            }
          }
        }
      } else {
#pragma unroll
      for (int kk = 0; kk < kBK; ++kk) {
        const float4 a0 = *reinterpret_cast<const float4*>(as + kk * kPadM + ty * 4);
        const float4 a1 = *reinterpret_cast<const float4*>(as + kk * kPadM + 64 + ty * 4);
        const float4 b0 = *reinterpret_cast<const float4*>(bs + kk * kPadN + tx * 4);
        const float4 b1 = *reinterpret_cast<const float4*>(bs + kk * kPadN + 64 + tx * 4);
        const float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
        const float bv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
      }
      }
      if (has_next) stash(cur ^ 1);
      __syncthreads();
      cur ^= 1;
    }
  }

  if constexpr (kMma && kBScale != 1.f) {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] *= 1.f / kBScale;
  }
  // acc[i][j] is C(row_of(i), col_at(j)). mma: acc[2mi + h][2ni + c] = fragment (mi, ni) element c + 2h.
  auto row_of = [&](int i) {
    return kMma ? m0 + wm * 64 + (i >> 1) * 16 + lg + 8 * (i & 1) : m0 + (i < 4 ? ty * 4 + i : 64 + ty * 4 + (i - 4));
  };
  auto col_at = [&](int j) {
    return kMma ? n0 + wn * 32 + (j >> 1) * 8 + 2 * lt + (j & 1) : n0 + (j >> 2) * 64 + tx * 4 + (j & 3);
  };
  auto col_of = [&](int jg) { return n0 + jg * 64 + tx * 4; };  // SIMT: first of 4 columns, jg in {0, 1}

  if constexpr (kEpi == kEpiProject) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int row = row_of(i);
      if (row >= p.M) continue;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int col = col_at(j);
        if (col < p.N) e.out[split * e.split_stride + row * e.o_rs + col * e.o_cs] = acc[i][j];
      }
    }
    if (want_sq && tid < kBM && m0 + tid < p.M) e.sq[split * e.sq_split_stride + m0 + tid] = sq;
  } else if constexpr (kEpi == kEpiUpdate && kMma) {
    // mma layout: pairs of adjacent columns per thread; scalar accesses (a quad of lanes covers 16 contiguous
    // bytes of a row, and the neighbouring ni covers the rest of the 32-byte sector right after)
    TW* w = static_cast<TW*>(e.w);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int row = row_of(i);
      if (row >= p.M) continue;
      const float srow = (!std::is_void<TG>::value && !e.scale_per_col) ? e.scale[row] : 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int col = col_at(j);
        if (col >= p.N) continue;
        const int64_t off = static_cast<int64_t>(row) * p.N + col;
        float res = 0.f;
        if constexpr (!std::is_void<TG>::value) {
          const float sv = e.scale_per_col ? e.scale[col] : srow;
          res = sv * ld_f32(static_cast<const TG*>(e.g) + off);
        }
        w[off] = from_f32<TW>(e.decay * (ld_f32(w + off) - acc[i][j] - res));
      }
    }
  } else if constexpr (kEpi == kEpiUpdate) {
    TW* w = static_cast<TW*>(e.w);
    const int64_t ld = p.N;
    // vector access needs 4 | ld and an aligned base (columns are multiples of 4 from n0 + tx·4)
    const bool vec = (ld & 3) == 0 && (reinterpret_cast<uintptr_t>(w) % (4 * sizeof(TW))) == 0 &&
                     (std::is_void<TG>::value || (reinterpret_cast<uintptr_t>(e.g) % (4 * sizeof(std::conditional_t<std::is_void<TG>::value, float, TG>))) == 0);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int row = row_of(i);
      if (row >= p.M) continue;
      const float srow = (!std::is_void<TG>::value && !e.scale_per_col) ? e.scale[row] : 0.f;
#pragma unroll
      for (int jg = 0; jg < 2; ++jg) {
        const int c0 = col_of(jg);
        if (c0 >= p.N) continue;
        const int64_t off = row * ld + c0;
        float wv[4], gv[4] = {0.f, 0.f, 0.f, 0.f}, sv[4] = {srow, srow, srow, srow};
        const bool full = vec && c0 + 3 < p.N;
        if (full) {
          load4(w + off, wv);
        } else {
#pragma unroll
          for (int j = 0; j < 4; ++j) wv[j] = c0 + j < p.N ? ld_f32(w + off + j) : 0.f;
        }
        if constexpr (!std::is_void<TG>::value) {
          const TG* g = static_cast<const TG*>(e.g);
          if (full) {
            load4(g + off, gv);
          } else {
#pragma unroll
            for (int j = 0; j < 4; ++j) gv[j] = c0 + j < p.N ? ld_f32(g + off + j) : 0.f;
          }
          if (e.scale_per_col) {
#pragma unroll
            for (int j = 0; j < 4; ++j) sv[j] = c0 + j < p.N ? e.scale[c0 + j] : 0.f;
          }
        }
        float out[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) out[j] = e.decay * (wv[j] - acc[i][jg * 4 + j] - sv[j] * gv[j]);
        if (full) {
          store4(w + off, out);
        } else {
#pragma unroll
          for (int j = 0; j < 4; ++j)
            if (c0 + j < p.N) w[off + j] = from_f32<TW>(out[j]);
        }
      }
    }
  } else {
    // column sums of |C| over this tile's valid rows
    float cs[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) s += row_of(i) < p.M ? fabsf(acc[i][j]) : 0.f;
      cs[j] = s;
    }
    __syncthreads();  // smem reused: every thread is past its last read of the operand tiles
    // 16 threads hold disjoint row sets of each column: SIMT ty, mma (wm, lane / 4)
    float* red = smem;  // [16][kBN]
    const int contributor = kMma ? wm * 8 + lg : ty;
#pragma unroll
    for (int j = 0; j < 8; ++j) red[contributor * kBN + (col_at(j) - n0)] = cs[j];
    __syncthreads();
    if (tid < kBN && n0 + tid < p.N) {
      float s = 0.f;
#pragma unroll
      for (int t = 0; t < 16; ++t) s += red[t * kBN + tid];
      e.partial[static_cast<int64_t>(blockIdx.y) * p.N + n0 + tid] = s;
    }
  }
}

// R(i, j) = Σ_s ws[s·M·N + i·N + j] into out[i·o_rs + j·o_cs]; sq[i] = Σ_s sq_ws[s·M + i]. In split order.
__global__ void reduce_splits_kernel(const float* __restrict__ ws, float* __restrict__ out, int64_t o_rs,
                                     int64_t o_cs, const float* __restrict__ sq_ws, float* __restrict__ sq, int M,
                                     int N, int splits) {
  const int64_t mn = static_cast<int64_t>(M) * N;
  const int64_t total = mn + (sq != nullptr ? M : 0);
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (t < mn) {
      float s = 0.f;
      for (int k = 0; k < splits; ++k) s += ws[k * mn + t];
      const int64_t i = t / N, j = t % N;
      out[i * o_rs + j * o_cs] = s;
    } else {
      const int64_t i = t - mn;
      float s = 0.f;
      for (int k = 0; k < splits; ++k) s += sq_ws[k * static_cast<int64_t>(M) + i];
      sq[i] = s;
    }
  }
}

// scores[c] = Σ_mt partial[mt·N + c], in m-tile order, summed in fp64: up to 2^31 / kBM partials of similar
// size, where an fp32 running sum drifts by percents.
__global__ void reduce_partials_kernel(const float* __restrict__ partial, float* __restrict__ scores, int m_tiles,
                                       int N) {
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < N;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double s = 0.0;
    for (int t = 0; t < m_tiles; ++t) s += static_cast<double>(partial[t * static_cast<int64_t>(N) + c]);
    scores[c] = static_cast<float>(s);
  }
}

__global__ void adam_kernel(float* __restrict__ m, float* __restrict__ v, const float* __restrict__ g,
                            float* __restrict__ out, int64_t n, float b1, float c1, float b2, float c2, float eps) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float gi = g[i];
    const float mi = m[i] * b1 + c1 * gi;
    const float vi = v[i] * b2 + c2 * (gi * gi);
    m[i] = mi;
    v[i] = vi;
    out[i] = mi / (sqrtf(vi) + eps);
  }
}

template <typename T>
__global__ void dct_kernel(T* __restrict__ q, int64_t n) {
  const int64_t total = n * n, period = 4 * n;
  const double norm = sqrt(2.0 / static_cast<double>(n)), row0 = sqrt(0.5), denom = 2.0 * static_cast<double>(n);
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = t / n, j = t % n;
    // i < n, 2j + 1 < 2n: the product fits in int64 for n < 2^31
    const int64_t p = (i * (2 * j + 1)) % period;
    const double s = i == 0 ? norm * row0 : norm;
    q[t] = static_cast<T>(s * cospi(static_cast<double>(p) / denom));
  }
}

int grid_for(int64_t n, int sms) {
  const int64_t blocks = (n + 255) / 256;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t(sms) * 8)));
}

void check_dims(const char* op, int64_t M, int64_t N, int64_t K) {
  const int64_t imax = std::numeric_limits<int32_t>::max();
  LOWRANK_CHECK(M <= imax - kBM && N <= imax - kBN && K <= imax - kBK, op,
                ": every GEMM dimension must stay below 2^31 on CUDA (got M=", M, ", N=", N, ", K=", K, ")");
}

bool fp32_on_tensor_cores() {
  static const bool on = [] {
    const char* v = std::getenv("LOWRANK_PROJECTION_FP32_TC");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return on;
}

template <typename TA, int kEpi, typename TW = float, typename TG = void>
void launch_gemm(const char* op, const GemmArgs& p, const EpiArgs& e, int splits, cudaStream_t stream) {
  const int64_t n_tiles = (p.N + kBN - 1) / kBN, m_tiles = (p.M + kBM - 1) / kBM;
  LOWRANK_CHECK(m_tiles <= 65535 && splits <= 65535, op, ": the GEMM's rows must be at most 65535·", kBM,
                " on CUDA (got ", p.M, " rows: G's rows, or its columns for a left projection)");
  const dim3 grid(static_cast<unsigned>(n_tiles), static_cast<unsigned>(m_tiles), static_cast<unsigned>(splits));
  constexpr bool kHasFp32Tc = (kEpi == kEpiProject && std::is_same<TA, float>::value) ||
                              (kEpi == kEpiUpdate && std::is_same<TW, float>::value);
  if (kHasFp32Tc && fp32_on_tensor_cores())
    sim_gemm_kernel<TA, kEpi, TW, TG, kHasFp32Tc><<<grid, kThreads, 0, stream>>>(p, e);
  else
    sim_gemm_kernel<TA, kEpi, TW, TG, false><<<grid, kThreads, 0, stream>>>(p, e);
  check_cuda(cudaGetLastError(), op, "GEMM launch");
}

const float* fptr(const Tensor& t) { return static_cast<const float*>(t.const_data_ptr()); }

// ------------------------------------------------------------------------------------------------ ops
std::tuple<Tensor, Tensor> galore_project_cuda(Tensor G, Tensor P, bool left, bool want_sqnorms) {
  const ProjDims d = projection_dims(kProjectOp, G, "G", P, left);
  LOWRANK_CHECK(G.is_cuda(), kProjectOp, ": the CUDA kernel got a tensor on ", device_name(G));
  torch::stable::accelerator::DeviceGuard guard(G.get_device_index());
  P = lowrank::contiguous(P, "P");
  Tensor R = lowrank::new_empty(G, left ? std::vector<int64_t>{d.r, d.n} : std::vector<int64_t>{d.m, d.r},
                                      ScalarType::Float);
  Tensor sq = lowrank::new_empty(G, {want_sqnorms ? (left ? d.n : d.m) : 0}, ScalarType::Float);
  // rows of A: G's rows (right) / columns (left)
  const int64_t M = left ? d.n : d.m, N = d.r, K = left ? d.m : d.n;
  if (M == 0) return {R, sq};
  check_dims(kProjectOp, M, N, K);
  const int dev = G.get_device_index();
  const int sms = num_sms(dev);
  const cudaStream_t stream = current_stream(dev);
  GemmArgs p;
  p.a = G.const_data_ptr();
  p.a_rs = left ? G.stride(1) : G.stride(0);
  p.a_ks = left ? G.stride(0) : G.stride(1);
  p.b = fptr(P);
  // right: B(k, j) = P[j, k] (P (r, n)); left: B(k, j) = P[k, j] (P (m, r))
  p.b_ks = left ? d.r : 1;
  p.b_ns = left ? 1 : d.n;
  p.M = static_cast<int>(M), p.N = static_cast<int>(N), p.K = static_cast<int>(K);
  // split K so the grid fills one wave (2 blocks per SM) without starting a second, partial one; >= 256 of K per split
  const int64_t tiles = ((M + kBM - 1) / kBM) * ((N + kBN - 1) / kBN);
  int64_t splits = std::min<int64_t>((2 * sms) / tiles, std::max<int64_t>(1, K / 256));
  splits = std::max<int64_t>(1, std::min<int64_t>(splits, 64));
  int64_t kps = ((K + splits - 1) / splits + kBK - 1) / kBK * kBK;
  splits = (K + kps - 1) / kps;  // every split non-empty
  p.k_per_split = static_cast<int>(kps);
  EpiArgs e{};
  Tensor ws, sq_ws;
  if (splits == 1) {
    e.out = static_cast<float*>(R.mutable_data_ptr());
    e.o_rs = left ? 1 : d.r;
    e.o_cs = left ? d.n : 1;
    e.sq = want_sqnorms ? static_cast<float*>(sq.mutable_data_ptr()) : nullptr;
  } else {
    ws = lowrank::new_empty(G, {splits * M * N}, ScalarType::Float);
    e.out = static_cast<float*>(ws.mutable_data_ptr());
    e.o_rs = N, e.o_cs = 1, e.split_stride = M * N;
    if (want_sqnorms) {
      sq_ws = lowrank::new_empty(G, {splits * M}, ScalarType::Float);
      e.sq = static_cast<float*>(sq_ws.mutable_data_ptr());
      e.sq_split_stride = M;
    }
  }
  dispatch_cuda_float(kProjectOp, G.scalar_type(), [&](auto tag) {
    launch_gemm<decltype(tag), kEpiProject>(kProjectOp, p, e, static_cast<int>(splits), stream);
  });
  if (splits > 1) {
    const int64_t total = M * N + (want_sqnorms ? M : 0);
    reduce_splits_kernel<<<grid_for(total, sms), 256, 0, stream>>>(
        fptr(ws), static_cast<float*>(R.mutable_data_ptr()), left ? 1 : d.r, left ? d.n : 1,
        want_sqnorms ? fptr(sq_ws) : nullptr, want_sqnorms ? static_cast<float*>(sq.mutable_data_ptr()) : nullptr,
        static_cast<int>(M), static_cast<int>(N), static_cast<int>(splits));
    check_cuda(cudaGetLastError(), kProjectOp, "split reduce launch");
  }
  return {R, sq};
}

Tensor adam_lowrank_cuda(Tensor exp_avg, Tensor exp_avg_sq, Tensor R, double beta1, double beta2, double eps) {
  check_adam_args(exp_avg, exp_avg_sq, R);
  LOWRANK_CHECK(R.is_cuda(), kAdamOp, ": the CUDA kernel got a tensor on ", device_name(R));
  torch::stable::accelerator::DeviceGuard guard(R.get_device_index());
  R = lowrank::contiguous(R, "R");
  Tensor N = lowrank::new_empty(R, R.sizes());
  const int64_t n = R.numel();
  if (n == 0) return N;
  const int dev = R.get_device_index();
  adam_kernel<<<grid_for(n, num_sms(dev)), 256, 0, current_stream(dev)>>>(
      static_cast<float*>(exp_avg.mutable_data_ptr()), static_cast<float*>(exp_avg_sq.mutable_data_ptr()), fptr(R),
      static_cast<float*>(N.mutable_data_ptr()), n, static_cast<float>(beta1), static_cast<float>(1.0 - beta1),
      static_cast<float>(beta2), static_cast<float>(1.0 - beta2), static_cast<float>(eps));
  check_cuda(cudaGetLastError(), kAdamOp, "kernel launch");
  return N;
}

void galore_update_cuda(Tensor W, Tensor M, Tensor P, bool left, double decay, std::optional<Tensor> G,
                        std::optional<Tensor> residual_scale) {
  const ProjDims d = check_update_args(W, M, P, left, G, residual_scale);
  LOWRANK_CHECK(W.is_cuda(), kUpdateOp, ": the CUDA kernel got a tensor on ", device_name(W));
  if (d.m == 0 || d.n == 0) return;
  torch::stable::accelerator::DeviceGuard guard(W.get_device_index());
  M = lowrank::contiguous(M, "M"), P = lowrank::contiguous(P, "P");
  Tensor Gc, sc;
  if (G.has_value()) Gc = lowrank::contiguous(*G, "G"), sc = lowrank::contiguous(*residual_scale, "residual_scale");
  check_dims(kUpdateOp, d.m, d.n, d.r);
  const int dev = W.get_device_index();
  GemmArgs p;
  // back(M) = A (m, r) · B (r, n): right A = M, B = P; left A = P, B = M; all contiguous
  p.a = (left ? P : M).const_data_ptr();
  p.a_rs = d.r, p.a_ks = 1;
  p.b = fptr(left ? M : P);
  p.b_ks = d.n, p.b_ns = 1;
  p.M = static_cast<int>(d.m), p.N = static_cast<int>(d.n), p.K = static_cast<int>(d.r);
  p.k_per_split = static_cast<int>(d.r);
  EpiArgs e{};
  e.w = W.mutable_data_ptr();
  e.decay = static_cast<float>(decay);
  if (G.has_value()) {
    e.g = Gc.const_data_ptr();
    e.scale = fptr(sc);
    e.scale_per_col = left ? 1 : 0;
  }
  const cudaStream_t stream = current_stream(dev);
  dispatch_cuda_float(kUpdateOp, W.scalar_type(), [&](auto wtag) {
    using TW = decltype(wtag);
    if (!G.has_value()) {
      launch_gemm<float, kEpiUpdate, TW, void>(kUpdateOp, p, e, 1, stream);
    } else {
      dispatch_cuda_float(kUpdateOp, Gc.scalar_type(), [&](auto gtag) {
        launch_gemm<float, kEpiUpdate, TW, decltype(gtag)>(kUpdateOp, p, e, 1, stream);
      });
    }
  });
}

void dct_basis_cuda(Tensor Q) {
  check_dct_args(Q);
  LOWRANK_CHECK(Q.is_cuda(), kDctOp, ": the CUDA kernel got a tensor on ", device_name(Q));
  const int64_t n = Q.size(0);
  if (n == 0) return;
  LOWRANK_CHECK(n < (int64_t(1) << 30), kDctOp, ": n = ", n, " is too large");
  torch::stable::accelerator::DeviceGuard guard(Q.get_device_index());
  const int dev = Q.get_device_index();
  const int grid = grid_for(n * n, num_sms(dev));
  const cudaStream_t stream = current_stream(dev);
  if (Q.scalar_type() == ScalarType::Double)
    dct_kernel<double><<<grid, 256, 0, stream>>>(static_cast<double*>(Q.mutable_data_ptr()), n);
  else
    dct_kernel<float><<<grid, 256, 0, stream>>>(static_cast<float*>(Q.mutable_data_ptr()), n);
  check_cuda(cudaGetLastError(), kDctOp, "kernel launch");
}

Tensor basis_scores_cuda(Tensor G, Tensor Q, bool left) {
  const int64_t k = check_scores_args(G, Q, left);
  LOWRANK_CHECK(G.is_cuda(), kScoresOp, ": the CUDA kernel got a tensor on ", device_name(G));
  torch::stable::accelerator::DeviceGuard guard(G.get_device_index());
  Q = lowrank::contiguous(Q, "Q");
  Tensor scores = lowrank::new_empty(G, {k}, ScalarType::Float);
  if (k == 0) return scores;
  const int64_t rows = left ? G.size(1) : G.size(0);
  if (rows == 0) {
    torch::stable::zero_(scores);
    return scores;
  }
  check_dims(kScoresOp, rows, k, k);
  const int dev = G.get_device_index();
  const int sms = num_sms(dev);
  const cudaStream_t stream = current_stream(dev);
  const int64_t m_tiles = (rows + kBM - 1) / kBM;
  Tensor partial = lowrank::new_empty(G, {m_tiles * k}, ScalarType::Float);
  GemmArgs p;
  p.a = G.const_data_ptr();
  p.a_rs = left ? G.stride(1) : G.stride(0);
  p.a_ks = left ? G.stride(0) : G.stride(1);
  p.b = fptr(Q);
  p.b_ks = 1, p.b_ns = k;  // B(kk, j) = Q[j, kk]
  p.M = static_cast<int>(rows), p.N = static_cast<int>(k), p.K = static_cast<int>(k);
  p.k_per_split = static_cast<int>(k);
  EpiArgs e{};
  e.partial = static_cast<float*>(partial.mutable_data_ptr());
  dispatch_cuda_float(kScoresOp, G.scalar_type(), [&](auto tag) {
    launch_gemm<decltype(tag), kEpiScores>(kScoresOp, p, e, 1, stream);
  });
  reduce_partials_kernel<<<grid_for(k, sms), 256, 0, stream>>>(fptr(partial),
                                                                static_cast<float*>(scores.mutable_data_ptr()),
                                                                static_cast<int>(m_tiles), static_cast<int>(k));
  check_cuda(cudaGetLastError(), kScoresOp, "reduce launch");
  return scores;
}

}  // namespace
}  // namespace lowrank

STABLE_TORCH_LIBRARY_IMPL(lowrank, CUDA, m) {
  m.impl("galore_project", LOWRANK_BOX(lowrank::kProjectOp, lowrank::galore_project_cuda));
  m.impl("adam_lowrank_", LOWRANK_BOX(lowrank::kAdamOp, lowrank::adam_lowrank_cuda));
  m.impl("galore_update_", LOWRANK_BOX(lowrank::kUpdateOp, lowrank::galore_update_cuda));
  m.impl("dct_basis_", LOWRANK_BOX(lowrank::kDctOp, lowrank::dct_basis_cuda));
  m.impl("basis_scores", LOWRANK_BOX(lowrank::kScoresOp, lowrank::basis_scores_cuda));
}
