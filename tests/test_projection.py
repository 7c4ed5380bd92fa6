"""Tests of the low-rank gradient projection ops: galore_project, adam_lowrank_, galore_update_, dct_basis,
basis_scores and dct_select.

Notation (see lowrank.ops.projection): G (m, n); right side (left=False): P (r, n), R = G·Pᵀ (m, r),
back(M) = M·P; left side: P (m, r), R = Pᵀ·G (r, n), back(M) = P·M. Ground truth is lowrank.reference run in
float64 on the CPU on the same (upcast) inputs. Relative errors are printed before each assert (`pytest -s`).
"""
from __future__ import annotations

import math

import pytest
import torch

import lowrank
from lowrank.reference import (adam_lowrank_reference, basis_scores_reference, dct_basis_reference,
                               dct_select_reference, galore_project_reference, galore_update_reference)

from conftest import devices

BAD_INPUT_ERRORS = (RuntimeError, ValueError)
# relative error ‖ours − truth‖_max / ‖truth‖_max allowed; low-precision G/W inputs are exact, accumulation fp32
REL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}


def g_dtypes(device):
    return [torch.float32, torch.bfloat16, torch.float16] + ([torch.float64] if device == "cpu" else [])


DEVICE_DTYPES = [(d, t) for d in devices for t in g_dtypes(d)]
# (m, n, r): odd and rectangular sizes, r = 1, r = the full side, a tall and a wide matrix
SHAPES = [(37, 23, 5), (23, 37, 5), (64, 64, 16), (129, 70, 1), (70, 129, 70), (300, 17, 17), (5, 260, 3)]


def _id(v):
    return str(v).replace("torch.", "")


def shape_id(s):
    return "x".join(map(str, s))


def companion(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def orthonormal(rows: int, cols: int, dtype, device) -> torch.Tensor:
    """A (rows, cols) matrix with orthonormal columns (rows ≥ cols)."""
    q, _ = torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64))
    return q.to(device=device, dtype=dtype)


def projector(m, n, r, left, dtype, device):
    return orthonormal(m, r, dtype, device) if left else orthonormal(n, r, dtype, device).T.contiguous()


def rel_err(got, truth) -> float:
    got, truth = got.detach().double().cpu(), truth.detach().double().cpu()
    return ((got - truth).abs().max() / truth.abs().max().clamp_min(1e-300)).item()


def check(name, got, truth, tol):
    err = rel_err(got, truth)
    print(f"{name}: rel err {err:.2e} (tol {tol:.0e})")
    assert err <= tol, f"{name}: rel err {err:.2e} > {tol:.0e}"


def as64(t):
    """A float64 CPU copy (never an alias, even of a float64 CPU tensor)."""
    return t.detach().to("cpu", torch.float64, copy=True)


# ------------------------------------------------------------------------------------------------ galore_project
@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES, ids=_id)
def test_project_matches_reference(shape, left, device, dtype):
    m, n, r = shape
    r = min(r, m if left else n)
    G = torch.randn(m, n, device=device).to(dtype)
    P = projector(m, n, r, left, companion(dtype), device)
    R, sq = lowrank.galore_project(G, P, left, want_sqnorms=True)
    R_ref, sq_ref = galore_project_reference(as64(G), as64(P), left, want_sqnorms=True)
    assert R.dtype == sq.dtype == companion(dtype)
    assert R.shape == ((r, n) if left else (m, r)) and sq.shape == ((n,) if left else (m,))
    check("R", R, R_ref, REL[dtype])
    check("sqnorms", sq, sq_ref, REL[dtype])


@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
@pytest.mark.parametrize("device", devices)
def test_project_without_sqnorms_gives_empty_and_same_R(left, device):
    G = torch.randn(45, 31, device=device)
    P = projector(45, 31, 6, left, torch.float32, device)
    R1, sq1 = lowrank.galore_project(G, P, left, want_sqnorms=False)
    R2, _ = lowrank.galore_project(G, P, left, want_sqnorms=True)
    assert sq1.shape == (0,)
    torch.testing.assert_close(R1, R2, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["transposed", "strided", "column_slice"])
