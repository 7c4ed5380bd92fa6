// Fused single-kernel Monarch forward for small blocks (fp16 / bf16):
//   out = P·BD(w2)·P·BD(w1)·x with the middle activation kept in shared memory, never in HBM.
//
// One CTA (256 threads, 8 warps) owns BM consecutive batch rows (BM = 64, 32 or 16, chosen on the host so
// that the tile fits shared memory) and the whole width of the layer:
//   phase 1 (step 1) for every input block i:   y_i^T (q x BM) = w1_i (q x p) · x_i^T (p x BM)
//            A = w1_i from smem (ldmatrix), B = x_i rows from smem (ldmatrix, K-contiguous), mma m16n8k16,
//            fp32 accumulate; the result is rounded to T and stored, permuted, into the "mid" buffer.
//   phase 2 (step 3) for every output group c:  u_c^T (s x BM) = w2_c (s x r) · z_c^T (r x BM)
//            A = w2_c from smem, B = z_c read straight out of the mid buffer with ldmatrix.trans;
//            the result overwrites group c's own rows of the buffer (in place, after a CTA barrier).
//   phase 3: the output tile is read back from the buffer (output permutation = smem addressing) and
//            written with 16-byte stores; each warp store instruction covers 8 rows x 128 contiguous bytes.
// Buffer (BM-wide rows of T, the batch row b is the fastest index): row R = c·RS + e, RS = max(r, s),
//   mid:  z[b, c, a] = y[b, a·l + c]  at row c·RS + a   (written by phase 1: u = i·q + j -> c = u mod l,
//                                                        a = u div l)
//   out:  u[b, c, d] = out[b, d·l + c] at row c·RS + d  (written by phase 2, read by phase 3)
//   Group c reads rows [c·RS, c·RS + r) and writes rows [c·RS, c·RS + s): only its own rows, so the
//   in-place overwrite needs just one barrier between the chunk's MMAs and its epilogue stores.
//   Every tile in smem is addressed in 16-byte chunks through swz() (an XOR of the chunk's position in its
//   128-byte line with a fold of the line index), which keeps ldmatrix rows and the 4-byte epilogue stores
//   spread over the banks for the strides that occur (rows 1, r·BM/8 or RS·BM/8 chunks apart).
// Weights are streamed through a 2-stage cp.async pipeline of "chunks": phase 1 chunk = KB whole w1 blocks
//   (contiguous in global) + the matching BM x KB·p slab of x (rows past the batch zero-filled); phase 2
//   chunk = GB whole w2 groups. The prefetch of chunk t+1 overlaps the MMAs of chunk t; the first w2 chunk
//   is prefetched during the last step-1 chunk.
//
// Traffic (n = N = L = 4096, 64 blocks of 64x64, bf16, B = 8192 rows): the mid tile is BM x N x 2 B =
//   128 KiB at BM = 16, so BM = 16 is the largest row tile that fits (BM = 32 needs 256 KiB).
//   Per CTA: x 128 KiB + out 128 KiB from/to HBM, w1 + w2 = 1 MiB from L2 (weights are L2-resident:
//   1 MiB against 50 MiB L2). 512 CTAs -> HBM 2 x 64 MiB + 1 MiB (the roofline bytes, ~38 us at 3.35 TB/s),
//   L2->SM 512 x 1.25 MiB = 640 MiB (~55-65 us at the ~10-12 TB/s an H100 L2 delivers). So this shape is
//   L2-bandwidth-bound, estimated ~60-70 us = 55-65 % of the HBM roofline; the two-GEMM path moves
//   x + 2·mid + out = 256 MiB through HBM (<= 50 % of roofline by construction). Larger row tiles
//   would need the mid tile split across a thread-block cluster (DSMEM, sm_90) -- not done here.
//   n = 1024 with 32 blocks of 32x32: mid tile at BM = 64 is 128 KiB; weights 2 x 64 KiB per 64 rows,
//   i.e. L2 weight traffic = 1/2 of the x + out bytes: HBM-bound.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/strided_gemm.cuh"

