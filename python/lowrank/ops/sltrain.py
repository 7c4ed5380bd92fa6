"""SLTrain sparse-plus-low-rank linear: ``lowrank.sltrain_linear``."""
from __future__ import annotations

import torch

from ._autograd import refuse_double_backward
from ._common import check_dim, check_float, check_grad_out, check_same_device, check_same_dtype, dtype_str, shape_str

_FWD = "lowrank::sltrain_linear"
_BWD = "lowrank::sltrain_linear_backward"


def sltrain_linear(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                   scale: float, bias: torch.Tensor | None = None, check: bool = True) -> torch.Tensor:
    """``y = x·(scale·B·A + S)ᵀ + bias``: SLTrain's linear layer (Han et al. 2024).

    Args:
        x: ``(..., in)``, float32 / float16 / bfloat16 (float64 on CPU).
        A: ``(r, in)``; B: ``(out, r)``; values: ``(nnz,)``, all in x's dtype.
        indices: ``(nnz,)`` int32 or int64, unique flat row-major positions ``row·in + col`` of S's nonzeros in
            the ``(out, in)`` weight (not differentiable).
        scale: the low-rank scale (SLTrain's ``alpha / r``).
        bias: optional ``(out,)``.
        check: validate ``indices`` first (every index in ``[0, out·in)``, no duplicates). It costs a sort of
            the indices (O(nnz log nnz) time, O(nnz) memory) and, on CUDA, a device sync, so ``SLTrainLinear`` validates its fixed support once and
            calls with ``check=False``. With ``check=False`` an out-of-range index is ignored (never written
            or read) and duplicates add up, but nothing crashes.

    Returns ``(..., out)`` in x's dtype. The weight is materialized per call in a transient scratch (fp32 on
    the CPU) and never saved for backward; the backward recomputes it. Differentiable in x, A, B, values
    and bias (``dvalues = (dyᵀ·x)[indices]``, ``dA = scale·Bᵀ·dyᵀ·x``, ``dB = scale·dyᵀ·x·Aᵀ``).
    """
    return torch.ops.lowrank.sltrain_linear(x, A, B, values, indices, float(scale), bias, check)


def _check_meta(op, x, A, B, values, indices, bias):
    # sltrain_dims (csrc/sltrain/sltrain_common.h): the same checks in the same order and words
    torch._check(x.dim() >= 1, lambda: f"{op}: x must have at least 1 dimension (..., in) (got a 0-D tensor)")
    check_dim(op, A, "A", 2, "(r, in)")
    check_dim(op, B, "B", 2, "(out, r)")
    check_dim(op, values, "values", 1, "(nnz,)")
    check_dim(op, indices, "indices", 1, "(nnz,)")
    check_float(op, x, "x")
    for name, t in (("A", A), ("B", B), ("values", values)):
        check_same_dtype(op, x, "x", t, name)
    torch._check(indices.dtype in (torch.int32, torch.int64),
                 lambda: f"{op}: indices must be int32 or int64 (got {dtype_str(indices.dtype)})")
    check_same_device(op, ("x", x), ("A", A), ("B", B), ("values", values), ("indices", indices))
    inn, r, out, nnz = x.shape[-1], A.shape[0], B.shape[0], values.shape[0]
    torch._check(A.shape[1] == inn,
                 lambda: f"{op}: A must be (r, in) with in = x's last dimension, {inn} (got A of {shape_str(A)})")
    torch._check(B.shape[1] == r,
                 lambda: f"{op}: B must be (out, r) with r = A.shape[0], {r} (got B of {shape_str(B)})")
    torch._check(r > 0 and inn > 0 and out > 0, lambda: f"{op}: A and B must have no zero-sized dimension (got A of "
                                                         f"{shape_str(A)}, B of {shape_str(B)})")
    torch._check(indices.shape[0] == nnz,
                 lambda: f"{op}: indices must have values' length, {nnz} (got {indices.shape[0]})")
    if bias is not None:
        check_same_dtype(op, x, "x", bias, "bias")
        check_same_device(op, ("x", x), ("bias", bias))
        torch._check(bias.dim() == 1 and bias.shape[0] == out,
                     lambda: f"{op}: bias must be (out,) = ({out},) (got {shape_str(bias)})")
    return out


@torch.library.register_fake(_FWD)
def _sltrain_linear_fake(x, A, B, values, indices, scale, bias=None, check=True):
    out = _check_meta("lowrank.sltrain_linear", x, A, B, values, indices, bias)
    return x.new_empty((*x.shape[:-1], out))


@torch.library.register_fake(_BWD)
def _sltrain_linear_backward_fake(grad_out, x, A, B, values, indices, scale, has_bias, need_grad_x,
                                  need_grad_lowrank, need_grad_values):
    op = "lowrank.sltrain_linear_backward"
    out = _check_meta(op, x, A, B, values, indices, None)
    check_grad_out(op, grad_out, x, out)
    empty = lambda t: t.new_empty((0,))  # noqa: E731
    return (
        x.new_empty(x.shape) if need_grad_x else empty(x),
        A.new_empty(A.shape) if need_grad_lowrank else empty(A),
        B.new_empty(B.shape) if need_grad_lowrank else empty(B),
        values.new_empty(values.shape) if need_grad_values else empty(values),
        x.new_empty((out,)) if has_bias else empty(x),
    )


def _setup_context(ctx, inputs, output):
    x, A, B, values, indices, scale = inputs[:6]
    ctx.save_for_backward(x, A, B, values, indices)
    ctx.scale = scale
    ctx.has_bias = len(inputs) > 6 and inputs[6] is not None


def _backward(ctx, grad_out):
    x, A, B, values, indices = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_bias = ctx.has_bias and need[6]
    dx, dA, dB, dv, db = torch.ops.lowrank.sltrain_linear_backward(
        grad_out, x, A, B, values, indices, ctx.scale, need_bias, need[0], need[1] or need[2], need[3])
    return (
        dx if need[0] else None,
        dA if need[1] else None,
        dB if need[2] else None,
        dv if need[3] else None,
        None,
        None,
        db if need_bias else None,
        None,
    )


torch.library.register_autograd(_FWD, _backward, setup_context=_setup_context)

refuse_double_backward(_BWD, "lowrank.sltrain_linear")

# Autocast (CPU and CUDA): x, A, B, values and bias cast to the region's dtype like nn.Linear; see _autocast.py.
from ._autocast import register_autocast_to_region_dtype  # noqa: E402

register_autocast_to_region_dtype("sltrain_linear")
