"""iFairy (Fairy±i) 2-bit complex inference: ``lowrank.ifairy_quantize``, ``ifairy_dequantize``, ``ifairy_linear``.

Public packed format (what users save and load):
    codes 0 = -1, 1 = +1, 2 = -i, 3 = +i; ``packed`` is uint8 ``(out, ceil(in/4))`` with element ``j`` of a row in
    byte ``j // 4`` at bits ``2·(j % 4)`` (low bits first; padding codes are 0 and ignored); ``scales`` is float32
    ``[s_re, s_im]``. The dequantized weight is ``W = Wr + i·Wi`` with ``Wr ∈ {0, ±s_re}``, ``Wi ∈ {0, ±s_im}``.

Inference only: asking for a gradient through these ops raises.
"""
from __future__ import annotations

import torch

from ._autograd import refuse_gradient
from ._common import check_dim, check_float, check_same_device, check_same_dtype, dtype_str, shape_str

__all__ = ["ifairy_quantize", "ifairy_dequantize", "ifairy_linear", "ifairy_linear_multi"]
# names in torch.ops.lowrank of this family
OP_NAMES = ["ifairy_quantize", "ifairy_dequantize", "ifairy_linear", "ifairy_linear_multi"]
# W2A8 sums are exact int32: |A| <= 127·in_features, so in_features is capped where that fits (2^31 − 1)
MAX_W2A8_IN_FEATURES = (2**31 - 1) // 127