namespace lowrank {
namespace mfused {

constexpr int kNT = 256;    // threads per CTA
constexpr int kWarps = kNT / 32;
constexpr int kMaxIt = 2;   // phase-2 work items held per warp per chunk (GB·s/16 <= kWarps·kMaxIt)
constexpr int kMaxBlock = 128;               // p, q, r, s <= 128, multiples of 16
constexpr int kStageCapElems = 24 * 1024;    // at most 48 KiB per pipeline stage

struct Params {
  const void* x;
  const void* w1;
  const void* w2;
  void* out;
  int batch, k, q, p, l, s, r;
  int RS;           // max(r, s): buffer rows per output group
  int KB, GB;       // w1 blocks per phase-1 chunk, w2 groups per phase-2 chunk
  int c1, c2;       // chunk counts of phase 1 and phase 2
  int buf_elems;    // l·RS·BM
  int stage_elems;  // elements per pipeline stage (multiple of 64)
};

// Swizzled position (in 16-byte chunks) of the linear chunk index L of a tile.
__device__ __forceinline__ int swz(int L) { return L ^ (((L >> 3) ^ (L >> 6) ^ (L >> 9) ^ (L >> 12)) & 7); }

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <typename T, int BM>
__global__ void __launch_bounds__(kNT, 1) monarch_fused_fwd_kernel(const Params P) {
  static_assert(BM % 16 == 0 && BM <= 64, "row tile must be 16, 32 or 64");
  constexpr int CWB = BM / 8;  // 16-byte chunks per buffer row
  constexpr int NI = BM / 8;   // n8 tiles per warp item
  using sgemm::cp_async16;
  using sgemm::smem_u32;

  extern __shared__ __align__(128) uint16_t smem[];
  uint16_t* const buf = smem;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g4 = lane >> 2, t4 = lane & 3;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int rows = static_cast<int>(min(static_cast<int64_t>(BM), static_cast<int64_t>(P.batch) - row0));
  const int64_t n = static_cast<int64_t>(P.k) * P.p;
  const int64_t L = static_cast<int64_t>(P.l) * P.s;
  const uint16_t* const x = static_cast<const uint16_t*>(P.x);
  const uint16_t* const w1 = static_cast<const uint16_t*>(P.w1);
  const uint16_t* const w2 = static_cast<const uint16_t*>(P.w2);
  const int nch = P.c1 + P.c2;

  auto stage_ptr = [&](int ch) { return smem + P.buf_elems + (ch & 1) * P.stage_elems; };

  auto load_chunk = [&](int ch) {
    uint16_t* const sw = stage_ptr(ch);
    if (ch < P.c1) {
      const int i0 = ch * P.KB, kb = min(P.KB, P.k - i0);
      const int wch = kb * P.q * P.p / 8;
      const uint16_t* const src = w1 + static_cast<int64_t>(i0) * P.q * P.p;
      for (int e = tid; e < wch; e += kNT) cp_async16(smem_u32(sw + swz(e) * 8), src + static_cast<int64_t>(e) * 8, 16);
      uint16_t* const sx = sw + P.KB * P.q * P.p;
      const int xw = kb * P.p / 8;  // chunks per x row of this slab
      const uint16_t* const xs = x + row0 * n + static_cast<int64_t>(i0) * P.p;
      for (int e = tid; e < BM * xw; e += kNT) {
        const int b = e / xw, c = e - b * xw;
        const bool ok = b < rows;
        const uint16_t* const s = ok ? xs + static_cast<int64_t>(b) * n + c * 8 : x;
        cp_async16(smem_u32(sx + swz(e) * 8), s, ok ? 16 : 0);
      }
    } else {
      const int c0 = (ch - P.c1) * P.GB, gb = min(P.GB, P.l - c0);
      const int wch = gb * P.s * P.r / 8;
      const uint16_t* const src = w2 + static_cast<int64_t>(c0) * P.s * P.r;
      for (int e = tid; e < wch; e += kNT) cp_async16(smem_u32(sw + swz(e) * 8), src + static_cast<int64_t>(e) * 8, 16);
    }
  };

  // Phase 1 on chunk ch: items (block il, 16-row slice mt of q), each 16 x BM, K = p.
  auto phase1 = [&](int ch) {
    const uint16_t* const sw = stage_ptr(ch);
    const uint16_t* const sx = sw + P.KB * P.q * P.p;
    const int i0 = ch * P.KB, kb = min(P.KB, P.k - i0);
    const int pw = P.p / 8, xw = kb * pw, mtq = P.q / 16;
    const int items = kb * mtq;
    for (int it = warp; it < items; it += kWarps) {
      const int il = it / mtq, mt = it - il * mtq;
      float acc[NI][4];
#pragma unroll
      for (int i = 0; i < NI; ++i)
#pragma unroll
        for (int v = 0; v < 4; ++v) acc[i][v] = 0.f;
      const int arow = il * P.q + mt * 16 + (lane & 15);
      for (int kk = 0; kk < P.p / 16; ++kk) {
        uint32_t af[4];
        sgemm::ldsm_x4(af, smem_u32(sw + swz(arow * pw + kk * 2 + (lane >> 4)) * 8));
#pragma unroll
        for (int nj = 0; nj < BM / 16; ++nj) {
          uint32_t rr[4];
          const int b = nj * 16 + (lane & 7) + ((lane >> 4) << 3);
          const int c = il * pw + kk * 2 + ((lane >> 3) & 1);
          sgemm::ldsm_x4(rr, smem_u32(sx + swz(b * xw + c) * 8));
          sgemm::mma16816<T>(acc[2 * nj], af, rr[0], rr[1]);
          sgemm::mma16816<T>(acc[2 * nj + 1], af, rr[2], rr[3]);
        }
      }
      // acc[ni][2h + {0,1}] = y^T(j = mt·16 + g4 + 8h, b = ni·8 + 2·t4 + {0,1}) -> mid row (u mod l)·RS + u div l
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int u = (i0 + il) * P.q + mt * 16 + g4 + 8 * h;
        const int ud = u / P.l;
        const int R = (u - ud * P.l) * P.RS + ud;
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
          *reinterpret_cast<uint32_t*>(buf + swz(R * CWB + ni) * 8 + 2 * t4) =
              pack2<T>(acc[ni][2 * h], acc[ni][2 * h + 1]);
      }
    }
  };

