// GaLore / Fira / DCT projection ops on the CPU, on the shared GEMM engine (common/cpu_gemm.h). Both sides
// of a projection run as "rows of A times B": A = G (right) or Gᵀ (left, addressing only), so one driver
// serves both and the row sqnorms of A are the per-row (right) / per-column (left) sqnorms of G.
//  * galore_project: row blocks of A (MC rows) own their output rows; each KC slice of A is packed once,
//    its squares summed from the packed (cache-resident) strips, then multiplied by the whole of P, packed
//    once per call. G is read once.
//  * galore_update_: MT x NC tiles of W; the tile of back(M) (a K = r GEMM) lives in a per-thread fp32
//    (fp64) scratch, and the epilogue reads W (and G) and writes W once. No full-size temporary.
//  * basis_scores: MT x NC tiles of A·Qᵀ in scratch, |·| summed per column into per-row-tile partials,
//    then the partials are added in row-tile order (deterministic, independent of the thread count).
//  * adam_lowrank_, dct_basis_: elementwise.
// bf16 / fp16 G are converted to fp32 while packing; every sum is in fp32 (fp64 for float64).
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "common/cpu_dispatch.h"
#include "common/cpu_gemm.h"
#include "common/op_boundary.h"
#include "projection/projection_common.h"

namespace lowrank {
namespace {


template <typename T>
T* ptr_of(const Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

// C (rows x N) = A (rows x K) · B (K x N), C in Acc; sq, if given, gets Σ_k A(row, k)² per row.
template <typename Acc, typename T>
void gemm_rows_with_sqnorms(int64_t rows, int64_t N, int64_t K, Operand<const T> A, Operand<const Acc> B,
                            Operand<Acc> C, Acc* sq) {
  using W = GemmWorkspace<Acc>;
  constexpr int64_t MR = W::MR, NR = W::NR, MC = W::MC, KC = W::KC;
  if (rows <= 0) return;
  const int64_t n_strips = (N + NR - 1) / NR, ldb = n_strips * NR, ldc = c_buffer_ld<Acc>(N);
  const int64_t k_blocks = (K + KC - 1) / KC;
  // B packed once: KC slice at k0 starts at k0·ldb and holds n_strips strips of klen x NR.
  auto packed = detail::aligned_buffer<Acc>(std::max<int64_t>(1, K * ldb));
  torch::stable::parallel_for(0, k_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t kb = begin; kb < end; ++kb) {
      const int64_t k0 = kb * KC;
      pack_strips<NR, Acc>(packed.get() + k0 * ldb, &B.at(0, k0, 0), B.cs, B.rs, N, std::min(KC, K - k0));
    }
  });
  // row blocks of at most MC, as many as a multiple of the threads (each row's result does not depend on it)
  const int64_t mb = balanced_tile(rows, MC, MR, torch::stable::get_num_threads());
  const int64_t m_blocks = (rows + mb - 1) / mb;
  struct Scratch {
    std::unique_ptr<Acc, detail::FreeDeleter> Ap, Cb;
  };
  parallel_tasks(
      m_blocks, [&] { return Scratch{detail::aligned_buffer<Acc>(MC * KC), detail::aligned_buffer<Acc>(MC * ldc)}; },
      [&](Scratch& scratch, int64_t blk) {
      auto& Ap = scratch.Ap;
      auto& Cb = scratch.Cb;
      Acc sq_acc[MC];
      const int64_t m0 = blk * mb, mlen = std::min(mb, rows - m0), m_strips = (mlen + MR - 1) / MR;
      std::memset(Cb.get(), 0, sizeof(Acc) * MC * ldc);
      for (int64_t i = 0; i < MC; ++i) sq_acc[i] = Acc(0);
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t klen = std::min(KC, K - k0);
        pack_strips<MR, Acc>(Ap.get(), &A.at(0, m0, k0), A.rs, A.cs, mlen, klen);
        if (sq != nullptr) {
          for (int64_t s = 0; s < m_strips; ++s) {
            const Acc* a = Ap.get() + s * klen * MR;
            Acc* q = sq_acc + s * MR;
            for (int64_t k = 0; k < klen; ++k)
              for (int64_t w = 0; w < MR; ++w) q[w] += a[k * MR + w] * a[k * MR + w];
          }
        }
        const Acc* Bp = packed.get() + k0 * ldb;
        for (int64_t sn = 0; sn < n_strips; ++sn)
          for (int64_t sm = 0; sm < m_strips; ++sm)
            detail::micro_kernel(klen, Ap.get() + sm * klen * MR, Bp + sn * klen * NR, Cb.get() + sm * MR * ldc + sn * NR,
                                 ldc);
      }
      for (int64_t i = 0; i < mlen; ++i)
        for (int64_t j = 0; j < N; ++j) C.at(0, m0 + i, j) = Cb.get()[i * ldc + j];
      if (sq != nullptr)
        for (int64_t i = 0; i < mlen; ++i) sq[m0 + i] = sq_acc[i];
      });
}

