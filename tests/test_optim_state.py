"""GaLoreAdamW's Adam state options: ``moments`` ('keep' / 'reproject' on a subspace refresh) and ``state_bits``
(32 / 8). Baselines: lowrank.reference.reproject_moments_reference and projected_adamw_step_reference(moments=...),
and the fp32-state optimizer."""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from lowrank.optim import GaLoreAdamW
from lowrank.optim import _moments, _state8bit
from lowrank.reference import projected_adamw_step_reference, reproject_moments_reference

from conftest import devices

LR, WD, ALPHA, RANK = 1e-2, 0.1, 0.25, 6
BETAS = (0.9, 0.999)


def orthonormal_rows(r, n, gen, dtype=torch.float64):
    q, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
    return q.T.contiguous().to(dtype)


def moments(shape, gen, dtype=torch.float64):
    """Moments as Adam leaves them after some steps of noisy gradients (v ≥ 0, not tied to m)."""
    m = torch.randn(shape, generator=gen, dtype=torch.float64) * 0.1
    v = m * m * 0.05 + torch.rand(shape, generator=gen, dtype=torch.float64) * 0.02
    return m.to(dtype), v.to(dtype)


def reproject_state(m, v, P_old, P_new, left, step):
    state = {"exp_avg": m.clone(), "exp_avg_sq": v.clone(), "P": P_new, "step": step}
    _moments.reproject_(state, {"P": P_old}, left, BETAS)
    return state["exp_avg"], state["exp_avg_sq"]


def sides(m, n, r, gen, dtype=torch.float64):
    """(left, P_old, moment shape) of both sides, P_old as the optimizer stores it."""
    Pr = orthonormal_rows(r, n, gen, dtype)
    Pl = orthonormal_rows(r, m, gen, dtype).T.contiguous()
    return [(False, Pr, (m, r)), (True, Pl, (r, n))]


