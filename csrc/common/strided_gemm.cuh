// Strided batched GEMM for CUDA: C_g(M x N) = A_g(M x K) · B_g(K x N) for g in [0, groups), fp32 accumulate.
//
// Every operand element is addressed by strides alone, so permutations (Monarch's 'b (r l) -> b (l r)' and
// friends) cost nothing but a descriptor:
//   A(g, m, k) = a.ptr[g·a.gs + m·a.s_mn + k·a.s_k]
//   B(g, k, n) = b.ptr[g·b.gs + n·b.s_mn + k·b.s_k]
//   C(g, m, n) = c.ptr[split·c.split_stride + g·c.gs + m·c.rs + n·c.cs]
//              or, with c.perm_l > 0 (Monarch's first-factor epilogue, u = g·perm_q + n):
//                c.ptr[split·c.split_stride + m·c.rs + (u mod perm_l)·perm_r + u div perm_l]
// All strides and offsets are int64; M, N, K, groups and tile counts are int (checked on the host).
//
// Two kernels:
//  * mma_gemm_kernel<T, ...> (T = __half / __nv_bfloat16): mma.sync m16n8k16 (sm_80+), ldmatrix fragment
//    loads, BK = 32, multi-stage cp.async pipeline. Per operand a run-time load mode (warp-uniform):
//      kKVec   K has stride 1, rows 16-byte aligned: 16-byte cp.async chunks along K, smem [MN][BK] (K-major)
//      kMNVec  MN has stride 1, 16-byte aligned: 16-byte cp.async chunks along MN, smem [BK][MN]
//              (MN-major), read back with ldmatrix.trans
//      kGather any strides: scalar loads (K or MN fastest, whichever has the smaller stride) stored into the
//              K-major smem layout
//    Both smem layouts are XOR-swizzled on 16-byte chunks so ldmatrix and cp.async are bank-conflict free.
//    Partial chunks at the K / MN edges use cp.async's zero-fill (src-size), so M, N, K need not be
//    multiples of anything.
//  * simt_gemm_kernel<float>: fp32 FMA (exact fp32, no TF32), 64x64x16 tiles, 4x4 outputs per thread.
// Split-K: grid covers `splits` K ranges of k_per_split (a multiple of BK); each split writes its own
// fp32 slice (c.f32 = 1, c.split_stride apart) and splitk_reduce_kernel sums the slices into the output.
// Epilogue: C = alpha·(A·B) (+ bias[n] when P.bias is set; bias has the element type and is added in fp32
// before the store, by split 0 only, so split-K slices still sum to the right result). alpha = 1 and no
// bias by default (Problem's member initializers), so callers that never set them are unaffected.
// Grid is 1-D, n-tile fastest, then group, then m-tile, then split (CTAs that share rows of A run
// together; for group-interleaved outputs all groups of one row block are written close in time).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/cuda_dispatch.cuh"

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace lowrank {
namespace sgemm {

enum LoadMode : int { kKVec = 0, kMNVec = 1, kGatherK = 2, kGatherMN = 3 };

struct Operand {
  const void* ptr;
  int64_t gs;    // group stride
  int64_t s_mn;  // stride of the M (for A) or N (for B) index
  int64_t s_k;   // stride of the K index
  int mode;      // LoadMode (16-bit kernel only)
};

struct Output {
  void* ptr;
  int64_t gs, rs, cs;
  int64_t split_stride;  // elements between split-K slices (f32 workspace)
  int perm_l, perm_q, perm_r;
  int f32;  // 1: store fp32 (workspace), 0: store the element type
};

struct Problem {
  Operand a, b;
  Output c;
  int M, N, K, groups, splits, k_per_split;
  int m_tiles, n_tiles;
  float alpha = 1.f;           // epilogue scale of the product
  const void* bias = nullptr;  // optional per-column (n) bias, element type, added after alpha
};

constexpr int kBK = 32;  // K tile of the tensor-core kernel

// ------------------------------------------------------------------------------------------ helpers
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; bytes [src_bytes, 16) of the destination are zero-filled (src_bytes may be 0).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

using lowrank::from_f32;  // fp32 <-> element conversions: common/cuda_dispatch.cuh
using lowrank::to_f32;

// alpha·acc (+ bias[n] for split 0), in fp32.
template <typename T>
__device__ __forceinline__ float epi(const Problem& P, int split, int n, float acc) {
  float v = P.alpha * acc;
  if (P.bias != nullptr && split == 0) v += to_f32<T>(static_cast<const T*>(P.bias)[n]);
  return v;
}

// Offset of C(g, m, n) within one split slice.
__device__ __forceinline__ int64_t out_offset(const Output& c, int g, int m, int n) {
  if (c.perm_l > 0) {
    const uint32_t u = static_cast<uint32_t>(g) * static_cast<uint32_t>(c.perm_q) + static_cast<uint32_t>(n);
    const uint32_t l = static_cast<uint32_t>(c.perm_l);
    return static_cast<int64_t>(m) * c.rs + static_cast<int64_t>(u % l) * c.perm_r + static_cast<int64_t>(u / l);
  }
  return static_cast<int64_t>(g) * c.gs + static_cast<int64_t>(m) * c.rs + static_cast<int64_t>(n) * c.cs;
}

// Block index -> (split, m-tile, group, n-tile).
struct TileIndex {
  int split, mt, g, nt;
};
__device__ __forceinline__ TileIndex decode_tile(const Problem& P) {
  int64_t bid = blockIdx.x;
  TileIndex t;
  t.nt = static_cast<int>(bid % P.n_tiles);
  bid /= P.n_tiles;
  t.g = static_cast<int>(bid % P.groups);
  bid /= P.groups;
  t.mt = static_cast<int>(bid % P.m_tiles);
  t.split = static_cast<int>(bid / P.m_tiles);
  return t;
}

// ------------------------------------------------------------------------- tensor-core (16-bit) kernel
// Swizzled smem positions (in 16-bit elements).
//   K-major tile [rows][kBK]: 4 chunks of 8 per row, chunk ^= (row >> 1) & 3.
//   MN-major tile [kBK][W]:   W/8 chunks per row,  chunk ^= row & 7.
__device__ __forceinline__ int kmaj_off(int row, int chunk) { return row * kBK + ((chunk ^ ((row >> 1) & 3)) << 3); }
template <int W>
__device__ __forceinline__ int mnmaj_off(int krow, int chunk) {
  return krow * W + ((chunk ^ (krow & 7)) << 3);
}

// Loads the [ROWS (MN) x kBK] tile of one operand starting at (mn0, k0) into smem `sm`.
template <int ROWS, int NT>
__device__ __forceinline__ void load_tile(const Operand& op, const uint16_t* base, uint16_t* sm, int mn0, int MN,
                                          int k0, int kend, int tid) {
  if (op.mode == kKVec) {
    constexpr int CH = ROWS * (kBK / 8);
    static_assert(CH % NT == 0, "tile chunks must divide among threads");
#pragma unroll
    for (int i = 0; i < CH / NT; ++i) {
      const int e = tid + i * NT;
      const int row = e >> 2, ch = e & 3;
      const int gm = mn0 + row, gk = k0 + ch * 8;
      int bytes = 0;
      const uint16_t* src = base;
      if (gm < MN && gk < kend) {
        bytes = 2 * min(8, kend - gk);
        src = base + static_cast<int64_t>(gm) * op.s_mn + gk;
      }
      cp_async16(smem_u32(sm + kmaj_off(row, ch)), src, bytes);
    }
  } else if (op.mode == kMNVec) {
    constexpr int CPR = ROWS / 8;
    constexpr int CH = kBK * CPR;
    static_assert(CH % NT == 0, "tile chunks must divide among threads");
#pragma unroll
    for (int i = 0; i < CH / NT; ++i) {
      const int e = tid + i * NT;
      const int kr = e / CPR, ch = e % CPR;
      const int gk = k0 + kr, gm = mn0 + ch * 8;
      int bytes = 0;
      const uint16_t* src = base;
      if (gk < kend && gm < MN) {
        bytes = 2 * min(8, MN - gm);
        src = base + static_cast<int64_t>(gk) * op.s_k + gm;
      }
      cp_async16(smem_u32(sm + mnmaj_off<ROWS>(kr, ch)), src, bytes);
    }
  } else {
    constexpr int EL = ROWS * kBK;
    static_assert(EL % NT == 0, "tile elements must divide among threads");
    const bool kfast = op.mode == kGatherK;
#pragma unroll 4
    for (int i = 0; i < EL / NT; ++i) {
      const int e = tid + i * NT;
      const int row = kfast ? e / kBK : e % ROWS;
      const int kk = kfast ? e % kBK : e / ROWS;
      const int gm = mn0 + row, gk = k0 + kk;
      uint16_t v = 0;
      if (gm < MN && gk < kend) v = base[static_cast<int64_t>(gm) * op.s_mn + static_cast<int64_t>(gk) * op.s_k];
      sm[kmaj_off(row, kk >> 3) + (kk & 7)] = v;
    }
  }
}

template <typename T, int BM, int BN, int WM, int WN, int STAGES, int MINB>
__global__ void __launch_bounds__(WM* WN * 32, MINB) mma_gemm_kernel(const Problem P) {
  constexpr int NT = WM * WN * 32;
  constexpr int WTM = BM / WM, WTN = BN / WN;  // warp tile
  constexpr int MI = WTM / 16, NI = WTN / 8;
  static_assert(WTM % 16 == 0 && WTN % 16 == 0, "warp tile must be a multiple of 16x16");
  constexpr int A_ST = BM * kBK, B_ST = BN * kBK;  // elements per stage

  extern __shared__ __align__(128) uint16_t smem[];
  uint16_t* sA = smem;
  uint16_t* sB = smem + STAGES * A_ST;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm0 = (warp / WN) * WTM, wn0 = (warp % WN) * WTN;
  const TileIndex t = decode_tile(P);
  const int m0 = t.mt * BM, n0 = t.nt * BN;
  const int kbeg = t.split * P.k_per_split;
  const int kend = static_cast<int>(min(static_cast<int64_t>(P.K), static_cast<int64_t>(kbeg) + P.k_per_split));
  const int KT = kend > kbeg ? (kend - kbeg + kBK - 1) / kBK : 0;

  const uint16_t* a_base = static_cast<const uint16_t*>(P.a.ptr) + static_cast<int64_t>(t.g) * P.a.gs;
  const uint16_t* b_base = static_cast<const uint16_t*>(P.b.ptr) + static_cast<int64_t>(t.g) * P.b.gs;
  const bool a_mn = P.a.mode == kMNVec, b_mn = P.b.mode == kMNVec;

  float acc[MI][NI][4];
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < NI; ++j)
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[i][j][v] = 0.f;

  auto load_stage = [&](int stage, int k0) {
    load_tile<BM, NT>(P.a, a_base, sA + stage * A_ST, m0, P.M, k0, kend, tid);
    load_tile<BN, NT>(P.b, b_base, sB + stage * B_ST, n0, P.N, k0, kend, tid);
  };

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < KT) load_stage(s, kbeg + s * kBK);
    cp_async_commit();
  }

  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    {
      const int nk = kt + STAGES - 1;
      if (nk < KT) load_stage(nk % STAGES, kbeg + nk * kBK);
      cp_async_commit();
    }
    const uint16_t* cA = sA + (kt % STAGES) * A_ST;
    const uint16_t* cB = sB + (kt % STAGES) * B_ST;
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      uint32_t af[MI][4];
      uint32_t bf[NI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        if (!a_mn) {
          const int row = wm0 + mi * 16 + (lane & 15);
          const int ch = kk * 2 + (lane >> 4);
          ldsm_x4(af[mi], smem_u32(cA + kmaj_off(row, ch)));
        } else {
          const int k = kk * 16 + (lane & 7) + ((lane >> 4) << 3);
          const int ch = ((wm0 + mi * 16) >> 3) + ((lane >> 3) & 1);
          ldsm_x4_t(af[mi], smem_u32(cA + mnmaj_off<BM>(k, ch)));
        }
      }