std::tuple<Tensor, Tensor> galore_project_cpu(Tensor G, Tensor P, bool left, bool want_sqnorms) {
  const ProjDims d = projection_dims(kProjectOp, G, "G", P, left);
  LOWRANK_CHECK(G.is_cpu(), kProjectOp, ": the CPU kernel got a tensor on ", device_name(G));
  P = lowrank::contiguous(P, "P");
  const ScalarType acc_st = companion_type(G.scalar_type());
  Tensor R = lowrank::new_empty(G, left ? std::vector<int64_t>{d.r, d.n} : std::vector<int64_t>{d.m, d.r}, acc_st);
  Tensor sq = lowrank::new_empty(G, {want_sqnorms ? (left ? d.n : d.m) : 0}, acc_st);
  const int64_t s0 = G.stride(0), s1 = G.stride(1);
  dispatch_float(G.scalar_type(), kProjectOp, [&](auto tag) {
    using T = decltype(tag);
    using Acc = acc_t<T>;
    const T* g = ptr_of<const T>(G);
    const Acc* p = ptr_of<const Acc>(P);
    Acc* r = ptr_of<Acc>(R);
    Acc* q = want_sqnorms ? ptr_of<Acc>(sq) : nullptr;
    if (!left) {
      // R (m, r) = G · Pᵀ: B(k, j) = P[j, k]
      gemm_rows_with_sqnorms<Acc, T>(d.m, d.r, d.n, operand<const T>(g, 0, s0, s1), operand<const Acc>(p, 0, 1, d.n),
                                     operand<Acc>(r, 0, d.r, 1), q);
    } else {
      // Rᵀ (n, r) = Gᵀ · P: B(k, j) = P[k, j], output row i is R's column i
      gemm_rows_with_sqnorms<Acc, T>(d.n, d.r, d.m, operand<const T>(g, 0, s1, s0), operand<const Acc>(p, 0, d.r, 1),
                                     operand<Acc>(r, 0, 1, d.n), q);
    }
  });
  return {R, sq};
}

Tensor adam_lowrank_cpu(Tensor exp_avg, Tensor exp_avg_sq, Tensor R, double beta1, double beta2, double eps) {
  check_adam_args(exp_avg, exp_avg_sq, R);
  LOWRANK_CHECK(R.is_cpu(), kAdamOp, ": the CPU kernel got a tensor on ", device_name(R));
  R = lowrank::contiguous(R, "R");
  Tensor N = lowrank::new_empty(R, R.sizes());
  const int64_t numel = R.numel();
  auto run = [&](auto tag) {
    using T = decltype(tag);
    // scalars rounded like torch's in-place ops round them (mul_(beta1).add_(R, alpha=1 - beta1) in T)
    const T b1 = static_cast<T>(beta1), c1 = static_cast<T>(1.0 - beta1);
    const T b2 = static_cast<T>(beta2), c2 = static_cast<T>(1.0 - beta2), e = static_cast<T>(eps);
    T* m = ptr_of<T>(exp_avg);
    T* v = ptr_of<T>(exp_avg_sq);
    const T* g = ptr_of<const T>(R);
    T* out = ptr_of<T>(N);
    torch::stable::parallel_for(0, numel, 4096, [&](int64_t begin, int64_t end) {
      // distinct tensors (checked): restrict lets the loop vectorize, sqrt included (-fno-math-errno)
      T* __restrict mr = m + begin;
      T* __restrict vr = v + begin;
      const T* __restrict gr = g + begin;
      T* __restrict outr = out + begin;
      const T B1 = b1, C1 = c1, B2 = b2, C2 = c2, E = e;  // locals: captured references could alias the stores
      for (int64_t i = 0; i < end - begin; ++i) {
        const T gi = gr[i];
        const T mi = mr[i] * B1 + C1 * gi;
        const T vi = vr[i] * B2 + C2 * (gi * gi);
        mr[i] = mi;
        vr[i] = vi;
        outr[i] = mi / (std::sqrt(vi) + E);
      }
    });
  };
  if (R.scalar_type() == ScalarType::Double)
    run(double{});
  else
    run(float{});
  return N;
}

