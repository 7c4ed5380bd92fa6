"""GaLore / Fira / SVD-free AdamW on the lowrank projection ops.

One projected step of an (m, n) weight W with gradient G, rank r, scale α, step t (counted from 1):

    refresh P when (t−1) % update_proj_gap == 0        SVD, randomized SVD or DCT row selection
    R, ‖G‖²  = galore_project(G, P, left)              pass 1 over G (‖G‖² per row/column only for Fira)
    N        = adam_lowrank_(m, v, R, β1, β2, eps)     m, v ← Adam moments of R;  N = m/(√v+eps)
    W        ← decay·(W − back(M) − s ⊙ G)             pass 2: galore_update_, decay = 1 − lr·wd

with step_size = lr·√(1−β2ᵗ)/(1−β1ᵗ) (lr when ``correct_bias=False``), and

    GaLore:  M = step_size·α·N,  no residual term.
    Fira:    φ = ‖N_i‖/(‖R_i‖+1e-8) over the rank dimension (length m on the right, n on the left);
             ‖S‖² = Σ_i φ_i²·max(‖G_i‖² − (2α−α²)‖R_i‖², 0)      (the norm identity: P is orthonormal, so
             ‖G_i − α·back(R)_i‖² needs no extra pass over G);
             limiter = max(‖S‖/(prev+1e-8), 1.01)/1.01, prev ← ‖S‖/limiter (the first step only records ‖S‖);
             M = step_size·α·(N − (φ/limiter)⊙R),  s = step_size·φ/limiter.
             Then W − back(M) − s⊙G = W − step_size·(α·back(N) + (φ/limiter)⊙(G − α·back(R))), Fira's update.

Side (GaLore's 'std' rule): m ≥ n → right, P (r, n) = Vh[:r], R = G·Pᵀ (m, r), back(M) = M·P;
m < n → left, P (m, r) = U[:, :r], R = Pᵀ·G (r, n), back(M) = P·M.

Row-sharded parameters (FSDP2's ``fully_shard``; see ``_sharding``): process k holds rows G_k, W_k.
    right:  R_k = G_k·Pᵀ, moments, φ and the update are local; P (r, n) replicated. Fira's ‖S‖² is summed over
            the processes (one scalar all-reduce).
    left:   R = Σ_k P_kᵀ·G_k (one r × n all-reduce; Fira's column norms ride along as one more row); the
            moments are column-sharded: Adam and Fira's per-column factors run on this process's columns (plus
            Fira's scalar all-reduce) and the finished M (with Fira's column scales as one more row) is
            all-gathered (r × n); W_k ← decay·(W_k − P_k·M − s ⊙ G_k) is local with P_k the own rows of P.
    refresh dct:        right: scores summed over the processes (an all-reduce of n scores); left: the
                        coefficients Q·G need whole columns, so G goes from row blocks to column blocks by
                        one all-to-all (each process sends one shard's worth) and m scores are all-reduced.
    refresh randomized: Halko's range finder with Y = G·Ω, Z = Gᵀ·Q and B = Qᵀ·G as local products plus
                        all-reduces of n × r and r × n (and an all-gather of the m × r Y for its QR).
    refresh svd:        needs the whole G: it is all-gathered on refresh steps only (every update_proj_gap
                        steps, a transient m × n buffer on every process), and every process runs the SVD.
The chosen indices are broadcast from the group's first process, so processes never disagree on the subspace.
State tensors are DTensors on the parameter's mesh (moments and a left P sharded; a right P (r, n), DCT indices
and Fira's norm replicated), so ``torch.distributed.checkpoint`` saves and reshards them.

Gradient accumulation in per-layer mode (``accumulate_grad``): between micro-batches only the rank-r R of the
summed gradient is kept (R is linear in G), except when the step refreshes the subspace (the new basis is
computed from the whole step's gradient) and for Fira (its residual G − α·back(R) and column/row norms need
all of G): then the full gradient is kept as ordinary accumulation keeps it.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from ..ops import projection as _ops
from ..ops._common import companion_dtype
from ..reference.projection import galore_project_reference, galore_update_reference
from . import _moments, _state8bit
from ._sharding import Layout, is_dtensor, local

__all__ = ["GaLoreAdamW", "shared_dct_basis"]

PROJ_TYPES = ("std", "reverse_std", "right", "left")  # galore-torch's 'full' (two-sided) is refused
BASES = ("svd", "dct", "randomized")
GALORE_GROUP_DEFAULTS = {"update_proj_gap": 200, "scale": 1.0, "proj_type": "std", "fira": False, "basis": "svd",
                         "moments": "keep", "state_bits": 32}
FIRA_GAMMA = 1.01

# One orthonormal DCT-II matrix per (size, device, dtype), built once and shared by every layer and optimizer.
_DCT_BASES: dict[tuple, torch.Tensor] = {}


def shared_dct_basis(n: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The cached (n, n) DCT-II basis of ``lowrank.dct_basis`` for this device and dtype."""
    key = (n, torch.device(device), dtype)
    Q = _DCT_BASES.get(key)
    if Q is None:
        Q = _DCT_BASES[key] = _ops.dct_basis(n, device=device, dtype=dtype)
    return Q