# ------------------------------------------------------------------------------------------- reproject: the rule
@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
def test_reproject_same_basis_is_identity_and_matches_reference(left):
    gen = torch.Generator().manual_seed(0)
    m_, n_, r = 30, 20, 5
    left_, P, shape = sides(m_, n_, r, gen)[int(left)]
    m, v = moments(shape, gen)
    m2, v2 = reproject_state(m, v, P, P, left, step=7)
    torch.testing.assert_close(m2, m, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(v2, v, rtol=1e-12, atol=1e-14)
    # a genuinely new basis: equal to the reference rule
    P_new = orthonormal_rows(r, m_ if left else n_, gen)
    P_new = P_new.T.contiguous() if left else P_new
    m3, v3 = reproject_state(m, v, P, P_new, left, step=7)
    m_ref, v_ref = reproject_moments_reference(m, v, P, P_new, left, 7, *BETAS)
    torch.testing.assert_close(m3, m_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(v3, v_ref, rtol=1e-12, atol=1e-14)
    assert (v3 >= 0).all()


@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
def test_reproject_rotation_within_subspace(left):
    """P_new = a rotation of P_old inside the same subspace: the full-space first moment back(m) is unchanged;
    a signed permutation permutes v exactly (it moves coordinates without mixing them)."""
    gen = torch.Generator().manual_seed(1)
    m_, n_, r = 24, 18, 4
    _, P, shape = sides(m_, n_, r, gen)[int(left)]
    m, v = moments(shape, gen)
    rot, _ = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=torch.float64))
    P_new = P @ rot.T if left else rot @ P  # columns (left) / rows (right) rotated inside span(P)
    m2, v2 = reproject_state(m, v, P, P_new, left, step=3)
    back = (lambda Q, x: Q @ x) if left else (lambda Q, x: x @ Q)
    torch.testing.assert_close(back(P_new, m2), back(P, m), rtol=1e-12, atol=1e-13)
    assert not torch.allclose(m2, m)  # the coordinates did change
    perm, signs = torch.tensor([2, 0, 3, 1]), torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    S = torch.eye(r, dtype=torch.float64)[perm] * signs.unsqueeze(1)  # row a of S picks old coordinate perm[a]
    P_perm = P @ S.T if left else S @ P
    m3, v3 = reproject_state(m, v, P, P_perm, left, step=3)
    if left:
        torch.testing.assert_close(m3, signs.unsqueeze(1) * m[perm], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(v3, v[perm], rtol=1e-12, atol=1e-14)
    else:
        torch.testing.assert_close(m3, signs * m[:, perm], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(v3, v[:, perm], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
def test_reproject_orthogonal_subspace_starts_from_zero(left):
    gen = torch.Generator().manual_seed(2)
    dim, r = 20, 4
    q, _ = torch.linalg.qr(torch.randn(dim, 2 * r, generator=gen, dtype=torch.float64))
    P_old, P_new = (q[:, :r], q[:, r:]) if left else (q[:, :r].T.contiguous(), q[:, r:].T.contiguous())
    m, v = moments((r, 9) if left else (9, r), gen)
    m2, v2 = reproject_state(m, v, P_old, P_new, left, step=5)
    assert m2.abs().max() <= 1e-15 and v2.abs().max() <= 1e-15


def test_reproject_dct_carries_kept_indices_bit_for_bit():
    gen = torch.Generator().manual_seed(3)
    m, v = moments((10, 5), gen, torch.float32)
    old, new = torch.tensor([1, 4, 6, 9, 12], dtype=torch.int32), torch.tensor([0, 4, 9, 12, 15], dtype=torch.int32)
    state = {"exp_avg": m.clone(), "exp_avg_sq": v.clone(), "basis_idx": new, "step": 4}
    _moments.reproject_(state, {"basis_idx": old}, False, BETAS)
    for a, b in ((1, 1), (2, 3), (3, 4)):  # new column a holds what old column b held
        assert torch.equal(state["exp_avg"][:, a], m[:, b]) and torch.equal(state["exp_avg_sq"][:, a], v[:, b])
    for a in (0, 4):  # basis vectors new to the subspace start at zero
        assert not state["exp_avg"][:, a].any() and not state["exp_avg_sq"][:, a].any()


# ------------------------------------------------------------------------------------------- reproject: optimizer
def run_opt(init, grads, shapes_projected=2, opt_kwargs=None, **group):
    params = [nn.Parameter(t.clone()) for t in init]
    opt = GaLoreAdamW([{"params": params[:shapes_projected], "rank": RANK, "update_proj_gap": 2, "scale": ALPHA,
                        **group}, {"params": params[shapes_projected:]}], lr=LR, weight_decay=WD,
                      **(opt_kwargs or {}))
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    return params, opt


def problem(steps, dtype=torch.float32, shapes=((40, 27), (27, 40)), device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes] for _ in range(steps)]
    return init, grads


@pytest.mark.parametrize("basis,fira", [("svd", False), ("svd", True), ("dct", False)])
@pytest.mark.parametrize("device,dtype", [(d, torch.float32) for d in devices] + [("cpu", torch.float64)],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_reproject_step_matches_reference(device, dtype, basis, fira):
    init, grads = problem(7, dtype, device=device)
    ours, opt = run_opt(init, grads, moments="reproject", fira=fira, basis=basis)
    refs = [t.clone() for t in init]
    states = [{} for _ in refs]
    for gs in grads:
        for W, g, st in zip(refs, gs, states):
            projected_adamw_step_reference(W, g, st, lr=LR, weight_decay=WD, rank=RANK, update_proj_gap=2,
                                           scale=ALPHA, fira=fira, basis=basis, moments="reproject")
    keep, _ = run_opt(init, grads, moments="keep", fira=fira, basis=basis)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for o, r, k, st in zip(ours, refs, keep, states):
        err = ((o - r).abs().max() / r.abs().max()).item()
        differs = ((k - r).abs().max() / r.abs().max()).item()
        print(f"{tuple(o.shape)}: reproject vs reference {err:.2e}; keep vs reproject {differs:.2e}")
        assert err <= tol and differs > max(100 * err, 1e-4)  # and the option really changes the training
        torch.testing.assert_close(opt.state[o]["exp_avg_sq"].cpu(), st["exp_avg_sq"].cpu(), rtol=tol * 10, atol=1e-12)


@pytest.mark.parametrize("basis", ["svd", "dct"])
def test_reproject_constant_gradient_equals_keep(basis):
    """A constant gradient refreshes to the same subspace every step: 'reproject' then changes nothing."""
    init, grads = problem(1)
    grads = grads * 5
    keep, opt_k = run_opt(init, grads, moments="keep", basis=basis)
    repro, opt_r = run_opt(init, grads, moments="reproject", basis=basis)
    for a, b in zip(keep, repro):
        if basis == "dct":  # the same DCT rows: C is exactly the identity selection
            assert torch.equal(a, b)
            assert torch.equal(opt_k.state[a]["exp_avg_sq"], opt_r.state[b]["exp_avg_sq"])
        else:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(opt_r.state[b]["exp_avg"], opt_k.state[a]["exp_avg"], rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------------- 8-bit state
def assert_same_steps(grads, *runs):
    """Step every (params, optimizer) run on the same gradients; their parameters must stay equal."""
    for gs in grads:
        for ps, o in runs:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            o.step()
    for ps, _ in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0][0], ps))


def test_8bit_state_layout_and_round_trip():
    init, grads = problem(6)
    params, opt = run_opt(init, grads[:3], state_bits=8, moments="reproject")
    st = opt.state[params[0]]
    blocks = math.ceil(40 * RANK / 256)
    assert st["exp_avg"].dtype == torch.int8 and st["exp_avg_sq"].dtype == torch.uint8
    assert st["exp_avg"].shape == (40, RANK) and st["exp_avg_absmax"].shape == (blocks,)
    assert st["exp_avg"].any() and st["exp_avg_sq"].any()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    params2 = [nn.Parameter(p.detach().clone()) for p in params]
    opt2 = GaLoreAdamW([{"params": params2, "rank": RANK, "update_proj_gap": 2, "scale": ALPHA, "state_bits": 8,
                         "moments": "reproject"}, {"params": []}], lr=LR, weight_decay=WD)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.state[params2[0]]["exp_avg"].dtype == torch.int8
    assert_same_steps(grads[3:], (params, opt), (params2, opt2))


def test_checkpoint_without_new_group_keys_resumes_with_their_defaults():
    # a checkpoint written before `moments` / `state_bits` existed: torch's loader takes its groups as they are
    init, grads = problem(5)
    params, opt = run_opt(init, grads[:2])
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        g.pop("moments", None)
        g.pop("state_bits", None)
    params2 = [nn.Parameter(p.detach().clone()) for p in params]
    opt2 = GaLoreAdamW([{"params": params2, "rank": RANK, "update_proj_gap": 2, "scale": ALPHA}, {"params": []}],
                       lr=LR, weight_decay=WD)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["moments"] == "keep" and opt2.param_groups[0]["state_bits"] == 32
    assert_same_steps(grads[2:], (params, opt), (params2, opt2))


@pytest.mark.parametrize("opts", [{}, {"fira": True, "moments": "reproject"}, {"basis": "dct", "moments": "reproject"}],
                         ids=["galore", "fira_reproject", "dct_reproject"])
@pytest.mark.parametrize("device", devices)
def test_8bit_training_tracks_fp32(device, opts):
    """A small regression trained 60 steps: 8-bit moments reach the fp32-state loss within a few percent. The
    weights differ more (a training trajectory is chaotic: raising lr by 0.1% moves them ~8% of the distance
    travelled here), so that bound is loose."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(256, 32, generator=gen)
    y = torch.tanh(x @ torch.randn(32, 16, generator=gen) / 32 ** 0.5)
    x, y = x.to(device), y.to(device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: on a loaded CI core, waking a second thread costs more than the work
    try:
        results = {bits: _train(device, opts, x, y, bits) for bits in (32, 8)}
    finally:
        torch.set_num_threads(threads)
    (l32, w32, w0), (l8, w8, _) = results[32], results[8]
    rel_w = ((w8 - w32).norm() / (w32 - w0).norm()).item()
    print(f"{opts}: loss fp32 {l32:.5f}, 8-bit {l8:.5f}; weight diff / distance travelled {rel_w:.2e}")
    assert abs(l8 - l32) <= 0.05 * l32 and rel_w <= 0.4


def _train(device, opts, x, y, bits):
    """(final loss, final weights, initial weights) of 60 steps; the same start for every call."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 16)).to(device)
    weights = [model[0].weight, model[2].weight]
    w0 = torch.cat([w.detach().reshape(-1) for w in weights])
    opt = GaLoreAdamW([{"params": weights, "rank": 8, "update_proj_gap": 20, "state_bits": bits, **opts},
                       {"params": [model[0].bias, model[2].bias]}], lr=1e-2)
    for _ in range(60):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item(), torch.cat([w.detach().reshape(-1) for w in weights]), w0


def test_state_options_are_validated():
    p = nn.Parameter(torch.randn(6, 4))
    for bad in ({"moments": "reset"}, {"state_bits": 16}):
        with pytest.raises(ValueError, match="GaLoreAdamW: (moments|state_bits) must be one of"):
            GaLoreAdamW([{"params": [p], "rank": 2, **bad}])
    q = nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
    q.grad = torch.randn(6, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="state_bits=8 needs float32 moments"):
        GaLoreAdamW([{"params": [q], "rank": 2, "state_bits": 8}]).step()


@pytest.mark.parametrize("bits", [8, 32])
def test_state_of_the_other_width_is_refused(bits):
    """A state saved with one state_bits loaded into a group edited to the other: a ValueError naming the
    option, not a dtype error from inside the kernel."""
    p = nn.Parameter(torch.randn(16, 12))
    p.grad = torch.randn(16, 12)
    other = 8 if bits == 32 else 32

    def make(b):
        return GaLoreAdamW([{"params": [p], "rank": 4, "update_proj_gap": 10, "state_bits": b}], lr=1e-2)
    first = make(other)
    first.step()
    sd = first.state_dict()
    sd["param_groups"][0]["state_bits"] = bits
    opt = make(bits)
    opt.load_state_dict(sd)
    with pytest.raises(ValueError, match=f"GaLoreAdamW: this parameter's moments are .* but its group asks for "
                                         f"state_bits={bits}"):
        opt.step()


def test_reproject_8bit_state_decodes_reprojects_and_reencodes():
    from lowrank.reference import (dequantize_exp_avg_reference, dequantize_exp_avg_sq_reference,
                                   quantize_exp_avg_reference, quantize_exp_avg_sq_reference)
    gen = torch.Generator().manual_seed(5)
    m, v = moments((30, 5), gen, torch.float32)
    P_old = orthonormal_rows(5, 12, gen, torch.float32)
    P_new = orthonormal_rows(5, 12, gen, torch.float32)
    state = {"P": P_new, "step": 9}
    _state8bit.init_state(state, m)
    _state8bit.quantize_(state, m, v)
    m8 = dequantize_exp_avg_reference(state["exp_avg"], state["exp_avg_absmax"])
    v8 = dequantize_exp_avg_sq_reference(state["exp_avg_sq"], state["exp_avg_sq_absmax"])
    _moments.reproject_(state, {"P": P_old}, False, BETAS)
    m_ref, v_ref = reproject_moments_reference(m8, v8, P_old, P_new, False, 9, *BETAS)
    qm, am = quantize_exp_avg_reference(m_ref)
    qv, av = quantize_exp_avg_sq_reference(v_ref)
    # the same float32 maths up to matmul rounding: codes agree to within one step
    assert (state["exp_avg"].int() - qm.int()).abs().max() <= 1 and (state["exp_avg_sq"].int() - qv.int()).abs().max() <= 1
    torch.testing.assert_close(state["exp_avg_absmax"], am, rtol=1e-5, atol=0)
    torch.testing.assert_close(state["exp_avg_sq_absmax"], av, rtol=1e-5, atol=0)
    assert state["exp_avg"].dtype == torch.int8 and state["exp_avg_sq"].dtype == torch.uint8
