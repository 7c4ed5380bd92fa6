// CUDA kernels of the iFairy ops: ifairy_quantize, ifairy_dequantize, ifairy_linear.
//
// ifairy_linear, act_quant (W2A8). Activations: per token and part, a = 127 / max(max|x|, 1e-5) and int8
// q = round_half_even(x·a) (ifairy_common.h), stored with a permutation inside every 16-element group,
// q'[4k + j] = q[4j + k], that matches the weight decode below (a permutation of K applied to both operands
// leaves every dot product unchanged). in_pad = ceil(in/64)·64, zero padded.
//   Weight decode: a 32-bit packed word holds 16 weights (byte j: elements 4j..4j+3). For slot k one shift
//   moves the bits of elements 4j+k to bit 7 of byte j, PRMT's sign-replicate mode turns them into byte
//   masks and one LOP3 builds a word of four int8 weights in {-1, 0, +1} per axis: no lookup table.
//   T <= 16, gemv_w2a8_kernel (decode, memory/latency bound): one warp per output row; lane l reads packed
//     words l, l+32, ... (128 coalesced bytes a warp step) and __dp4a adds every token's int8 activations
//     into int32, so all tokens are served by one read of the weights. For T <= 4 (and 2·T·in_pad <= 46 KiB)
//     each block quantizes the tokens into shared memory itself: one launch, no scratch. Otherwise
//     act_quant_kernel (one block per token and part) writes q and a to a scratch first.
//   T > 16, prefill_w2a8_kernel: int8 tensor cores, mma.sync m16n8k32 s8·s8 -> s32 (exact). A block owns
//     64 tokens x 64 rows; per 64-wide K step it stores the q tiles and the packed tile decoded into two
//     int8 planes (Wre, Wim in {-1, 0, 1}) in shared memory, while the next step's global loads are in
//     flight in registers; fragments come from ldmatrix. Four products per fragment pair: A = q_r·Wre,
//     B = q_i·Wim, C = q_i·Wre, D = q_r·Wim.
//   Both end with y_re = s_re·A/a_r + s_im·B/a_i, y_im = -s_re·C/a_i + s_im·D/a_r in fp32.
// act_quant=false: linear_float_kernel, one warp per row (lanes on packed words as above) and up to 8 tokens
//   a pass, fp32 adds and subtracts of the activations by code, lanes reduced with a fixed shuffle tree
//   (deterministic).
// ifairy_quantize: one block per row computes codes, packs them and writes per-row sums (double) and
//   counts; one block then sums the rows in a fixed order: deterministic scales. A NaN or Inf weight raises
//   (a device flag read back with one synchronization).
// Non-finite rule (as on the CPU): a token whose input holds a NaN or ±Inf gets NaN in all its outputs. W2A8:
//   the absmax reduction keeps NaN (nan_max) and a non-finite part gets the scale a = NaN, which every output
//   of the token divides by; act_quant=false: a poison term (x - x, 0 or NaN) joins one sum of each output.
// ifairy_linear_multi: the linears one after the other on one contiguous copy of x.
//
// Packed rows of any width are read safely: rows may start at any byte (in % 16 != 0), so unaligned words are
// funnel-shifted from two aligned 4-byte loads, and bytes near the end of the tensor are loaded one by one;
// nothing past its last byte is read. Bytes past a row's end (the next row's codes) meet zero activations.
// Offsets are 64-bit. Results are deterministic (integer sums; fixed reduction orders).
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
#include <string>
#include <tuple>
#include <vector>

#include "common/cuda_dispatch.cuh"
#include "common/op_boundary.h"
#include "ifairy/ifairy_common.h"

