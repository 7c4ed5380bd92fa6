"""The non-finite rule (README, "Reliability"): a NaN or Inf in a token's input makes that token's outputs
non-finite; never a finite plausible value. The exact pattern, shared by every path of an op (CPU and CUDA):
SLTrain gives F.linear's on the materialized weight (both CPU paths: the low-rank one recomputes such tokens);
Monarch gives its two-factor product's in float64 (lowrank.reference.monarch_matmul_reference), with NaN in
the outputs that no path connects to the non-finite input (F.linear's 0·Inf on the dense matrix); projection
ops give their float64 reference's. Finite tokens stay untouched."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lowrank
from conftest import devices
from lowrank.reference import (basis_scores_reference, galore_project_reference, galore_update_reference,
                               monarch_matmul_reference, sltrain_weight)

INF, NAN = float("inf"), float("nan")


def poison(x: torch.Tensor) -> torch.Tensor:
    """x (T, in) with T >= 5: row 1 one +Inf, row 2 one NaN, row 3 -Inf and +Inf, row 4 two +Inf; others finite."""
    x = x.clone()
    n = x.shape[-1]
    x[1, n // 2] = INF
    x[2, 0] = NAN
    x[3, 1], x[3, n - 1] = -INF, INF
    x[4, 0], x[4, n - 1] = INF, INF
    return x


def assert_same_nonfinite(name, got, want, tol=1e-3):
    """Same NaN / +Inf / -Inf positions as the float64 truth, finite entries close."""
    got, want = got.double().cpu(), want.double().cpu()
    for what, f in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        bad = (f(got) != f(want)).nonzero()
        assert bad.numel() == 0, f"{name}: {what} pattern differs at {bad[:5].tolist()} (got {got[tuple(bad[0])]}, " \
                                 f"want {want[tuple(bad[0])]})"
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], rtol=tol, atol=tol)


DTYPES = {"cpu": [torch.float32, torch.float64], "cuda": [torch.float32, torch.bfloat16]}
CASES = [(dev, dt) for dev in devices for dt in DTYPES[dev]]
IDS = [f"{d}-{str(t)[6:]}" for d, t in CASES]


@pytest.mark.parametrize("device,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("path", ["materialize", "lowrank"])
@pytest.mark.parametrize("bias", [False, True])
def test_sltrain_nonfinite_matches_dense_linear(device, dtype, path, bias, monkeypatch):
    monkeypatch.setenv("LOWRANK_SLTRAIN_CPU_PATH", path)  # CUDA has one (materializing) path
    T, n_in, n_out, r = 7, 24, 20, 4
    x = poison(torch.randn(T, n_in)).to(device, dtype)
    A, B = torch.randn(r, n_in).to(device, dtype), torch.randn(n_out, r).to(device, dtype)
    idx = torch.randperm(n_in * n_out)[:30].to(device)
    vals = torch.randn(30).to(device, dtype)
    b = torch.randn(n_out).to(device, dtype) if bias else None
    got = lowrank.sltrain_linear(x, A, B, vals, idx, 0.5, b)
    W = sltrain_weight(A.double(), B.double(), vals.double(), idx, 0.5)
    want = F.linear(x.double(), W, b.double() if bias else None)
    assert not torch.isfinite(got[1:5]).any()
    assert_same_nonfinite(f"sltrain {path}", got, want, tol=0.05 if dtype == torch.bfloat16 else 1e-3)


MONARCH_SHAPES = {
    "dense_small_blocks": ((4, 8, 8), (4, 8, 8)),    # fused row tiles, every output depends on every input
    "structural_zeros": ((3, 4, 5), (6, 2, 2)),      # r < k: some outputs do not depend on some inputs
    "large_blocks": ((2, 136, 132), (2, 136, 136)),  # blocks above 128: one GEMM per step on the CPU
}


@pytest.mark.parametrize("device,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("shape", list(MONARCH_SHAPES))
@pytest.mark.parametrize("save_middle", [False, True])
def test_monarch_nonfinite_matches_dense_linear(device, dtype, shape, save_middle):
    if save_middle and device != "cpu":
        pytest.skip("save_middle=True is CPU only")
    s1, s2 = MONARCH_SHAPES[shape]
    w1, w2 = torch.randn(*s1).to(device, dtype), torch.randn(*s2).to(device, dtype)
    x = poison(torch.randn(6, s1[0] * s1[2])).to(device, dtype)
    if save_middle:
        w1.requires_grad_(True)
    got = lowrank.monarch_matmul(x, w1, w2, save_middle=save_middle).detach()
    want = monarch_matmul_reference(x.double(), w1.detach().double(), w2.double())
    rows = ~torch.isfinite(x.double().cpu()).all(-1)
    want[rows] = torch.where(torch.isfinite(want[rows]), NAN, want[rows])  # outputs no path connects: F.linear's 0·Inf
    assert not torch.isfinite(got[1:5]).any()
    assert_same_nonfinite(f"monarch {shape}", got, want, tol=0.1 if dtype == torch.bfloat16 else 1e-3)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("g_dtype", [torch.float32, torch.bfloat16])
def test_projection_nonfinite_propagates(device, left, g_dtype):
    """A token of G is a row (right projection) or a column (left): its projection, its squared norm, the
    scores and the updated weight become non-finite exactly where the float64 reference does."""
    m, n, r = 9, 7, 3
    G = torch.randn(m, n)
    G[2, 3], G[5, 1], G[6, 0], G[6, 6] = INF, NAN, -INF, INF
    G = G.to(device, g_dtype)
    P = torch.linalg.qr(torch.randn(m if left else n, r))[0]
    P = (P if left else P.T).contiguous().to(device)
    R, sq = lowrank.galore_project(G, P, left, True)
    R64, sq64 = galore_project_reference(G.double(), P.double(), left, True)
    assert_same_nonfinite("galore_project R", R, R64)
    assert_same_nonfinite("galore_project sqnorms", sq, sq64)
    Q = lowrank.dct_basis(m if left else n, device=device)
    assert_same_nonfinite("basis_scores", lowrank.basis_scores(G, Q, left), basis_scores_reference(G.double(), Q.double(), left))
    W = torch.randn(m, n, device=device)
    M = torch.randn(*((r, n) if left else (m, r)), device=device)
    scale = torch.rand(n if left else m, device=device)
    want = W.double()
    galore_update_reference(want, M.double(), P.double(), left, 0.9, G.double(), scale.double())
    lowrank.galore_update_(W, M, P, left, 0.9, G, scale)
    assert_same_nonfinite("galore_update_", W, want)


@pytest.mark.parametrize("device", devices)
def test_adam_lowrank_nonfinite_propagates(device):
    R = torch.randn(4, 5, device=device)
    R[1, 2], R[3, 0] = NAN, INF
    m, v = torch.zeros(4, 5, device=device), torch.zeros(4, 5, device=device)
    N = lowrank.adam_lowrank_(m, v, R, 0.9, 0.99, 1e-8)
    assert torch.isnan(N[1, 2]) and not torch.isfinite(N[3, 0]) and torch.isfinite(N[0]).all()


def test_large_finite_float64_is_not_taken_for_infinite(monkeypatch):
    """A float64 value beyond float32's range (1e300) is finite: no NaN from the non-finite handling."""
    w1, w2 = torch.rand(3, 4, 5, dtype=torch.float64), torch.rand(6, 2, 2, dtype=torch.float64)  # r < k
    x = torch.rand(4, 15, dtype=torch.float64)
    x[1, 3] = 1e300
    got = lowrank.monarch_matmul(x, w1, w2)
    torch.testing.assert_close(got, monarch_matmul_reference(x, w1, w2), rtol=1e-12, atol=0)
    A, B = torch.rand(2, 15, dtype=torch.float64), torch.rand(6, 2, dtype=torch.float64)
    idx, vals = torch.tensor([0, 17, 40]), torch.rand(3, dtype=torch.float64)
    want = F.linear(x, sltrain_weight(A, B, vals, idx, 0.5))
    for path in ("lowrank", "materialize"):
        monkeypatch.setenv("LOWRANK_SLTRAIN_CPU_PATH", path)
        torch.testing.assert_close(lowrank.sltrain_linear(x, A, B, vals, idx, 0.5), want, rtol=1e-12, atol=0)