@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
@pytest.mark.parametrize("device,dtype", [(d, t) for d in devices for t in (torch.float32, torch.bfloat16)], ids=_id)
def test_project_noncontiguous_G(layout, left, device, dtype):
    m, n, r = 33, 21, 4
    if layout == "transposed":
        G = torch.randn(n, m, device=device).to(dtype).T
    elif layout == "strided":
        G = torch.randn(m, 2 * n, device=device).to(dtype)[:, ::2]
    else:
        G = torch.randn(m + 3, n + 5, device=device).to(dtype)[2:m + 2, 1:n + 1]
    assert not G.is_contiguous()
    P = projector(m, n, r, left, torch.float32, device)
    R, sq = lowrank.galore_project(G, P, left, want_sqnorms=True)
    R_ref, sq_ref = galore_project_reference(as64(G), as64(P), left, want_sqnorms=True)
    check("R", R, R_ref, REL[dtype])
    check("sqnorms", sq, sq_ref, REL[dtype])


@pytest.mark.parametrize("alpha", [0.25, 1.0, 1.7])
@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
@pytest.mark.parametrize("device", devices)
def test_norm_identity(alpha, left, device):
    """‖G_i − α·back(R)_i‖² = ‖G_i‖² − (2α−α²)‖R_i‖² for orthonormal P, from the op's R and sqnorms (fp32)."""
    m, n, r = (96, 64, 12) if not left else (64, 96, 12)
    G = torch.randn(m, n, device=device)
    P = projector(m, n, r, left, torch.float32, device)
    R, sq = lowrank.galore_project(G, P, left, want_sqnorms=True)
    dim = 0 if left else 1
    G64, P64, R64 = as64(G), as64(P), as64(R)
    direct = (G64 - alpha * (P64 @ R64 if left else R64 @ P64)).square().sum(dim)
    identity = as64(sq) - (2 * alpha - alpha * alpha) * R64.square().sum(dim)
    check("identity", identity, direct, 1e-5)


# ------------------------------------------------------------------------------------------------ adam_lowrank_
@pytest.mark.parametrize("shape", [(37, 5), (5, 129), (1, 1), (64, 256)], ids=shape_id)
@pytest.mark.parametrize("device,dtype", [(d, t) for d in devices for t in (torch.float32,)] + [("cpu", torch.float64)],
                         ids=_id)
def test_adam_lowrank_matches_reference(shape, device, dtype):
    beta1, beta2, eps = 0.9, 0.999, 1e-6
    m = torch.zeros(shape, device=device, dtype=dtype)
    v = torch.zeros(shape, device=device, dtype=dtype)
    m_ref, v_ref = as64(m), as64(v)
    ptrs = (m.data_ptr(), v.data_ptr())
    for step in range(3):
        R = torch.randn(shape, device=device, dtype=dtype) * (10.0 ** (step - 1))
        N = lowrank.adam_lowrank_(m, v, R, beta1, beta2, eps)
        N_ref = adam_lowrank_reference(m_ref, v_ref, as64(R), beta1, beta2, eps)
        assert N.shape == shape and N.dtype == dtype and N.data_ptr() not in ptrs
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        check(f"exp_avg step {step}", m, m_ref, tol)
        check(f"exp_avg_sq step {step}", v, v_ref, tol)
        check(f"N step {step}", N, N_ref, tol)
    assert (m.data_ptr(), v.data_ptr()) == ptrs, "the moments must be updated in place"


@pytest.mark.parametrize("device", devices)
def test_adam_lowrank_noncontiguous_R_and_eps(device):
    m = torch.zeros(20, 7, device=device)
    v = torch.zeros(20, 7, device=device)
    R = torch.randn(7, 20, device=device).T
    N = lowrank.adam_lowrank_(m, v, R, 0.5, 0.75, 0.1)
    m_ref, v_ref = torch.zeros(20, 7, dtype=torch.float64), torch.zeros(20, 7, dtype=torch.float64)
    check("N", N, adam_lowrank_reference(m_ref, v_ref, as64(R), 0.5, 0.75, 0.1), 2e-6)


@pytest.mark.parametrize("device", devices)
def test_adam_lowrank_rejects_aliased_moments(device):
    """The moments are updated in place from R: one tensor passed twice is refused, not silently mixed."""
    m, v, R = (torch.randn(6, 5, device=device).abs() for _ in range(3))
    for args in ((m, m, R), (m, v, m), (m, v, v)):
        with pytest.raises(RuntimeError, match="must not share memory with"):
            lowrank.adam_lowrank_(*args, 0.9, 0.999, 1e-8)


