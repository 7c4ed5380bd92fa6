"""Pure-torch references of the projection ops (re-exported by lowrank.reference).

G is an (m, n) gradient, W the weight of the same shape, r the rank, α the scale.
Right side (``left=False``, GaLore's rule for m ≥ n): P is (r, n) with orthonormal rows, R = G·Pᵀ (m, r),
back(M) = M·P, and per-row quantities have length m. Left side (``left=True``, m < n): P is (m, r) with
orthonormal columns, R = Pᵀ·G (r, n), back(M) = P·M, and per-column quantities have length n.

Each reference computes in the dtype of the fp32/fp64 operand it is given (P, M or the states), so passing
float64 tensors gives ground truth. The last two functions are reference *optimizer steps* (GaLore and Fira)
written straight from the published algorithms, independently of ``lowrank.optim``.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "galore_project_reference",
    "adam_lowrank_reference",
    "galore_update_reference",
    "dct_basis_reference",
    "basis_scores_reference",
    "dct_select_reference",
    "projected_adamw_step_reference",
    "reproject_moments_reference",
    "STATE8_BLOCK",
    "quantize_exp_avg_reference",
    "dequantize_exp_avg_reference",
    "quantize_exp_avg_sq_reference",
    "dequantize_exp_avg_sq_reference",
    "adam_lowrank_8bit_reference",
]


def galore_project_reference(G: torch.Tensor, P: torch.Tensor, left: bool, want_sqnorms: bool = False):
    """``(R, sqnorms)``: R = G·Pᵀ (right) or Pᵀ·G (left) in P's dtype; sqnorms = ‖G_i‖² per row (right, length m)
    or ‖G_j‖² per column (left, length n) in P's dtype, or an empty tensor when not wanted."""
    g = G.to(P.dtype)
    R = P.T @ g if left else g @ P.T
    sq = (g * g).sum(dim=0 if left else 1) if want_sqnorms else R.new_empty(0)
    return R, sq


