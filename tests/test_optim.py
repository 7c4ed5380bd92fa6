"""Tests of lowrank.optim.GaLoreAdamW (GaLore, Fira, DCT and randomized bases) and register_per_layer_step.

Baselines: galore_torch.GaLoreAdamW (installed; GaLore parity step for step), and
lowrank.reference.projected_adamw_step_reference, a transliteration of GaLore's and Fira's published step
with dense back-projections and an explicit residual (Fira parity; Fira's own package is not installed).
"""
from __future__ import annotations

import copy
import io
import os
import warnings

import pytest
import torch
from torch import nn

import lowrank
from lowrank.optim import GaLoreAdamW, register_per_layer_step, shared_dct_basis
from lowrank.optim import galore as galore_mod
from lowrank.reference import projected_adamw_step_reference

from conftest import devices

try:  # a test dependency (scripts/setup.sh installs it); without it only the parity test is skipped,
    import galore_torch  # unless LOWRANK_REQUIRE_GALORE_TORCH=1 (scripts/test.sh's main run) makes that an error
except ImportError:
    if os.environ.get("LOWRANK_REQUIRE_GALORE_TORCH") == "1":
        raise
    galore_torch = None
needs_galore_torch = pytest.mark.skipif(galore_torch is None, reason="galore-torch is not installed")

LR, WD, ALPHA, GAP, RANK = 1e-2, 0.1, 0.25, 2, 6
# one right-projected (m ≥ n) and one left-projected (m < n) weight, odd sizes
SHAPES = [(40, 27), (27, 40)]


def _id(v):
    return str(v).replace("torch.", "")


def make_problem(device, steps, dtype=torch.float32, shapes=SHAPES, extra=True, seed=0):
    """Initial weights and a list of gradient sets (one per step) for the projected shapes plus, if extra,
    a bias and a plain 2-D weight that live in a non-projected group."""
    gen = torch.Generator().manual_seed(seed)
    all_shapes = list(shapes) + ([(7,), (5, 9)] if extra else [])
    init = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in all_shapes]
    grads = [[torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in all_shapes] for _ in range(steps)]
    return init, grads


def make_groups(params, n_projected, **opts):
    groups = [{"params": params[:n_projected], "rank": RANK, "update_proj_gap": GAP, "scale": ALPHA,
               "proj_type": "std", **opts}]
    if len(params) > n_projected:
        groups.append({"params": params[n_projected:]})
    return groups


def run(opt_cls, init, grads, n_projected=len(SHAPES), opt_kwargs=None, **group_opts):
    params = [nn.Parameter(t.clone()) for t in init]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # galore-torch's deprecation warning
        opt = opt_cls(make_groups(params, n_projected, **group_opts), lr=LR, weight_decay=WD, **(opt_kwargs or {}))
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    return params, opt


def max_rel(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------- GaLore parity
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "right", "left"])
@pytest.mark.parametrize("correct_bias", [True, False])
@pytest.mark.parametrize("device", devices)
@needs_galore_torch
def test_galore_matches_galore_torch(device, correct_bias, proj_type):
    init, grads = make_problem(device, steps=5)
    kw = {"correct_bias": correct_bias}
    ref_params, ref_opt = run(galore_torch.GaLoreAdamW, init, grads, opt_kwargs=kw, proj_type=proj_type)
    our_params, our_opt = run(GaLoreAdamW, init, grads, opt_kwargs=kw, proj_type=proj_type)
    for i, (ours, ref, start) in enumerate(zip(our_params, ref_params, init)):
        err = max_rel(ours, ref)
        moved = max_rel(ref, start)
        print(f"param {i} {tuple(ours.shape)}: rel err {err:.2e}, moved {moved:.2e}")
        assert moved > 1e-3  # the comparison is not vacuous
        assert err <= 2e-6
        s_ours, s_ref = our_opt.state[ours], ref_opt.state[ref]
        assert s_ours["step"] == s_ref["step"] == 5
        for key in ("exp_avg", "exp_avg_sq"):
            assert s_ours[key].shape == s_ref[key].shape
            assert max_rel(s_ours[key], s_ref[key]) <= 2e-6, key
        if i < len(SHAPES):
            torch.testing.assert_close(s_ours["P"], s_ref["projector"].ortho_matrix, rtol=0, atol=0)


