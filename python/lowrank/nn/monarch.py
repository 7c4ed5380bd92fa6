"""``MonarchLinear``: a drop-in ``nn.Linear`` replacement whose weight is a Monarch matrix."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.monarch import monarch_matmul
from ..reference import monarch_to_dense


def monarch_factor_shapes(in_features: int, out_features: int, nblocks: int):
    """fly's MonarchLinear factor shapes: ``((nb, q, p), (nb, s, r))`` for the zero-padded in/out sizes."""
    if in_features <= 0 or out_features <= 0 or nblocks <= 0:
        raise ValueError(f"MonarchLinear needs positive sizes, got in={in_features}, out={out_features}, nblocks={nblocks}")
    in_blk = math.ceil(in_features / nblocks)
    out_blk = math.ceil(out_features / nblocks)
    if in_blk * nblocks < out_blk * nblocks:
        return (nblocks, in_blk, in_blk), (nblocks, out_blk, in_blk)
    return (nblocks, out_blk, in_blk), (nblocks, out_blk, out_blk)


def project_to_monarch(weight: torch.Tensor, shape1, shape2):
    """Frobenius-optimal Monarch factors ``(w1, w2)`` of a dense ``(out, in)`` weight (zero-padded to the
    factors' sizes), by a truncated SVD of each of the k·l independent blocks.

    Block (c, i) of the dense operator — rows ``{d·l + c}``, columns ``{i·p + t}`` — equals
    ``Σ_{j ∈ J(c,i)} w2[c, :, (i·q+j)//l] ⊗ w1[i, j, :]`` with ``J(c,i) = {j : (i·q + j) mod l = c}``; the
    blocks share no parameters, so each is fit alone, at rank ``|J(c,i)|`` (Eckart–Young). This covers
    rectangular shapes and nblocks ≠ √n, which fly's projection does not.
    """
    k, q, p = shape1
    l, s, r = shape2
    if k * q != l * r:
        raise ValueError(f"factor shapes {tuple(shape1)} and {tuple(shape2)} need k·q = l·r")
    out_f, in_f = weight.shape
    if out_f > l * s or in_f > k * p:
        raise ValueError(f"weight {tuple(weight.shape)} is larger than the Monarch operator ({l * s}, {k * p})")
    dense = weight.detach().to(torch.float64)
    dense = F.pad(dense, (0, k * p - in_f, 0, l * s - out_f))
    # blocks[c, i] = dense[d·l + c, i·p + t] as an (s, p) matrix
    blocks = dense.reshape(s, l, k, p).permute(1, 2, 0, 3)
    u, sig, vh = torch.linalg.svd(blocks, full_matrices=False)  # (l,k,s,m) (l,k,m) (l,k,m,p)
    m = sig.shape[-1]
    flat = torch.arange(k * q, device=dense.device).reshape(k, q)  # i·q + j
    c = flat % l
    a = flat // l
    i_idx = torch.arange(k, device=dense.device)[:, None].expand(k, q)
    j_idx = torch.arange(q, device=dense.device)[None, :].expand(k, q)
    j0 = (c - i_idx * q) % l  # first j of block (c, i)
    pos = (j_idx - j0) // l  # rank slot of j within its block
    keep = pos < m
    pos_c = pos.clamp(max=m - 1)
    root = sig.sqrt()[c, i_idx, pos_c] * keep  # (k, q)
    w1 = vh[c, i_idx, pos_c, :] * root[..., None]  # (k, q, p)
    w2 = torch.zeros(l, s, r, dtype=torch.float64, device=dense.device)
    cols = u[c, i_idx, :, pos_c] * root[..., None]  # (k, q, s): column of w2[c, :, a]
    w2[c.reshape(-1), :, a.reshape(-1)] = cols.reshape(-1, s)
    return w1.to(weight.dtype), w2.to(weight.dtype)


class MonarchLinear(nn.Module):
    """``y = x Mᵀ + b`` with M a Monarch matrix (two block-diagonal factors and fly's permutations).

    Factors follow fly's ``MonarchLinear``: ``blkdiag1`` and ``blkdiag2`` each have ``nblocks`` blocks, the input
    is zero-padded to ``nblocks·ceil(in/nblocks)`` and the output cut to ``out_features``. Parameters and
    multiply-adds per token are ``saving × in·out`` (e.g. 0.3125 for 768→3072 at nblocks=4).
    Init: each factor Kaiming-uniform (a=√5, fan_in = the block's input size); bias uniform ±1/√in_features
    like ``nn.Linear`` (fly uses out_features there). ``save_middle``: passed to
    :func:`lowrank.monarch_matmul` (``None``: keep the middle activation for the backward on the CPU,
    recompute it on CUDA).
    """

    def __init__(self, in_features: int, out_features: int, nblocks: int = 4, bias: bool = True,
                 device=None, dtype=None, save_middle: bool | None = None):
        super().__init__()
        self.save_middle = save_middle
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.nblocks = in_features, out_features, nblocks
        shape1, shape2 = monarch_factor_shapes(in_features, out_features, nblocks)
        self.in_features_extended = shape1[0] * shape1[2]
        self.out_features_extended = shape2[0] * shape2[1]
        self.blkdiag1 = nn.Parameter(torch.empty(shape1, **factory))
        self.blkdiag2 = nn.Parameter(torch.empty(shape2, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.blkdiag1, self.blkdiag2):
            bound = 1.0 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def saving(self) -> float:
        return (self.blkdiag1.numel() + self.blkdiag2.numel()) / (self.in_features * self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"MonarchLinear: expected input (..., {self.in_features}), got {tuple(x.shape)}")
        if self.in_features_extended != self.in_features:
            x = F.pad(x, (0, self.in_features_extended - self.in_features))
        y = monarch_matmul(x, self.blkdiag1, self.blkdiag2, save_middle=self.save_middle)
        if self.out_features_extended != self.out_features:
            y = y[..., : self.out_features]
        # The bias follows y's dtype, so under autocast the output has the region's dtype like nn.Linear's.
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def to_dense(self) -> torch.Tensor:
        """The equivalent dense ``(out_features, in_features)`` weight."""
        dense = monarch_to_dense(self.blkdiag1, self.blkdiag2)
        return dense[: self.out_features, : self.in_features]

    @classmethod
    def from_dense(cls, weight_or_linear, nblocks: int = 4) -> "MonarchLinear":
        """The Frobenius-optimal MonarchLinear for a dense weight ``(out, in)`` or an ``nn.Linear``
        (whose bias is copied), via :func:`project_to_monarch`."""
        if isinstance(weight_or_linear, nn.Linear):
            weight, bias = weight_or_linear.weight, weight_or_linear.bias
        elif isinstance(weight_or_linear, torch.Tensor) and weight_or_linear.dim() == 2:
            weight, bias = weight_or_linear, None
        else:
            raise TypeError("MonarchLinear.from_dense takes an nn.Linear or a 2-D (out, in) weight tensor")
        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, nblocks, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        w1, w2 = project_to_monarch(weight, layer.blkdiag1.shape, layer.blkdiag2.shape)
        with torch.no_grad():
            layer.blkdiag1.copy_(w1)
            layer.blkdiag2.copy_(w2)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nblocks={self.nblocks}, "
                f"bias={self.bias is not None}")
