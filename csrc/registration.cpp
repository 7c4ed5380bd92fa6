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
}