  // Phase 2 on chunk ch: items (group gl, 16-row slice mt of s), each 16 x BM, K = r; in place.
  auto phase2 = [&](int ch) {
    const uint16_t* const sw = stage_ptr(ch);
    const int c0 = (ch - P.c1) * P.GB, gb = min(P.GB, P.l - c0);
    const int rw = P.r / 8, mts = P.s / 16;
    const int items = gb * mts;
    float acc[kMaxIt][NI][4];
#pragma unroll
    for (int t = 0; t < kMaxIt; ++t) {
#pragma unroll
      for (int i = 0; i < NI; ++i)
#pragma unroll
        for (int v = 0; v < 4; ++v) acc[t][i][v] = 0.f;
      const int item = warp + t * kWarps;
      if (item < items) {
        const int gl = item / mts, mt = item - gl * mts;
        const int arow = gl * P.s + mt * 16 + (lane & 15);
        const int rbase = (c0 + gl) * P.RS;
        for (int kk = 0; kk < P.r / 16; ++kk) {
          uint32_t af[4];
          sgemm::ldsm_x4(af, smem_u32(sw + swz(arow * rw + kk * 2 + (lane >> 4)) * 8));
          const int R = rbase + kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
#pragma unroll
          for (int nj = 0; nj < BM / 16; ++nj) {
            uint32_t rr[4];
            sgemm::ldsm_x4_t(rr, smem_u32(buf + swz(R * CWB + nj * 2 + (lane >> 4)) * 8));
            sgemm::mma16816<T>(acc[t][2 * nj], af, rr[0], rr[1]);
            sgemm::mma16816<T>(acc[t][2 * nj + 1], af, rr[2], rr[3]);
          }
        }
      }
    }
    __syncthreads();  // every read of these groups' mid rows is done before they are overwritten
#pragma unroll
    for (int t = 0; t < kMaxIt; ++t) {
      const int item = warp + t * kWarps;
      if (item < items) {
        const int gl = item / mts, mt = item - gl * mts;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int R = (c0 + gl) * P.RS + mt * 16 + g4 + 8 * h;
#pragma unroll
          for (int ni = 0; ni < NI; ++ni)
            *reinterpret_cast<uint32_t*>(buf + swz(R * CWB + ni) * 8 + 2 * t4) =
                pack2<T>(acc[t][ni][2 * h], acc[t][ni][2 * h + 1]);
        }
      }
    }
  };