def adam_lowrank_reference(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, R: torch.Tensor, beta1: float,
                           beta2: float, eps: float) -> torch.Tensor:
    """In place: m = β1·m + (1−β1)·R, v = β2·v + (1−β2)·R²; returns N = m / (√v + eps) (no bias correction)."""
    r = R.to(exp_avg.dtype)
    exp_avg.mul_(beta1).add_(r, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(r, r, value=1 - beta2)
    return exp_avg / (exp_avg_sq.sqrt() + eps)


def galore_update_reference(W: torch.Tensor, M: torch.Tensor, P: torch.Tensor, left: bool, decay: float,
                            G: torch.Tensor | None = None, residual_scale: torch.Tensor | None = None) -> None:
    """In place: W ← decay·(W − back(M) − residual_scale ⊙ G), back(M) = M·P (right) or P·M (left);
    residual_scale scales row i of G (right, length m) or column j (left, length n). Computed in M's dtype,
    W rounded once."""
    w = W.to(M.dtype)
    w = w - (P @ M if left else M @ P)
    if G is not None:
        s = residual_scale.to(M.dtype)
        w = w - (s.unsqueeze(0) if left else s.unsqueeze(1)) * G.to(M.dtype)
    W.copy_(w * decay)


def dct_basis_reference(n: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Orthonormal DCT-II matrix Q (n, n): Q[i, j] = √(2/n)·cos(π·i·(2j+1)/(2n)), row 0 scaled by √½,
    built in float64 (the angle reduced exactly as the integer i·(2j+1) mod 4n first) and rounded once to
    ``dtype``."""
    i = torch.arange(n, dtype=torch.int64, device=device).unsqueeze(1)
    j = torch.arange(n, dtype=torch.int64, device=device).unsqueeze(0)
    k = (i * (2 * j + 1)) % (4 * n)
    Q = math.sqrt(2.0 / n) * torch.cos(math.pi * k.to(torch.float64) / (2 * n))
    Q[0] *= math.sqrt(0.5)
    return Q.to(dtype)


def basis_scores_reference(G: torch.Tensor, Q: torch.Tensor, left: bool) -> torch.Tensor:
    """L1 norm of each column of G·Qᵀ (right, length n) or each row of Q·G (left, length m), in Q's dtype."""
    g = G.to(Q.dtype)
    return (Q @ g).abs().sum(dim=1) if left else (g @ Q.T).abs().sum(dim=0)


def dct_select_reference(G: torch.Tensor, Q: torch.Tensor, rank: int, left: bool) -> torch.Tensor:
    """The ``rank`` basis vectors (rows of Q) with the largest scores, as ascending int32 indices; ties go to the
    lower index."""
    scores = basis_scores_reference(G, Q, left)
    top = torch.sort(scores, descending=True, stable=True).indices[:rank]
    return top.sort().values.to(torch.int32)


def _refresh_basis(G: torch.Tensor, rank: int, left: bool, basis: str, dtype: torch.dtype) -> torch.Tensor:
    """P for the current gradient: SVD of G (fp32 copy, float64 for float64 G), truncated like GaLore's
    projector; or the top-``rank`` DCT rows."""
    if basis == "svd":
        U, _, Vh = torch.linalg.svd(G.to(dtype), full_matrices=False)
        return U[:, :rank].contiguous() if left else Vh[:rank].contiguous()
    if basis == "dct":
        size = G.shape[0] if left else G.shape[1]
        Q = dct_basis_reference(size, G.device, dtype)
        rows = Q[dct_select_reference(G, Q, rank, left).long()]
        return rows.T.contiguous() if left else rows
    raise ValueError(f"reference step knows basis 'svd' and 'dct', not {basis!r}")


@torch.no_grad()
def projected_adamw_step_reference(W: torch.Tensor, G: torch.Tensor, state: dict, *, lr: float,
                                   betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                                   correct_bias: bool = True, rank: int, update_proj_gap: int,
                                   scale: float = 1.0, left: bool | None = None, fira: bool = False,
                                   basis: str = "svd", moments: str = "keep") -> None:
    """One GaLore (``fira=False``) or Fira (``fira=True``) AdamW step on W in place, written as the papers'
    code does it, with dense back-projections and an explicitly formed residual. ``state`` is a dict this
    function owns (empty before the first step). Works in float64 when W and G are float64 (the moments then
    are float64 too); otherwise moments and maths are float32 and W is rounded once per step.

    GaLore (galore_torch.GaLoreAdamW, proj_type 'std'): side = right if m ≥ n else left (or as given);
    P refreshed when step % update_proj_gap == 0 (step counted before the increment, so step 0 refreshes);
    R = project(G); m, v ← Adam moments of R; N = m/(√v+eps); t = step+1;
    step_size = lr·√(1−β2ᵗ)/(1−β1ᵗ) (lr without bias correction);
    W ← W − step_size·α·back(N); then W ← W − lr·wd·W.

    Fira (xichen-fy/Fira fira_adamw.AdamW): additionally φ_i = ‖N_i‖/(‖R_i‖+1e-8) over the rank dimension
    (one per row of W on the right, per column on the left); S = φ ⊙ (G − α·back(R)); the first step stores
    ‖S‖; later steps divide S by limiter = max(‖S‖/(stored+1e-8), 1.01)/1.01 and store ‖S‖/limiter;
    W ← W − step_size·(α·back(N) + S); then decoupled weight decay.

    ``moments="reproject"``: on a refresh after the first, the moments are carried into the new subspace by
    :func:`reproject_moments_reference` (``"keep"``, galore-torch's behaviour, leaves them as they are).
    """
    m, n = G.shape
    side_left = (m < n) if left is None else left
    cdtype = torch.float64 if G.dtype == torch.float64 else torch.float32
    g = G.to(cdtype)
    step = state.get("step", 0)
    r = min(rank, m, n)
    if "P" not in state or step % update_proj_gap == 0:
        P_old = state.get("P")
        state["P"] = _refresh_basis(G, r, side_left, basis, cdtype)
        if moments == "reproject" and P_old is not None and "exp_avg" in state:
            state["exp_avg"], state["exp_avg_sq"] = reproject_moments_reference(
                state["exp_avg"], state["exp_avg_sq"], P_old, state["P"], side_left, step, *betas)
    P = state["P"]
    R = P.T @ g if side_left else g @ P.T
    if "exp_avg" not in state:
        state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(R), torch.zeros_like(R)
    beta1, beta2 = betas
    step += 1
    state["step"] = step
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    exp_avg.mul_(beta1).add_(R, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(R, R, value=1 - beta2)
    N = exp_avg / (exp_avg_sq.sqrt() + eps)
    step_size = lr
    if correct_bias:
        step_size = lr * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)

    def back(x):
        return scale * (P @ x if side_left else x @ P)

    update = back(N)
    if fira:
        rank_dim = 0 if side_left else 1
        phi = N.norm(dim=rank_dim) / (R.norm(dim=rank_dim) + 1e-8)
        S = (phi.unsqueeze(0) if side_left else phi.unsqueeze(1)) * (g - back(R))
        s_norm = S.norm().item()
        if "fira_norm" in state:
            limiter = max(s_norm / (state["fira_norm"] + 1e-8), 1.01) / 1.01
            S = S / limiter
            state["fira_norm"] = s_norm / limiter
        else:
            state["fira_norm"] = s_norm
        update = update + S
    w = W.to(cdtype) - step_size * update
    if weight_decay > 0.0:
        w = w - lr * weight_decay * w
    W.copy_(w)


# ------------------------------------------------------------------------- moments across a subspace refresh
def reproject_moments_reference(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, P_old: torch.Tensor,
                                 P_new: torch.Tensor, left: bool, step: int, beta1: float, beta2: float):
    """Adam moments of the old subspace re-expressed in the new one (LDAdam's projection-aware rule, Robert et
    al., ICLR 2025, eq. for m̃ and ṽ), returned as new tensors.

    C = P_newᵀ·P_old (left, (r, r)) or P_new·P_oldᵀ (right), the change of basis on the rank index. First moment
    (exact for the part of the old moment that lies in the new subspace): m_new = C·m (left) or m·Cᵀ (right).
    Second moment: with bias-corrected m̂ = m/(1−β1ᵗ), v̂ = v/(1−β2ᵗ) and coordinates taken as independent,
    E[y²] of y = C·x is (C∘C)·Var(x) + (C·E[x])², so
    v_new = (1−β2ᵗ)·|(C∘C)·(v̂ − m̂²) + (C·m̂)²|, i.e. |(C∘C)·(v − κ·m²) + κ·m_new²| with κ = (1−β2ᵗ)/(1−β1ᵗ)²
    (the |·| as in LDAdam: v̂ − m̂² of two EMAs of different length can be negative). t = steps taken so far.
    C = I leaves both moments unchanged."""
    dt = exp_avg.dtype
    C = (P_new.T @ P_old) if left else (P_new @ P_old.T)
    C = C.to(dt)
    kappa = (1.0 - beta2 ** step) / (1.0 - beta1 ** step) ** 2

    def apply(A, x):  # change of basis on the rank index: rows (left) or columns (right) of x
        return A @ x if left else x @ A.T

    m_new = apply(C, exp_avg)
    v_new = (apply(C * C, exp_avg_sq - kappa * exp_avg * exp_avg) + kappa * m_new * m_new).abs()
    return m_new, v_new


# ---------------------------------------------------------------------------- 8-bit (blockwise) Adam state
STATE8_BLOCK = 256  # elements per quantization block (one float32 absmax each), over the flattened state


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """x flattened, zero-padded to whole blocks, as (n_blocks, STATE8_BLOCK)."""
    flat = x.reshape(-1)
    pad = (-flat.numel()) % STATE8_BLOCK
    return torch.nn.functional.pad(flat, (0, pad)).reshape(-1, STATE8_BLOCK)


def quantize_exp_avg_reference(m: torch.Tensor):
    """First moment (float32) -> (int8 codes of m's shape, float32 absmax per block). Signed square-law map:
    value = sign(k)·(|k|/127)²·absmax, k = sign(m)·round(127·√(|m|/absmax)) (round half to even); an all-zero
    block has absmax 0 and codes 0."""
    b = _blocks(m)
    absmax = b.abs().amax(dim=1)
    a = absmax.unsqueeze(1)
    safe = torch.where(a > 0, a, torch.ones_like(a))
    k = torch.round(127 * torch.sqrt(b.abs() / safe))
    k = torch.where(a > 0, torch.where(b < 0, -k, k), torch.zeros_like(k))
    return k.to(torch.int8).reshape(-1)[:m.numel()].reshape(m.shape), absmax


def dequantize_exp_avg_reference(codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    k = _blocks(codes.to(torch.float32))
    t = k.abs() / 127
    v = (t * t) * absmax.unsqueeze(1)
    v = torch.where(k < 0, -v, v)
    return v.reshape(-1)[:codes.numel()].reshape(codes.shape)


def quantize_exp_avg_sq_reference(v: torch.Tensor):
    """Second moment (float32, ≥ 0) -> (uint8 codes, float32 absmax per block). Fourth-root map:
    value = (k/255)⁴·absmax, k = round(255·√√(v/absmax))."""
    b = _blocks(v)
    absmax = b.amax(dim=1)
    a = absmax.unsqueeze(1)
    safe = torch.where(a > 0, a, torch.ones_like(a))
    k = torch.round(255 * torch.sqrt(torch.sqrt(b / safe)))
    k = torch.where(a > 0, k, torch.zeros_like(k))
    return k.to(torch.uint8).reshape(-1)[:v.numel()].reshape(v.shape), absmax


def dequantize_exp_avg_sq_reference(codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    t = _blocks(codes.to(torch.float32)) / 255
    t2 = t * t
    v = (t2 * t2) * absmax.unsqueeze(1)
    return v.reshape(-1)[:codes.numel()].reshape(codes.shape)


def adam_lowrank_8bit_reference(exp_avg: torch.Tensor, exp_avg_absmax: torch.Tensor, exp_avg_sq: torch.Tensor,
                                exp_avg_sq_absmax: torch.Tensor, R: torch.Tensor, beta1: float, beta2: float,
                                eps: float) -> torch.Tensor:
    """adam_lowrank_ on 8-bit state, in place: dequantize m, v; m = β1·m + (1−β1)·R, v = β2·v + (1−β2)·R² in
    float32 (each product rounded, no fused multiply-add); N = m/(√v + eps) from these float32 moments; then
    m, v requantized with their new per-block absmax. Returns N."""
    m = dequantize_exp_avg_reference(exp_avg, exp_avg_absmax)
    v = dequantize_exp_avg_sq_reference(exp_avg_sq, exp_avg_sq_absmax)
    r = R.to(torch.float32)
    m = m * beta1 + (1 - beta1) * r
    v = v * beta2 + (1 - beta2) * (r * r)
    N = m / (torch.sqrt(v) + eps)
    codes, absmax = quantize_exp_avg_reference(m)
    exp_avg.copy_(codes)
    exp_avg_absmax.copy_(absmax)
    codes, absmax = quantize_exp_avg_sq_reference(v)
    exp_avg_sq.copy_(codes)
    exp_avg_sq_absmax.copy_(absmax)
    return N