def _projects_left(shape: torch.Size, proj_type: str) -> bool:
    m, n = shape
    return {"std": m < n, "reverse_std": m >= n, "right": False, "left": True}[proj_type]


RANDOMIZED_NITER = 2  # power iterations of the randomized range finder (torch.svd_lowrank's default)


def _top_indices(scores: torch.Tensor, rank: int) -> torch.Tensor:
    """``lowrank.dct_select`` on given scores: the ``rank`` largest, ties to the lower index, ascending int32."""
    order = torch.sort(scores, descending=True, stable=True).indices[:rank]
    return torch.sort(order).values.to(torch.int32)


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW with GaLore gradient projection, Fira's residual scaling and an SVD-free DCT basis.

    Param groups follow galore-torch: a group with a ``rank`` key is projected (its 2-D parameters; any other
    parameter in it falls back to plain AdamW), with ``update_proj_gap`` (default 200), ``scale`` (α, default 1)
    and ``proj_type`` ('std' default, 'reverse_std', 'right', 'left'; galore-torch's two-sided 'full' is refused
    with a ValueError). Extra keys: ``fira`` (bool, default False: Fira's norm-based residual scaling and
    norm-growth limiter, γ = 1.01) and ``basis``: 'svd' (default; ``torch.linalg.svd`` of an fp32 copy of G, as
    galore-torch), 'dct' (one shared orthonormal DCT-II basis per size and device, the r rows of largest
    coefficient L1 norm chosen by ``lowrank.dct_select``; only r int32 indices are stored per layer) or
    'randomized' (Halko's randomized SVD with r columns and 2 power iterations, as ``torch.svd_lowrank``, with
    a Gaussian test matrix seeded by the step and the shape, so every process draws the same one). The maths of
    a step is in this module's docstring.

    Groups without ``rank`` get transformers-style AdamW (galore-torch's own): m, v ← moments of G,
    W ← W − step_size·m/(√v+eps), then W ← W − lr·wd·W.

    Weights may be bf16/fp16 (moments, P and the update are fp32, W is rounded once per step) or fp32/fp64
    (float64 weights keep float64 state). ``state_dict`` keeps the state dtypes on load (torch's default would
    cast fp32 moments of a bf16 parameter to bf16). Sparse gradients are refused.

    Two more keys of a projected group: ``moments``, what a subspace refresh does to the Adam moments: 'keep'
    (default, galore-torch's behaviour: the old coordinates are read in the new basis) or 'reproject' (LDAdam's
    change of basis, see ``lowrank.optim._moments``); and ``state_bits``: 32 (default) or 8, the projected moments
    stored blockwise 8-bit (``lowrank.adam_lowrank_8bit_``; float32 moments only, so not for float64
    parameters). Plain AdamW parameters keep 32-bit moments.

    FSDP2 (``fully_shard``): parameters, gradients and state are DTensors, the step runs on local shards with
    the collectives listed in the module docstring; save and load with ``torch.distributed.checkpoint``
    (``get_optimizer_state_dict`` / ``set_optimizer_state_dict``).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr} - should be >= 0.0")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid betas: {betas} - each should be in [0.0, 1.0)")
        if eps < 0.0:
            raise ValueError(f"Invalid epsilon value: {eps} - should be >= 0.0")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "correct_bias": correct_bias}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        if "rank" in param_group:
            for key, value in GALORE_GROUP_DEFAULTS.items():
                param_group.setdefault(key, value)
            rank, gap = param_group["rank"], param_group["update_proj_gap"]
            if not isinstance(rank, int) or rank < 1:
                raise ValueError(f"GaLoreAdamW: rank must be a positive int, got {rank!r}")
            if not isinstance(gap, int) or gap < 1:
                raise ValueError(f"GaLoreAdamW: update_proj_gap must be a positive int, got {gap!r}")
            if param_group["proj_type"] not in PROJ_TYPES:
                raise ValueError(f"GaLoreAdamW: proj_type {param_group['proj_type']!r} is not supported; use one of "
                                 f"{PROJ_TYPES} (the two-sided 'full' projection has no fused kernel)")
            if param_group["basis"] not in BASES:
                raise ValueError(f"GaLoreAdamW: basis must be one of {BASES}, got {param_group['basis']!r}")
            if not isinstance(param_group["fira"], bool):
                raise ValueError(f"GaLoreAdamW: fira must be a bool, got {param_group['fira']!r}")
            if param_group["moments"] not in _moments.MOMENT_MODES:
                raise ValueError(f"GaLoreAdamW: moments must be one of {_moments.MOMENT_MODES}, got "
                                 f"{param_group['moments']!r}")
            if param_group["state_bits"] not in _state8bit.STATE_BITS:
                raise ValueError(f"GaLoreAdamW: state_bits must be one of {_state8bit.STATE_BITS}, got "
                                 f"{param_group['state_bits']!r}")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        """One optimization step of every parameter that has a gradient (or a projected accumulation)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None and not (p in self.state and "grad_acc" in self.state[p]):
                    continue
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError("GaLoreAdamW does not support sparse gradients")
                if self._is_projected(p, group):
                    self._projected_step(p, group)
                else:
                    self._adamw_step(p, group)
        return loss

    @staticmethod
    def _is_projected(p: torch.Tensor, group: dict) -> bool:
        return "rank" in group and p.dim() == 2 and p.numel() > 0  # an empty matrix has no subspace

    @staticmethod
    def _step_size(group: dict, step: int) -> float:
        beta1, beta2 = group["betas"]
        if not group["correct_bias"]:
            return group["lr"]
        return group["lr"] * math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)

    def _adamw_step(self, p: torch.Tensor, group: dict) -> None:
        """transformers/galore-torch AdamW; low-precision weights keep fp32 moments and are rounded once.
        Elementwise, so a DTensor of any layout steps on its local shard."""
        state = self.state[p]
        sdtype = p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32
        if "exp_avg" not in state:
            state["step"] = 0
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = (torch.zeros_like(p, dtype=sdtype) if is_dtensor(p)
                              else torch.zeros(p.shape, dtype=sdtype, device=p.device))
        beta1, beta2 = group["betas"]
        g = local(p.grad).to(sdtype)
        state["step"] += 1
        exp_avg, exp_avg_sq = local(state["exp_avg"]), local(state["exp_avg_sq"])
        exp_avg.mul_(beta1).add_(g, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        norm_grad = exp_avg / exp_avg_sq.sqrt().add_(group["eps"])
        p_local = local(p)
        w = p_local if p_local.dtype == sdtype else p_local.to(sdtype)
        w.add_(norm_grad, alpha=-self._step_size(group, state["step"]))
        if group["weight_decay"] > 0.0:
            w.add_(w, alpha=-group["lr"] * group["weight_decay"])
        if w is not p_local:
            p_local.copy_(w)

    # ------------------------------------------------------------------------------ the projected step
    @staticmethod
    def _needs_refresh(state: dict, group: dict) -> bool:
        return state.get("step", 0) % group["update_proj_gap"] == 0 or ("P" not in state and "basis_idx" not in state)

    def _refresh(self, G: torch.Tensor, state: dict, group: dict, left: bool, rank: int,
                 lay: Layout | None = None) -> None:
        """A new subspace for this gradient: P (svd, randomized) or DCT row indices (dct) into ``state``.
        G is this process's row block; ``lay`` says how the rows are spread (None: G is the whole matrix)."""
        lay = lay or Layout(G)
        m, n = lay.shape
        sdtype = companion_dtype(G.dtype)
        basis = group["basis"]
        if basis == "dct":
            size = m if left else n
            Q = shared_dct_basis(size, G.device, sdtype)
            if not lay.sharded:
                scores = _ops.basis_scores(G, Q, left)
            elif left:  # coefficients Q·G need whole columns of G
                scores = _ops.basis_scores(lay.column_block(G), Q, True)
            else:
                scores = _ops.basis_scores(G, Q, False) if G.shape[0] else G.new_zeros(n, dtype=sdtype)
            lay.all_reduce_(scores)
            state["basis_idx"] = lay.wrap(lay.broadcast_(_top_indices(scores, rank)), None, (rank,))
            return
        if basis == "svd":
            U, _, Vh = torch.linalg.svd(lay.gather_rows(G, m).to(sdtype), full_matrices=False)
            U = lay.own_rows(U[:, :rank])
        else:
            U, Vh = self._randomized_svd(G.to(sdtype), rank, lay, seed=state.get("step", 0) * 1000003 + m * 7919 + n)
        P = U.contiguous() if left else Vh[:rank].contiguous()
        state["P"] = lay.wrap(P, 0 if left else None, (m, rank) if left else (rank, n))

    @staticmethod
    def _randomized_svd(G: torch.Tensor, q: int, lay: Layout, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Halko et al.'s randomized SVD (``torch.svd_lowrank``'s algorithm) of the row-sharded G: returns this
        process's rows of U (m_k, q) and the replicated Vh (q, n). The Gaussian Ω is drawn on the CPU from a
        generator seeded with ``seed``, so every process (and a single-process run) uses the same one."""
        m, n = lay.shape
        gen = torch.Generator().manual_seed(seed)
        omega = torch.randn((n, q), generator=gen, dtype=G.dtype).to(G.device)

        def orthonormal_rows(Y):  # QR of the (m, q) matrix whose rows are spread like G's
            return lay.own_rows(torch.linalg.qr(lay.gather_rows(Y, m)).Q)

        Qm = orthonormal_rows(G @ omega)
        for _ in range(RANDOMIZED_NITER):
            Z = torch.linalg.qr(lay.all_reduce_(G.T @ Qm)).Q
            Qm = orthonormal_rows(G @ Z)
        B = lay.all_reduce_(Qm.T @ G)
        Ub, _, Vh = torch.linalg.svd(B, full_matrices=False)
        return Qm @ Ub, Vh

    def _basis(self, state: dict, group: dict, left: bool, lay: Layout, device, sdtype) -> torch.Tensor:
        """This process's P: (r, n) on the right (every process the same), its own rows (m_k, r) on the left."""
        if group["basis"] != "dct":
            return local(state["P"])
        m, n = lay.shape
        Q = shared_dct_basis(m if left else n, device, sdtype)
        rows = Q.index_select(0, local(state["basis_idx"]))
        return lay.own_rows(rows.T).contiguous() if left else rows

    @staticmethod
    def _project(G: torch.Tensor, P: torch.Tensor, left: bool, want_sqnorms: bool, lay: Layout):
        """``galore_project`` of this process's rows; on the left the partial sums (and Fira's column norms) are
        completed by one all-reduce."""
        if not left:
            return _ops.galore_project(G, P, False, want_sqnorms)
        if G.shape[0] >= P.shape[1]:
            R, sq = _ops.galore_project(G, P, True, want_sqnorms)
        else:  # a shard with fewer rows than the rank (or none), which the fused kernel does not take
            R, sq = galore_project_reference(G, P, True, want_sqnorms)
        if not lay.sharded:
            return R, sq
        if not want_sqnorms:
            return lay.all_reduce_(R), sq
        both = lay.all_reduce_(torch.cat([R, sq.unsqueeze(0)]))
        return both[:-1], both[-1]

    def _adam(self, state: dict, R: torch.Tensor, group: dict, left: bool, lay: Layout) -> torch.Tensor:
        """Adam on the projected gradient: updates the rank-r moments in ``state`` and returns N = m/(√v+eps).
        The one place the moments are created (zero, at the first step), read and written. R is this process's
        part: W's rows on the right, a column block of the (r, n) R on the left (moments shard like them)."""
        beta1, beta2 = group["betas"]
        if group["state_bits"] == 8:  # blockwise 8-bit moments, created by _state8bit on first use
            return _state8bit.adam_step(state, R, beta1, beta2, group["eps"])
        if "exp_avg" not in state:
            shape = (R.shape[0], lay.shape[1]) if left else (lay.shape[0], R.shape[1])
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = lay.wrap(R.new_zeros(R.shape), 1 if left else 0, shape)
        return _ops.adam_lowrank_(local(state["exp_avg"]), local(state["exp_avg_sq"]), R, beta1, beta2, group["eps"])

    def _projected_step(self, p: torch.Tensor, group: dict) -> None:
        lay = Layout(p)
        if is_dtensor(p) and (group["state_bits"] != 32 or group["moments"] != "keep"):
            raise NotImplementedError(
                "GaLoreAdamW: state_bits=8 and moments='reproject' are not supported on FSDP2 (DTensor) parameters "
                "yet (use state_bits=32, moments='keep' there)")
        G = None if p.grad is None else local(p.grad)
        W = local(p)
        state = self.state[p]
        left = _projects_left(p.shape, group["proj_type"])
        rank = min(group["rank"], *p.shape)
        if "step" not in state:
            state["step"] = 0
        fira = group["fira"]
        acc = state.pop("grad_acc", None)
        if acc is not None:  # earlier micro-batches of this step, already projected (never on a refresh step)
            acc = local(acc)
        elif self._needs_refresh(state, group):
            old_basis = _moments.basis_of(state)
            self._refresh(G, state, group, left, rank, lay)
            if group["moments"] == "reproject":
                _moments.reproject_(state, old_basis, left, group["betas"])
        sdtype = companion_dtype(p.dtype)
        P = self._basis(state, group, left, lay, p.device, sdtype)
        if G is not None:
            R, sqnorms = self._project(G, P, left, fira, lay)
            if acc is not None:
                R.add_(acc)
        else:
            R, sqnorms = acc, None
        state["step"] += 1
        # on the left the moments are column-sharded: Adam (and Fira's per-column factors) runs on this
        # process's columns, and the finished M (with Fira's scale as one more row) is all-gathered
        cols = lay.own_cols(R.shape[1]) if left else None
        R_own = R if cols is None else R[:, cols]
        N = self._adam(state, R_own, group, left, lay)
        step_size, alpha = self._step_size(group, state["step"]), group["scale"]
        decay = 1.0 - group["lr"] * group["weight_decay"] if group["weight_decay"] > 0.0 else 1.0
        if not fira:
            M = N.mul_(step_size * alpha)
            self._update(W, M if cols is None else lay.gather_cols(M, R.shape[1]), P, left, decay)
            return
        rank_dim = 0 if left else 1
        sq_own = sqnorms if cols is None else sqnorms[cols]
        r_sq = (R_own * R_own).sum(dim=rank_dim)
        phi = N.norm(dim=rank_dim) / (r_sq.sqrt() + 1e-8)
        residual_sq = (sq_own - (2 * alpha - alpha * alpha) * r_sq).clamp_min(0.0)
        s_sq = lay.all_reduce_((phi * phi * residual_sq).sum())  # rows (right) or columns (left) are spread
        s_norm = s_sq.sqrt()
        prev = state.get("fira_norm")
        if prev is None:  # the first step only records ‖S‖ (limiter 1)
            limiter = torch.ones((), dtype=s_norm.dtype, device=s_norm.device)
        else:
            limiter = (s_norm / (local(prev) + 1e-8)).clamp_min(FIRA_GAMMA) / FIRA_GAMMA
        state["fira_norm"] = lay.wrap(s_norm / limiter, None, ())
        coef = phi / limiter
        coef_b = coef.unsqueeze(0) if left else coef.unsqueeze(1)
        M = (N - coef_b * R_own).mul_(step_size * alpha)
        scale = coef.mul_(step_size)
        if cols is not None:
            both = lay.gather_cols(torch.cat([M, scale.unsqueeze(0)]), R.shape[1])
            M, scale = both[:-1], both[-1]
        self._update(W, M, P, left, decay, G, scale)

    @staticmethod
    def _update(W: torch.Tensor, M: torch.Tensor, P: torch.Tensor, left: bool, decay: float,
                G: torch.Tensor | None = None, residual_scale: torch.Tensor | None = None) -> None:
        if W.numel() == 0:  # this process holds no rows of W
            return
        if left and W.shape[0] < P.shape[1]:  # a shard thinner than the rank: not a shape the fused kernel takes
            galore_update_reference(W, M, P, True, decay, G, residual_scale)
            return
        # the fused update writes W in place and needs it contiguous: a strided parameter (a transposed view)
        # is updated through a contiguous copy
        w = W if W.is_contiguous() else W.contiguous()
        _ops.galore_update_(w, M, P, left, decay, G, residual_scale)
        if w is not W:
            W.copy_(w)

    # ------------------------------------------------------------------------------ accumulation
    @torch.no_grad()
    def accumulate_grad(self, p: torch.Tensor) -> bool:
        """Fold ``p.grad`` (one micro-batch) into p's rank-r accumulator and drop it (``p.grad = None``), when
        the coming step allows it: p is projected, not Fira, and the step does not refresh the subspace. Returns
        whether it did; if not, keep ``p.grad`` and let autograd accumulate it. The next ``step()`` adds the
        projection of whatever ``p.grad`` then holds and uses the sum."""
        group = next((g for g in self.param_groups if any(q is p for q in g["params"])), None)
        if group is None:
            raise ValueError("GaLoreAdamW.accumulate_grad: p is not one of this optimizer's parameters")
        state = self.state[p]
        if (p.grad is None or not self._is_projected(p, group) or group["fira"]
                or self._needs_refresh(state, group)):
            return False
        lay = Layout(p)
        left = _projects_left(p.shape, group["proj_type"])
        P = self._basis(state, group, left, lay, p.device, companion_dtype(p.dtype))
        R, _ = self._project(local(p.grad), P, left, False, lay)
        acc = state.get("grad_acc")
        if acc is None:
            state["grad_acc"] = lay.wrap(R, None if left else 0, tuple(R.shape) if left else (lay.shape[0], R.shape[1]))
        else:
            local(acc).add_(R)
        p.grad = None
        return True

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader, except that state tensors keep their saved dtype (fp32 moments of bf16 weights)."""
        check_state_matches_params(self.param_groups, state_dict)
        super().load_state_dict(state_dict)
        # torch's loader takes the saved groups as they are: a checkpoint written before a group option existed
        # gets that option's default (as a group given without it would)
        for group in self.param_groups:
            if group.get("rank") is not None:
                for key, value in GALORE_GROUP_DEFAULTS.items():
                    group.setdefault(key, value)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(pid)
            if saved is None:
                continue
            for key, value in saved.items():
                if torch.is_tensor(value):
                    self.state[p][key] = value.to(device=p.device, copy=True)


def check_state_matches_params(param_groups: list[dict], state_dict: dict) -> None:
    """Refuse, at load time, a state whose tensors do not fit the parameters they would be given (torch pairs
    saved and current parameters by position: groups passed in another order would otherwise fail, or
    silently mix states, only at the next step)."""
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups):
        return  # torch's own loader raises for this
    for gi, (saved_g, g) in enumerate(zip(saved_groups, param_groups)):
        for pid, p in zip(saved_g["params"], g["params"]):
            st = state_dict["state"].get(pid)
            if not st:
                continue
            want = {}
            if saved_g.get("rank") is not None and p.dim() == 2:
                left = _projects_left(p.shape, saved_g.get("proj_type", "std"))
                r, (m, n) = min(saved_g["rank"], *p.shape), p.shape
                want = {"exp_avg": (r, n) if left else (m, r), "exp_avg_sq": (r, n) if left else (m, r),
                        "P": (m, r) if left else (r, n), "basis_idx": (r,)}
            else:
                want = {"exp_avg": tuple(p.shape), "exp_avg_sq": tuple(p.shape)}
            for key, shape in want.items():
                got = st.get(key)
                if torch.is_tensor(got) and tuple(got.shape) != shape:
                    raise ValueError(
                        f"GaLoreAdamW.load_state_dict: group {gi}'s parameter of shape {tuple(p.shape)} would get "
                        f"{key} of shape {tuple(got.shape)}, expected {shape}: the saved state belongs to another "
                        "parameter (were the param groups or their parameters given in another order?)")

