"""Low-rank gradient projection (GaLore, Fira, SVD-free DCT): typed wrappers and fakes.

Notation: G is an ``(m, n)`` gradient (W an ``(m, n)`` weight). A **right** projection (``left=False``, what
GaLore uses when ``m >= n``) has ``P (r, n)``, ``R = G·Pᵀ (m, r)`` and ``back(M) = M·P``; a **left** projection
(``left=True``) has ``P (m, r)``, ``R = Pᵀ·G (r, n)`` and ``back(M) = P·M``. The "companion" dtype of G is
float64 when G is float64 (CPU only) and float32 otherwise: P, M, Q, residual_scale and every output use it.

These are optimizer ops: none of them is differentiable (no autograd registration).
"""
from __future__ import annotations

import torch

from ._common import check_companion, check_same_device, companion_dtype

__all__ = ["galore_project", "adam_lowrank_", "galore_update_", "dct_basis", "basis_scores", "dct_select",
           "adam_lowrank_8bit_", "STATE8_BLOCK"]
# names in torch.ops.lowrank of this family
OP_NAMES: list[str] = ["galore_project", "adam_lowrank_", "galore_update_", "dct_basis_", "basis_scores",
                       "adam_lowrank_8bit_"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def galore_project(G: torch.Tensor, P: torch.Tensor, left: bool, want_sqnorms: bool = False):
    """Project a gradient onto a rank-r subspace, and optionally take G's squared norms in the same pass.

    ``R = G·Pᵀ`` (right, ``P (r, n)``, R ``(m, r)``) or ``R = Pᵀ·G`` (left, ``P (m, r)``, R ``(r, n)``).
    ``sqnorms[i] = Σ_j G[i, j]²`` per row (right, length m) or ``sqnorms[j] = Σ_i G[i, j]²`` per column (left,
    length n), accumulated from the same reads of G that feed the product (G is read once). With
    ``want_sqnorms=False`` the second output is an empty ``(0,)`` tensor.

    G: float32 / bfloat16 / float16 (float64 on CPU), any strides. P: float32 (float64 iff G is float64).
    Outputs in P's dtype. Accumulation in fp32 (fp64). On CUDA a 16-bit G runs on tensor cores with P entering as
    three 16-bit terms, so R keeps fp32-level accuracy (galore-torch rounds P to G's dtype instead); for float16 G
    that needs ``|P| < 1023`` (any orthonormal P). Returns ``(R, sqnorms)``.
    """
    return torch.ops.lowrank.galore_project(G, P, bool(left), bool(want_sqnorms))


def adam_lowrank_(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, R: torch.Tensor, beta1: float, beta2: float,
                  eps: float) -> torch.Tensor:
    """Adam's moment update on a projected gradient, in place, fused with the normalized step.

    ``exp_avg = β1·exp_avg + (1-β1)·R``, ``exp_avg_sq = β2·exp_avg_sq + (1-β2)·R²`` (both in place), and returns a
    new tensor ``N = exp_avg / (√exp_avg_sq + eps)``. No bias correction: the optimizer folds it into the step
    size (transformers-style ``lr·√(1-β2ᵗ)/(1-β1ᵗ)``). All three tensors float32 (or all float64 on CPU), one
    shape; exp_avg and exp_avg_sq contiguous.
    """
    return torch.ops.lowrank.adam_lowrank_(exp_avg, exp_avg_sq, R, float(beta1), float(beta2), float(eps))


def galore_update_(W: torch.Tensor, M: torch.Tensor, P: torch.Tensor, left: bool, decay: float,
                   G: torch.Tensor | None = None, residual_scale: torch.Tensor | None = None) -> None:
    """Project back and update a weight in place: ``W = decay·(W - back(M) - residual_scale ⊙ G)``.

    ``back(M) = M·P`` (right: M ``(m, r)``, P ``(r, n)``) or ``P·M`` (left: P ``(m, r)``, M ``(r, n)``); it is
    never written to memory (a K = r GEMM whose epilogue reads W and G and writes W once, computed in fp32,
    fp64 for float64 W, and rounded to W's dtype once). ``residual_scale ⊙ G`` scales row i of G by
    ``residual_scale[i]`` (right, length m) or column j by ``residual_scale[j]`` (left, length n); G and
    residual_scale go together (both or neither).

    GaLore: ``M = step_size·α·N``, ``decay = 1 - lr·weight_decay``. Fira folds its residual in:
    ``M = step_size·α·N - c·α·φ⊙R`` and ``residual_scale = c·φ`` (so the residual ``G - α·back(R)`` is never formed).

    W: float32 / bfloat16 / float16 (float64 on CPU), contiguous. M, P, residual_scale: float32 (float64 iff W is
    float64). G: W's shape, float32 / bfloat16 / float16 (float64 too on the CPU).
    """
    torch.ops.lowrank.galore_update_(W, M, P, bool(left), float(decay), G, residual_scale)


def dct_basis(n: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``(n, n)`` orthonormal DCT-II matrix ``Q[i, j] = √(2/n)·cos(π·i·(2j+1)/(2n))``, row 0 scaled by ``√½``.

    ``Q·Qᵀ = I``; row i is the i-th cosine basis vector, so ``G·Qᵀ`` holds G's DCT coefficients along its rows.
    The angle is computed in double from ``i·(2j+1) mod 4n`` (exact integer reduction), so every entry is
    correctly rounded up to n in the tens of thousands. dtype: float32 or float64.
    """
    Q = torch.empty((n, n), device=device, dtype=dtype)
    torch.ops.lowrank.dct_basis_(Q)
    return Q


def basis_scores(G: torch.Tensor, Q: torch.Tensor, left: bool) -> torch.Tensor:
    """L1 norm of each coefficient of G in an orthonormal basis Q, without storing the coefficients.

    Right (``Q (n, n)``): ``scores[c] = Σ_i |(G·Qᵀ)[i, c]|`` (length n). Left (``Q (m, m)``):
    ``scores[c] = Σ_j |(Q·G)[c, j]|`` (length m). The |·| reduction is the GEMM's epilogue; per-tile partials are
    added in a fixed order (deterministic, no atomics). G: float32 / bfloat16 / float16 (float64 on CPU), any
    strides; Q and the result: float32 (float64 iff G is float64).
    """
    return torch.ops.lowrank.basis_scores(G, Q, bool(left))


def dct_select(G: torch.Tensor, Q: torch.Tensor, rank: int, left: bool) -> torch.Tensor:
    """The SVD-free subspace: indices of the ``rank`` basis vectors of Q with the largest :func:`basis_scores`.

    Returns int32 indices sorted ascending. Ties are broken toward the lower index (a stable descending sort,
    so the choice never depends on the device or the thread count). The projector is then ``Q[idx]`` (right,
    ``(r, n)``) or ``Q[idx].T`` (left, ``(m, r)``).
    """
    scores = basis_scores(G, Q, left)
    k = scores.shape[0]
    # two checks whose messages capture only the Python int: a closure over k (a SymInt under dynamic shapes)
    # would break torch.compile(fullgraph=True)
    torch._check(1 <= rank, lambda: f"lowrank.dct_select: rank {rank} must be >= 1")
    torch._check(rank <= k, lambda: f"lowrank.dct_select: rank {rank} exceeds the number of basis vectors")
    order = torch.sort(scores, descending=True, stable=True).indices[:rank]
    return torch.sort(order).values.to(torch.int32)


# ---------------------------------------------------------------------------------------------- fakes
def _check_float(op: str, t: torch.Tensor, name: str):
    torch._check(t.dtype in _FLOATS,
                 lambda: f"{op}: {name} must be float32, float16 or bfloat16 (float64 on CPU), got {t.dtype}")


def _proj_dims(op: str, G, g_name: str, P, left: bool):
    torch._check(G.dim() == 2, lambda: f"{op}: {g_name} must be 2-D (m, n), got a {G.dim()}-D tensor")
    _check_float(op, G, g_name)
    torch._check(P.dim() == 2, lambda: f"{op}: P must be 2-D, got a {P.dim()}-D tensor")
    check_companion(op, P, "P", G, g_name)
    check_same_device(op, (g_name, G), ("P", P))
    m, n = G.shape
    if left:
        torch._check(P.shape[0] == m, lambda: f"{op}: left projection: P must be (m, r) with m = {m}")
        r, dim = P.shape[1], m
    else:
        torch._check(P.shape[1] == n, lambda: f"{op}: right projection: P must be (r, n) with n = {n}")
        r, dim = P.shape[0], n
    torch._check(1 <= r and r <= dim, lambda: f"{op}: the rank r = {r} must be in [1, {dim}]")
    return m, n, r


@torch.library.register_fake("lowrank::galore_project")
def _galore_project_fake(G, P, left, want_sqnorms):
    m, n, r = _proj_dims("lowrank.galore_project", G, "G", P, left)
    dt = companion_dtype(G.dtype)
    R = G.new_empty((r, n) if left else (m, r), dtype=dt)
    sq = G.new_empty(((n if left else m) if want_sqnorms else 0,), dtype=dt)
    return R, sq


@torch.library.register_fake("lowrank::adam_lowrank_")
def _adam_lowrank_fake(exp_avg, exp_avg_sq, R, beta1, beta2, eps):
    op = "lowrank.adam_lowrank_"
    torch._check(R.dtype in (torch.float32, torch.float64), lambda: f"{op}: R must be float32 (float64 on CPU)")
    check_same_device(op, ("R", R), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq))
    torch._check(exp_avg.dtype == R.dtype and exp_avg_sq.dtype == R.dtype,
                 lambda: f"{op}: exp_avg, exp_avg_sq and R must have the same dtype")
    torch._check(exp_avg.shape == R.shape and exp_avg_sq.shape == R.shape,
                 lambda: f"{op}: exp_avg, exp_avg_sq and R must have the same shape")
    torch._check(exp_avg.is_contiguous() and exp_avg_sq.is_contiguous(),
                 lambda: f"{op}: exp_avg and exp_avg_sq must be contiguous (they are updated in place)")
    return torch.empty(R.shape, dtype=R.dtype, device=R.device)


@torch.library.register_fake("lowrank::galore_update_")
def _galore_update_fake(W, M, P, left, decay, G=None, residual_scale=None):
    op = "lowrank.galore_update_"
    m, n, r = _proj_dims(op, W, "W", P, left)
    torch._check(W.is_contiguous(), lambda: f"{op}: W must be contiguous (it is updated in place)")
    check_companion(op, M, "M", W, "W")
    check_same_device(op, ("W", W), ("M", M), ("G", G), ("residual_scale", residual_scale))
    want = (r, n) if left else (m, r)
    torch._check(tuple(M.shape) == want, lambda: f"{op}: M must be {want}, got {tuple(M.shape)}")
    torch._check((G is None) == (residual_scale is None),
                 lambda: f"{op}: G and residual_scale go together: pass both or neither")
    if G is not None:
        _check_float(op, G, "G")
        torch._check(tuple(G.shape) == (m, n), lambda: f"{op}: G must have W's shape ({m}, {n})")
        check_companion(op, residual_scale, "residual_scale", W, "W")
        length = n if left else m
        torch._check(tuple(residual_scale.shape) == (length,),
                     lambda: f"{op}: residual_scale must be 1-D of length {length}")
    return None


@torch.library.register_fake("lowrank::dct_basis_")
def _dct_basis_fake(Q):
    op = "lowrank.dct_basis_"
    torch._check(Q.dim() == 2 and Q.shape[0] == Q.shape[1], lambda: f"{op}: Q must be square (n, n)")
    torch._check(Q.dtype in (torch.float32, torch.float64), lambda: f"{op}: Q must be float32 or float64")
    torch._check(Q.is_contiguous(), lambda: f"{op}: Q must be contiguous (it is filled in place)")
    return None


@torch.library.register_fake("lowrank::basis_scores")
def _basis_scores_fake(G, Q, left):
    op = "lowrank.basis_scores"
    torch._check(G.dim() == 2, lambda: f"{op}: G must be 2-D (m, n), got a {G.dim()}-D tensor")
    _check_float(op, G, "G")
    check_companion(op, Q, "Q", G, "G")
    check_same_device(op, ("G", G), ("Q", Q))
    k = G.shape[0] if left else G.shape[1]
    torch._check(Q.dim() == 2 and Q.shape[0] == k and Q.shape[1] == k, lambda: f"{op}: Q must be ({k}, {k})")
    return G.new_empty((k,), dtype=companion_dtype(G.dtype))


# ------------------------------------------------------------------------------------- 8-bit Adam state
STATE8_BLOCK = 256  # elements per quantization block of adam_lowrank_8bit_ (csrc/projection/state8bit.h)


def adam_lowrank_8bit_(exp_avg: torch.Tensor, exp_avg_absmax: torch.Tensor, exp_avg_sq: torch.Tensor,
                       exp_avg_sq_absmax: torch.Tensor, R: torch.Tensor, beta1: float, beta2: float,
                       eps: float) -> torch.Tensor:
    """:func:`adam_lowrank_` on blockwise 8-bit moments, in place, in one pass over the state.

    The moments are stored flattened in blocks of ``STATE8_BLOCK`` (256) elements, each block with one float32
    absmax: ``exp_avg`` int8 codes k, value ``sign(k)·(|k|/127)²·absmax`` (a signed square-law map);
    ``exp_avg_sq`` uint8 codes k, value ``(k/255)⁴·absmax`` (a fourth-root map). Per block the kernel decodes
    both, takes Adam's float32 step with R (the ops of adam_lowrank_), returns ``N = m/(√v + eps)`` from those
    float32 moments, and re-encodes them against the block's new absmax (codes rounded to nearest, ties to
    even). All-zero codes and absmax are the zero state. R float32, any strides; codes of R's shape and
    contiguous; the absmax vectors float32 of length ``ceil(R.numel()/256)``. See
    ``lowrank.reference.adam_lowrank_8bit_reference``.
    """
    return torch.ops.lowrank.adam_lowrank_8bit_(exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax, R,
                                                float(beta1), float(beta2), float(eps))


@torch.library.register_fake("lowrank::adam_lowrank_8bit_")
def _adam_lowrank_8bit_fake(exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax, R, beta1, beta2, eps):
    op = "lowrank.adam_lowrank_8bit_"
    check_same_device(op, ("R", R), ("exp_avg", exp_avg), ("exp_avg_absmax", exp_avg_absmax), ("exp_avg_sq", exp_avg_sq),
                      ("exp_avg_sq_absmax", exp_avg_sq_absmax))
    torch._check(R.dtype == torch.float32, lambda: f"{op}: R must be float32, got {R.dtype}")
    torch._check(exp_avg.dtype == torch.int8, lambda: f"{op}: exp_avg must be int8 (signed codes), got {exp_avg.dtype}")
    torch._check(exp_avg_sq.dtype == torch.uint8,
                 lambda: f"{op}: exp_avg_sq must be uint8 (unsigned codes), got {exp_avg_sq.dtype}")
    torch._check(exp_avg.shape == R.shape and exp_avg_sq.shape == R.shape,
                 lambda: f"{op}: exp_avg, exp_avg_sq and R must have the same shape")
    torch._check(exp_avg.is_contiguous(), lambda: f"{op}: exp_avg must be contiguous (it is updated in place)")
    torch._check(exp_avg_sq.is_contiguous(), lambda: f"{op}: exp_avg_sq must be contiguous (it is updated in place)")
    blocks = (R.numel() + STATE8_BLOCK - 1) // STATE8_BLOCK
    for name, a in (("exp_avg_absmax", exp_avg_absmax), ("exp_avg_sq_absmax", exp_avg_sq_absmax)):
        torch._check(a.dtype == torch.float32, lambda: f"{op}: {name} must be float32, got {a.dtype}")
        torch._check(a.dim() == 1 and a.shape[0] == blocks,
                     lambda: f"{op}: {name} must be 1-D of length {blocks} (one absmax per block of 256 elements of R)")
    return torch.empty(R.shape, dtype=R.dtype, device=R.device)
