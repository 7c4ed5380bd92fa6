"""Pure-torch references of the SLTrain ops (re-exported by lowrank.reference), written from the maths."""
from __future__ import annotations

import torch

__all__ = ["sltrain_weight", "sltrain_linear_reference", "sltrain_linear_official"]


def sltrain_weight(A: torch.Tensor, B: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """SLTrain's effective weight ``W = scale·B·A + S`` with ``S.view(-1)[indices] = values`` (out, in)."""
    w = scale * (B @ A)
    return w.reshape(-1).index_add(0, indices.long(), values.to(w.dtype)).reshape(B.shape[0], A.shape[1])


def sltrain_linear_reference(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, values: torch.Tensor,
                             indices: torch.Tensor, scale: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x·(scale·B·A + S)ᵀ + bias``: the official SLTrain path (materialize W, then ``F.linear``), which is
    also the baseline our kernels are timed against."""
    return torch.nn.functional.linear(x, sltrain_weight(A, B, values, indices, scale), bias)


class _SLTrainOfficial(torch.autograd.Function):
    """The official SLTrain autograd path, re-derived from its description: the forward materializes
    W = B·(scale·A) with a scatter-add of the values and runs ``F.linear``, saving x, B, scale·A, values and
    indices (not W); the backward rebuilds W, then dx = dy·W, G = dyᵀ·x, dB = G·(scale·A)ᵀ,
    d(scale·A) = Bᵀ·G, dvalues = G[indices], dbias = Σ dy."""

    @staticmethod
    def forward(ctx, x, A, B, values, indices, scale, bias):
        sA = A * scale
        w = (B @ sA).reshape(-1).scatter_add(0, indices.long(), values).reshape(B.shape[0], A.shape[1])
        ctx.save_for_backward(x, B, sA, values, indices)
        ctx.scale, ctx.has_bias = scale, bias is not None
        return torch.nn.functional.linear(x, w, bias)

    @staticmethod
    def backward(ctx, dy):
        x, B, sA, values, indices = ctx.saved_tensors
        idx = indices.long()
        w = (B @ sA).reshape(-1).scatter_add(0, idx, values).reshape(B.shape[0], sA.shape[1])
        dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        dx = (dy2 @ w).reshape(x.shape)
        g = dy2.T @ x2
        dB, dsA = g @ sA.T, B.T @ g
        dv = g.reshape(-1).gather(0, idx)
        db = dy2.sum(0) if ctx.has_bias else None
        return dx, dsA * ctx.scale, dB, dv, None, None, db


def sltrain_linear_official(x, A, B, values, indices, scale, bias=None):
    """SLTrain's own path (materialize, ``F.linear``, rebuild W in backward): the baseline users run today."""
    return _SLTrainOfficial.apply(x, A, B, values, indices, scale, bias)