namespace lowrank {
namespace ifairy {
namespace {

using cuda_glue::check_cuda;
using cuda_glue::current_stream;
using cuda_glue::num_sms;

constexpr char kQuant[] = "lowrank.ifairy_quantize";
constexpr char kMulti[] = "lowrank.ifairy_linear_multi";
constexpr char kDequant[] = "lowrank.ifairy_dequantize";
constexpr char kLinear[] = "lowrank.ifairy_linear";
constexpr int64_t kInPad = 64;  // activations padded to whole 16-byte packed chunks



// ---------------------------------------------------------------------------------------- bit decode
// w: 16 packed weights (byte j holds elements 4j..4j+3). For element slot k, byte j of re (im) is the int8
// value of element 4j+k on the real (imaginary) axis: +1, -1 or 0.
// PRMT with selector nibbles 8..B copies bytes 0..3 with their msb replicated over the byte: 0x00 or 0xFF.
__device__ __forceinline__ uint32_t msb_to_byte_mask(uint32_t x) {
  uint32_t r;
  asm("prmt.b32 %0, %1, 0, 0xBA98;" : "=r"(r) : "r"(x));
  return r;
}

template <int K>
__device__ __forceinline__ void decode_slot(uint32_t w, uint32_t& re, uint32_t& im) {
  const uint32_t pos = msb_to_byte_mask(w << (7 - 2 * K));   // 0xFF where the code is positive
  const uint32_t axis = msb_to_byte_mask(w << (6 - 2 * K));  // 0xFF on the imaginary axis
  const uint32_t sgn = ~pos | 0x01010101u;                   // +1 / -1 per byte
  re = sgn & ~axis;
  im = sgn & axis;
}

// Packed bytes 4w..4w+3 of row r as one little-endian word; bytes past the tensor read as 0. Rows may start at
// any byte (nbytes need not be a multiple of 4), so unaligned words are funnel-shifted from two aligned ones.
struct PackedView {
  const uint8_t* base;
  int64_t nbytes, total;  // row width, whole tensor in bytes
  bool base4;             // base 4-byte aligned (else bytes are loaded one by one)
};

__device__ __forceinline__ uint32_t load_word(const PackedView& v, int64_t r, int64_t w) {
  const int64_t abs = r * v.nbytes + 4 * w;
  if (v.base4) {
    const int64_t a4 = abs & ~int64_t(3);
    if ((abs & 3) == 0 && abs + 4 <= v.total) return __ldg(reinterpret_cast<const uint32_t*>(v.base + abs));
    if (a4 + 8 <= v.total) {
      const uint32_t* p = reinterpret_cast<const uint32_t*>(v.base + a4);
      return __funnelshift_r(__ldg(p), __ldg(p + 1), static_cast<uint32_t>(abs & 3) * 8u);
    }
  }
  uint32_t o = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i)
    if (abs + i < v.total) o |= static_cast<uint32_t>(__ldg(v.base + abs + i)) << (8 * i);
  return o;
}

// Sums every accumulator over the warp; each lane ends with the totals.
template <int NT, typename A>
__device__ __forceinline__ void warp_sum(A (&acc)[NT][4]) {
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int k = 0; k < 4; ++k)
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc[t][k] += __shfl_xor_sync(0xffffffffu, acc[t][k], o);
}

// ----------------------------------------------------------------------------------- activations
// q (T, 2, in_pad) int8 with the 16-group permutation; a (T, 2) float. grid (T, 2), 256 threads.
template <typename T>
__global__ void __launch_bounds__(256) act_quant_kernel(const T* __restrict__ xr, const T* __restrict__ xi,
                                                         int64_t in, int64_t in_pad, int8_t* __restrict__ q,
                                                         float* __restrict__ a_out) {
  const int64_t t = blockIdx.x;
  const int part = blockIdx.y;
  const T* x = (part == 0 ? xr : xi) + t * in;
  float m = 0.f;
  for (int64_t j = threadIdx.x; j < in; j += blockDim.x) m = nan_max(m, fabsf(to_f32(x[j])));
  __shared__ float red[32];
  for (int o = 16; o > 0; o >>= 1) m = nan_max(m, __shfl_xor_sync(0xffffffffu, m, o));
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = m;
  __syncthreads();
  if (threadIdx.x < 32) {
    m = threadIdx.x < (blockDim.x >> 5) ? red[threadIdx.x] : 0.f;
    for (int o = 16; o > 0; o >>= 1) m = nan_max(m, __shfl_xor_sync(0xffffffffu, m, o));
    if (threadIdx.x == 0) red[0] = m;
  }
  __syncthreads();
  const float a = act_scale_or_nan(red[0]);  // NaN for a non-finite part: the token's outputs are NaN
  int8_t* dst = q + (2 * t + part) * in_pad;
  for (int64_t p = threadIdx.x; p < in_pad; p += blockDim.x) {
    // destination p = 16g + 4k + j holds source element 16g + 4j + k
    const int64_t g = p >> 4, k = (p >> 2) & 3, j = p & 3;
    const int64_t src = 16 * g + 4 * j + k;
    dst[p] = src < in ? static_cast<int8_t>(act_quant(to_f32(x[src]), a)) : int8_t(0);
  }
  if (threadIdx.x == 0) a_out[2 * t + part] = a;
}

template <typename T>
__device__ __forceinline__ void store_output(T* yr, T* yi, int64_t idx, float s_re, float s_im, float ar, float ai,
                                             int32_t A, int32_t B, int32_t C, int32_t D) {
  const float re = s_re * (static_cast<float>(A) / ar) + s_im * (static_cast<float>(B) / ai);
  const float im = s_im * (static_cast<float>(D) / ar) - s_re * (static_cast<float>(C) / ai);
  yr[idx] = from_f32<T>(re);
  yi[idx] = from_f32<T>(im);
}

// ------------------------------------------------------------------------------ decode (T <= 16)
constexpr int kGemvWarps = 8;
constexpr int kFusedMaxTokens = 4;
constexpr int64_t kFusedSmemBytes = 46 * 1024;  // + the static arrays, under the 48 KiB a block gets by default

// Rows r = blockIdx.x·8 + warp, stepping by gridDim.x·8. Lane l takes packed words l, l+32, ... of the row
// (128 coalesced bytes a warp step) and, per token, the 16 matching permuted int8 activations of each part.
// FUSED (T <= 4, small in): the block first quantizes every token into shared memory itself (one launch, no
// global scratch); otherwise q and a come from act_quant_kernel.
template <int NT, bool FUSED, typename T>
__global__ void __launch_bounds__(kGemvWarps * 32) gemv_w2a8_kernel(PackedView pv, int64_t out, int T_, const T* xr,
                                                                    const T* xi, int64_t in, const int8_t* q_global,
                                                                    int64_t in_pad, const float* a_global,
                                                                    const float* __restrict__ scales, T* yr, T* yi) {
  extern __shared__ __align__(16) int8_t q_smem[];  // FUSED: (T, 2, in_pad) int8
  __shared__ float a_smem[2 * NT];
  __shared__ float red[2 * NT][kGemvWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int8_t* q = q_global;
  const float* a = a_global;
  const int64_t words = (pv.nbytes + 3) / 4;
  if constexpr (FUSED) {
    // The weights do not depend on the activations: start pulling this warp's first row (up to 512 bytes)
    // toward L1 while the block quantizes the tokens.
    const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kGemvWarps + warp;
    if (r0 < out)
      for (int64_t w = lane; w < words && w < 128; w += 32)
        asm volatile("prefetch.global.L1 [%0];" ::"l"(pv.base + r0 * pv.nbytes + 4 * w));
    float mx[2 * NT];
#pragma unroll
    for (int v = 0; v < 2 * NT; ++v) {
      mx[v] = 0.f;
      if (v < 2 * T_) {
        const T* x = ((v & 1) ? xi : xr) + static_cast<int64_t>(v >> 1) * in;
#pragma unroll 4
        for (int64_t j = threadIdx.x; j < in; j += blockDim.x) mx[v] = nan_max(mx[v], fabsf(to_f32(x[j])));
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) mx[v] = nan_max(mx[v], __shfl_xor_sync(0xffffffffu, mx[v], o));
      if (lane == 0) red[v][warp] = mx[v];
    }
    __syncthreads();
    if (threadIdx.x < 2 * NT) {
      float m = 0.f;
#pragma unroll
      for (int k = 0; k < kGemvWarps; ++k) m = nan_max(m, red[threadIdx.x][k]);
      a_smem[threadIdx.x] = act_scale_or_nan(m);
    }
    __syncthreads();
    for (int v = 0; v < 2 * T_; ++v) {
      const T* x = ((v & 1) ? xi : xr) + static_cast<int64_t>(v >> 1) * in;
      const float av = a_smem[v];
#pragma unroll 4
      for (int64_t p = threadIdx.x; p < in_pad; p += blockDim.x) {
        const int64_t src = (p & ~int64_t(15)) + 4 * (p & 3) + ((p >> 2) & 3);  // see act_quant_kernel
        q_smem[v * in_pad + p] = src < in ? static_cast<int8_t>(act_quant(to_f32(x[src]), av)) : int8_t(0);
      }
    }
    __syncthreads();
    q = q_smem;
    a = a_smem;
  }
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kGemvWarps + warp; r < out;
       r += static_cast<int64_t>(gridDim.x) * kGemvWarps) {
    int32_t acc[NT][4];
#pragma unroll
    for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0;
#pragma unroll 4
    for (int64_t w = lane; w < words; w += 32) {
      const uint32_t pw = load_word(pv, r, w);
      uint32_t re[4], im[4];
      decode_slot<0>(pw, re[0], im[0]);
      decode_slot<1>(pw, re[1], im[1]);
      decode_slot<2>(pw, re[2], im[2]);
      decode_slot<3>(pw, re[3], im[3]);
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        if (t < T_) {
          const int8_t* qt = q + static_cast<int64_t>(t) * 2 * in_pad + w * 16;
          int4 vr, vi;
          if constexpr (FUSED) {
            vr = *reinterpret_cast<const int4*>(qt);
            vi = *reinterpret_cast<const int4*>(qt + in_pad);
          } else {
            vr = __ldg(reinterpret_cast<const int4*>(qt));
            vi = __ldg(reinterpret_cast<const int4*>(qt + in_pad));
          }
          const int xrs[4] = {vr.x, vr.y, vr.z, vr.w}, xis[4] = {vi.x, vi.y, vi.z, vi.w};
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            acc[t][0] = __dp4a(static_cast<int>(re[k]), xrs[k], acc[t][0]);  // A
            acc[t][1] = __dp4a(static_cast<int>(im[k]), xis[k], acc[t][1]);  // B
            acc[t][2] = __dp4a(static_cast<int>(re[k]), xis[k], acc[t][2]);  // C
            acc[t][3] = __dp4a(static_cast<int>(im[k]), xrs[k], acc[t][3]);  // D
          }
        }
      }
    }
    warp_sum(acc);
    if (lane == 0) {
      const float s_re = scales[0], s_im = scales[1];
#pragma unroll
      for (int t = 0; t < NT; ++t)
        if (t < T_)
          store_output(yr, yi, static_cast<int64_t>(t) * out + r, s_re, s_im, a[2 * t], a[2 * t + 1], acc[t][0],
                       acc[t][1], acc[t][2], acc[t][3]);
    }
  }
}

