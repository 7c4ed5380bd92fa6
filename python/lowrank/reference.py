"""Pure-torch references of every lowrank op: the executable spec used by tests and benchmarks.

Each reference is written from the maths, independently of the kernels, and computes in whatever
dtype it is given (tests pass float64 for ground truth).
"""
from __future__ import annotations

import torch

__all__ = [
    "monarch_matmul_reference",
    "monarch_matmul_bmm",
    "monarch_to_dense",
    "sltrain_weight",
    "sltrain_linear_reference",
    "sltrain_linear_official",
]


def monarch_matmul_reference(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """fly's ``blockdiag_butterfly_multiply`` written as the 4-step index formula.

    x ``(..., n)``, w1 ``(k, q, p)`` with ``k·p = n``, w2 ``(l, s, r)`` with ``l·r = k·q``; returns ``(..., l·s)``:

    1. ``y[b, i·q + j] = Σ_t w1[i, j, t] · x[b, i·p + t]``
    2. ``z[b, c, a] = y[b, a·l + c]``
    3. ``u[b, c, d] = Σ_a w2[c, d, a] · z[b, c, a]``
    4. ``out[b, d·l + c] = u[b, c, d]``
    """
    k, q, p = w1.shape
    l, s, r = w2.shape
    lead = x.shape[:-1]
    xb = x.reshape(-1, k, p)
    y = torch.einsum("bit,ijt->bij", xb, w1).reshape(-1, r, l)  # index a·l + c
    z = y.transpose(1, 2)  # (b, c, a)
    u = torch.einsum("bca,cda->bcd", z, w2)
    return u.transpose(1, 2).reshape(*lead, s * l)  # index d·l + c


def monarch_matmul_bmm(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The path users run today (fly's autograd function): two ``torch.bmm`` calls with the permutations
    materialized by ``.contiguous()`` copies. The baseline our kernels are timed against."""
    k, q, p = w1.shape
    l, s, r = w2.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    batch = x2.shape[0]
    out1 = torch.bmm(x2.reshape(batch, k, p).transpose(0, 1), w1.transpose(-1, -2))  # (k, B, q)
    out1 = out1.transpose(0, 1).reshape(batch, r, l).transpose(-1, -2).contiguous().transpose(0, 1)  # (l, B, r)
    out2 = torch.bmm(out1, w2.transpose(-1, -2))  # (l, B, s)
    return out2.permute(1, 2, 0).reshape(*lead, s * l)


def monarch_to_dense(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The dense ``(l·s, k·p)`` matrix M of the Monarch operator, so that ``out = x @ M.T``."""
    n = w1.shape[0] * w1.shape[2]
    eye = torch.eye(n, dtype=w1.dtype, device=w1.device)
    return monarch_matmul_reference(eye, w1, w2).T.contiguous()


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


# The iFairy and projection references live in their own modules and are re-exported here.
from ._reference_ifairy import *  # noqa: E402,F401,F403
from ._reference_ifairy import __all__ as _ifairy_all  # noqa: E402
from ._reference_projection import *  # noqa: E402,F401,F403
from ._reference_projection import __all__ as _projection_all  # noqa: E402

__all__ += _ifairy_all + _projection_all
