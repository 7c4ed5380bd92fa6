"""``SLTrainLinear``: a linear layer whose weight is ``scale·B·A + S`` with a fixed random sparse support."""
from __future__ import annotations

import math
import operator

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


def draw_support(out_features: int, in_features: int, density: float, seed: int | None = None,
                 device=None) -> torch.Tensor:
    """SLTrain's support: ``int(density·out·in)`` flat positions drawn uniformly without replacement over the
    whole ``(out, in)`` weight, sorted; int32 when ``out·in < 2³¹``. With an int ``seed`` it is a pure
    function of ``(seed, out, in, density)`` (a private CPU generator; the global RNG is neither read nor
    advanced); with None it comes from the global CPU RNG, as in SLTrain's code."""
    size = out_features * in_features
    nnz = int(density * size)
    generator = None if seed is None else torch.Generator(device="cpu").manual_seed(int(seed))
    perm = torch.randperm(size, generator=generator, device="cpu")
    index_dtype = torch.int32 if size < 2**31 else torch.int64
    return perm[:nnz].sort().values.to(device=device, dtype=index_dtype)


class SLTrainLinear(nn.Module):
    """SLTrain's sparse-plus-low-rank linear: ``y = x·(scale·B·A + S)ᵀ + bias`` (Han et al. 2024).

    ``A`` ``(rank, in)`` is Kaiming-uniform (a=√5), ``B`` ``(out, rank)`` starts at zero, ``values`` ``(nnz,)`` is
    uniform ±1/√in on a support of ``nnz = int(density·out·in)`` positions (:func:`draw_support`), kept fixed
    in the ``indices`` buffer (int32 when ``out·in < 2³¹``; saved in the state dict). ``scale = alpha / rank``.

    ``seed``: None draws the support from the global RNG; an int makes it a pure function of
    ``(seed, in, out, density)``, so every process builds the same support without communicating.
    :meth:`reset_parameters` draws the support as well as the weights, so the deferred-init recipe (build on
    the meta device, ``to_empty``, ``reset_parameters``) gives a valid one. The support is validated when it
    is drawn, loaded (``load_state_dict``) or moved (``.to``), so forward calls the op with ``check=False``;
    a forward on a support that is uninitialized (moved off the meta device and not reset or loaded) or
    invalid raises instead of running.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, density: float = 0.03, alpha: float = 32.0,
                 bias: bool = False, device=None, dtype=None, seed: int | None = None):
        super().__init__()
        if min(in_features, out_features, rank) <= 0:
            raise ValueError(f"SLTrainLinear needs positive sizes, got in={in_features}, out={out_features}, "
                             f"rank={rank}")
        if not 0.0 <= density <= 1.0:
            raise ValueError(f"SLTrainLinear: density must lie in [0, 1], got {density}")
        if seed is not None:
            try:
                seed = operator.index(seed)  # ints, numpy ints; not floats or strings
            except TypeError:
                raise TypeError(f"SLTrainLinear: seed must be an int or None, got {type(seed).__name__}") from None
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.density, self.alpha, self.seed = density, alpha, seed
        self.scale = alpha / rank
        size = out_features * in_features
        nnz = int(density * size)
        self.A = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.B = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.values = nn.Parameter(torch.empty(nnz, **factory))
        index_dtype = torch.int32 if size < 2**31 else torch.int64
        self.register_buffer("indices", torch.empty(nnz, dtype=index_dtype, device=device))
        self._support_error: str | None = self._UNINITIALIZED
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    _UNINITIALIZED = ("SLTrainLinear: the sparse support is uninitialized (the layer was moved off the meta "
                      "device, e.g. by to_empty); call reset_parameters() (it draws the support, from `seed` when "
                      "given) or load a state dict before the forward")

    def reset_parameters(self) -> None:
        """Draw the weights and the support (from ``seed`` when given); on the meta device, only shapes."""
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.zeros_(self.B)
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.values, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)
        if self.indices.is_meta:
            self._support_error = self._UNINITIALIZED
            return
        support = draw_support(self.out_features, self.in_features, self.density, self.seed)
        with torch.no_grad():
            self.indices.copy_(support)  # in place: the buffer stays the object DDP / FSDP registered
        self._support_error = None

    def _apply(self, fn, *args, **kwargs):
        old = self.indices
        out = super()._apply(fn, *args, **kwargs)
        new = self.indices
        if new is not old:
            if new.is_meta:
                self._support_error = self._UNINITIALIZED
            elif old.is_meta:  # nothing to carry over from the meta device: the data is garbage
                self._support_error = self._UNINITIALIZED
            elif self._support_error is None:
                self._support_error = self._validate(new)
        return out

    def _validate(self, indices: torch.Tensor) -> str | None:
        try:
            _check_support(indices, self.out_features * self.in_features)
        except ValueError as exc:
            return str(exc)
        return None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "indices"
        if key in state_dict:
            _check_support(state_dict[key], self.out_features * self.in_features)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if key in state_dict and not self.indices.is_meta:
            self._support_error = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._support_error is not None and not self.indices.is_meta:
            raise RuntimeError(self._support_error)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SLTrainLinear: expected input (..., {self.in_features}), got {tuple(x.shape)}")
        return sltrain_linear(x, self.A, self.B, self.values, self.indices, self.scale, self.bias, check=False)

    def to_dense(self) -> torch.Tensor:
        """The effective ``(out_features, in_features)`` weight."""
        return sltrain_weight(self.A, self.B, self.values, self.indices, self.scale)

    def extra_repr(self) -> str:
        seed = "" if self.seed is None else f", seed={self.seed}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"nnz={self.values.numel()}, scale={self.scale:g}, bias={self.bias is not None}{seed}")

