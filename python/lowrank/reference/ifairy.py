"""Pure-torch references of the ifairy ops (re-exported by lowrank.reference), written from the maths.

iFairy (Fairy±i) weights are one of ±1, ±i per element, with two per-tensor scales. The public format:

- codes ``0 = -1, 1 = +1, 2 = -i, 3 = +i`` (bit 1: imaginary axis, bit 0: positive);
- packed uint8 ``(out, ceil(in/4))``: element j of a row in byte ``j // 4`` at bits ``2·(j % 4)`` (low bits
  first); padding codes in the last byte are 0 and ignored;
- scales float32 ``[s_re, s_im]``: the weight is ``Wr = s_re·([c=1] − [c=0])``, ``Wi = s_im·([c=3] − [c=2])``.

The layer computes ``y = W·conj(x)`` per token: ``y_re = x_re·Wrᵀ + x_im·Wiᵀ``, ``y_im = x_re·Wiᵀ − x_im·Wrᵀ``.
"""
from __future__ import annotations

import torch

__all__ = [
    "ifairy_pack_codes",
    "ifairy_unpack_codes",
    "ifairy_codes_to_weights",
    "ifairy_quantize_reference",
    "ifairy_dequantize_reference",
    "ifairy_quantize_activations_reference",
    "ifairy_linear_reference",
    "ifairy_block_weight",
    "ifairy_stacked_weight",
    "ifairy_linear_block",
    "ifairy_linear_stacked",
]

_SHIFTS = (0, 2, 4, 6)
SCALE_MIN = 1e-5  # PhaseQuant's clamp of each weight scale, and the activation quantizer's clamp of max|x|


def ifairy_pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Codes ``(out, in)`` with values in {0, 1, 2, 3} -> packed uint8 ``(out, ceil(in/4))`` (padding codes 0)."""
    if codes.dim() != 2:
        raise ValueError(f"ifairy_pack_codes: codes must be 2-D (out, in), got {tuple(codes.shape)}")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > 3):
        raise ValueError("ifairy_pack_codes: codes must lie in {0, 1, 2, 3}")
    rows, n = c.shape
    c = torch.nn.functional.pad(c, (0, (-n) % 4)).reshape(rows, (n + 3) // 4, 4)
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=c.device)
    return (c << shifts).sum(-1).to(torch.uint8)


def ifairy_unpack_codes(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Packed uint8 ``(out, ceil(in/4))`` -> codes uint8 ``(out, in)`` (the padding codes are dropped)."""
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != (in_features + 3) // 4:
        raise ValueError(f"ifairy_unpack_codes: packed must be uint8 (out, ceil({in_features}/4)), got "
                         f"{packed.dtype} {tuple(packed.shape)}")
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=packed.device)
    codes = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & 3
    return codes.reshape(packed.shape[0], -1)[:, :in_features].to(torch.uint8)


def ifairy_codes_to_weights(codes: torch.Tensor, dtype: torch.dtype = torch.int8):
    """Codes -> the unit weight ``(σ_re, σ_im)`` with σ in {−1, 0, +1}: exactly one of the two is nonzero."""
    c = codes.to(torch.int64)
    sigma_re = (c == 1).to(torch.int64) - (c == 0).to(torch.int64)
    sigma_im = (c == 3).to(torch.int64) - (c == 2).to(torch.int64)
    return sigma_re.to(dtype), sigma_im.to(dtype)


def _phase_codes(w_real: torch.Tensor, w_imag: torch.Tensor) -> torch.Tensor:
    """The code of the fourth root of unity nearest in phase, with iFairy's half-open sectors of
    ``angle(w) ∈ (−π, π]``: [−π/4, π/4) -> +1, [π/4, 3π/4) -> +i, [−3π/4, −π/4) -> −i, the rest -> −1,
    and angle(0) = 0 so 0 -> +1.

    Written with exact comparisons instead of ``atan2``: |wr| = |wi| is a sector boundary exactly, so the
    result does not depend on how an ``atan2`` rounds near π/4. A boundary belongs to the sector it opens
    when turning counter-clockwise (π/4 -> +i, 3π/4 -> −1, −3π/4 -> −i, −π/4 -> +1)."""
    wr, wi = w_real.to(torch.float64), w_imag.to(torch.float64)
    plus_one = ((wr > 0) & (-wr <= wi) & (wi < wr)) | ((wr == 0) & (wi == 0))
    plus_i = (wi > 0) & (-wi < wr) & (wr <= wi)
    minus_i = (wi < 0) & (wi <= wr) & (wr < -wi)
    codes = torch.zeros(wr.shape, dtype=torch.uint8, device=wr.device)  # −1 unless another sector holds
    codes[plus_one] = 1
    codes[minus_i] = 2
    codes[plus_i] = 3
    return codes


