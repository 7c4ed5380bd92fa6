"""Monarch (block-diagonal butterfly) matmul: ``lowrank.monarch_matmul``."""
from __future__ import annotations

import torch

from ._autograd import refuse_double_backward
from .._loader import register_cuda_stub
from ._common import (check_companion, check_dim, check_float, check_grad_out, check_same_device, check_same_dtype,
                      companion_dtype, shape_str)

_FWD = "lowrank::monarch_matmul"
_BWD = "lowrank::monarch_matmul_backward"
_FWD_SAVE = "lowrank::monarch_matmul_forward_saving"
_BWD_SAVED = "lowrank::monarch_matmul_backward_saved"

# save_middle=None keeps the middle activation on the CPU when a block dimension exceeds this: the CPU
# kernel's fused tile schedule (csrc/monarch/monarch_cpu.cpp, fits_fused) takes blocks up to 128 and
# recomputes y in cache; larger blocks run one GEMM per step, where the recompute is a full extra GEMM.
_SAVE_ABOVE = 128

# Ops with a CPU kernel only: their CUDA kernel is a stub that says so (registered below).
CPU_ONLY_OP_NAMES = ["monarch_matmul_forward_saving", "monarch_matmul_backward_saved"]


def monarch_matmul(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, *,
                   save_middle: bool | None = None) -> torch.Tensor:
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
    Differentiable in x, w1 and w2. All tensors on one device, one dtype.

    save_middle: what the backward gets when a weight needs a gradient (dw2 needs the middle activation
    ``y``). ``False``: recompute y in the backward, so autograd keeps only x, w1 and w2 (one extra
    factor-1 GEMM per backward). ``True``: keep y (``(B, k·q)`` in fp32, fp64 for float64 inputs; fly's bmm
    path keeps a ``(B, k·q)`` tensor too) and skip that GEMM, a fifth of the backward's work; CPU only.
    ``None`` (default): ``True`` on the CPU when a block dimension exceeds 128 (there the GEMMs bound the
    speed and the recompute is a big one; smaller blocks recompute y tile by tile in cache for about
    nothing), ``False`` otherwise and on CUDA, where activation memory is usually the constraint. Without
    grad mode or a weight that requires grad, nothing is kept either way. The gradients do not depend on
    the choice beyond rounding.
    """
    if save_middle is None:
        save_middle = x.device.type == "cpu" and max(w1.shape[-2:] + w2.shape[-2:], default=0) > _SAVE_ABOVE
    elif save_middle and x.device.type not in ("cpu", "meta"):
        raise NotImplementedError(
            f"lowrank.monarch_matmul: save_middle=True is CPU only (x is on {x.device.type}); the CUDA backward "
            "recomputes the middle activation: pass save_middle=None or False"
        )
    if save_middle and torch.is_grad_enabled() and (w1.requires_grad or w2.requires_grad):
        return torch.ops.lowrank.monarch_matmul_forward_saving(x, w1, w2)[0]
    return torch.ops.lowrank.monarch_matmul(x, w1, w2)


def monarch_matmul_backward(grad_out, x, w1, w2, need_grad_x: bool = True, need_grad_w: bool = True):
    """Gradients ``(grad_x, grad_w1, grad_w2)`` of :func:`monarch_matmul`; an entry not asked for is an
    empty ``(0,)`` tensor."""
    return torch.ops.lowrank.monarch_matmul_backward(grad_out, x, w1, w2, need_grad_x, need_grad_w)


def monarch_matmul_forward_saving(x, w1, w2):
    """``(out, mid)``: :func:`monarch_matmul`'s output and its middle activation ``y`` (x's leading dims,
    ``k·q``; float32, float64 for float64 inputs), for :func:`monarch_matmul_backward_saved`. CPU only."""
    return torch.ops.lowrank.monarch_matmul_forward_saving(x, w1, w2)


def monarch_matmul_backward_saved(grad_out, x, w1, w2, mid, need_grad_x: bool = True, need_grad_w: bool = True):
    """:func:`monarch_matmul_backward` with the middle activation ``mid`` from
    :func:`monarch_matmul_forward_saving` instead of recomputing it. CPU only."""
    return torch.ops.lowrank.monarch_matmul_backward_saved(grad_out, x, w1, w2, mid, need_grad_x, need_grad_w)


def _check_meta(op: str, x, w1, w2):
    # monarch_dims (csrc/monarch/monarch_common.h): the same checks in the same order and words
    torch._check(x.dim() >= 1, lambda: f"{op}: x must have at least 1 dimension (..., n) (got a 0-D tensor)")
    check_dim(op, w1, "w1", 3, "(k, q, p)")
    check_dim(op, w2, "w2", 3, "(l, s, r)")
    check_float(op, x, "x")
    check_same_dtype(op, x, "x", w1, "w1")
    check_same_dtype(op, x, "x", w2, "w2")
    check_same_device(op, ("x", x), ("w1", w1), ("w2", w2))
    k, q, p = w1.shape
    l, s, r = w2.shape
    torch._check(min(k, q, p, l, s, r) > 0, lambda: f"{op}: w1 and w2 must have no zero-sized dimension (got w1 of "
                                                    f"{shape_str(w1)}, w2 of {shape_str(w2)})")
    torch._check(k * p == x.shape[-1], lambda: f"{op}: x's last dimension must equal k·p = {k * p} for w1 of shape "
                                               f"{shape_str(w1)} (got {x.shape[-1]})")
    torch._check(l * r == k * q, lambda: f"{op}: w2 must have l·r = k·q = {k * q} for w1 of shape {shape_str(w1)} "
                                         f"(got w2 of {shape_str(w2)}, l·r = {l * r})")
    return l * s


@torch.library.register_fake(_FWD)
def _monarch_matmul_fake(x, w1, w2):
    out = _check_meta("lowrank.monarch_matmul", x, w1, w2)
    return x.new_empty((*x.shape[:-1], out))


@torch.library.register_fake(_BWD)
def _monarch_matmul_backward_fake(grad_out, x, w1, w2, need_grad_x, need_grad_w):
    return _backward_fake("lowrank.monarch_matmul_backward", grad_out, x, w1, w2, need_grad_x, need_grad_w)


def _backward_fake(op, grad_out, x, w1, w2, need_grad_x, need_grad_w):
    out = _check_meta(op, x, w1, w2)
    check_grad_out(op, grad_out, x, out)
    dx = x.new_empty(x.shape) if need_grad_x else x.new_empty((0,))
    dw1 = w1.new_empty(w1.shape) if need_grad_w else w1.new_empty((0,))
    dw2 = w2.new_empty(w2.shape) if need_grad_w else w2.new_empty((0,))
    return dx, dw1, dw2


@torch.library.register_fake(_FWD_SAVE)
def _monarch_matmul_forward_saving_fake(x, w1, w2):
    op = "lowrank.monarch_matmul_forward_saving"
    out = _check_meta(op, x, w1, w2)
    torch._check(x.device.type in ("cpu", "meta"),
                 lambda: f"{op}: x must be a CPU tensor, only the CPU keeps the middle activation (got x on "
                         f"{x.device}; use monarch_matmul, whose backward recomputes it)")
    mid = w1.shape[0] * w1.shape[1]
    return x.new_empty((*x.shape[:-1], out)), x.new_empty((*x.shape[:-1], mid), dtype=companion_dtype(x.dtype))


@torch.library.register_fake(_BWD_SAVED)
def _monarch_matmul_backward_saved_fake(grad_out, x, w1, w2, mid, need_grad_x, need_grad_w):
    op = "lowrank.monarch_matmul_backward_saved"
    grads = _backward_fake(op, grad_out, x, w1, w2, need_grad_x, need_grad_w)
    check_companion(op, mid, "mid", x, "x")
    check_same_device(op, ("x", x), ("mid", mid))
    want = (*x.shape[:-1], w1.shape[0] * w1.shape[1])
    torch._check(tuple(mid.shape) == want,
                 lambda: f"{op}: mid must have shape {want} (x's leading dims, k·q), the middle activation "
                         f"monarch_matmul_forward_saving returned (got {shape_str(mid)})")
    return grads


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


def _setup_context_saving(ctx, inputs, output):
    x, w1, w2 = inputs
    ctx.save_for_backward(x, w1, w2, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward_saved(ctx, grad_out, _grad_mid):
    x, w1, w2, mid = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    need_w = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    dx, dw1, dw2 = torch.ops.lowrank.monarch_matmul_backward_saved(grad_out, x, w1, w2, mid, need_x, need_w)
    return (
        dx if need_x else None,
        dw1 if ctx.needs_input_grad[1] else None,
        dw2 if ctx.needs_input_grad[2] else None,
    )


torch.library.register_autograd(_FWD, _backward, setup_context=_setup_context)
torch.library.register_autograd(_FWD_SAVE, _backward_saved, setup_context=_setup_context_saving)

refuse_double_backward(_BWD, "lowrank.monarch_matmul")
refuse_double_backward(_BWD_SAVED, "lowrank.monarch_matmul")

register_cuda_stub(CPU_ONLY_OP_NAMES, "it is CPU only: on CUDA, monarch_matmul's backward recomputes the middle "
                   "activation")

# Autocast (CPU and CUDA): inputs cast to the region's dtype like nn.Linear; see _autocast.py.
from ._autocast import register_autocast_to_region_dtype  # noqa: E402

for _name in ("monarch_matmul", "monarch_matmul_forward_saving"):
    register_autocast_to_region_dtype(_name)