@pytest.mark.parametrize("device", devices)
def test_galore_refreshes_at_step_zero_and_every_gap(device, monkeypatch):
    init, grads = make_problem(device, steps=7, shapes=[(30, 20)], extra=False)
    calls = []
    real = GaLoreAdamW._refresh

    def spy(self, G, state, *args):
        calls.append(state["step"])
        return real(self, G, state, *args)

    monkeypatch.setattr(GaLoreAdamW, "_refresh", spy)
    run(GaLoreAdamW, init, grads, n_projected=1, update_proj_gap=3)
    assert calls == [0, 3, 6]


@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
def test_first_step_is_sign_of_R(left):
    """From zero state, ΔW ≈ −lr·α·back(sign(R)) where |R| ≫ eps/√(1−β2)."""
    shape = (20, 12) if not left else (12, 20)
    W0 = torch.randn(shape)
    G = torch.randn(shape)
    params, opt = run(GaLoreAdamW, [W0], [[G]], n_projected=1)
    P = opt.state[params[0]]["P"]
    R = P.T @ G if left else G @ P.T
    want = W0 - LR * ALPHA * (P @ torch.sign(R) if left else torch.sign(R) @ P)
    want = want * (1 - LR * WD)
    torch.testing.assert_close(params[0].detach(), want, rtol=1e-5, atol=1e-5)


def test_refuses_unsupported_group_options():
    p = nn.Parameter(torch.randn(4, 4))
    for bad in ({"proj_type": "full"}, {"basis": "qr"}, {"rank": 0}, {"update_proj_gap": 0}, {"fira": "yes"}):
        with pytest.raises(ValueError):
            GaLoreAdamW([{"params": [p], "rank": 2, "update_proj_gap": 2, "scale": 1.0, **bad}])
    with pytest.raises(ValueError):
        GaLoreAdamW([p], lr=-1.0)
    p.grad = torch.randn(4, 4).to_sparse()
    with pytest.raises(RuntimeError):
        GaLoreAdamW([p]).step()


# ------------------------------------------------------------------------------------------- Fira parity
def run_reference(init, grads, n_projected=len(SHAPES), **kw):
    """The reference step for the projected params (plain AdamW ones are not compared here)."""
    Ws = [t.clone() for t in init[:n_projected]]
    states = [{} for _ in Ws]
    for gs in grads:
        for W, g, st in zip(Ws, gs, states):
            projected_adamw_step_reference(W, g, st, lr=LR, weight_decay=WD, rank=RANK, update_proj_gap=GAP,
                                           scale=ALPHA, **kw)
    return Ws, states


@pytest.mark.parametrize("basis", ["svd", "dct"])
@pytest.mark.parametrize("device,dtype", [(d, torch.float32) for d in devices] + [("cpu", torch.float64)], ids=_id)
def test_fira_matches_reference(device, dtype, basis):
    init, grads = make_problem(device, steps=6, dtype=dtype)
    ours, opt = run(GaLoreAdamW, init, grads, fira=True, basis=basis)
    ref, ref_states = run_reference(init, grads, fira=True, basis=basis)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for i, (o, r) in enumerate(zip(ours, ref)):
        err = max_rel(o, r)
        print(f"param {i} {tuple(o.shape)}: rel err {err:.2e}")
        assert err <= tol
        st = opt.state[o]
        assert abs(st["fira_norm"].item() - ref_states[i]["fira_norm"]) <= 1e-5 * ref_states[i]["fira_norm"]
    # Fira differs from GaLore: the residual term is really applied
    galore, _ = run(GaLoreAdamW, init, grads, fira=False, basis=basis)
    assert max_rel(ours[0], galore[0]) > 1e-3