void galore_update_cpu(Tensor W, Tensor M, Tensor P, bool left, double decay, std::optional<Tensor> G,
                       std::optional<Tensor> residual_scale) {
  const ProjDims d = check_update_args(W, M, P, left, G, residual_scale);
  LOWRANK_CHECK(W.is_cpu(), kUpdateOp, ": the CPU kernel got a tensor on ", device_name(W));
  if (d.m == 0 || d.n == 0) return;
  M = lowrank::contiguous(M, "M"), P = lowrank::contiguous(P, "P");
  Tensor Gc, sc;
  if (G.has_value()) Gc = lowrank::contiguous(*G, "G"), sc = lowrank::contiguous(*residual_scale, "residual_scale");
  const bool has_g = G.has_value();
  dispatch_float(W.scalar_type(), kUpdateOp, [&](auto wtag) {
    using T = decltype(wtag);
    using Acc = acc_t<T>;
    using Ws = GemmWorkspace<Acc>;
    // back(M) = A (m, r) · B (r, n): right A = M, B = P; left A = P, B = M. Both contiguous.
    const Acc* a = ptr_of<const Acc>(left ? P : M);
    const Acc* b = ptr_of<const Acc>(left ? M : P);
    const Acc* scale = has_g ? ptr_of<const Acc>(sc) : nullptr;
    T* w = ptr_of<T>(W);
    const Acc dec = static_cast<Acc>(decay);
    // tiles of at most MT x NC, balanced, the row-tile count a multiple of the threads (results do not
    // depend on the tiling: each W element is one dot product of length r plus its epilogue)
    const int64_t mt = balanced_tile(d.m, Ws::MT, Ws::MR, torch::stable::get_num_threads());
    const int64_t nt = balanced_tile(d.n, Ws::NC, Ws::NR);
    const int64_t m_tiles = (d.m + mt - 1) / mt, n_tiles = (d.n + nt - 1) / nt;
    auto run = [&](auto gtag) {
      using TG = decltype(gtag);
      const TG* g = has_g ? ptr_of<const TG>(Gc) : nullptr;
      struct Scratch {
        std::unique_ptr<Ws> ws;
        std::unique_ptr<Acc, detail::FreeDeleter> tile;
      };
      parallel_tasks(
          m_tiles * n_tiles,
          [&] { return Scratch{std::make_unique<Ws>(), detail::aligned_buffer<Acc>(Ws::MT * Ws::NC)}; },
          [&](Scratch& scratch, int64_t t) {
          Ws& ws = *scratch.ws;
          auto& tile = scratch.tile;
          const int64_t m0 = t / n_tiles * mt, n0 = t % n_tiles * nt;
          const int64_t mlen = std::min(mt, d.m - m0), nlen = std::min(nt, d.n - n0);
          Acc* bm = tile.get();
          gemm_tile<Acc, Acc, Acc, Acc>(mlen, nlen, d.r, operand<const Acc>(a + m0 * d.r, 0, d.r, 1),
                                        operand<const Acc>(b + n0, 0, d.n, 1), operand<Acc>(bm, 0, Ws::NC, 1), ws);
          for (int64_t i = 0; i < mlen; ++i) {
            T* wr = w + (m0 + i) * d.n + n0;
            const Acc* br = bm + i * Ws::NC;
            if (g == nullptr) {
              for (int64_t j = 0; j < nlen; ++j) wr[j] = static_cast<T>(dec * (static_cast<Acc>(wr[j]) - br[j]));
            } else {
              const TG* gr = g + (m0 + i) * d.n + n0;
              if (left) {
                const Acc* s = scale + n0;
                for (int64_t j = 0; j < nlen; ++j)
                  wr[j] = static_cast<T>(dec * (static_cast<Acc>(wr[j]) - br[j] - s[j] * static_cast<Acc>(gr[j])));
              } else {
                const Acc s = scale[m0 + i];
                for (int64_t j = 0; j < nlen; ++j)
                  wr[j] = static_cast<T>(dec * (static_cast<Acc>(wr[j]) - br[j] - s * static_cast<Acc>(gr[j])));
              }
            }
          }
          });
    };
    if (has_g)
      dispatch_float(Gc.scalar_type(), kUpdateOp, run);
    else
      run(float{});
  });
}

// Q[i, j] = √(2/n)·cos(π·i·(2j+1)/(2n)), row 0 ·√½. i·(2j+1) is reduced mod 4n exactly (the period of the
// cosine in these units), so the angle handed to cos is < 2π and exact to double rounding at any n.
template <typename T>
void dct_fill(T* q, int64_t n) {
  const double norm = std::sqrt(2.0 / static_cast<double>(n)), row0 = std::sqrt(0.5);
  const double unit = 3.14159265358979323846 / (2.0 * static_cast<double>(n));
  const int64_t period = 4 * n;
  torch::stable::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const double s = i == 0 ? norm * row0 : norm;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t p = (i * (2 * j + 1)) % period;  // < 2n² < 2^63: an n x n Q never has n near 2^31
        q[i * n + j] = static_cast<T>(s * std::cos(unit * static_cast<double>(p)));
      }
    }
  });
}