# ------------------------------------------------------------------------------------------------ galore_update_
def _update_case(shape, left, w_dtype, device, residual, g_layout="contiguous"):
    m, n, r = shape
    r = min(r, m if left else n)
    sd = companion(w_dtype)
    W = torch.randn(m, n, device=device).to(w_dtype)
    P = projector(m, n, r, left, sd, device)
    M = torch.randn((r, n) if left else (m, r), device=device, dtype=sd) * 0.1
    G = s = None
    if residual:
        G = torch.randn(n, m, device=device).to(w_dtype).T if g_layout == "transposed" else \
            torch.randn(m, n, device=device).to(w_dtype)
        s = torch.rand(n if left else m, device=device, dtype=sd) * 0.05
    return W, M, P, G, s


@pytest.mark.parametrize("residual", [False, True], ids=["galore", "fira"])
@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES, ids=_id)
def test_update_matches_reference(shape, left, residual, device, dtype):
    W, M, P, G, s = _update_case(shape, left, dtype, device, residual)
    decay = 0.999
    W64 = as64(W)
    galore_update_reference(W64, as64(M), as64(P), left, decay, None if G is None else as64(G),
                            None if s is None else as64(s))
    ptr = W.data_ptr()
    lowrank.galore_update_(W, M, P, left, decay, G, s)
    assert W.data_ptr() == ptr and W.dtype == dtype
    if dtype in (torch.float32, torch.float64):
        check("W", W, W64, REL[dtype])
    else:  # rounded once from an fp32 result: within one unit in the last place of the exact value
        ulp = torch.finfo(dtype).eps
        err = ((as64(W) - W64).abs() / W64.abs().clamp_min(1e-3)).max().item()
        print(f"W: max rel err {err:.2e} (one ulp {ulp:.1e})")
        assert err <= ulp


@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
@pytest.mark.parametrize("device", devices)
def test_update_noncontiguous_G(left, device):
    W, M, P, G, s = _update_case((41, 29, 6), left, torch.float32, device, True, "transposed")
    assert not G.is_contiguous()
    W64 = as64(W)
    galore_update_reference(W64, as64(M), as64(P), left, 0.9, as64(G), as64(s))
    lowrank.galore_update_(W, M, P, left, 0.9, G, s)
    check("W", W, W64, 2e-6)


@pytest.mark.parametrize("device", devices)
def test_update_zero_M_is_decay_and_residual_only(device):
    W, M, P, G, s = _update_case((30, 20, 4), False, torch.float32, device, True)
    M.zero_()
    want = 0.5 * (W - s.unsqueeze(1) * G)
    lowrank.galore_update_(W, M, P, False, 0.5, G, s)
    torch.testing.assert_close(W, want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------ DCT
@pytest.mark.parametrize("n", [1, 2, 7, 64, 100, 333])
@pytest.mark.parametrize("device", devices)
def test_dct_basis_matches_formula(n, device):
    for dtype in (torch.float32,) + ((torch.float64,) if device == "cpu" else ()):
        Q = lowrank.dct_basis(n, device=device, dtype=dtype)
        assert Q.shape == (n, n) and Q.dtype == dtype and Q.device.type == device
        check(f"Q {dtype}", Q, dct_basis_reference(n, dtype=torch.float64), 2e-15 if dtype == torch.float64 else 1e-7)


@pytest.mark.parametrize("device", devices)
def test_dct_basis_is_orthonormal(device):
    n = 1024
    Q = lowrank.dct_basis(n, device=device)
    Q64 = as64(Q)
    err = (Q64 @ Q64.T - torch.eye(n, dtype=torch.float64)).abs().max().item()
    print(f"max |Q·Qᵀ − I| = {err:.2e}")
    assert err <= 1e-5
    # row i is the cosine of frequency i: its sign changes exactly i times along j
    signs = torch.sign(Q64[:40, :])
    assert [int((signs[i, 1:] != signs[i, :-1]).sum()) for i in range(40)] == list(range(40))


@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES, ids=_id)
def test_basis_scores_matches_reference(left, device, dtype):
    m, n = 53, 38
    G = torch.randn(m, n, device=device).to(dtype)
    Q = lowrank.dct_basis(m if left else n, device=device, dtype=companion(dtype))
    scores = lowrank.basis_scores(G, Q, left)
    assert scores.shape == ((m,) if left else (n,)) and scores.dtype == companion(dtype)
    check("scores", scores, basis_scores_reference(as64(G), as64(Q), left), REL[dtype] * 2)
    Gt = torch.randn(n, m, device=device).to(dtype).T  # non-contiguous
    check("scores (transposed G)", lowrank.basis_scores(Gt, Q, left),
          basis_scores_reference(as64(Gt), as64(Q), left), REL[dtype] * 2)