@pytest.mark.parametrize("device", devices)
def test_fira_leaves_plain_groups_alone(device):
    init, grads = make_problem(device, steps=3)
    with_fira, _ = run(GaLoreAdamW, init, grads, fira=True)
    without, _ = run(GaLoreAdamW, init, grads, fira=False)
    for a, b in zip(with_fira[len(SHAPES):], without[len(SHAPES):]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", devices)
def test_fira_scaling_factor_lengths(device, monkeypatch):
    """φ (residual_scale) has one entry per row of W on the right (length m), per column on the left (n)."""
    seen = []
    real = galore_mod._ops.galore_update_

    def spy(W, M, P, left, decay, G=None, residual_scale=None):
        seen.append((tuple(W.shape), left, None if residual_scale is None else tuple(residual_scale.shape)))
        return real(W, M, P, left, decay, G, residual_scale)

    monkeypatch.setattr(galore_mod._ops, "galore_update_", spy)
    init, grads = make_problem(device, steps=1, extra=False)
    run(GaLoreAdamW, init, grads, fira=True)
    assert seen == [((40, 27), False, (40,)), ((27, 40), True, (40,))]
    seen.clear()
    init, grads = make_problem(device, steps=1, shapes=[(33, 20), (20, 33)], extra=False)
    run(GaLoreAdamW, init, grads, fira=True)
    assert seen == [((33, 20), False, (33,)), ((20, 33), True, (33,))]


@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
@pytest.mark.parametrize("device", devices)
def test_fira_on_rank_deficient_gradient_equals_galore(device, left):
    """G of rank ≤ r with α = 1: the residual G − back(R) is ~0, so Fira's step equals GaLore's."""
    m, n = (30, 18) if not left else (18, 30)
    G = (torch.randn(m, 3) @ torch.randn(3, n)).to(device)
    W0 = torch.randn(m, n, device=device)
    fira, _ = run(GaLoreAdamW, [W0], [[G]] * 3, n_projected=1, fira=True, scale=1.0)
    galore, _ = run(GaLoreAdamW, [W0], [[G]] * 3, n_projected=1, fira=False, scale=1.0)
    err = max_rel(fira[0] - W0, galore[0] - W0)
    print(f"rel difference of the updates {err:.2e}")
    assert err <= 1e-4


@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
@pytest.mark.parametrize("device", devices)
def test_fira_limiter_caps_residual_growth(device, left):
    """G doubles every step, its residual part only: the pre-limit ‖S‖ doubles, the applied ‖S‖ (measured
    from the weight change) grows by at most γ = 1.01 per step."""
    m, n, r = (32, 20, 4) if not left else (20, 32, 4)
    base = torch.randn(m, n, device=device)
    params = [nn.Parameter(torch.randn(m, n, device=device))]
    opt = GaLoreAdamW([{"params": params, "rank": r, "update_proj_gap": 1000, "scale": ALPHA, "fira": True}],
                      lr=LR, weight_decay=0.0)
    W = params[0]
    applied = []
    for t in range(6):
        G = base.clone()
        if t > 0:  # keep the first step's subspace part, double the part outside it
            P = opt.state[W]["P"]
            inside = P @ (P.T @ base) if left else (base @ P.T) @ P
            G = inside + (2.0 ** t) * (base - inside)
        before = W.detach().clone()
        W.grad = G
        opt.step()
        st = opt.state[W]
        P = st["P"]
        N = st["exp_avg"] / (st["exp_avg_sq"].sqrt() + 1e-6)
        step_size = LR * (1 - 0.999 ** (t + 1)) ** 0.5 / (1 - 0.9 ** (t + 1))
        back_N = ALPHA * (P @ N if left else N @ P)
        S = (before - W.detach()) / step_size - back_N
        applied.append(S.double().norm().item())
        assert abs(applied[-1] - st["fira_norm"].item()) <= 1e-3 * applied[-1]
    ratios = [b / a for a, b in zip(applied, applied[1:])]
    print("applied ‖S‖ ratios", [f"{x:.4f}" for x in ratios])
    assert all(x <= 1.01 * (1 + 1e-3) for x in ratios)
    assert all(x >= 1.01 * (1 - 1e-3) for x in ratios[1:])  # the limiter is engaged, not just idle


# ------------------------------------------------------------------------------------------- other bases
@pytest.mark.parametrize("fira", [False, True])
@pytest.mark.parametrize("device", devices)
def test_dct_basis_stores_indices_and_shares_Q(device, fira, monkeypatch):
    built = []
    real = galore_mod._ops.dct_basis

    def counting(n, device=None, dtype=torch.float32):
        built.append(n)
        return real(n, device=device, dtype=dtype)

    monkeypatch.setattr(galore_mod, "_DCT_BASES", {})
    monkeypatch.setattr(galore_mod._ops, "dct_basis", counting)
    init, grads = make_problem(device, steps=3, shapes=[(40, 27), (27, 40), (60, 27)], extra=False)
    params, opt = run(GaLoreAdamW, init, grads, n_projected=3, basis="dct", fira=fira, update_proj_gap=1)
    # one Q of size 27 serves (40, 27) and (60, 27) on the right and (27, 40) on the left, over all 3 refreshes
    assert built == [27]
    for p in params:
        st = opt.state[p]
        assert "P" not in st
        assert st["basis_idx"].dtype == torch.int32 and st["basis_idx"].shape == (RANK,)
        assert torch.all(st["basis_idx"][1:] > st["basis_idx"][:-1])
        assert torch.isfinite(p).all()
    Q = shared_dct_basis(27, torch.device(device), torch.float32)
    assert shared_dct_basis(27, torch.device(device), torch.float32) is Q and built == [27]


@pytest.mark.parametrize("device", devices)
def test_dct_step_matches_reference_and_selects_top_scores(device):
    init, grads = make_problem(device, steps=4, extra=False)
    ours, opt = run(GaLoreAdamW, init, grads, basis="dct")
    ref, ref_states = run_reference(init, grads, basis="dct")
    for o, r in zip(ours, ref):
        assert max_rel(o, r) <= 2e-6


@pytest.mark.parametrize("fira", [False, True])
@pytest.mark.parametrize("device", devices)
def test_randomized_basis_runs(device, fira):
    init, grads = make_problem(device, steps=4)
    params, opt = run(GaLoreAdamW, init, grads, basis="randomized", fira=fira)
    for p, shape in zip(params, SHAPES):
        P = opt.state[p]["P"]
        left = shape[0] < shape[1]
        assert P.shape == ((shape[0], RANK) if left else (RANK, shape[1]))
        gram = P.T @ P if left else P @ P.T
        torch.testing.assert_close(gram, torch.eye(RANK, device=device), rtol=0, atol=1e-5)
        assert torch.isfinite(p).all()


# ------------------------------------------------------------------------------------------- dtypes, state
@pytest.mark.parametrize("fira", [False, True])
@pytest.mark.parametrize("device", devices)
def test_bf16_weights_keep_fp32_state(device, fira):
    """bf16 weights and gradients: moments and P are fp32; each step equals the fp32 reference step on the same
    (upcast) weight and gradient, rounded once to bf16."""
    init, grads = make_problem(device, steps=4, dtype=torch.bfloat16)
    params = [nn.Parameter(t.clone()) for t in init]
    opt = GaLoreAdamW(make_groups(params, len(SHAPES), fira=fira), lr=LR, weight_decay=WD)
    ref_states = [{} for _ in SHAPES]
    for gs in grads:
        refs = [p.detach().float() for p in params[:len(SHAPES)]]
        for W, g, st in zip(refs, gs, ref_states):
            projected_adamw_step_reference(W, g, st, lr=LR, weight_decay=WD, rank=RANK, update_proj_gap=GAP,
                                           scale=ALPHA, fira=fira)
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        for p, W in zip(params, refs):
            assert p.dtype == torch.bfloat16
            ulp = (W.abs() * 2 ** -8).clamp_min(1e-6)  # bf16 spacing/2 of the exact value, plus slack
            assert ((p.float() - W).abs() <= 2 * ulp).all()
    for p in params:
        st = opt.state[p]
        assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.float32
        if "P" in st:
            assert st["P"].dtype == torch.float32
    assert opt.state[params[-1]]["exp_avg"].shape == params[-1].shape  # plain AdamW, fp32 moments too


@pytest.mark.parametrize("basis,fira,dtype", [("svd", False, torch.float32), ("svd", True, torch.bfloat16),
                                              ("dct", True, torch.float32), ("dct", False, torch.bfloat16)],
                         ids=_id)
@pytest.mark.parametrize("device", devices)
def test_state_dict_round_trip(device, basis, fira, dtype):
    """Save after 3 steps, load into a fresh optimizer on copies of the weights, step 3 more times: identical."""
    init, grads = make_problem(device, steps=6, dtype=dtype)
    params = [nn.Parameter(t.clone()) for t in init]
    opt = GaLoreAdamW(make_groups(params, len(SHAPES), fira=fira, basis=basis), lr=LR, weight_decay=WD)

    def steps(ps, o, gsets):
        for gs in gsets:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            o.step()

    steps(params, opt, grads[:3])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    params2 = [nn.Parameter(p.detach().clone()) for p in params]
    opt2 = GaLoreAdamW(make_groups(params2, len(SHAPES), fira=fira, basis=basis), lr=LR, weight_decay=WD)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for p, p2 in zip(params, params2):
        for key, value in opt.state[p].items():
            other = opt2.state[p2][key]
            if torch.is_tensor(value):
                assert other.dtype == value.dtype and torch.equal(other, value), key
                assert other.data_ptr() != value.data_ptr()
            else:
                assert other == value, key
    steps(params, opt, grads[3:])
    steps(params2, opt2, grads[3:])
    for p, p2 in zip(params, params2):
        assert torch.equal(p, p2)


# ------------------------------------------------------------------------------------------- per-layer mode
class MLP(nn.Module):
    def __init__(self, d_in=24, d_hidden=40, d_out=12, dtype=torch.float32):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden, dtype=dtype)
        self.fc2 = nn.Linear(d_hidden, d_out, dtype=dtype)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def mlp_groups(model, **opts):
    weights = [model.fc1.weight, model.fc2.weight]
    others = [model.fc1.bias, model.fc2.bias]
    return [{"params": weights, "rank": 8, "update_proj_gap": 5, "scale": 0.5, **opts}, {"params": others}]