// ---------------------------------------------------------------------------- prefill (T > 16)
constexpr int kPBM = 64, kPBN = 64, kPBK = 64, kPStride = 80;  // smem rows padded: conflict-free fragments

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* smem) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void mma_s8(int32_t (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// grid (ceil(out/64), ceil(T/64)), 256 threads = 8 warps as 2 (tokens) x 4 (rows), warp tile 32 x 16.
template <typename T>
__global__ void __launch_bounds__(256) prefill_w2a8_kernel(PackedView pv, int64_t out, int64_t Tn,
                                                           const int8_t* __restrict__ q, int64_t in_pad,
                                                           const float* __restrict__ a,
                                                           const float* __restrict__ scales, T* yr, T* yi) {
  __shared__ __align__(16) int8_t sQ[2][kPBM * kPStride];  // q_r, q_i tiles [token][k]
  __shared__ __align__(16) int8_t sW[2][kPBN * kPStride];  // Wre, Wim tiles [row][k]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, tig = lane & 3;
  const int wm = warp >> 2, wn = warp & 3;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kPBM, n0 = static_cast<int64_t>(blockIdx.x) * kPBN;
  int32_t acc[2][2][4][4];  // [m tile][n tile][A, B, C, D][fragment]
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int s = 0; s < 4; ++s) acc[i][j][s][0] = acc[i][j][s][1] = acc[i][j][s][2] = acc[i][j][s][3] = 0;

  // Global loads of the next K step are issued into registers before the current step's MMAs (a register
  // double buffer), then decoded and stored to shared memory after them.
  int4 qv[2];      // this thread's two 16-byte pieces of the activation tiles
  uint32_t pw;     // this thread's packed word (16 weights)
  const int wrow = tid >> 2, wd = tid & 3;
  auto load_step = [&](int64_t k0) {
#pragma unroll
    for (int it = 0; it < 2; ++it) {
      const int i = tid + it * 256;
      const int part = i >> 8, row = (i >> 2) & 63, c16 = i & 3;
      const int64_t t = m0 + row;
      qv[it] = t < Tn ? __ldg(reinterpret_cast<const int4*>(q + (t * 2 + part) * in_pad + k0 + c16 * 16))
                      : make_int4(0, 0, 0, 0);
    }
    const int64_t r = n0 + wrow;
    pw = r < out ? load_word(pv, r, k0 / 16 + wd) : 0u;  // bytes past the row meet zero activations
  };
  load_step(0);
  for (int64_t k0 = 0; k0 < in_pad; k0 += kPBK) {
#pragma unroll
    for (int it = 0; it < 2; ++it) {
      const int i = tid + it * 256;
      const int part = i >> 8, row = (i >> 2) & 63, c16 = i & 3;
      *reinterpret_cast<int4*>(&sQ[part][row * kPStride + c16 * 16]) = qv[it];
    }
    {
      uint4 re, im;
      decode_slot<0>(pw, re.x, im.x);
      decode_slot<1>(pw, re.y, im.y);
      decode_slot<2>(pw, re.z, im.z);
      decode_slot<3>(pw, re.w, im.w);
      *reinterpret_cast<uint4*>(&sW[0][wrow * kPStride + wd * 16]) = re;
      *reinterpret_cast<uint4*>(&sW[1][wrow * kPStride + wd * 16]) = im;
    }
    __syncthreads();
    if (k0 + kPBK < in_pad) load_step(k0 + kPBK);
#pragma unroll
    for (int kk = 0; kk < kPBK; kk += 32) {
      // ldmatrix x4 (8x8 b16 matrices = 8 rows x 16 bytes): for s8 m16n8k32 the A and B fragments have the
      // byte layout of f16 m16n8k16, so the addressing is the one of common/strided_gemm.cuh.
      uint32_t fa[2][2][4];  // [part][m tile][reg]
#pragma unroll
      for (int p = 0; p < 2; ++p)
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
          ldsm_x4(fa[p][mi], &sQ[p][(wm * 32 + mi * 16 + (lane & 15)) * kPStride + kk + (lane >> 4) * 16]);
      uint32_t fbr[2][4];  // [plane][b0, b1 of n tile 0, b0, b1 of n tile 1]
#pragma unroll
      for (int p = 0; p < 2; ++p) {
        const int n = wn * 16 + (lane & 7) + ((lane >> 4) << 3);
        ldsm_x4(fbr[p], &sW[p][n * kPStride + kk + ((lane >> 3) & 1) * 16]);
      }
#pragma unroll
      for (int ni = 0; ni < 2; ++ni) {
        const uint32_t fb[2][2] = {{fbr[0][2 * ni], fbr[0][2 * ni + 1]}, {fbr[1][2 * ni], fbr[1][2 * ni + 1]}};
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          mma_s8(acc[mi][ni][0], fa[0][mi], fb[0][0], fb[0][1]);  // A = q_r·Wre
          mma_s8(acc[mi][ni][1], fa[1][mi], fb[1][0], fb[1][1]);  // B = q_i·Wim
          mma_s8(acc[mi][ni][2], fa[1][mi], fb[0][0], fb[0][1]);  // C = q_i·Wre
          mma_s8(acc[mi][ni][3], fa[0][mi], fb[1][0], fb[1][1]);  // D = q_r·Wim
        }
      }
    }
    __syncthreads();
  }
  const float s_re = scales[0], s_im = scales[1];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t t = m0 + wm * 32 + mi * 16 + g + half * 8;
      if (t >= Tn) continue;
      const float ar = a[2 * t], ai = a[2 * t + 1];
#pragma unroll
      for (int ni = 0; ni < 2; ++ni)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t r = n0 + wn * 16 + ni * 8 + tig * 2 + e;
          const int f = half * 2 + e;
          if (r < out)
            store_output(yr, yi, t * out + r, s_re, s_im, ar, ai, acc[mi][ni][0][f], acc[mi][ni][1][f],
                         acc[mi][ni][2][f], acc[mi][ni][3][f]);
        }
    }
}

