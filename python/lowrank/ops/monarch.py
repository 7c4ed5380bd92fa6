"""Monarch (block-diagonal butterfly) matmul: ``lowrank.monarch_matmul``."""
from __future__ import annotations

import torch

from ._autograd import refuse_double_backward

_FWD = "lowrank::monarch_matmul"
_BWD = "lowrank::monarch_matmul_backward"


def monarch_matmul(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Multiply ``x`` by the Monarch matrix ``P·BD(w2)·P·BD(w1)``; fly's ``blockdiag_butterfly_multiply``.

    Args:
        x: ``(..., n)``, any leading dims, float32 / float16 / bfloat16 (float64 on CPU).
        w1: ``(k, q, p)`` with ``k·p = n``: k blocks of q x p (out x in, like ``nn.Linear.weight``).
        w2: ``(l, s, r)`` with ``l·r = k·q``.

    Returns:
        ``(..., l·s)`` in x's dtype, where with ``b`` a flattened batch index

        - ``y[b, i·q + j] = Σ_t w1[i, j, t] · x[b, i·p + t]``
        - ``out[b, d·l + c] = Σ_a w2[c, d, a] · y[b, a·l + c]``

    Accumulation is fp32 (fp64 for float64) and the middle activation is kept in fp32 on the CPU.
    Differentiable in x, w1 and w2; the backward recomputes the middle activation, so only x, w1 and w2
    are saved (fly also saves a ``(B, k·q)`` intermediate). All tensors on one device, one dtype.
    """
    return torch.ops.lowrank.monarch_matmul(x, w1, w2)


def monarch_matmul_backward(grad_out, x, w1, w2, need_grad_x: bool = True, need_grad_w: bool = True):
    """Gradients ``(grad_x, grad_w1, grad_w2)`` of :func:`monarch_matmul`; an entry not asked for is an
    empty ``(0,)`` tensor."""
    return torch.ops.lowrank.monarch_matmul_backward(grad_out, x, w1, w2, need_grad_x, need_grad_w)


def _check_meta(op: str, x, w1, w2):
    torch._check(x.dim() >= 1, lambda: f"{op}: x must have at least 1 dimension (..., n)")
    torch._check(w1.dim() == 3, lambda: f"{op}: w1 must be 3-D (k, q, p), got a {w1.dim()}-D tensor")
    torch._check(w2.dim() == 3, lambda: f"{op}: w2 must be 3-D (l, s, r), got a {w2.dim()}-D tensor")
    torch._check(
        x.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64),
        lambda: f"{op}: x must be float32, float16 or bfloat16 (float64 on CPU), got {x.dtype}",
    )
    torch._check(x.dtype == w1.dtype == w2.dtype, lambda: f"{op}: x, w1 and w2 must have the same dtype")
    torch._check(x.device == w1.device == w2.device, lambda: f"{op}: x, w1 and w2 must be on the same device")
    k, q, p = w1.shape
    l, s, r = w2.shape
    torch._check(min(k, q, p, l, s, r) > 0, lambda: f"{op}: w1 and w2 must have no zero-sized dimension")
    torch._check(k * p == x.shape[-1], lambda: f"{op}: x's last dimension must equal k·p = {k * p}")
    torch._check(l * r == k * q, lambda: f"{op}: w2 needs l·r = k·q")
    return l * s


@torch.library.register_fake(_FWD)
def _monarch_matmul_fake(x, w1, w2):
    out = _check_meta("lowrank.monarch_matmul", x, w1, w2)
    return x.new_empty((*x.shape[:-1], out))


@torch.library.register_fake(_BWD)
def _monarch_matmul_backward_fake(grad_out, x, w1, w2, need_grad_x, need_grad_w):
    op = "lowrank.monarch_matmul_backward"
    out = _check_meta(op, x, w1, w2)
    torch._check(grad_out.dtype == x.dtype, lambda: f"{op}: grad_out and x must have the same dtype")
    torch._check(grad_out.device == x.device, lambda: f"{op}: grad_out and x must be on the same device")
    torch._check(
        tuple(grad_out.shape) == (*x.shape[:-1], out),
        lambda: f"{op}: grad_out must have the output's shape (x's leading dims, l·s = {out})",
    )
    dx = x.new_empty(x.shape) if need_grad_x else x.new_empty((0,))
    dw1 = w1.new_empty(w1.shape) if need_grad_w else w1.new_empty((0,))
    dw2 = w2.new_empty(w2.shape) if need_grad_w else w2.new_empty((0,))
    return dx, dw1, dw2


def _setup_context(ctx, inputs, output):
    x, w1, w2 = inputs
    ctx.save_for_backward(x, w1, w2)


def _backward(ctx, grad_out):
    x, w1, w2 = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    need_w = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    dx, dw1, dw2 = torch.ops.lowrank.monarch_matmul_backward(grad_out, x, w1, w2, need_x, need_w)
    return (
        dx if need_x else None,
        dw1 if ctx.needs_input_grad[1] else None,
        dw2 if ctx.needs_input_grad[2] else None,
    )


torch.library.register_autograd(_FWD, _backward, setup_context=_setup_context)

refuse_double_backward(_BWD, "lowrank.monarch_matmul")