def ifairy_quantize_reference(w_real: torch.Tensor, w_imag: torch.Tensor):
    """PhaseQuant (iFairy's ``DirectionQuantSTE``): ``(packed uint8 (out, ceil(in/4)), scales float32 [s_re, s_im])``.

    s_re = mean |w_real| over the weights mapped to ±1, s_im = mean |w_imag| over those mapped to ±i, each
    computed in float64 and clamped to >= 1e-5 (an empty set counts as mean 0, so gives 1e-5)."""
    if w_real.dim() != 2 or w_real.shape != w_imag.shape:
        raise ValueError("ifairy_quantize_reference: w_real and w_imag must be 2-D (out, in) of the same shape")
    if not (torch.isfinite(w_real).all() and torch.isfinite(w_imag).all()):
        raise ValueError("ifairy_quantize_reference: w_real and w_imag must be finite, got a NaN or Inf")
    codes = _phase_codes(w_real, w_imag)
    on_re = codes <= 1
    wr, wi = w_real.to(torch.float64).abs(), w_imag.to(torch.float64).abs()

    def mean_over(values, mask):
        count = int(mask.sum())
        return max(values[mask].sum().item() / count if count else 0.0, SCALE_MIN)

    scales = torch.tensor([mean_over(wr, on_re), mean_over(wi, ~on_re)], dtype=torch.float32, device=w_real.device)
    return ifairy_pack_codes(codes), scales


def ifairy_dequantize_reference(packed: torch.Tensor, scales: torch.Tensor, in_features: int,
                                dtype: torch.dtype = torch.float32):
    """``(w_real, w_imag)`` ``(out, in)`` in ``dtype``: ``Wr = s_re·σ_re``, ``Wi = s_im·σ_im``."""
    sigma_re, sigma_im = ifairy_codes_to_weights(ifairy_unpack_codes(packed, in_features), torch.float64)
    s = scales.to(torch.float64)
    return (s[0] * sigma_re).to(dtype), (s[1] * sigma_im).to(dtype)


def ifairy_quantize_activations_reference(x: torch.Tensor):
    """iFairy's ``ActivationQuantSTE`` without the division back: per token (last dim) absmax to int8.

    Computed in float32: ``a = 127 / max(max|x|, 1e-5)``, ``q = clamp(round_half_even(x·a), −128, 127)``.
    Returns ``(q int8 (..., in), a float32 (..., 1))``; ``x ≈ q / a``. A token holding a NaN or ±Inf gets
    ``a = NaN`` and ``q = 0`` (lowrank's non-finite rule: that token's outputs are all NaN)."""
    xf = x.to(torch.float32)
    absmax = xf.abs().amax(dim=-1, keepdim=True) if xf.shape[-1] else xf.new_zeros((*xf.shape[:-1], 1))
    finite = torch.isfinite(xf).all(dim=-1, keepdim=True)
    a = torch.where(finite, 127.0 / absmax.clamp_min(SCALE_MIN), float("nan"))
    q = torch.where(finite, torch.round(xf * a).clamp_(-128, 127), 0.0)  # torch.round: half to even
    return q.to(torch.int8), a