  load_chunk(0);
  sgemm::cp_async_commit();
  for (int ch = 0; ch < nch; ++ch) {
    sgemm::cp_async_wait<0>();
    __syncthreads();  // chunk ch has landed; everyone is done with chunk ch - 1 (its stage is free again)
    if (ch + 1 < nch) load_chunk(ch + 1);
    sgemm::cp_async_commit();
    if (ch < P.c1) {
      phase1(ch);
    } else {
      phase2(ch);
    }
  }
  __syncthreads();

  // Phase 3: out[row0 + b, v] for v = 8·vc + [0, 8), two rows (b, b + 1) per thread; a warp covers 4 row
  // pairs x 8 consecutive 16-byte column chunks.
  const int VC = static_cast<int>(L / 8), VC8 = (VC + 7) / 8;
  const int total = (BM / 8) * VC8 * 32;
  uint16_t* const out = static_cast<uint16_t*>(P.out);
  for (int e = tid; e < total; e += kNT) {
    const int ln = e & 31, w = e >> 5;
    const int wb = w / VC8;
    const int vc = (w - wb * VC8) * 8 + (ln & 7);
    const int b = (wb * 4 + (ln >> 3)) * 2;
    if (vc >= VC || b >= rows) continue;
    int d = (vc * 8) / P.l;
    int c = vc * 8 - d * P.l;
    uint32_t lo[4], hi[4];
#pragma unroll
    for (int xx = 0; xx < 8; ++xx) {
      const int R = c * P.RS + d;
      const uint32_t wv = *reinterpret_cast<const uint32_t*>(buf + swz(R * CWB + (b >> 3)) * 8 + (b & 7));
      if ((xx & 1) == 0) {
        lo[xx >> 1] = wv & 0xffffu;
        hi[xx >> 1] = wv >> 16;
      } else {
        lo[xx >> 1] |= wv << 16;
        hi[xx >> 1] |= wv & 0xffff0000u;
      }
      if (++c == P.l) {
        c = 0;
        ++d;
      }
    }
    uint16_t* const o = out + (row0 + b) * L + static_cast<int64_t>(vc) * 8;
    *reinterpret_cast<uint4*>(o) = make_uint4(lo[0], lo[1], lo[2], lo[3]);
    if (b + 1 < rows) *reinterpret_cast<uint4*>(o + L) = make_uint4(hi[0], hi[1], hi[2], hi[3]);
  }
}

// ------------------------------------------------------------------------------------------- host side
struct Plan {
  bool ok;
  int bm;
  Params P;
  int smem_bytes;
};

