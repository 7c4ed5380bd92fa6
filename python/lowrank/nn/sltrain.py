"""``SLTrainLinear``: a linear layer whose weight is ``scale·B·A + S`` with a fixed random sparse support."""
from __future__ import annotations

import math
from typing import Callable, Iterable, Union

import torch
from torch import nn

from ..ops.sltrain import sltrain_linear
from ..reference import sltrain_weight


def _check_support(indices: torch.Tensor, size: int) -> None:
    """A support must be 1-D, integer, in range and unique (validated once, so forward can skip it)."""
    if indices.dim() != 1 or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"SLTrainLinear: indices must be a 1-D int32/int64 tensor, got {tuple(indices.shape)} "
                         f"{indices.dtype}")
    if indices.numel() == 0:
        return
    idx = indices.long()
    if int(idx.min()) < 0 or int(idx.max()) >= size:
        raise ValueError(f"SLTrainLinear: indices must lie in [0, out·in = {size})")
    if torch.unique(idx).numel() != idx.numel():
        raise ValueError("SLTrainLinear: indices must be unique")


class SLTrainLinear(nn.Module):
    """SLTrain's sparse-plus-low-rank linear: ``y = x·(scale·B·A + S)ᵀ + bias`` (Han et al. 2024).

    ``A`` ``(rank, in)`` is Kaiming-uniform (a=√5), ``B`` ``(out, rank)`` starts at zero, ``values`` ``(nnz,)`` is
    uniform ±1/√in on a support of ``nnz = int(density·out·in)`` positions drawn uniformly without
    replacement over the whole ``(out, in)`` weight, sorted, and kept fixed in the ``indices`` buffer (int32
    when ``out·in < 2³¹``; saved in the state dict). ``scale = alpha / rank``. The support is validated at
    construction and on ``load_state_dict``, so forward calls the op with ``check=False``.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, density: float = 0.03, alpha: float = 32.0,
                 bias: bool = False, device=None, dtype=None):
        super().__init__()
        if min(in_features, out_features, rank) <= 0:
            raise ValueError(f"SLTrainLinear needs positive sizes, got in={in_features}, out={out_features}, "
                             f"rank={rank}")
        if not 0.0 <= density <= 1.0:
            raise ValueError(f"SLTrainLinear: density must lie in [0, 1], got {density}")
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.density, self.alpha = density, alpha
        self.scale = alpha / rank
        size = out_features * in_features
        nnz = int(density * size)
        self.A = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.B = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.values = nn.Parameter(torch.empty(nnz, **factory))
        index_dtype = torch.int32 if size < 2**31 else torch.int64
        support = torch.randperm(size)[:nnz].sort().values.to(index_dtype)
        self.register_buffer("indices", support.to(device))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.zeros_(self.B)
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.values, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "indices"
        if key in state_dict:
            _check_support(state_dict[key], self.out_features * self.in_features)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SLTrainLinear: expected input (..., {self.in_features}), got {tuple(x.shape)}")
        return sltrain_linear(x, self.A, self.B, self.values, self.indices, self.scale, self.bias, check=False)

    def to_dense(self) -> torch.Tensor:
        """The effective ``(out_features, in_features)`` weight."""
        return sltrain_weight(self.A, self.B, self.values, self.indices, self.scale)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"nnz={self.values.numel()}, scale={self.scale:g}, bias={self.bias is not None}")


Target = Union[None, Iterable[str], Callable[[str, nn.Module], bool]]


def convert_to_sltrain(model: nn.Module, rank: int, density: float = 0.03, alpha: float = 32.0,
                       target: Target = None) -> nn.Module:
    """Replace ``nn.Linear`` layers of ``model`` by freshly initialized :class:`SLTrainLinear` layers of the
    same sizes, bias, device and dtype (SLTrain pretrains from scratch). ``target`` picks the layers: None
    for every Linear, a list of substrings of the module name (e.g. ``["q_proj", "mlp"]``), or a callable
    ``(name, module) -> bool``. Returns ``model`` (changed in place)."""
    if target is None:
        chosen = lambda name, mod: True  # noqa: E731
    elif callable(target):
        chosen = target
    else:
        keys = [target] if isinstance(target, str) else list(target)
        chosen = lambda name, mod: any(k in name for k in keys)  # noqa: E731
    replace = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and chosen(name, mod)]
    for name, lin in replace:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = SLTrainLinear(lin.in_features, lin.out_features, rank, density, alpha, bias=lin.bias is not None,
                              device=lin.weight.device, dtype=lin.weight.dtype)
        setattr(parent, child, layer)
    return model
