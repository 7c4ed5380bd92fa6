"""iFairy modules: ``IFairyLinear``, a complex linear layer with 2-bit {±1, ±i} weights (inference only), and,
from ``ifairy_model``, the blocks and the whole model (``IFairyForCausalLM``) built from it."""
from __future__ import annotations

import torch
from torch import nn

import lowrank

__all__ = ["IFairyLinear"]


def _packed_shape(in_features: int, out_features: int) -> tuple[int, int]:
    return out_features, (in_features + 3) // 4


class IFairyLinear(nn.Module):
    """iFairy's ``ComplexLinear`` at inference: ``y = W·conj(x)`` with W quantized to {±1, ±i}·scales.

    Holds two buffers in the public format (what ``state_dict`` saves and loads):

    - ``packed`` uint8 ``(out, ceil(in/4))``: codes 0 = −1, 1 = +1, 2 = −i, 3 = +i, element j of a row in byte
      ``j // 4`` at bits ``2·(j % 4)``;
    - ``scales`` float32 ``[s_re, s_im]``.

    ``forward(x_real, x_imag) -> (y_real, y_imag)``, x ``(..., in)``, y ``(..., out)`` in x's dtype.
    ``act_quant=True`` (the default, iFairy's W2A8) quantizes each part of x per token to int8 first, exactly
    as the model was trained; ``act_quant=False`` keeps x in its dtype. Build it from latent full-precision
    weights with :meth:`from_float` (PhaseQuant); a fresh layer holds random codes and scales ``1/√in``.
    No parameters and no gradients: asking for one raises.

    ``state_dict`` also holds ``_extra_state``: int64 ``[in_features]``, because ``packed`` alone fixes
    ``in_features`` only up to ``ceil(in/4)`` (a 130-input weight fits a 129-input layer's buffer). Loading checks
    it; a state dict saved before it existed (no ``_extra_state``) still loads, checked by shape only.
    """

    def __init__(self, in_features: int, out_features: int, act_quant: bool = True, device=None):
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"IFairyLinear needs positive sizes, got in={in_features}, out={out_features}")
        self.in_features, self.out_features, self.act_quant = in_features, out_features, bool(act_quant)
        self.register_buffer("packed", torch.empty(_packed_shape(in_features, out_features), dtype=torch.uint8,
                                                   device=device))
        self.register_buffer("scales", torch.empty(2, dtype=torch.float32, device=device))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random codes (padding codes 0) and ``s_re = s_im = 1/√in``, so ``|y| ≈ |x|`` on random data."""
        if self.packed.is_meta:
            return
        # random bytes are random codes: no (out, in) code tensor, so a 1.3B-shaped model builds in its packed size
        self.packed.random_(0, 256)
        tail = self.in_features % 4
        if tail:
            self.packed[:, -1] &= (1 << (2 * tail)) - 1  # padding codes stay 0
        self.scales.fill_(self.in_features ** -0.5)

    @classmethod
    def from_float(cls, w_real: torch.Tensor, w_imag: torch.Tensor, act_quant: bool = True) -> "IFairyLinear":
        """PhaseQuant latent weights ``(out, in)`` (what iFairy checkpoints hold) into a layer on their device."""
        if w_real.dim() != 2 or w_real.shape != w_imag.shape:
            raise ValueError(f"IFairyLinear.from_float: w_real and w_imag must be 2-D (out, in) of the same "
                             f"shape, got {tuple(w_real.shape)} and {tuple(w_imag.shape)}")
        # skip_init: no random codes drawn only to be overwritten
        layer = nn.utils.skip_init(cls, w_real.shape[1], w_real.shape[0], act_quant, device=w_real.device)
        packed, scales = lowrank.ifairy_quantize(w_real.detach(), w_imag.detach())
        layer.packed.copy_(packed)
        layer.scales.copy_(scales)
        return layer

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The float32 ``(w_real, w_imag)`` ``(out, in)`` this layer multiplies by."""
        return lowrank.ifairy_dequantize(self.packed, self.scales, self.in_features)

    def forward(self, x_real: torch.Tensor, x_imag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x_real.shape != x_imag.shape or x_real.dim() == 0 or x_real.shape[-1] != self.in_features:
            raise ValueError(f"IFairyLinear: expected x_real and x_imag of the same shape (..., "
                             f"{self.in_features}), got {tuple(x_real.shape)} and {tuple(x_imag.shape)}")
        return lowrank.ifairy_linear(x_real, x_imag, self.packed, self.scales, self.act_quant, self.in_features)

    @staticmethod
    def forward_many(layers: "list[IFairyLinear]", x_real: torch.Tensor, x_imag: torch.Tensor
                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[layer(x_real, x_imag) for layer in layers]`` in one ``ifairy_linear_multi`` call (one dispatch; on the
        CPU the activations are quantized once); layers that differ in ``in_features`` or ``act_quant`` are run
        one by one."""
        first = layers[0]
        if any(l.in_features != first.in_features or l.act_quant != first.act_quant for l in layers):
            return [layer(x_real, x_imag) for layer in layers]
        if x_real.shape != x_imag.shape or x_real.dim() == 0 or x_real.shape[-1] != first.in_features:
            raise ValueError(f"IFairyLinear: expected x_real and x_imag of the same shape (..., "
                             f"{first.in_features}), got {tuple(x_real.shape)} and {tuple(x_imag.shape)}")
        return lowrank.ifairy_linear_multi(x_real, x_imag, [l.packed for l in layers], [l.scales for l in layers],
                                           first.act_quant, first.in_features)

    def _apply(self, fn, recurse=True):
        # .half() / .to(dtype) would cast the float32 scales like any float buffer: follow the device only.
        scales = self.scales
        super()._apply(fn, recurse)
        if self.scales.dtype != torch.float32:
            self.scales = scales.to(self.scales.device)
        return self

    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor([self.in_features], dtype=torch.int64)

    def set_extra_state(self, state) -> None:
        pass  # checked, before anything is copied, in _load_from_state_dict

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        extra = state_dict.get(prefix + "_extra_state")
        if extra is not None:
            recorded = extra.tolist() if isinstance(extra, torch.Tensor) else extra
            if recorded != [self.in_features]:
                raise ValueError(f"IFairyLinear({self.in_features}, {self.out_features}): {prefix}_extra_state "
                                 f"records in_features {recorded}, this layer has {self.in_features}")
        expected = {"packed": (torch.uint8, _packed_shape(self.in_features, self.out_features)),
                    "scales": (torch.float32, (2,))}
        for name, (dtype, shape) in expected.items():
            value = state_dict.get(prefix + name)
            if value is None:
                continue
            if not isinstance(value, torch.Tensor) or value.dtype != dtype or tuple(value.shape) != shape:
                got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value)
                raise ValueError(f"IFairyLinear({self.in_features}, {self.out_features}): {prefix}{name} must be "
                                 f"{dtype} {shape}, got {got}")
            if name == "scales" and not torch.isfinite(value).all():
                raise ValueError(f"IFairyLinear: {prefix}scales must be finite, got {value.tolist()}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if extra is None and prefix + "_extra_state" in missing_keys:
            missing_keys.remove(prefix + "_extra_state")  # saved before in_features was recorded: shape-checked

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, act_quant={self.act_quant}, "
                f"bits=2")


from .ifairy_model import *  # noqa: E402,F401,F403  (the blocks and the model, built from IFairyLinear)
from .ifairy_model import __all__ as _model_all  # noqa: E402

__all__ += _model_all