@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES, ids=_id)
def test_dct_select_recovers_planted_basis(left, device, dtype):
    """G built from r chosen DCT vectors only: selection returns exactly them and the projection is lossless."""
    m, n, r = (48, 200, 9) if left else (200, 48, 9)
    size = m if left else n
    Q = lowrank.dct_basis(size, device=device, dtype=companion(dtype))
    J = torch.randperm(size)[:r].sort().values
    X = torch.randn((r, n) if left else (m, r), dtype=torch.float64) + 3.0 * torch.sign(torch.randn(1))
    Q64 = as64(Q)
    G = (Q64[J].T @ X if left else X @ Q64[J]).to(device=device, dtype=dtype)
    idx = lowrank.dct_select(G, Q, r, left)
    assert idx.dtype == torch.int32 and idx.shape == (r,)
    assert torch.equal(idx.cpu().long(), J), f"selected {idx.tolist()}, planted {J.tolist()}"
    P = Q[idx.long()].T.contiguous() if left else Q[idx.long()]
    R, sq = lowrank.galore_project(G, P, left, want_sqnorms=True)
    back = as64(P) @ as64(R) if left else as64(R) @ as64(P)
    err = ((as64(G) - back).norm() / as64(G).norm()).item()
    tol = 1e-6 if dtype in (torch.float32, torch.float64) else torch.finfo(dtype).eps  # G itself was rounded
    print(f"projection error {err:.2e} (tol {tol:.0e})")
    assert err <= tol


@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
@pytest.mark.parametrize("device", devices)
def test_dct_select_matches_reference_and_sorts(left, device):
    G = torch.randn(70, 90, device=device)
    Q = lowrank.dct_basis(70 if left else 90, device=device)
    for r in (1, 17, Q.shape[0]):
        idx = lowrank.dct_select(G, Q, r, left)
        assert torch.equal(idx.cpu(), dct_select_reference(as64(G), as64(Q), r, left))
        assert torch.all(idx[1:] > idx[:-1])