// ------------------------------------------------------------------------------- act_quant=false
constexpr int kFloatTokens = 8;

// One warp per row, tokens [t0, t0 + 8) of x (T, in). Lane l takes packed words l, l + 32, ... (element e of
// word w, at bits 2e, is x's element 16w + e) and adds or subtracts the matching activations in fp32.
template <typename T>
__global__ void __launch_bounds__(kGemvWarps * 32) linear_float_kernel(PackedView pv, int64_t out, int64_t in,
                                                                       int64_t Tn, const T* __restrict__ xr,
                                                                       const T* __restrict__ xi,
                                                                       const float* __restrict__ scales, T* yr,
                                                                       T* yi) {
  const int lane = threadIdx.x & 31;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * kFloatTokens;
  const int nt = static_cast<int>(Tn - t0 < kFloatTokens ? Tn - t0 : kFloatTokens);
  const int64_t words = (pv.nbytes + 3) / 4;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kGemvWarps + (threadIdx.x >> 5); r < out;
       r += static_cast<int64_t>(gridDim.x) * kGemvWarps) {
    float acc[kFloatTokens][4];
#pragma unroll
    for (int t = 0; t < kFloatTokens; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
    for (int64_t w = lane; w < words; w += 32) {
      const uint32_t pw = load_word(pv, r, w);
#pragma unroll
      for (int e = 0; e < 16; ++e) {
        const int64_t j = 16 * w + e;
        if (j >= in) break;
        const uint32_t c = (pw >> (2 * e)) & 3u;
        const bool positive = c & 1u, imag = c & 2u;
#pragma unroll
        for (int t = 0; t < kFloatTokens; ++t) {
          if (t < nt) {
            const float vr = to_f32(xr[(t0 + t) * in + j]), vi = to_f32(xi[(t0 + t) * in + j]);
            const float sr = positive ? vr : -vr, si = positive ? vi : -vi;
            // 0 for finite inputs, NaN otherwise, into one sum of each output: the non-finite rule
            const float poison = (vr - vr) + (vi - vi);
            acc[t][0] += poison, acc[t][3] += poison;
            if (imag) {
              acc[t][1] += si, acc[t][3] += sr;
            } else {
              acc[t][0] += sr, acc[t][2] += si;
            }
          }
        }
      }
    }
    warp_sum(acc);
    if (lane == 0) {
      const float s_re = scales[0], s_im = scales[1];
#pragma unroll
      for (int t = 0; t < kFloatTokens; ++t)
        if (t < nt) {
          const int64_t idx = (t0 + t) * out + r;
          yr[idx] = from_f32<T>(s_re * acc[t][0] + s_im * acc[t][1]);
          yi[idx] = from_f32<T>(s_im * acc[t][3] - s_re * acc[t][2]);
        }
    }
  }
}

