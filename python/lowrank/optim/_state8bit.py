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

STATE_BITS = (32, 8)
_BLOCK = _ops.STATE8_BLOCK


def _blocks(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1)
    return torch.nn.functional.pad(flat, (0, (-flat.numel()) % _BLOCK)).reshape(-1, _BLOCK)


def _unblock(b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return b.reshape(-1)[:like.numel()].reshape(like.shape)


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
    mq, vq = state["exp_avg"], state["exp_avg_sq"]
    k = _blocks(mq.to(torch.float32))
    t = k.abs() / 127
    m = (t * t) * state["exp_avg_absmax"].unsqueeze(1)
    m = torch.where(k < 0, -m, m)
    t = _blocks(vq.to(torch.float32)) / 255
    t2 = t * t
    v = (t2 * t2) * state["exp_avg_sq_absmax"].unsqueeze(1)
    return _unblock(m, mq), _unblock(v, vq)


def quantize_(state: dict, m: torch.Tensor, v: torch.Tensor) -> None:
    """Encode float32 moments into the state's codes and absmax, in place."""
    b = _blocks(m)
    am = b.abs().amax(dim=1, keepdim=True)
    k = torch.round(127 * torch.sqrt(b.abs() / torch.where(am > 0, am, torch.ones_like(am))))
    k = torch.where(am > 0, torch.where(b < 0, -k, k), torch.zeros_like(k))
    state["exp_avg"].copy_(_unblock(k, m))
    state["exp_avg_absmax"].copy_(am.squeeze(1))
    b = _blocks(v)
    av = b.amax(dim=1, keepdim=True)
    k = torch.round(255 * torch.sqrt(torch.sqrt(b / torch.where(av > 0, av, torch.ones_like(av)))))
    state["exp_avg_sq"].copy_(_unblock(torch.where(av > 0, k, torch.zeros_like(k)), v))
    state["exp_avg_sq_absmax"].copy_(av.squeeze(1))