# ------------------------------------------------------------------------------------------------ bad input
def _bad_cases(device):
    f32 = dict(device=device, dtype=torch.float32)
    G, P_right, P_left = torch.randn(8, 6, **f32), torch.randn(3, 6, **f32), torch.randn(8, 3, **f32)
    Q6 = torch.randn(6, 6, **f32)
    m3 = torch.zeros(8, 3, **f32)
    W = torch.randn(8, 6, **f32)
    return {
        "project_P_wrong_dtype": lambda: lowrank.galore_project(G, P_right.double(), False),
        "project_P_bf16": lambda: lowrank.galore_project(G, P_right.bfloat16(), False),
        "project_P_wrong_n": lambda: lowrank.galore_project(G, torch.randn(3, 5, **f32), False),
        "project_P_wrong_m_left": lambda: lowrank.galore_project(G, torch.randn(7, 3, **f32), True),
        "project_rank_too_big": lambda: lowrank.galore_project(G, torch.randn(7, 6, **f32), False),
        "project_G_1d": lambda: lowrank.galore_project(G[0], P_right, False),
        "project_G_int": lambda: lowrank.galore_project(G.to(torch.int32), P_right, False),
        "adam_shape_mismatch": lambda: lowrank.adam_lowrank_(m3, torch.zeros(8, 4, **f32), m3.clone(), 0.9, 0.99, 1e-6),
        "adam_dtype_mismatch": lambda: lowrank.adam_lowrank_(m3, m3.clone().double(), m3.clone(), 0.9, 0.99, 1e-6),
        "adam_noncontiguous_state": lambda: lowrank.adam_lowrank_(torch.zeros(3, 8, **f32).T, m3.clone(),
                                                                   m3.clone(), 0.9, 0.99, 1e-6),
        "update_M_wrong_shape": lambda: lowrank.galore_update_(W, torch.zeros(8, 4, **f32), P_right, False, 1.0),
        "update_M_wrong_dtype": lambda: lowrank.galore_update_(W, m3.bfloat16(), P_right, False, 1.0),
        "update_W_noncontiguous": lambda: lowrank.galore_update_(torch.randn(6, 8, **f32).T, m3, P_right, False, 1.0),
        "update_G_without_scale": lambda: lowrank.galore_update_(W, m3, P_right, False, 1.0, G, None),
        "update_scale_without_G": lambda: lowrank.galore_update_(W, m3, P_right, False, 1.0, None, torch.ones(8, **f32)),
        "update_scale_wrong_length": lambda: lowrank.galore_update_(W, m3, P_right, False, 1.0, G, torch.ones(6, **f32)),
        "update_G_wrong_shape": lambda: lowrank.galore_update_(W, m3, P_right, False, 1.0, G[:7], torch.ones(8, **f32)),
        "update_left_P_wrong": lambda: lowrank.galore_update_(W, torch.zeros(3, 6, **f32), P_right, True, 1.0),
        "dct_basis_bad_dtype": lambda: lowrank.dct_basis(8, device=device, dtype=torch.bfloat16),
        "scores_Q_wrong_size": lambda: lowrank.basis_scores(G, torch.randn(8, 8, **f32), False),
        "scores_Q_wrong_dtype": lambda: lowrank.basis_scores(G, Q6.double(), False),
        "select_rank_zero": lambda: lowrank.dct_select(G, Q6, 0, False),
        "select_rank_too_big": lambda: lowrank.dct_select(G, Q6, 7, False),
        "left_P_used_right": lambda: lowrank.galore_project(G, P_left, False),
    }


BAD_NAMES = list(_bad_cases("cpu"))
# what the message must name (the offending argument, or the rule broken)
BAD_MESSAGE = {
    "project_P_wrong_dtype": "P must", "project_P_bf16": "P must", "project_P_wrong_n": "P must",
    "project_P_wrong_m_left": "P must", "project_rank_too_big": "rank", "project_G_1d": "G must",
    "project_G_int": "G must", "adam_shape_mismatch": "shape", "adam_dtype_mismatch": "dtype",
    "adam_noncontiguous_state": "contiguous", "update_M_wrong_shape": "M must", "update_M_wrong_dtype": "M must",
    "update_W_noncontiguous": "W must", "update_G_without_scale": "residual_scale",
    "update_scale_without_G": "residual_scale", "update_scale_wrong_length": "residual_scale",
    "update_G_wrong_shape": "G must", "update_left_P_wrong": "P must", "dct_basis_bad_dtype": "Q must",
    "scores_Q_wrong_size": "Q must", "scores_Q_wrong_dtype": "Q must", "select_rank_zero": "rank",
    "select_rank_too_big": "rank", "left_P_used_right": "P must",
}


@pytest.mark.parametrize("case", BAD_NAMES)
@pytest.mark.parametrize("device", devices + ["meta"])
def test_bad_input_raises(case, device):
    """Every kernel, and the meta (fake) kernel torch.compile uses, rejects the input with a message naming
    the offending argument."""
    with pytest.raises(BAD_INPUT_ERRORS, match=BAD_MESSAGE[case]):
        _bad_cases(device)[case]()


def test_cuda_rejects_float64_and_mixed_devices():
    if not (torch.cuda.is_available() and lowrank.has_cuda_kernels()):
        pytest.skip("needs a GPU and the CUDA kernels")
    G = torch.randn(8, 6, device="cuda", dtype=torch.float64)
    with pytest.raises(BAD_INPUT_ERRORS):
        lowrank.galore_project(G, torch.randn(3, 6, device="cuda", dtype=torch.float64), False)
    with pytest.raises(BAD_INPUT_ERRORS):
        lowrank.galore_project(G.float(), torch.randn(3, 6), False)