def regression_data(device, n=256, d_in=24, d_out=12):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, d_in, generator=gen)
    teacher = torch.randn(d_in, d_out, generator=gen) / d_in ** 0.5
    y = torch.sin(x @ teacher) + 0.5 * (x @ teacher)
    return x.to(device), y.to(device)


@pytest.mark.parametrize("opts", [{}, {"fira": True}, {"basis": "dct"}], ids=["galore", "fira", "dct"])
@pytest.mark.parametrize("device", devices)
def test_per_layer_mode_equals_normal_mode(device, opts):
    model = MLP().to(device)
    model2 = copy.deepcopy(model)
    x, y = regression_data(device)
    opt = GaLoreAdamW(mlp_groups(model, **opts), lr=1e-2, weight_decay=0.01)
    live = []

    class Counting(GaLoreAdamW):
        def step(self, closure=None):
            live.append(sum(p.grad is not None for p in model2.parameters()))
            return super().step(closure)

    handle = register_per_layer_step(mlp_groups(model2, **opts),
                                     lambda groups: Counting(groups, lr=1e-2, weight_decay=0.01))
    assert len(handle.optimizers) == 4
    for _ in range(7):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        nn.functional.mse_loss(model2(x), y).backward()
        assert all(p.grad is None for p in model2.parameters())
    assert live and max(live) == 1, f"gradients alive at a step: {set(live)}"
    for (name, a), b in zip(model.named_parameters(), model2.parameters()):
        err = max_rel(b, a)
        print(f"{name}: rel err {err:.2e}")
        assert err <= 1e-6
    handle.remove()
    nn.functional.mse_loss(model2(x), y).backward()
    assert all(p.grad is not None for p in model2.parameters())


