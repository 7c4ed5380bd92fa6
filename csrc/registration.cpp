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
}