#pragma unroll
      for (int nj = 0; nj < NI / 2; ++nj) {
        uint32_t r[4];
        if (!b_mn) {
          const int n = wn0 + nj * 16 + (lane & 7) + ((lane >> 4) << 3);
          const int ch = kk * 2 + ((lane >> 3) & 1);
          ldsm_x4(r, smem_u32(cB + kmaj_off(n, ch)));
        } else {
          const int k = kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
          const int ch = ((wn0 + nj * 16) >> 3) + (lane >> 4);
          ldsm_x4_t(r, smem_u32(cB + mnmaj_off<BN>(k, ch)));
        }
        bf[2 * nj][0] = r[0];
        bf[2 * nj][1] = r[1];
        bf[2 * nj + 1][0] = r[2];
        bf[2 * nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) mma16816<T>(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
    }
  }
  cp_async_wait<0>();

  // Epilogue: fragment c0,c1 at (row lane/4, cols 2·(lane%4) + {0,1}), c2,c3 eight rows below.
  const Output& c = P.c;
  const int g4 = lane >> 2, t4 = lane & 3;
  if (c.f32) {
    float* cp = static_cast<float*>(c.ptr) + static_cast<int64_t>(t.split) * c.split_stride;
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int m = m0 + wm0 + mi * 16 + g4 + h * 8;
          const int n = n0 + wn0 + ni * 8 + t4 * 2;
          if (m >= P.M || n >= P.N) continue;
          const int64_t off = out_offset(c, t.g, m, n);
          float* p = cp + off;
          const float v0 = epi<T>(P, t.split, n, acc[mi][ni][2 * h]);
          const float v1 = n + 1 < P.N ? epi<T>(P, t.split, n + 1, acc[mi][ni][2 * h + 1]) : 0.f;
          if (n + 1 < P.N && c.perm_l == 0 && c.cs == 1 && (reinterpret_cast<uintptr_t>(p) & 7) == 0) {
            *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
          } else {
            p[0] = v0;
            if (n + 1 < P.N) cp[out_offset(c, t.g, m, n + 1)] = v1;
          }
        }
  } else {
    T* cp = static_cast<T*>(c.ptr);
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int m = m0 + wm0 + mi * 16 + g4 + h * 8;
          const int n = n0 + wn0 + ni * 8 + t4 * 2;
          if (m >= P.M || n >= P.N) continue;
          const int64_t off = out_offset(c, t.g, m, n);
          T* p = cp + off;
          const T v0 = from_f32<T>(epi<T>(P, t.split, n, acc[mi][ni][2 * h]));
          const T v1 = from_f32<T>(n + 1 < P.N ? epi<T>(P, t.split, n + 1, acc[mi][ni][2 * h + 1]) : 0.f);
          if (n + 1 < P.N && c.perm_l == 0 && c.cs == 1 && (reinterpret_cast<uintptr_t>(p) & 3) == 0) {
            struct alignas(4) Pair {
              T x, y;
            };
            *reinterpret_cast<Pair*>(p) = Pair{v0, v1};
          } else {
            p[0] = v0;
            if (n + 1 < P.N) cp[out_offset(c, t.g, m, n + 1)] = v1;
          }
        }
  }
}