// ------------------------------------------------------------------------------------ quantize
// Fixed-order tree sums of three per-thread values over a 256-thread block (deterministic); thread 0
// reads the totals from element 0. Every thread of the block must call it.
__device__ __forceinline__ void block_sum3(double* red_re, double* red_im, long long* red_n, double sre, double sim,
                                           long long n) {
  red_re[threadIdx.x] = sre, red_im[threadIdx.x] = sim, red_n[threadIdx.x] = n;
  __syncthreads();
  for (int s = 128; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      red_re[threadIdx.x] += red_re[threadIdx.x + s];
      red_im[threadIdx.x] += red_im[threadIdx.x + s];
      red_n[threadIdx.x] += red_n[threadIdx.x + s];
    }
    __syncthreads();
  }
}

// One block (256 threads) per row: codes packed a byte per thread-iteration; per-row |w| sums and counts.
template <typename T>
__global__ void __launch_bounds__(256) quantize_rows_kernel(const T* __restrict__ wr, const T* __restrict__ wi,
                                                            int64_t out, int64_t in, int64_t nb,
                                                            uint8_t* __restrict__ packed, double* __restrict__ sums,
                                                            long long* __restrict__ counts,
                                                            int* __restrict__ nonfinite) {
  __shared__ double red_re[256], red_im[256];
  __shared__ long long red_n[256];
  for (int64_t r = blockIdx.x; r < out; r += gridDim.x) {
    double sre = 0.0, sim = 0.0;
    long long n = 0;
    for (int64_t b = threadIdx.x; b < nb; b += blockDim.x) {
      uint32_t byte = 0;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t j = 4 * b + e;
        if (j < in) {
          const float x = to_f32(wr[r * in + j]), y = to_f32(wi[r * in + j]);
          if (!(fabsf(x) <= 3.40282347e38f && fabsf(y) <= 3.40282347e38f)) *nonfinite = 1;  // benign race
          const uint32_t c = phase_code(x, y);
          byte |= c << (2 * e);
          if (c & 2u) {
            sim += fabs(static_cast<double>(y));
          } else {
            sre += fabs(static_cast<double>(x));
            ++n;
          }
        }
      }
      packed[r * nb + b] = static_cast<uint8_t>(byte);
    }
    block_sum3(red_re, red_im, red_n, sre, sim, n);
    if (threadIdx.x == 0) sums[2 * r] = red_re[0], sums[2 * r + 1] = red_im[0], counts[r] = red_n[0];
    __syncthreads();
  }
}

// One block of 256: fixed-order sums over the rows, then the scales.
__global__ void __launch_bounds__(256) quantize_scales_kernel(const double* __restrict__ sums,
                                                              const long long* __restrict__ counts, int64_t out,
                                                              int64_t in, float* __restrict__ scales) {
  __shared__ double red_re[256], red_im[256];
  __shared__ long long red_n[256];
  double sre = 0.0, sim = 0.0;
  long long n = 0;
  for (int64_t r = threadIdx.x; r < out; r += blockDim.x) sre += sums[2 * r], sim += sums[2 * r + 1], n += counts[r];
  block_sum3(red_re, red_im, red_n, sre, sim, n);
  if (threadIdx.x == 0) {
    const long long n_re = red_n[0], n_im = static_cast<long long>(out * in) - red_n[0];
    scales[0] = axis_scale(red_re[0], n_re);
    scales[1] = axis_scale(red_im[0], n_im);
  }
}

