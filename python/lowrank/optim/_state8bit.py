"""8-bit projected Adam moments for GaLoreAdamW (group key ``state_bits=8``), on ``lowrank.adam_lowrank_8bit_``.

The rank-r moments are kept as codes (``exp_avg`` int8, ``exp_avg_sq`` uint8, R's shape) plus one float32 absmax
per block of 256 elements (``exp_avg_absmax``, ``exp_avg_sq_absmax``): 2.03 bytes per element instead of 8.
The maps (csrc/projection/state8bit.h): m = sign(k)·(|k|/127)²·absmax, v = (k/255)⁴·absmax. The float32 helpers
below are used only where the moments must be handled as numbers outside the fused kernel (re-projecting them
on a subspace refresh); they use the same IEEE ops as the kernels, so a decode/encode here equals theirs.
"""
from __future__ import annotations

import torch

from ..ops import projection as _ops
from ..reference import projection as _codec  # the maps, written once (same IEEE ops as the kernels)

STATE_BITS = (32, 8)
_BLOCK = _ops.STATE8_BLOCK


def init_state(state: dict, R: torch.Tensor) -> None:
    """The zero state: all codes 0 and all absmax 0."""
    blocks = (R.numel() + _BLOCK - 1) // _BLOCK
    state["exp_avg"] = torch.zeros(R.shape, dtype=torch.int8, device=R.device)
    state["exp_avg_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=R.device)
    state["exp_avg_sq"] = torch.zeros(R.shape, dtype=torch.uint8, device=R.device)
    state["exp_avg_sq_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=R.device)


def adam_step(state: dict, R: torch.Tensor, beta1: float, beta2: float, eps: float) -> torch.Tensor:
    """adam_lowrank_ on this parameter's 8-bit moments (created on first use); returns N."""
    if R.dtype != torch.float32:
        raise ValueError("GaLoreAdamW: state_bits=8 needs float32 moments; float64 parameters keep float64 state "
                         "(use state_bits=32)")
    if "exp_avg" not in state:
        init_state(state, R)
    elif state["exp_avg"].dtype != torch.int8:
        raise ValueError("GaLoreAdamW: this parameter's moments are float32 but its group asks for state_bits=8 "
                         "(state_bits cannot change during training)")
    return _ops.adam_lowrank_8bit_(state["exp_avg"], state["exp_avg_absmax"], state["exp_avg_sq"],
                                   state["exp_avg_sq_absmax"], R, beta1, beta2, eps)


def dequantize(state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 moments (m, v) the codes stand for."""
    return (_codec.dequantize_exp_avg_reference(state["exp_avg"], state["exp_avg_absmax"]),
            _codec.dequantize_exp_avg_sq_reference(state["exp_avg_sq"], state["exp_avg_sq_absmax"]))


def quantize_(state: dict, m: torch.Tensor, v: torch.Tensor) -> None:
    """Encode float32 moments into the state's codes and absmax, in place."""
    for key, (codes, absmax) in (("exp_avg", _codec.quantize_exp_avg_reference(m)),
                                 ("exp_avg_sq", _codec.quantize_exp_avg_sq_reference(v))):
        state[key].copy_(codes)
        state[key + "_absmax"].copy_(absmax)