def test_per_layer_state_dict_round_trip():
    model = MLP()
    handle = register_per_layer_step(mlp_groups(model, fira=True), lr=1e-2)
    x, y = regression_data("cpu")
    nn.functional.mse_loss(model(x), y).backward()
    model2 = copy.deepcopy(model)
    handle2 = register_per_layer_step(mlp_groups(model2, fira=True), lr=1e-2)
    handle2.load_state_dict(handle.state_dict())
    for m in (model, model2):
        nn.functional.mse_loss(m(x), y).backward()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)



@pytest.mark.parametrize("opts", [{}, {"basis": "dct"}, {"fira": True}], ids=["galore", "dct", "fira"])
def test_per_layer_accumulation_equals_one_big_batch(opts):
    """3 micro-batches per step (loss / 3) in per-layer mode against one full-batch step of GaLoreAdamW, over
    refresh (0, 5) and non-refresh steps; between micro-batches a non-refresh, non-Fira projected weight keeps
    only its rank-r R, the rest keep the full gradient."""
    model = MLP()
    model2 = copy.deepcopy(model)
    x, y = regression_data("cpu", n=96)
    opt = GaLoreAdamW(mlp_groups(model, **opts), lr=1e-2, weight_decay=0.01)
    handle = register_per_layer_step(mlp_groups(model2, **opts), lr=1e-2, weight_decay=0.01, accumulation_steps=3)
    weights = {model2.fc1.weight: (40, 8), model2.fc2.weight: (8, 40)}  # R: right (m, r), left (r, n)
    for step in range(7):
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        for i, (xb, yb) in enumerate(zip(x.chunk(3), y.chunk(3))):
            (nn.functional.mse_loss(model2(xb), yb) / 3).backward()
            if i == 2:
                continue
            refresh = step % 5 == 0
            for p, r_shape in weights.items():
                st = handle.optimizers[[q is p for q in handle._params].index(True)].state[p]
                if refresh or opts.get("fira"):
                    assert p.grad is not None and "grad_acc" not in st
                else:
                    assert p.grad is None and tuple(st["grad_acc"].shape) == r_shape
            assert model2.fc1.bias.grad is not None  # plain AdamW parameters accumulate as usual
        assert all(p.grad is None for p in model2.parameters())
    for (name, a), b in zip(model.named_parameters(), model2.parameters()):
        err = max_rel(b, a)
        print(f"{name}: rel err {err:.2e}")
        assert err <= 2e-5