__global__ void dequantize_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ scales, int64_t out,
                                  int64_t in, int64_t nb, float* __restrict__ wr, float* __restrict__ wi) {
  const float s_re = scales[0], s_im = scales[1];
  const int64_t total = out * in;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += step) {
    const int64_t r = e / in, j = e - r * in;
    const uint32_t c = (static_cast<uint32_t>(packed[r * nb + (j >> 2)]) >> (2 * (j & 3))) & 3u;
    wr[e] = c == 1u ? s_re : (c == 0u ? -s_re : 0.f);
    wi[e] = c == 3u ? s_im : (c == 2u ? -s_im : 0.f);
  }
}

unsigned grid_for(int64_t n, int sms) {
  const int64_t blocks = std::min<int64_t>((n + 255) / 256, static_cast<int64_t>(sms) * 16);
  return static_cast<unsigned>(std::max<int64_t>(blocks, 1));
}

// ------------------------------------------------------------------------------------ host side
std::tuple<Tensor, Tensor> quantize_cuda(Tensor w_real, Tensor w_imag) {
  check_quantize_inputs(kQuant, w_real, w_imag);
  LOWRANK_CHECK(w_real.is_cuda(), kQuant, ": the CUDA kernel got a tensor on ", device_name(w_real));
  torch::stable::accelerator::DeviceGuard guard(w_real.get_device_index());
  const Tensor wr = torch::stable::contiguous(w_real), wi = torch::stable::contiguous(w_imag);
  const int64_t out = wr.size(0), in = wr.size(1), nb = packed_width(in);
  Tensor packed = torch::stable::new_empty(wr, {out, nb}, ScalarType::Byte);
  Tensor scales = torch::stable::new_empty(wr, {2}, ScalarType::Float);
  const int32_t dev = wr.get_device_index();
  const cudaStream_t stream = current_stream(dev);
  const int64_t rows = std::max<int64_t>(out, 1);
  Tensor sums = torch::stable::new_empty(wr, {2 * rows}, ScalarType::Double);
  Tensor counts = torch::stable::new_empty(wr, {rows}, ScalarType::Long);
  Tensor nonfinite = torch::stable::new_empty(wr, {1}, ScalarType::Int);
  torch::stable::zero_(nonfinite);
  if (out > 0) {
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(out, 65535));
    dispatch_cuda_float(kQuant, wr.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      quantize_rows_kernel<T><<<blocks, 256, 0, stream>>>(
          static_cast<const T*>(wr.const_data_ptr()), static_cast<const T*>(wi.const_data_ptr()), out, in, nb,
          static_cast<uint8_t*>(packed.mutable_data_ptr()), static_cast<double*>(sums.mutable_data_ptr()),
          static_cast<long long*>(counts.mutable_data_ptr()), static_cast<int*>(nonfinite.mutable_data_ptr()));
    });
    check_cuda(cudaGetLastError(), kQuant, "quantize_rows launch");
    // a NaN or Inf weight would give a NaN, Inf or silently clamped scale: refuse, as the CPU kernel does
    // (one sync; quantizing is a load-time step)
    int host_flag = 0;
    check_cuda(cudaMemcpyAsync(&host_flag, nonfinite.const_data_ptr(), sizeof(int), cudaMemcpyDeviceToHost, stream),
               kQuant, "non-finite flag copy");
    check_cuda(cudaStreamSynchronize(stream), kQuant, "non-finite flag sync");
    LOWRANK_CHECK(host_flag == 0, kQuant, ": w_real and w_imag must be finite (got a NaN or Inf)");
  }
  quantize_scales_kernel<<<1, 256, 0, stream>>>(static_cast<const double*>(sums.const_data_ptr()),
                                                static_cast<const long long*>(counts.const_data_ptr()), out, in,
                                                static_cast<float*>(scales.mutable_data_ptr()));
  check_cuda(cudaGetLastError(), kQuant, "quantize_scales launch");
  return {packed, scales};
}

std::tuple<Tensor, Tensor> dequantize_cuda(Tensor packed, Tensor scales, int64_t in) {
  check_dequantize_inputs(kDequant, packed, scales, in);
  LOWRANK_CHECK(packed.is_cuda(), kDequant, ": the CUDA kernel got a tensor on ", device_name(packed));
  torch::stable::accelerator::DeviceGuard guard(packed.get_device_index());
  const Tensor pk = torch::stable::contiguous(packed), sc = torch::stable::contiguous(scales);
  const int64_t out = pk.size(0), nb = pk.size(1);
  Tensor wr = torch::stable::new_empty(pk, {out, in}, ScalarType::Float);
  Tensor wi = torch::stable::new_empty(pk, {out, in}, ScalarType::Float);
  if (out * in == 0) return {wr, wi};
  const int32_t dev = pk.get_device_index();
  dequantize_kernel<<<grid_for(out * in, num_sms(dev)), 256, 0, current_stream(dev)>>>(
      static_cast<const uint8_t*>(pk.const_data_ptr()), static_cast<const float*>(sc.const_data_ptr()), out, in, nb,
      static_cast<float*>(wr.mutable_data_ptr()), static_cast<float*>(wi.mutable_data_ptr()));
  check_cuda(cudaGetLastError(), kDequant, "dequantize launch");
  return {wr, wi};
}