// Chooses the row tile and chunking, or ok = false when the shape is not for the fused kernel:
// needs p, q, r, s multiples of 16 and <= 128, and the mid buffer (l·max(r, s) rows of BM) plus two
// pipeline stages (>= one w1 block + its x slab, >= one w2 group) within smem_optin bytes. Among the
// fitting BM in {64, 32, 16}, the largest that still gives >= 7/8·num_sms CTAs (1 CTA per SM), else the
// smallest.
inline Plan plan_fused(int64_t batch, int64_t k, int64_t q, int64_t p, int64_t l, int64_t s, int64_t r, int num_sms,
                       int64_t smem_optin) {
  Plan pl{};
  pl.ok = false;
  auto good = [](int64_t v) { return v > 0 && v % 16 == 0 && v <= kMaxBlock; };
  if (batch <= 0 || !good(p) || !good(q) || !good(r) || !good(s)) return pl;
  const int64_t RS = std::max(r, s);
  const int64_t max_items = static_cast<int64_t>(kWarps) * kMaxIt;
  int chosen = 0;
  Params best{};
  int best_smem = 0;
  for (int bm : {64, 32, 16}) {
    const int64_t buf = l * RS * bm;
    const int64_t avail = (smem_optin / 2 - buf) / 2;  // elements per stage
    if (avail <= 0) continue;
    const int64_t stage_cap = std::min<int64_t>(avail, kStageCapElems);
    const int64_t per1 = q * p + bm * p, per2 = s * r;
    int64_t KB = std::min<int64_t>(stage_cap / per1, k);
    int64_t GB = std::min<int64_t>({stage_cap / per2, l, max_items / (s / 16)});
    if (KB < 1 || GB < 1) continue;
    const int64_t stage = ((std::max(KB * per1, GB * per2) + 63) / 64) * 64;
    const int64_t bytes = 2 * (buf + 2 * stage);
    if (bytes > smem_optin) continue;
    Params P{};
    P.batch = static_cast<int>(batch);
    P.k = static_cast<int>(k), P.q = static_cast<int>(q), P.p = static_cast<int>(p);
    P.l = static_cast<int>(l), P.s = static_cast<int>(s), P.r = static_cast<int>(r);
    P.RS = static_cast<int>(RS);
    P.KB = static_cast<int>(KB), P.GB = static_cast<int>(GB);
    P.c1 = static_cast<int>((k + KB - 1) / KB), P.c2 = static_cast<int>((l + GB - 1) / GB);
    P.buf_elems = static_cast<int>(buf);
    P.stage_elems = static_cast<int>(stage);
    const bool enough_ctas = 8 * ((batch + bm - 1) / bm) >= 7 * static_cast<int64_t>(num_sms);
    chosen = bm;
    best = P;
    best_smem = static_cast<int>(bytes);
    if (enough_ctas) break;  // largest fitting tile that fills the GPU
  }
  if (chosen == 0) return pl;
  pl.ok = true;
  pl.bm = chosen;
  pl.P = best;
  pl.smem_bytes = best_smem;
  return pl;
}

template <typename T, int BM>
inline cudaError_t launch_bm(const Params& P, int smem, int smem_optin, cudaStream_t stream) {
  auto kern = monarch_fused_fwd_kernel<T, BM>;
  // Always the device maximum (the same for every caller), never this launch's size: another host thread
  // could otherwise lower the limit between our set and our launch.
  cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_optin);
  if (e != cudaSuccess) return e;
  const int64_t blocks = (static_cast<int64_t>(P.batch) + BM - 1) / BM;
  if (blocks <= 0) return cudaSuccess;
  kern<<<static_cast<unsigned>(blocks), kNT, smem, stream>>>(P);
  return cudaGetLastError();
}

template <typename T>
inline cudaError_t launch_fused(const Plan& pl, int smem_optin, cudaStream_t stream) {
  switch (pl.bm) {
    case 64: return launch_bm<T, 64>(pl.P, pl.smem_bytes, smem_optin, stream);
    case 32: return launch_bm<T, 32>(pl.P, pl.smem_bytes, smem_optin, stream);
    default: return launch_bm<T, 16>(pl.P, pl.smem_bytes, smem_optin, stream);
  }
}

}  // namespace mfused
}  // namespace lowrank