def ifairy_quantize(w_real: torch.Tensor, w_imag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PhaseQuant of a complex weight ``w_real + i·w_imag`` (both ``(out, in)``) to ``{±1, ±i}``, packed.

    Each weight goes to the fourth root of unity nearest by phase, with iFairy's half-open sectors of
    ``atan2(wi, wr)``: ``[-π/4, π/4) -> +1``, ``[π/4, 3π/4) -> +i``, ``[-3π/4, -π/4) -> -i``, otherwise ``-1``
    (so ``1+1i -> +i``, ``1-1i -> +1``, ``-1+1i -> -1``, ``-1-1i -> -i``; zero ``-> +1``). The sectors are
    decided by exact comparisons, not a rounded atan2.
    ``s_re`` = mean ``|w_real|`` over the weights mapped to ±1, ``s_im`` = mean ``|w_imag|`` over those mapped to ±i
    (summed in float64, independent of the thread count), each clamped to ``>= 1e-5`` (an axis no weight maps
    to gets ``1e-5``).

    Args:
        w_real, w_imag: ``(out, in)``, float32 / float16 / bfloat16 (float64 on CPU), same dtype and device.

    A NaN or ±Inf anywhere in the weight raises (it would make a scale NaN or Inf, or be clamped silently);
    on CUDA that check costs one synchronization (quantizing is a load-time step).

    Returns ``(packed, scales)``: uint8 ``(out, ceil(in/4))`` and float32 ``[s_re, s_im]``.
    """
    return torch.ops.lowrank.ifairy_quantize(w_real, w_imag)


def ifairy_dequantize(packed: torch.Tensor, scales: torch.Tensor, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack ``packed`` (uint8 ``(out, ceil(in_features/4))``) with ``scales`` (float32 ``[s_re, s_im]``).

    Returns ``(w_real, w_imag)``, float32 ``(out, in_features)``: code 0 -> ``(-s_re, 0)``, 1 -> ``(s_re, 0)``,
    2 -> ``(0, -s_im)``, 3 -> ``(0, s_im)``.
    """
    return torch.ops.lowrank.ifairy_dequantize(packed, scales, int(in_features))


def ifairy_linear(x_real: torch.Tensor, x_imag: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                  act_quant: bool = True, in_features: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``y = W·conj(x)`` per token, iFairy's ``ComplexLinear`` on a packed 2-bit weight.

    ``y_real = x_real @ Wrᵀ + x_imag @ Wiᵀ`` and ``y_imag = x_real @ Wiᵀ - x_imag @ Wrᵀ`` with ``(Wr, Wi)`` the
    dequantized weight.

    Args:
        x_real, x_imag: ``(..., in)``, float32 / float16 / bfloat16 (float64 on CPU), same shape, dtype, device;
            any strides.
        packed: uint8 ``(out, ceil(in/4))``; scales: float32 ``[s_re, s_im]``, on x's device.
        act_quant: iFairy's W2A8. Each token's real and imaginary parts are quantized separately to int8:
            ``a = 127 / max(max|x|, 1e-5)`` (float32), ``q = clamp(round_half_even(x·a), -128, 127)`` computed in
            float32; the sums of the signed int8 values are exact (int32, so ``in`` is at most
            ``MAX_W2A8_IN_FEATURES`` = 16,909,320) and ``y_re = s_re·A/a_r + s_im·B/a_i``,
            ``y_im = -s_re·C/a_i + s_im·D/a_r`` at the end. With ``act_quant=False`` the activations are added and
            subtracted in floating point (fp32 accumulation, fp64 for float64). An all-zero token gives zeros.
        in_features: the layer's input width. The packed width ``ceil(in/4)`` cannot tell 129 from 130 inputs
            (a padding code would act as a −1 weight), so pass it when you know it: it must equal ``x``'s last
            dimension.

    Non-finite input (every path, CPU and CUDA, W2A8 and float): a token whose ``x_real`` or ``x_imag`` holds a
    NaN or ±Inf gets NaN in every element of its ``y_real`` and ``y_imag``; the other tokens are unaffected.

    Returns ``(y_real, y_imag)``, ``(..., out)`` in x's dtype. Not differentiable (inference only).
    """
    if _no_gradient_needed(x_real, x_imag, scales):
        with _BelowAutograd():
            return _LINEAR(x_real, x_imag, packed, scales, bool(act_quant), in_features)
    return _LINEAR(x_real, x_imag, packed, scales, bool(act_quant), in_features)


def ifairy_linear_multi(x_real: torch.Tensor, x_imag: torch.Tensor, packed: list[torch.Tensor],
                        scales: list[torch.Tensor], act_quant: bool = True,
                        in_features: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Several iFairy linears on the same input in one call: ``[ifairy_linear(x_real, x_imag, p, s, act_quant,
    in_features) for p, s in zip(packed, scales)]``, equal to it element for element, for a decode step's
    q/k/v or gate/up projections.

    One call pays the dispatch and the checks once, and on the CPU with ``act_quant`` quantizes the activations
    once for all the linears (the CUDA kernel still runs the linears one after another inside the call). ``packed[i]`` is uint8 ``(out_i, ceil(in/4))`` and ``scales[i]`` float32 ``[s_re, s_im]``;
    the ``out_i`` may differ. Returns one ``(y_real, y_imag)`` pair ``(..., out_i)`` per linear.
    ``torch.ops.lowrank.ifairy_linear_multi`` itself returns the flat list ``[y_real_0, y_imag_0, ...]``.

    Called through these wrappers, a call whose inputs need no gradient skips the ops' gradient refusal (see
    ``_no_gradient_needed``); ``torch.ops.lowrank.*`` called directly pays it unless under
    ``torch.inference_mode()``.
    """
    if _no_gradient_needed(x_real, x_imag, *scales):
        with _BelowAutograd():
            ys = _LINEAR_MULTI(x_real, x_imag, packed, scales, bool(act_quant), in_features)
    else:
        ys = _LINEAR_MULTI(x_real, x_imag, packed, scales, bool(act_quant), in_features)
    return [(ys[2 * i], ys[2 * i + 1]) for i in range(len(ys) // 2)]


def _no_gradient_needed(*tensors: torch.Tensor) -> bool:
    """True when no gradient can flow through this call, so that it may run below the autograd keys.

    The gradient refusal (``refuse_gradient``) is a Python autograd kernel that every call under grad mode, even
    under ``no_grad``, passes through: measured 8.3 -> 4.9 us for one 16x256 linear on the dev box, and a decode
    step pays it once per linear. It has nothing to do when grad mode is off or no input requires grad, and
    ``_AutoDispatchBelowAutograd`` is what its own no-gradient case does; the Python, autocast and backend keys
    still run. Not while ``torch.compile`` traces (the guard is not traceable; compiled code pays no kernel
    per call anyway) or under functorch transforms (their gradients are not ``requires_grad``).
    """
    if _is_compiling() or _functorch_active():
        return False
    if not _grad_enabled():
        return True
    for t in tensors:
        if t.requires_grad:
            return False
    return True


_is_compiling = torch.compiler.is_compiling
_functorch_active = torch._C._are_functorch_transforms_active
_grad_enabled = torch.is_grad_enabled
_BelowAutograd = torch._C._AutoDispatchBelowAutograd
_LINEAR = torch.ops.lowrank.ifairy_linear.default
_LINEAR_MULTI = torch.ops.lowrank.ifairy_linear_multi.default


# --------------------------------------------------------------------------------------------- fakes
# The same checks, in the same order and words, as csrc/ifairy/ifairy_common.h.
def _check_packed_scales(op, packed, scales, pname="packed", sname="scales"):
    check_dim(op, packed, pname, 2, "(out, ceil(in/4)) uint8")
    torch._check(packed.dtype == torch.uint8, lambda: f"{op}: {pname} must be uint8 (got {dtype_str(packed.dtype)})")
    torch._check(scales.dtype == torch.float32,
                 lambda: f"{op}: {sname} must be float32 [s_re, s_im] (got {dtype_str(scales.dtype)})")
    torch._check(scales.numel() == 2, lambda: f"{op}: {sname} must hold 2 elements [s_re, s_im] (got {scales.numel()} "
                                              f"elements, shape {shape_str(scales)})")
    check_same_device(op, (pname, packed), (sname, scales))


@torch.library.register_fake("lowrank::ifairy_quantize")
def _ifairy_quantize_fake(w_real, w_imag):
    op = "lowrank.ifairy_quantize"
    check_dim(op, w_real, "w_real", 2, "(out, in)")
    check_dim(op, w_imag, "w_imag", 2, "(out, in)")
    torch._check(w_real.shape == w_imag.shape, lambda: f"{op}: w_imag must have w_real's shape (got w_real "
                                                       f"{shape_str(w_real)}, w_imag {shape_str(w_imag)})")
    check_float(op, w_real, "w_real")
    check_same_dtype(op, w_real, "w_real", w_imag, "w_imag")
    check_same_device(op, ("w_real", w_real), ("w_imag", w_imag))
    out, inn = w_real.shape
    return (w_real.new_empty((out, (inn + 3) // 4), dtype=torch.uint8), w_real.new_empty((2,), dtype=torch.float32))


@torch.library.register_fake("lowrank::ifairy_dequantize")
def _ifairy_dequantize_fake(packed, scales, in_features):
    op = "lowrank.ifairy_dequantize"
    _check_packed_scales(op, packed, scales)
    torch._check(in_features >= 0, lambda: f"{op}: in_features must be >= 0 (got {in_features})")
    torch._check(packed.shape[1] == (in_features + 3) // 4,
                 lambda: f"{op}: packed must be (out, ceil(in_features/4)) = (out, {(in_features + 3) // 4}) "
                         f"(got packed of shape {shape_str(packed)}, in_features {in_features})")
    shape = (packed.shape[0], in_features)
    return packed.new_empty(shape, dtype=torch.float32), packed.new_empty(shape, dtype=torch.float32)


def _check_x(op, x_real, x_imag, act_quant, in_features):
    torch._check(x_real.dim() >= 1, lambda: f"{op}: x_real must have at least 1 dimension (..., in) (got a 0-D tensor)")
    torch._check(x_real.shape == x_imag.shape, lambda: f"{op}: x_imag must have x_real's shape (got x_real "
                                                       f"{shape_str(x_real)}, x_imag {shape_str(x_imag)})")
    check_float(op, x_real, "x_real")
    check_same_dtype(op, x_real, "x_real", x_imag, "x_imag")
    check_same_device(op, ("x_real", x_real), ("x_imag", x_imag))
    inn = x_real.shape[-1]
    torch._check(in_features is None or in_features == inn,
                 lambda: f"{op}: in_features must equal x_real's last dimension (got in_features {in_features}, "
                         f"x_real of shape {shape_str(x_real)})")
    torch._check(not act_quant or inn <= MAX_W2A8_IN_FEATURES,
                 lambda: f"{op}: x_real's last dimension must be at most {MAX_W2A8_IN_FEATURES} with act_quant=True, "
                         f"the exact int8 sums being int32 (got x_real of shape {shape_str(x_real)})")
    return inn


def _check_weight(op, x_real, packed, scales, inn, pname="packed", sname="scales"):
    _check_packed_scales(op, packed, scales, pname, sname)
    check_same_device(op, ("x_real", x_real), (pname, packed))
    torch._check(packed.shape[1] == (inn + 3) // 4,
                 lambda: f"{op}: {pname} must be (out, ceil(in/4)) = (out, {(inn + 3) // 4}) for in = x_real's last "
                         f"dimension (got {pname} of shape {shape_str(packed)}, x_real of shape {shape_str(x_real)})")
    shape = (*x_real.shape[:-1], packed.shape[0])
    return x_real.new_empty(shape), x_real.new_empty(shape)


@torch.library.register_fake("lowrank::ifairy_linear")
def _ifairy_linear_fake(x_real, x_imag, packed, scales, act_quant=True, in_features=None):
    op = "lowrank.ifairy_linear"
    inn = _check_x(op, x_real, x_imag, act_quant, in_features)
    return _check_weight(op, x_real, packed, scales, inn)


@torch.library.register_fake("lowrank::ifairy_linear_multi")
def _ifairy_linear_multi_fake(x_real, x_imag, packed, scales, act_quant=True, in_features=None):
    op = "lowrank.ifairy_linear_multi"
    inn = _check_x(op, x_real, x_imag, act_quant, in_features)
    torch._check(len(packed) == len(scales), lambda: f"{op}: packed and scales must be lists of the same length "
                                                     f"(got {len(packed)} and {len(scales)})")
    return [y for i, (p, s) in enumerate(zip(packed, scales))
            for y in _check_weight(op, x_real, p, s, inn, f"packed[{i}]", f"scales[{i}]")]


# ------------------------------------------------------------------------------------------ autograd
def _refusal(public_name: str) -> str:
    return (f"{public_name} is inference only: it has no gradient (iFairy trains full-precision latent weights "
            "with straight-through estimators; run such training in float)")


for _name in OP_NAMES:
    refuse_gradient(f"lowrank::{_name}", _refusal(f"lowrank.{_name}"))
del _name