struct GemvArgs {
  PackedView pv;
  int64_t out;
  int Tn;
  int64_t in, in_pad;
  const int8_t* q;
  const float* a;
  const float* s;
};

template <int NT, bool FUSED, typename T>
void launch_gemv_nt(const GemvArgs& g, const T* xr, const T* xi, T* yr, T* yi, unsigned blocks, cudaStream_t stream) {
  const size_t smem = FUSED ? static_cast<size_t>(2 * g.Tn * g.in_pad) : 0;
  gemv_w2a8_kernel<NT, FUSED, T><<<blocks, kGemvWarps * 32, smem, stream>>>(g.pv, g.out, g.Tn, xr, xi, g.in, g.q,
                                                                          g.in_pad, g.a, g.s, yr, yi);
}

// LOWRANK_IFAIRY_GEMV_FUSED=0 sends every decode call through the separate activation-quantization kernel:
// the fused kernel re-reads x in every block, which a review estimated can cost more L2 traffic than the
// packed weights at 8192² (bench/ab_paths.py times both; read once per process).
bool gemv_fused_allowed() {
  static const bool on = [] {
    const char* v = std::getenv("LOWRANK_IFAIRY_GEMV_FUSED");
    return !(v != nullptr && std::strcmp(v, "0") == 0);
  }();
  return on;
}

bool gemv_fused_fits(int64_t T, int64_t in_pad) {
  return gemv_fused_allowed() && T <= kFusedMaxTokens && 2 * T * in_pad <= kFusedSmemBytes;
}

template <typename T>
void launch_gemv(const GemvArgs& g, const T* xr, const T* xi, T* yr, T* yi, int sms, cudaStream_t stream) {
  const int64_t groups = (g.out + kGemvWarps - 1) / kGemvWarps;
  if (gemv_fused_fits(g.Tn, g.in_pad)) {
    // every block quantizes the tokens itself: cap the blocks so that work stays small beside the weights
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(groups, 4 * static_cast<int64_t>(sms)));
    switch (g.Tn) {
      case 1: launch_gemv_nt<1, true, T>(g, xr, xi, yr, yi, blocks, stream); break;
      case 2: launch_gemv_nt<2, true, T>(g, xr, xi, yr, yi, blocks, stream); break;
      default: launch_gemv_nt<4, true, T>(g, xr, xi, yr, yi, blocks, stream); break;
    }
    return;
  }
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(groups, 65535));
  if (g.Tn <= 2)
    launch_gemv_nt<2, false, T>(g, xr, xi, yr, yi, blocks, stream);
  else if (g.Tn <= 4)
    launch_gemv_nt<4, false, T>(g, xr, xi, yr, yi, blocks, stream);
  else if (g.Tn <= 8)
    launch_gemv_nt<8, false, T>(g, xr, xi, yr, yi, blocks, stream);
  else
    launch_gemv_nt<16, false, T>(g, xr, xi, yr, yi, blocks, stream);
}