# ------------------------------------------------------------------------------------------------ registration
@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
@pytest.mark.parametrize("device,dtype", [(d, t) for d in devices for t in (torch.float32, torch.bfloat16)], ids=_id)
def test_opcheck_all_ops(left, device, dtype):
    m, n, r = 11, 7, 3
    G = torch.randn(m, n, device=device).to(dtype)
    P = projector(m, n, r, left, torch.float32, device)
    torch.library.opcheck(torch.ops.lowrank.galore_project.default, (G, P, left, True))
    torch.library.opcheck(torch.ops.lowrank.galore_project.default, (G, P, left, False))
    R = torch.randn((r, n) if left else (m, r), device=device)
    torch.library.opcheck(torch.ops.lowrank.adam_lowrank_.default,
                          (torch.randn_like(R), torch.rand_like(R), R, 0.9, 0.99, 1e-6))
    W = torch.randn(m, n, device=device).to(dtype)
    s = torch.rand(n if left else m, device=device)
    torch.library.opcheck(torch.ops.lowrank.galore_update_.default, (W, R, P, left, 0.99, None, None))
    torch.library.opcheck(torch.ops.lowrank.galore_update_.default, (W, R, P, left, 0.99, G, s))
    torch.library.opcheck(torch.ops.lowrank.dct_basis_.default, (torch.empty(9, 9, device=device),))
    Q = lowrank.dct_basis(m if left else n, device=device)
    torch.library.opcheck(torch.ops.lowrank.basis_scores.default, (G, Q, left))


@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
def test_compile_projected_step_fullgraph(left):
    """One GaLore-Fira step written with the ops compiles with fullgraph=True and matches eager (in-place ops
    included)."""
    torch._dynamo.reset()

    def step(W, G, P, m, v, alpha, step_size):
        R, sq = lowrank.galore_project(G, P, left, want_sqnorms=True)
        N = lowrank.adam_lowrank_(m, v, R, 0.9, 0.999, 1e-6)
        dim = 0 if left else 1
        phi = N.norm(dim=dim) / (R.norm(dim=dim) + 1e-8)
        coef = (phi.unsqueeze(0) if left else phi.unsqueeze(1))
        lowrank.galore_update_(W, step_size * alpha * (N - coef * R), P, left, 0.99, G, step_size * phi)
        Q = lowrank.dct_basis(G.shape[0] if left else G.shape[1], device=G.device)
        return sq.sum(), lowrank.dct_select(G, Q, 2, left)

    m, n, r = (24, 16, 4) if not left else (16, 24, 4)
    G = torch.randn(m, n)
    P = projector(m, n, r, left, torch.float32, "cpu")
    shape = (r, n) if left else (m, r)
    inputs = [torch.randn(m, n), G, P, torch.zeros(shape), torch.zeros(shape)]
    eager = [t.clone() for t in inputs]
    out_e = step(*eager, 0.25, 1e-2)
    out_c = torch.compile(step, fullgraph=True)(*inputs, 0.25, 1e-2)
    torch.testing.assert_close(out_c[0], out_e[0])
    assert torch.equal(out_c[1], out_e[1])
    for name, a, b in zip(("W", "G", "P", "exp_avg", "exp_avg_sq"), inputs, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(inputs[0], G)  # W was updated


def test_ops_are_registered_for_cpu_and_cuda():
    for name in ("galore_project", "adam_lowrank_", "galore_update_", "dct_basis_", "basis_scores"):
        op = getattr(torch.ops.lowrank, name).default
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU"), name
        if lowrank.has_cuda_kernels():
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA"), name
    schema = str(torch.ops.lowrank.galore_update_.default._schema)
    assert "Tensor(a!) W" in schema
    schema = str(torch.ops.lowrank.adam_lowrank_.default._schema)
    assert "Tensor(a!) exp_avg" in schema and "Tensor(b!) exp_avg_sq" in schema


def test_dct_select_compiles_with_dynamic_shapes_fullgraph():
    G, Q = torch.randn(6, 4), lowrank.dct_basis(4)
    f = torch.compile(lambda g, q: lowrank.dct_select(g, q, 2, False), backend="aot_eager", fullgraph=True,
                      dynamic=True)
    assert torch.equal(f(G, Q), lowrank.dct_select(G, Q, 2, False))