// ------------------------------------------------------------------------------------ fp32 SIMT kernel
constexpr int kSimtBM = 64, kSimtBN = 64, kSimtBK = 16, kSimtNT = 256;

// static: this header is included by several .cu files and the kernel is not a template.
static __global__ void __launch_bounds__(kSimtNT) simt_gemm_kernel(const Problem P) {
  constexpr int BM = kSimtBM, BN = kSimtBN, BK = kSimtBK, NT = kSimtNT;
  __shared__ float As[BK][BM + 4];
  __shared__ float Bs[BK][BN + 4];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const TileIndex t = decode_tile(P);
  const int m0 = t.mt * BM, n0 = t.nt * BN;
  const int kbeg = t.split * P.k_per_split;
  const int kend = static_cast<int>(min(static_cast<int64_t>(P.K), static_cast<int64_t>(kbeg) + P.k_per_split));
  const float* a_base = static_cast<const float*>(P.a.ptr) + static_cast<int64_t>(t.g) * P.a.gs;
  const float* b_base = static_cast<const float*>(P.b.ptr) + static_cast<int64_t>(t.g) * P.b.gs;
  // Coalesce the global reads along whichever index has the smaller stride.
  const bool a_kfast = P.a.s_k <= P.a.s_mn, b_kfast = P.b.s_k <= P.b.s_mn;

  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  for (int k0 = kbeg; k0 < kend; k0 += BK) {
#pragma unroll
    for (int i = 0; i < BM * BK / NT; ++i) {
      const int e = tid + i * NT;
      const int row = a_kfast ? e / BK : e % BM, kk = a_kfast ? e % BK : e / BM;
      const int gm = m0 + row, gk = k0 + kk;
      As[kk][row] = (gm < P.M && gk < kend)
                        ? a_base[static_cast<int64_t>(gm) * P.a.s_mn + static_cast<int64_t>(gk) * P.a.s_k]
                        : 0.f;
    }
#pragma unroll
    for (int i = 0; i < BN * BK / NT; ++i) {
      const int e = tid + i * NT;
      const int col = b_kfast ? e / BK : e % BN, kk = b_kfast ? e % BK : e / BN;
      const int gn = n0 + col, gk = k0 + kk;
      Bs[kk][col] = (gn < P.N && gk < kend)
                        ? b_base[static_cast<int64_t>(gn) * P.b.s_mn + static_cast<int64_t>(gk) * P.b.s_k]
                        : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }

  float* cp = static_cast<float*>(P.c.ptr) + static_cast<int64_t>(t.split) * P.c.split_stride;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int m = m0 + ty + 16 * i, n = n0 + tx + 16 * j;
      if (m < P.M && n < P.N) cp[out_offset(P.c, t.g, m, n)] = epi<float>(P, t.split, n, acc[i][j]);
    }
}