// One linear on x (already checked and contiguous) into fresh outputs.
std::tuple<Tensor, Tensor> run_linear(const LinearDims& d, const Tensor& xr, const Tensor& xi, const Tensor& pk,
                                      const Tensor& sc, bool act_quant) {
  Tensor yr = torch::stable::new_empty(xr, out_shape_like(xr, d.out));
  Tensor yi = torch::stable::new_empty(xr, out_shape_like(xr, d.out));
  if (d.T == 0 || d.out == 0) return {yr, yi};
  if (d.in == 0) {
    torch::stable::zero_(yr);
    torch::stable::zero_(yi);
    return {yr, yi};
  }
  LOWRANK_CHECK(d.T <= std::numeric_limits<int32_t>::max() && d.out <= int64_t(65535) * 65535, kLinear,
                ": too many tokens or rows for one launch (T=", d.T, ", out=", d.out, ")");
  const int32_t dev = xr.get_device_index();
  const cudaStream_t stream = current_stream(dev);
  const uint8_t* pbase = static_cast<const uint8_t*>(pk.const_data_ptr());
  const float* s = static_cast<const float*>(sc.const_data_ptr());
  dispatch_cuda_float(kLinear, xr.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xrp = static_cast<const T*>(xr.const_data_ptr());
    const T* xip = static_cast<const T*>(xi.const_data_ptr());
    T* yrp = static_cast<T*>(yr.mutable_data_ptr());
    T* yip = static_cast<T*>(yi.mutable_data_ptr());
    const uintptr_t addr = reinterpret_cast<uintptr_t>(pbase);  // a view may start at any byte
    const PackedView pv{pbase, d.nbytes, d.out * d.nbytes, addr % 4 == 0};
    if (!act_quant) {
      const int64_t token_groups = (d.T + kFloatTokens - 1) / kFloatTokens;
      LOWRANK_CHECK(token_groups <= 65535, kLinear, ": x_real must have at most ", 65535 * kFloatTokens,
                    " tokens (its leading dims' product) with act_quant=False (got ", d.T, " tokens, x_real of shape ",
                    shape_str(xr), ")");
      const int64_t row_groups = (d.out + kGemvWarps - 1) / kGemvWarps;
      const dim3 grid(static_cast<unsigned>(std::min<int64_t>(row_groups, 65535)), static_cast<unsigned>(token_groups));
      linear_float_kernel<T><<<grid, kGemvWarps * 32, 0, stream>>>(pv, d.out, d.in, d.T, xrp, xip, s, yrp, yip);
      check_cuda(cudaGetLastError(), kLinear, "linear_float launch");
      return;
    }
    const int64_t in_pad = (d.in + kInPad - 1) / kInPad * kInPad;
    GemvArgs g{pv, d.out, static_cast<int>(std::min<int64_t>(d.T, 16)), d.in, in_pad, nullptr, nullptr, s};
    if (d.T <= 16 && gemv_fused_fits(d.T, in_pad)) {
      launch_gemv<T>(g, xrp, xip, yrp, yip, num_sms(dev), stream);
      check_cuda(cudaGetLastError(), kLinear, "gemv_w2a8 (fused) launch");
      return;
    }
    // the prefill grid's y dimension holds the token tiles: refuse before allocating or launching anything
    LOWRANK_CHECK(d.T <= 16 || (d.T + kPBM - 1) / kPBM <= 65535, kLinear, ": x_real must have at most ",
                  int64_t(65535) * kPBM, " tokens (its leading dims' product) (got ", d.T, " tokens, x_real of shape ",
                  shape_str(xr), ")");
    Tensor q = torch::stable::new_empty(xr, {d.T * 2 * in_pad}, ScalarType::Char);
    Tensor a = torch::stable::new_empty(xr, {d.T * 2}, ScalarType::Float);
    int8_t* qp = static_cast<int8_t*>(q.mutable_data_ptr());
    float* ap = static_cast<float*>(a.mutable_data_ptr());
    act_quant_kernel<T><<<dim3(static_cast<unsigned>(d.T), 2), 256, 0, stream>>>(xrp, xip, d.in, in_pad, qp, ap);
    check_cuda(cudaGetLastError(), kLinear, "act_quant launch");
    if (d.T <= 16) {
      g.q = qp, g.a = ap;
      launch_gemv<T>(g, xrp, xip, yrp, yip, num_sms(dev), stream);
      check_cuda(cudaGetLastError(), kLinear, "gemv_w2a8 launch");
    } else {
      const dim3 grid(static_cast<unsigned>((d.out + kPBN - 1) / kPBN), static_cast<unsigned>((d.T + kPBM - 1) / kPBM));
      prefill_w2a8_kernel<T><<<grid, 256, 0, stream>>>(pv, d.out, d.T, qp, in_pad, ap, s, yrp, yip);
      check_cuda(cudaGetLastError(), kLinear, "prefill_w2a8 launch");
    }
  });
  return {yr, yi};
}

std::tuple<Tensor, Tensor> linear_cuda(Tensor x_real, Tensor x_imag, Tensor packed, Tensor scales, bool act_quant,
                                       std::optional<int64_t> in_features) {
  const LinearDims d = linear_dims(kLinear, x_real, x_imag, packed, scales, act_quant, in_features);
  LOWRANK_CHECK(x_real.is_cuda(), kLinear, ": the CUDA kernel got a tensor on ", device_name(x_real));
  torch::stable::accelerator::DeviceGuard guard(x_real.get_device_index());
  return run_linear(d, torch::stable::contiguous(x_real), torch::stable::contiguous(x_imag),
                    torch::stable::contiguous(packed), torch::stable::contiguous(scales), act_quant);
}

// Several linears on one x: one call and one contiguous copy of x; each linear quantizes x itself (the decode
// kernels fuse the quantization into their launch).
std::vector<Tensor> linear_multi_cuda(Tensor x_real, Tensor x_imag, std::vector<Tensor> packed,
                                      std::vector<Tensor> scales, bool act_quant, std::optional<int64_t> in_features) {
  LinearDims xd{};
  const std::vector<LinearDims> wd = multi_dims(kMulti, x_real, x_imag, packed, scales, act_quant, in_features, &xd);
  LOWRANK_CHECK(x_real.is_cuda(), kMulti, ": the CUDA kernel got a tensor on ", device_name(x_real));
  torch::stable::accelerator::DeviceGuard guard(x_real.get_device_index());
  const Tensor xr = torch::stable::contiguous(x_real), xi = torch::stable::contiguous(x_imag);
  std::vector<Tensor> ys;
  for (size_t i = 0; i < packed.size(); ++i) {
    auto [yr, yi] = run_linear(wd[i], xr, xi, torch::stable::contiguous(packed[i]),
                               torch::stable::contiguous(scales[i]), act_quant);
    ys.push_back(yr);
    ys.push_back(yi);
  }
  return ys;
}

}  // namespace
}  // namespace ifairy
}  // namespace lowrank

STABLE_TORCH_LIBRARY_IMPL(lowrank, CUDA, m) {
  m.impl("ifairy_quantize", LOWRANK_BOX(lowrank::ifairy::kQuant, lowrank::ifairy::quantize_cuda));
  m.impl("ifairy_dequantize", LOWRANK_BOX(lowrank::ifairy::kDequant, lowrank::ifairy::dequantize_cuda));
  m.impl("ifairy_linear", LOWRANK_BOX(lowrank::ifairy::kLinear, lowrank::ifairy::linear_cuda));
  m.impl("ifairy_linear_multi", LOWRANK_BOX(lowrank::ifairy::kMulti, lowrank::ifairy::linear_multi_cuda));
}