void dct_basis_cpu(Tensor Q) {
  check_dct_args(Q);
  LOWRANK_CHECK(Q.is_cpu(), kDctOp, ": the CPU kernel got a tensor on ", device_name(Q));
  const int64_t n = Q.size(0);
  if (Q.scalar_type() == ScalarType::Double)
    dct_fill(ptr_of<double>(Q), n);
  else
    dct_fill(ptr_of<float>(Q), n);
}

Tensor basis_scores_cpu(Tensor G, Tensor Q, bool left) {
  const int64_t k = check_scores_args(G, Q, left);
  LOWRANK_CHECK(G.is_cpu(), kScoresOp, ": the CPU kernel got a tensor on ", device_name(G));
  Q = lowrank::contiguous(Q, "Q");
  const ScalarType acc_st = companion_type(G.scalar_type());
  Tensor scores = lowrank::new_empty(G, {k}, acc_st);
  // rows of A: G's rows (right) or columns (left); K = k; C = A·Qᵀ (rows x k), scores = Σ_rows |C|
  const int64_t rows = left ? G.size(1) : G.size(0);
  const int64_t rs = left ? G.stride(1) : G.stride(0), cs = left ? G.stride(0) : G.stride(1);
  dispatch_float(G.scalar_type(), kScoresOp, [&](auto tag) {
    using T = decltype(tag);
    using Acc = acc_t<T>;
    using Ws = GemmWorkspace<Acc>;
    Acc* out = ptr_of<Acc>(scores);
    if (rows == 0) {
      for (int64_t c = 0; c < k; ++c) out[c] = Acc(0);
      return;
    }
    const T* g = ptr_of<const T>(G);
    const Acc* q = ptr_of<const Acc>(Q);
    const int64_t m_tiles = (rows + Ws::MT - 1) / Ws::MT, n_tiles = (k + Ws::NC - 1) / Ws::NC;
    // fp64 sums whatever Acc: rows / MT partials of similar size, where an fp32 running sum drifts by percents
    std::vector<double> partial(static_cast<size_t>(m_tiles * k));
    torch::stable::parallel_for(0, m_tiles * n_tiles, 1, [&](int64_t begin, int64_t end) {
      Ws ws;
      auto tile = detail::aligned_buffer<Acc>(Ws::MT * Ws::NC);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t mt = t / n_tiles, m0 = mt * Ws::MT, n0 = t % n_tiles * Ws::NC;
        const int64_t mlen = std::min(Ws::MT, rows - m0), nlen = std::min(Ws::NC, k - n0);
        Acc* c = tile.get();
        // B(kk, j) = Q[n0 + j, kk]
        gemm_tile<Acc, T, Acc, Acc>(mlen, nlen, k, operand<const T>(g + m0 * rs, 0, rs, cs),
                                    operand<const Acc>(q + n0 * k, 0, 1, k), operand<Acc>(c, 0, Ws::NC, 1), ws);
        double* p = partial.data() + mt * k + n0;
        for (int64_t j = 0; j < nlen; ++j) p[j] = 0.0;
        for (int64_t i = 0; i < mlen; ++i)
          for (int64_t j = 0; j < nlen; ++j) p[j] += static_cast<double>(std::abs(c[i * Ws::NC + j]));
      }
    });
    torch::stable::parallel_for(0, k, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        double s = 0.0;
        for (int64_t mt = 0; mt < m_tiles; ++mt) s += partial[mt * k + c];
        out[c] = static_cast<Acc>(s);
      }
    });
  });
  return scores;
}

}  // namespace
}  // namespace lowrank

STABLE_TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("galore_project", LOWRANK_BOX(lowrank::kProjectOp, lowrank::galore_project_cpu));
  m.impl("adam_lowrank_", LOWRANK_BOX(lowrank::kAdamOp, lowrank::adam_lowrank_cpu));
  m.impl("galore_update_", LOWRANK_BOX(lowrank::kUpdateOp, lowrank::galore_update_cpu));
  m.impl("dct_basis_", LOWRANK_BOX(lowrank::kDctOp, lowrank::dct_basis_cpu));
  m.impl("basis_scores", LOWRANK_BOX(lowrank::kScoresOp, lowrank::basis_scores_cpu));
}
