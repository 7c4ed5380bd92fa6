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
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn

from ..ops import projection as _ops
from ..ops._common import companion_dtype
from . import _moments, _state8bit

__all__ = ["GaLoreAdamW", "PerLayerStep", "register_per_layer_step", "shared_dct_basis"]

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


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW with GaLore gradient projection, Fira's residual scaling and an SVD-free DCT basis.

    Param groups follow galore-torch: a group with a ``rank`` key is projected (its 2-D parameters; any other
    parameter in it falls back to plain AdamW), with ``update_proj_gap`` (default 200), ``scale`` (α, default 1)
    and ``proj_type`` ('std' default, 'reverse_std', 'right', 'left'; galore-torch's two-sided 'full' is refused
    with a ValueError). Extra keys: ``fira`` (bool, default False: Fira's norm-based residual scaling and
    norm-growth limiter, γ = 1.01) and ``basis``: 'svd' (default; ``torch.linalg.svd`` of an fp32 copy of G, as
    galore-torch), 'dct' (one shared orthonormal DCT-II basis per size and device, the r rows of largest
    coefficient L1 norm chosen by ``lowrank.dct_select``; only r int32 indices are stored per layer) or
    'randomized' (``torch.svd_lowrank(G, q=r, niter=2)``). The maths of a step is in this module's docstring.

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
        """One optimization step of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("GaLoreAdamW does not support sparse gradients")
                if "rank" in group and p.dim() == 2 and p.numel() > 0:  # an empty matrix has no subspace
                    self._projected_step(p, group)
                else:
                    self._adamw_step(p, group)
        return loss

    @staticmethod
    def _step_size(group: dict, step: int) -> float:
        beta1, beta2 = group["betas"]
        if not group["correct_bias"]:
            return group["lr"]
        return group["lr"] * math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)

    def _adamw_step(self, p: torch.Tensor, group: dict) -> None:
        """transformers/galore-torch AdamW; low-precision weights keep fp32 moments and are rounded once."""
        state = self.state[p]
        sdtype = p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros(p.shape, dtype=sdtype, device=p.device)
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=sdtype, device=p.device)
        beta1, beta2 = group["betas"]
        g = p.grad.to(sdtype)
        state["step"] += 1
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(g, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        norm_grad = exp_avg / exp_avg_sq.sqrt().add_(group["eps"])
        w = p if p.dtype == sdtype else p.to(sdtype)
        w.add_(norm_grad, alpha=-self._step_size(group, state["step"]))
        if group["weight_decay"] > 0.0:
            w.add_(w, alpha=-group["lr"] * group["weight_decay"])
        if w is not p:
            p.copy_(w)

    def _refresh(self, G: torch.Tensor, state: dict, group: dict, left: bool, rank: int) -> None:
        """A new subspace for this gradient: P (svd, randomized) or DCT row indices (dct) into ``state``."""
        sdtype = companion_dtype(G.dtype)
        basis = group["basis"]
        if basis == "dct":
            size = G.shape[0] if left else G.shape[1]
            Q = shared_dct_basis(size, G.device, sdtype)
            state["basis_idx"] = _ops.dct_select(G, Q, rank, left)
            return
        g = G.to(sdtype)
        if basis == "svd":
            U, _, Vh = torch.linalg.svd(g, full_matrices=False)
        else:  # randomized
            U, _, V = torch.svd_lowrank(g, q=rank, niter=2)
            Vh = V.T
        state["P"] = U[:, :rank].contiguous() if left else Vh[:rank].contiguous()

    def _basis(self, G: torch.Tensor, state: dict, group: dict, left: bool) -> torch.Tensor:
        if group["basis"] != "dct":
            return state["P"]
        size = G.shape[0] if left else G.shape[1]
        rows = shared_dct_basis(size, G.device, companion_dtype(G.dtype)).index_select(0, state["basis_idx"])
        return rows.T.contiguous() if left else rows  # (m, r) left, (r, n) right

    def _projected_step(self, p: torch.Tensor, group: dict) -> None:
        G = p.grad
        state = self.state[p]
        left = _projects_left(p.shape, group["proj_type"])
        rank = min(group["rank"], *p.shape)
        if "step" not in state:
            state["step"] = 0
        if state["step"] % group["update_proj_gap"] == 0 or ("P" not in state and "basis_idx" not in state):
            old_basis = _moments.basis_of(state)
            self._refresh(G, state, group, left, rank)
            if group["moments"] == "reproject":
                _moments.reproject_(state, old_basis, left, group["betas"])
        P = self._basis(G, state, group, left)
        fira = group["fira"]
        R, sqnorms = _ops.galore_project(G, P, left, want_sqnorms=fira)
        if "exp_avg" not in state and group["state_bits"] == 32:  # 8-bit state: created by _state8bit.adam_step
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(R), torch.zeros_like(R)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        N = (_state8bit.adam_step(state, R, beta1, beta2, group["eps"]) if group["state_bits"] == 8 else
             _ops.adam_lowrank_(state["exp_avg"], state["exp_avg_sq"], R, beta1, beta2, group["eps"]))
        step_size, alpha = self._step_size(group, state["step"]), group["scale"]
        decay = 1.0 - group["lr"] * group["weight_decay"] if group["weight_decay"] > 0.0 else 1.0
        # the fused update writes W in place and needs it contiguous: a strided parameter (a transposed view)
        # is updated through a contiguous copy
        w = p if p.is_contiguous() else p.contiguous()
        if not fira:
            _ops.galore_update_(w, N.mul_(step_size * alpha), P, left, decay)
            if w is not p:
                p.copy_(w)
            return
        rank_dim = 0 if left else 1
        r_sq = (R * R).sum(dim=rank_dim)
        phi = N.norm(dim=rank_dim) / (r_sq.sqrt() + 1e-8)
        residual_sq = (sqnorms - (2 * alpha - alpha * alpha) * r_sq).clamp_min(0.0)
        s_norm = (phi * phi * residual_sq).sum().sqrt()
        prev = state.get("fira_norm")
        if prev is None:  # the first step only records ‖S‖ (limiter 1)
            limiter = torch.ones((), dtype=s_norm.dtype, device=s_norm.device)
        else:
            limiter = (s_norm / (prev + 1e-8)).clamp_min(FIRA_GAMMA) / FIRA_GAMMA
        state["fira_norm"] = s_norm / limiter
        coef = phi / limiter
        coef_b = coef.unsqueeze(0) if left else coef.unsqueeze(1)
        M = (N - coef_b * R).mul_(step_size * alpha)
        _ops.galore_update_(w, M, P, left, decay, G, coef.mul_(step_size))
        if w is not p:
            p.copy_(w)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader, except that state tensors keep their saved dtype (fp32 moments of bf16 weights)."""
        check_state_matches_params(self.param_groups, state_dict)
        super().load_state_dict(state_dict)
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


