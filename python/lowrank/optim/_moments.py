"""What GaLoreAdamW does with the Adam moments when a parameter's subspace is refreshed (group key ``moments``).

``"keep"`` (default, galore-torch's behaviour): the rank-r moments are left as they are, so after a refresh their
coordinates are read in the new basis although they were accumulated in the old one.

``"reproject"``: the moments are re-expressed in the new basis (LDAdam's projection-aware rule, Robert et al.,
"LDAdam: Adaptive Optimization from Low-Dimensional Gradient Statistics", ICLR 2025). With C the (r, r) change of
basis (``P_newᵀ·P_old`` on the left, ``P_new·P_oldᵀ`` on the right, acting on the rank index) and t the steps
taken so far:

    m ← C·m                                  the part of the old first moment inside the new subspace, exactly
    v ← |(C∘C)·(v − κ·m²) + κ·(C·m)²|        κ = (1−β2ᵗ)/(1−β1ᵗ)²

The second moment is not linear in the basis; the rule splits the bias-corrected v̂ into variance v̂ − m̂² and
squared mean m̂², rotates the mean exactly and the variance as if the old coordinates were independent
(Var(Σ_b C_ab·x_b) = Σ_b C_ab²·Var(x_b)). The |·| (LDAdam's) guards against v̂ − m̂² < 0, possible because the
two EMAs have different lengths. C = I leaves both moments unchanged; directions of the new subspace that the
old one did not contain start from zero. For the DCT basis both subspaces are rows of one orthonormal matrix, so
C is exactly a 0/1 selection: the moments of the basis vectors kept are carried over bit for bit (m and v alike)
and new vectors start at zero. 8-bit moments are decoded, re-projected in float32 and re-encoded.
"""
from __future__ import annotations

import torch

from . import _state8bit

MOMENT_MODES = ("keep", "reproject")


def basis_of(state: dict) -> dict:
    """The current subspace of a parameter's state (its P or its DCT row indices), before a refresh replaces it."""
    return {k: state[k] for k in ("P", "basis_idx") if k in state}


def reproject_(state: dict, old: dict, left: bool, betas: tuple[float, float]) -> None:
    """Re-express the moments in ``state`` (accumulated in subspace ``old``) in the state's current subspace."""
    if "exp_avg" not in state or not old or state.get("step", 0) == 0:
        return
    eight_bit = state["exp_avg"].dtype == torch.int8
    m, v = _state8bit.dequantize(state) if eight_bit else (state["exp_avg"], state["exp_avg_sq"])

    def apply(C, x):  # the change of basis acts on the rank index: rows of x (left) or columns (right)
        return C @ x if left else x @ C.T

    if "basis_idx" in old:
        C = (state["basis_idx"].unsqueeze(1) == old["basis_idx"].unsqueeze(0)).to(m.dtype)
        m_new, v_new = apply(C, m), apply(C, v)  # one 1 per kept row: exact copies and zeros
    else:
        P_old, P_new = old["P"], state["P"]
        C = (P_new.T @ P_old) if left else (P_new @ P_old.T)
        beta1, beta2 = betas
        t = state["step"]
        kappa = (1.0 - beta2 ** t) / (1.0 - beta1 ** t) ** 2
        m_new = apply(C, m)
        v_new = (apply(C * C, v - kappa * m * m) + kappa * m_new * m_new).abs_()
    if eight_bit:
        _state8bit.quantize_(state, m_new, v_new)
    else:
        state["exp_avg"].copy_(m_new)
        state["exp_avg_sq"].copy_(v_new)
