// Every lowrank op schema, declared once. Kernels register per backend in csrc/<family>/
// (STABLE_TORCH_LIBRARY_IMPL(lowrank, CPU|CUDA, m)); fakes and autograd live in python/lowrank/ops/.
// Schemas use only stable-ABI types (Tensor, int, float, bool, optionals).
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY(lowrank, m) {
  // ---- Monarch (fly's blockdiag_butterfly_multiply): out = P·BD(w2)·P·BD(w1)·x, x (..., n) -> (..., l·s)
  m.def("monarch_matmul(Tensor x, Tensor w1, Tensor w2) -> Tensor");
  // Gradients of monarch_matmul; the middle activation is recomputed, so only x, w1, w2 are saved.
  // Entries not asked for (need_grad_x / need_grad_w false) come back as empty tensors of shape (0,).
  m.def(
      "monarch_matmul_backward(Tensor grad_out, Tensor x, Tensor w1, Tensor w2, bool need_grad_x, "
      "bool need_grad_w) -> (Tensor grad_x, Tensor grad_w1, Tensor grad_w2)");
  // Training pair that keeps the middle activation instead of recomputing it (CPU only; fly's bmm path keeps
  // the same (B, k·q) tensor): mid = y (x's leading dims, k·q) in the accumulation dtype (float32; float64 for
  // float64 inputs), to be passed back to monarch_matmul_backward_saved unchanged.
  m.def("monarch_matmul_forward_saving(Tensor x, Tensor w1, Tensor w2) -> (Tensor out, Tensor mid)");
  m.def(
      "monarch_matmul_backward_saved(Tensor grad_out, Tensor x, Tensor w1, Tensor w2, Tensor mid, "
      "bool need_grad_x, bool need_grad_w) -> (Tensor grad_x, Tensor grad_w1, Tensor grad_w2)");

  // ---- SLTrain (sparse + low-rank linear): y = x·(scale·B·A + S)ᵀ + bias, S[idx // in, idx % in] = values.
  // check: validate indices (in range, unique) first; costs a pass (and a device sync on CUDA).
  m.def(
      "sltrain_linear(Tensor x, Tensor A, Tensor B, Tensor values, Tensor indices, float scale, Tensor? bias=None, "
      "bool check=True) -> Tensor");
  // Gradients of sltrain_linear; W is recomputed (nothing of size out·in is saved). Entries not asked for
  // come back as empty (0,) tensors; grad_bias only when has_bias.
  m.def(
      "sltrain_linear_backward(Tensor grad_out, Tensor x, Tensor A, Tensor B, Tensor values, Tensor indices, "
      "float scale, bool has_bias, bool need_grad_x, bool need_grad_lowrank, bool need_grad_values) -> "
      "(Tensor grad_x, Tensor grad_A, Tensor grad_B, Tensor grad_values, Tensor grad_bias)");

  // ---- iFairy (Fairy±i 2-bit complex inference). Public packed format: codes 0 = -1, 1 = +1, 2 = -i, 3 = +i;
  // uint8 (out, ceil(in/4)), element j of a row in byte j//4 at bits 2·(j%4); scales float32 [s_re, s_im].
  m.def("ifairy_quantize(Tensor w_real, Tensor w_imag) -> (Tensor packed, Tensor scales)");
  m.def("ifairy_dequantize(Tensor packed, Tensor scales, int in_features) -> (Tensor w_real, Tensor w_imag)");
  // y = W·conj(x) per token; act_quant: per-token int8 absmax of each part (iFairy's W2A8), exact integer sums.
  // in_features, when given, must equal x's last dimension (the packed width alone leaves it ambiguous).
  m.def(
      "ifairy_linear(Tensor x_real, Tensor x_imag, Tensor packed, Tensor scales, bool act_quant=True, "
      "int? in_features=None) -> (Tensor y_real, Tensor y_imag)");
  // Several linears on one x (q/k/v, gate/up) in one call (on the CPU the activations are quantized once):
  // returns [y_real_0, y_imag_0, y_real_1, y_imag_1, ...].
  m.def(
      "ifairy_linear_multi(Tensor x_real, Tensor x_imag, Tensor[] packed, Tensor[] scales, bool act_quant=True, "
      "int? in_features=None) -> Tensor[]");
  // ---- end iFairy

  // ---- Low-rank gradient projection (GaLore / Fira / SVD-free DCT). G (m, n); right side (left=false): P (r, n),
  // R = G·Pᵀ (m, r); left side (left=true): P (m, r), R = Pᵀ·G (r, n). sqnorms: ‖G‖² per row (right) / column (left).
  m.def("galore_project(Tensor G, Tensor P, bool left, bool want_sqnorms) -> (Tensor R, Tensor sqnorms)");
  // exp_avg = β1·exp_avg + (1-β1)·R; exp_avg_sq = β2·exp_avg_sq + (1-β2)·R²; returns N = exp_avg / (√exp_avg_sq + eps).
  m.def("adam_lowrank_(Tensor(a!) exp_avg, Tensor(b!) exp_avg_sq, Tensor R, float beta1, float beta2, float eps) -> Tensor");
  // W = decay·(W - back(M) - residual_scale ⊙ G); back(M) = M·P (right) or P·M (left); residual_scale per row/column.
  m.def(
      "galore_update_(Tensor(a!) W, Tensor M, Tensor P, bool left, float decay, Tensor? G=None, "
      "Tensor? residual_scale=None) -> ()");
  // Q (n, n) = orthonormal DCT-II matrix: Q[i, j] = √(2/n)·cos(π·i·(2j+1)/(2n)), row 0 scaled by √½.
  m.def("dct_basis_(Tensor(a!) Q) -> ()");
  // L1 norm of every coefficient column of G·Qᵀ (right, length n) or row of Q·G (left, length m), G·Qᵀ never stored.
  m.def("basis_scores(Tensor G, Tensor Q, bool left) -> Tensor");
  // adam_lowrank_ on 8-bit moments: exp_avg int8, exp_avg_sq uint8 (codes), one float32 absmax per block of 256
  // elements each; dequantize, update in float32, requantize in place; returns N from the float32 moments.
  m.def(
      "adam_lowrank_8bit_(Tensor(a!) exp_avg, Tensor(b!) exp_avg_absmax, Tensor(c!) exp_avg_sq, "
      "Tensor(d!) exp_avg_sq_absmax, Tensor R, float beta1, float beta2, float eps) -> Tensor");
  // ---- end projection
}