def ifairy_linear_reference(x_real: torch.Tensor, x_imag: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                            act_quant: bool = True):
    """``y = W·conj(x)`` per token, as float64 ``(y_real, y_imag)`` of shape ``(..., out)``.

    act_quant=False: ``y_re = x_re·Wrᵀ + x_im·Wiᵀ``, ``y_im = x_re·Wiᵀ − x_im·Wrᵀ`` with x and W in float64.
    act_quant=True (iFairy's W2A8): q_r, a_r and q_i, a_i from ``ifairy_quantize_activations_reference``, then
    the four integer sums per output ``A = Σ σ_re·q_r``, ``B = Σ σ_im·q_i``, ``C = Σ σ_re·q_i``,
    ``D = Σ σ_im·q_r`` and ``y_re = s_re·A/a_r + s_im·B/a_i``, ``y_im = s_im·D/a_r − s_re·C/a_i``. The sums are
    taken in float64 on integer values whose magnitude stays below 128·in < 2⁵³, so they are exact.

    Non-finite rule, both modes: every output of a token whose x_real or x_imag holds a NaN or ±Inf is NaN."""
    if x_real.shape != x_imag.shape:
        raise ValueError("ifairy_linear_reference: x_real and x_imag must have the same shape")
    in_features = x_real.shape[-1]
    sigma_re, sigma_im = ifairy_codes_to_weights(ifairy_unpack_codes(packed, in_features), torch.float64)
    s_re, s_im = scales.to(torch.float64).tolist()
    if not act_quant:
        xr, xi = x_real.to(torch.float64), x_imag.to(torch.float64)
        wr, wi = s_re * sigma_re, s_im * sigma_im
        finite = (torch.isfinite(xr) & torch.isfinite(xi)).all(dim=-1, keepdim=True)
        xr, xi = torch.where(finite, xr, 0.0), torch.where(finite, xi, 0.0)
        return tuple(torch.where(finite, y, float("nan")) for y in (xr @ wr.T + xi @ wi.T, xr @ wi.T - xi @ wr.T))
    q_r, a_r = ifairy_quantize_activations_reference(x_real)
    q_i, a_i = ifairy_quantize_activations_reference(x_imag)
    q_r, q_i = q_r.to(torch.float64), q_i.to(torch.float64)
    a_r, a_i = a_r.to(torch.float64), a_i.to(torch.float64)
    A, B = q_r @ sigma_re.T, q_i @ sigma_im.T
    C, D = q_i @ sigma_re.T, q_r @ sigma_im.T
    return s_re * A / a_r + s_im * B / a_i, s_im * D / a_r - s_re * C / a_i


# ---- Baselines for the benchmark: the same layer as real dense GEMMs ----------------------------------------

def ifairy_block_weight(w_real: torch.Tensor, w_imag: torch.Tensor) -> torch.Tensor:
    """The real 2x2 block form ``[[Wr, Wi], [Wi, −Wr]]`` ``(2·out, 2·in)``: ``[y_re, y_im] = M·[x_re, x_im]``."""
    return torch.cat([torch.cat([w_real, w_imag], 1), torch.cat([w_imag, -w_real], 1)], 0)


def ifairy_stacked_weight(w_real: torch.Tensor, w_imag: torch.Tensor) -> torch.Tensor:
    """``[Wr; Wi]`` stacked ``(2·out, in)`` (the SGLang port's form)."""
    return torch.cat([w_real, w_imag], 0)


def ifairy_linear_block(x_real: torch.Tensor, x_imag: torch.Tensor, w_block: torch.Tensor):
    """One GEMM with the block form: ``[x_re, x_im] (…, 2·in) · Mᵀ`` split into ``(y_real, y_imag)``."""
    out = w_block.shape[0] // 2
    y = torch.nn.functional.linear(torch.cat([x_real, x_imag], -1), w_block)
    return y[..., :out], y[..., out:]


def ifairy_linear_stacked(x_real: torch.Tensor, x_imag: torch.Tensor, w_stacked: torch.Tensor):
    """One GEMM with ``[Wr; Wi]`` on the real and imaginary tokens stacked: ``[x_re; x_im]·[Wr; Wi]ᵀ`` gives
    the four products, combined as ``y_re = x_re·Wrᵀ + x_im·Wiᵀ``, ``y_im = x_re·Wiᵀ − x_im·Wrᵀ``."""
    out = w_stacked.shape[0] // 2
    y = torch.nn.functional.linear(torch.stack([x_real, x_imag]), w_stacked)
    return y[0, ..., :out] + y[1, ..., out:], y[0, ..., out:] - y[1, ..., :out]