// ----------------------------------------------------------------------------------- split-K reduce
template <typename T>
__global__ void splitk_reduce_kernel(const float* __restrict__ ws, T* __restrict__ out, int64_t elems, int splits) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < elems; i += step) {
    float s = 0.f;
    for (int j = 0; j < splits; ++j) s += ws[static_cast<int64_t>(j) * elems + i];
    out[i] = from_f32<T>(s);
  }
}

// --------------------------------------------------------------------------------------- host side
// Tile configurations of the tensor-core kernel.
//   big:   128x128 CTA, 8 warps (2x4) of 64x32, 4 stages (64 KiB smem), 2 CTAs/SM
//   small:  64x64 CTA,  4 warps (2x2) of 32x32, 4 stages (32 KiB smem)
enum class TileConfig { kBig, kSmall, kSimt };

struct Plan {
  TileConfig cfg;
  int bm, bn;
  int splits;
  int k_per_split;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Chooses the tile shape and, when allow_split and the output tiles are too few to fill the GPU, a
// split of K (each split gets a multiple of the K tile, at least 256 deep).
inline Plan plan_gemm(bool is_f32, int64_t M, int64_t N, int64_t K, int64_t groups, int num_sms, bool allow_split) {
  Plan p;
  if (is_f32) {
    p.cfg = TileConfig::kSimt;
    p.bm = kSimtBM;
    p.bn = kSimtBN;
  } else {
    const int64_t big_tiles = ceil_div(M, 128) * ceil_div(N, 128) * groups;
    if (M > 64 && N > 64 && big_tiles >= num_sms) {
      p.cfg = TileConfig::kBig;
      p.bm = p.bn = 128;
    } else {
      p.cfg = TileConfig::kSmall;
      p.bm = p.bn = 64;
    }
  }
  const int64_t tiles = ceil_div(M, p.bm) * ceil_div(N, p.bn) * groups;
  const int kunit = is_f32 ? kSimtBK : kBK;
  int64_t splits = 1;
  if (allow_split && tiles < 2 * static_cast<int64_t>(num_sms)) {
    splits = ceil_div(2 * static_cast<int64_t>(num_sms), tiles);
    splits = std::min<int64_t>(splits, std::max<int64_t>(1, K / 256));
    splits = std::min<int64_t>(splits, 64);
  }
  int64_t kps = ceil_div(ceil_div(K, splits), kunit) * kunit;
  if (kps <= 0) kps = kunit;
  splits = std::max<int64_t>(1, ceil_div(K, kps));  // no empty trailing split
  p.splits = static_cast<int>(splits);
  p.k_per_split = static_cast<int>(kps);
  return p;
}

// Picks the load mode of a 16-bit operand from its strides and alignment (a 16-byte chunk start must be
// 16-byte aligned for every group, row and K tile).
inline int pick_mode(const Operand& op, int groups) {
  const bool aligned = (reinterpret_cast<uintptr_t>(op.ptr) & 15) == 0 && (groups == 1 || op.gs % 8 == 0);
  if (aligned && op.s_k == 1 && op.s_mn % 8 == 0) return kKVec;
  if (aligned && op.s_mn == 1 && op.s_k % 8 == 0) return kMNVec;
  return op.s_k <= op.s_mn ? kGatherK : kGatherMN;
}

template <typename T>
inline cudaError_t launch_gemm(Problem P, const Plan& plan, cudaStream_t stream) {
  P.splits = plan.splits;
  P.k_per_split = plan.k_per_split;
  P.m_tiles = static_cast<int>(ceil_div(P.M, plan.bm));
  P.n_tiles = static_cast<int>(ceil_div(P.N, plan.bn));
  const int64_t blocks = static_cast<int64_t>(P.m_tiles) * P.n_tiles * P.groups * P.splits;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(blocks));
  if constexpr (std::is_same<T, float>::value) {
    simt_gemm_kernel<<<grid, kSimtNT, 0, stream>>>(P);
  } else {
    P.a.mode = pick_mode(P.a, P.groups);
    P.b.mode = pick_mode(P.b, P.groups);
    if (plan.cfg == TileConfig::kBig) {
      constexpr int STAGES = 4;
      auto kern = mma_gemm_kernel<T, 128, 128, 2, 4, STAGES, 2>;
      const int smem = STAGES * (128 + 128) * kBK * 2;
      cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
      if (e != cudaSuccess) return e;
      kern<<<grid, 256, smem, stream>>>(P);
    } else {
      constexpr int STAGES = 4;
      auto kern = mma_gemm_kernel<T, 64, 64, 2, 2, STAGES, 4>;
      const int smem = STAGES * (64 + 64) * kBK * 2;
      kern<<<grid, 128, smem, stream>>>(P);
    }
  }
  return cudaGetLastError();
}

template <typename T>
inline cudaError_t launch_splitk_reduce(const float* ws, T* out, int64_t elems, int splits, cudaStream_t stream) {
  if (elems == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>(ceil_div(elems, 256), 8192);
  splitk_reduce_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(ws, out, elems, splits);
  return cudaGetLastError();
}

}  // namespace sgemm
}  // namespace lowrank