class PerLayerStep:
    """One optimizer per parameter, each stepped from its parameter's post-accumulate-grad hook, which then
    frees the gradient: only one parameter's gradient is alive at a time during backward. ``step()`` and
    ``zero_grad()`` are not needed. Every ``backward()`` is a full optimizer step of every parameter it
    reaches, so gradient accumulation over micro-batches is not possible in this mode."""

    def __init__(self):
        self.optimizers: list[torch.optim.Optimizer] = []
        self._handles: list = []

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict["optimizers"]
        if len(saved) != len(self.optimizers):
            raise ValueError(f"PerLayerStep: state_dict holds {len(saved)} optimizers, this one has "
                             f"{len(self.optimizers)}")
        for opt, sd in zip(self.optimizers, saved):
            opt.load_state_dict(sd)

    def remove(self) -> None:
        """Detach the hooks (the parameters go back to ordinary gradient accumulation)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def register_per_layer_step(params, make_optimizer: Callable[[list], torch.optim.Optimizer] | None = None,
                            **defaults) -> PerLayerStep:
    """Per-layer mode (GaLore's ``torchrun_main.py`` recipe): for every trainable parameter build
    ``make_optimizer([{**group_options, "params": [p]}])`` (default ``GaLoreAdamW(groups, **defaults)``) and
    register a hook that runs its ``step()`` as soon as p's gradient is accumulated, then sets ``p.grad = None``.

    ``params`` is an ``nn.Module`` (all parameters that require grad, one plain group), an iterable of
    parameters, or a list of galore-torch-style group dicts (their options go to each parameter's optimizer).
    Returns a ``PerLayerStep`` holding the optimizers (for ``state_dict``) and the hooks (``remove()``).
    """
    if make_optimizer is None:
        def make_optimizer(groups):
            return GaLoreAdamW(groups, **defaults)
    elif defaults:
        raise TypeError("register_per_layer_step: pass optimizer options either in make_optimizer or as keywords")
    if isinstance(params, nn.Module):
        params = [p for p in params.parameters() if p.requires_grad]
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    result = PerLayerStep()
    for group in groups:
        options = {k: v for k, v in group.items() if k != "params"}
        members = [group["params"]] if torch.is_tensor(group["params"]) else list(group["params"])
        for p in members:
            if not p.requires_grad:  # a frozen parameter gets no gradient, hence no hook and no optimizer
                continue
            opt = make_optimizer([{**options, "params": [p]}])

            def hook(param, opt=opt):
                opt.step()
                param.grad = None

            result.optimizers.append(opt)
            result._handles.append(p.register_post_accumulate_grad_hook(hook))
    return result
