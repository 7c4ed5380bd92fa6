"""Pure-torch references of the Monarch ops (re-exported by lowrank.reference), written from the maths."""
from __future__ import annotations

import torch

__all__ = ["monarch_matmul_reference", "monarch_matmul_bmm", "monarch_to_dense"]


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