def test_per_layer_flush_steps_a_short_cycle():
    model = MLP()
    model2 = copy.deepcopy(model)
    x, y = regression_data("cpu", n=64)
    opt = GaLoreAdamW(mlp_groups(model, basis="dct"), lr=1e-2)
    handle = register_per_layer_step(mlp_groups(model2, basis="dct"), lr=1e-2, accumulation_steps=4)
    for _ in range(2):  # steps 1 (refresh) and 2 (projected accumulation), each only 2 of 4 micro-batches
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        for xb, yb in zip(x.chunk(2), y.chunk(2)):
            (nn.functional.mse_loss(model2(xb), yb) / 2).backward()
        handle.flush()
        assert all(p.grad is None for p in model2.parameters())
    for a, b in zip(model.parameters(), model2.parameters()):
        assert max_rel(b, a) <= 2e-5


def test_per_layer_refusals():
    with pytest.raises(ValueError, match="accumulation_steps"):
        register_per_layer_step(MLP(), accumulation_steps=0)


TRAIN_MODES = [
    ("galore", {}), ("fira", {"fira": True}), ("dct", {"basis": "dct"}), ("dct_fira", {"basis": "dct", "fira": True}),
    ("randomized", {"basis": "randomized"}), ("per_layer", {}), ("bf16", {}),
]


@pytest.mark.parametrize("mode,opts", TRAIN_MODES, ids=[m for m, _ in TRAIN_MODES])
@pytest.mark.parametrize("device", devices)
def test_small_model_loss_falls(device, mode, opts):
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    model = MLP(dtype=dtype).to(device)
    x, y = regression_data(device)
    x, y = x.to(dtype), y.to(dtype)
    groups = mlp_groups(model, **opts)
    if mode == "per_layer":
        register_per_layer_step(groups, lr=3e-2)
        opt = None
    else:
        opt = GaLoreAdamW(groups, lr=3e-2)
    losses = []
    for _ in range(60):
        loss = nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad()
    print(f"{mode}: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < 0.25 * losses[0]


# ------------------------------------------------------------------------------------------- edge cases
def test_empty_matrix_in_projected_group_takes_plain_adamw():
    p = nn.Parameter(torch.zeros(0, 4))
    p.grad = torch.zeros(0, 4)
    GaLoreAdamW([{"params": [p], "rank": 2, "update_proj_gap": 2}]).step()  # no subspace to project onto
    assert p.shape == (0, 4)


@pytest.mark.parametrize("fira", [False, True])
def test_noncontiguous_parameter_matches_contiguous(fira):
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(9, 14, generator=gen)
    strided = nn.Parameter(base.t())  # (14, 9), a transposed view
    dense = nn.Parameter(base.t().contiguous())
    group = {"rank": 3, "update_proj_gap": 2, "scale": 0.25, "fira": fira}
    opts = [GaLoreAdamW([{**group, "params": [q]}], lr=1e-2, weight_decay=0.1) for q in (strided, dense)]
    for _ in range(4):
        g = torch.randn(14, 9, generator=gen)
        for q, opt in zip((strided, dense), opts):
            q.grad = g.clone()
            opt.step()
    assert not strided.is_contiguous()
    assert torch.equal(strided.detach(), dense.detach())


def test_per_layer_step_skips_frozen_parameters():
    model = nn.Linear(4, 3)
    model.bias.requires_grad_(False)
    steps = register_per_layer_step(model.parameters(), lr=1e-2)  # an iterable, not the module
    assert len(steps.optimizers) == 1
    before = model.weight.detach().clone()
    model(torch.randn(5, 4)).sum().backward()
    assert not torch.equal(model.weight.detach(), before) and model.weight.grad is None


def test_per_layer_step_still_importable_from_galore():
    """register_per_layer_step / PerLayerStep moved to lowrank.optim.per_layer; the old path re-exports them."""
    from lowrank.optim import galore, per_layer
    from lowrank.optim.galore import PerLayerStep, register_per_layer_step as old
    assert old is per_layer.register_per_layer_step and PerLayerStep is per_layer.PerLayerStep
    assert set(galore.__all__) >= {"PerLayerStep", "register_per_layer_step"}
    with pytest.raises(AttributeError):
        galore.no_such_name
