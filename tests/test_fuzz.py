"""Property-based (hypothesis) differential tests of every op and module against ``lowrank.reference`` in
float64: random shapes (odd, rectangular, empty batches), every dtype of each device, memory layouts
(contiguous, transposed, strided, expanded), both SLTrain CPU paths, gradients; and bad inputs, which must
raise a Python exception reading ``lowrank.<op>: ...`` (no crash, no source path, never a result).

Bounded for CI: LOWRANK_FUZZ_EXAMPLES examples per test (default 100: about 15 s for the whole file on the
two-core development machine, a few seconds per test). Long runs:
``LOWRANK_FUZZ_EXAMPLES=2000 LOWRANK_FUZZ_RANDOM=1 pytest tests/test_fuzz.py`` (random seeds instead of
hypothesis' derandomized ones). Tests are parametrized by device, so the CUDA half runs with
``pytest -m cuda`` (bench/gpu_check.sh) when a GPU is there. iFairy is checked on finite inputs only; its
non-finite rule is tested in test_ifairy_decode.py."""
from __future__ import annotations

import contextlib
import os
import re

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import lowrank  # noqa: E402
from conftest import devices  # noqa: E402
from lowrank import reference as ref  # noqa: E402

EXAMPLES = int(os.environ.get("LOWRANK_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize=os.environ.get("LOWRANK_FUZZ_RANDOM") != "1",
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

DTYPES = {"cpu": [torch.float32, torch.float64, torch.bfloat16, torch.float16],
          "cuda": [torch.float32, torch.float16, torch.bfloat16]}
# max |got - want| <= TOL · (max |want| + 1): a few units of the dtype's rounding after short reductions
TOL = {torch.float64: 1e-9, torch.float32: 3e-5, torch.float16: 8e-3, torch.bfloat16: 6e-2}
LAYOUTS = ["contiguous", "transposed", "strided", "expanded"]
_PATH = re.compile(r"(\.h:\d|\.cpp:\d|\.cu:\d|\.cuh:\d|/csrc/|API call failed)")


def close(name, got, want, dtype):
    got, want = got.detach().to("cpu", torch.float64), want.detach().to("cpu", torch.float64)
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if want.numel() == 0:
        return
    err = (got - want).abs().max().item()
    bound = TOL[dtype] * (want.abs().max().item() + 1.0)
    assert err <= bound, f"{name}: max err {err:.3e} > {bound:.3e} ({dtype})"


def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """t's values (expanded: its first row repeated) in another memory layout."""
    if kind == "transposed" and t.dim() >= 2:
        return t.mT.contiguous().mT
    if kind == "strided" and t.dim() >= 1:
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        big[..., ::2] = t
        return big[..., ::2]
    if kind == "expanded" and t.dim() >= 2 and t.shape[-2] > 0:
        return t[..., :1, :].expand(t.shape)
    return t


def randn(g: torch.Generator, *shape, device="cpu", dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


@contextlib.contextmanager
def sltrain_path(path: str | None):
    old = os.environ.get("LOWRANK_SLTRAIN_CPU_PATH")
    if path is None:
        os.environ.pop("LOWRANK_SLTRAIN_CPU_PATH", None)
    else:
        os.environ["LOWRANK_SLTRAIN_CPU_PATH"] = path
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LOWRANK_SLTRAIN_CPU_PATH", None)
        else:
            os.environ["LOWRANK_SLTRAIN_CPU_PATH"] = old


def batch_shapes():
    return st.lists(st.integers(0, 5), min_size=0, max_size=2).map(tuple)


def grads_of(out, inputs, g):
    gy = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)
    return torch.autograd.grad(out, [t for t in inputs if t is not None], gy, allow_unused=True), gy


# --------------------------------------------------------------------------------------------------- Monarch
@pytest.mark.parametrize("device", devices)
@FUZZ
@given(data=st.data())
def test_monarch_matches_reference(device, data):
    d = data.draw
    dtype = d(st.sampled_from(DTYPES[device]))
    k, q, p = d(st.integers(1, 5)), d(st.integers(1, 9)), d(st.integers(1, 9))
    l = d(st.sampled_from([v for v in range(1, k * q + 1) if k * q % v == 0]))
    s, r = d(st.integers(1, 9)), k * q // l
    lead = d(batch_shapes())
    kinds = [d(st.sampled_from(LAYOUTS)) for _ in range(3)]
    save_middle = d(st.sampled_from([None, False] + ([True] if device == "cpu" else [])))
    g = torch.Generator().manual_seed(d(st.integers(0, 2 ** 31 - 1)))
    x = layout(randn(g, *lead, k * p, device=device, dtype=dtype), kinds[0]).requires_grad_(dtype != torch.float16)
    w1 = layout(randn(g, k, q, p, device=device, dtype=dtype), kinds[1]).requires_grad_(x.requires_grad)
    w2 = layout(randn(g, l, s, r, device=device, dtype=dtype), kinds[2]).requires_grad_(x.requires_grad)
    out = lowrank.monarch_matmul(x, w1, w2, save_middle=save_middle)
    x64, w164, w264 = (t.detach().double().cpu().requires_grad_(True) for t in (x, w1, w2))
    want = ref.monarch_matmul_reference(x64, w164, w264)
    close("monarch out", out, want, dtype)
    if x.requires_grad:
        ours, gy = grads_of(out, (x, w1, w2), g)
        theirs = torch.autograd.grad(want, (x64, w164, w264), gy.double().cpu())
        for name, a, b in zip(("dx", "dw1", "dw2"), ours, theirs):
            close(f"monarch {name}", a, b, dtype)


# --------------------------------------------------------------------------------------------------- SLTrain
@pytest.mark.parametrize("device", devices)
@FUZZ
@given(data=st.data())
def test_sltrain_matches_reference(device, data):
    d = data.draw
    dtype = d(st.sampled_from(DTYPES[device]))
    n_in, n_out, r = d(st.integers(1, 24)), d(st.integers(1, 24)), d(st.integers(1, 6))
    nnz = d(st.integers(0, n_in * n_out))
    lead = d(batch_shapes())
    kinds = [d(st.sampled_from(LAYOUTS)) for _ in range(3)]
    idx_dtype = d(st.sampled_from([torch.int32, torch.int64]))
    bias_on, check = d(st.booleans()), d(st.booleans())
    path = d(st.sampled_from([None, "materialize", "lowrank"]))
    g = torch.Generator().manual_seed(d(st.integers(0, 2 ** 31 - 1)))
    grad = dtype != torch.float16
    x = layout(randn(g, *lead, n_in, device=device, dtype=dtype), kinds[0]).requires_grad_(grad)
    A = layout(randn(g, r, n_in, device=device, dtype=dtype, scale=0.5), kinds[1]).requires_grad_(grad)
    B = layout(randn(g, n_out, r, device=device, dtype=dtype, scale=0.5), kinds[2]).requires_grad_(grad)
    values = randn(g, nnz, device=device, dtype=dtype).requires_grad_(grad)
    idx = torch.randperm(n_in * n_out, generator=g)[:nnz].to(device=device, dtype=idx_dtype)
    bias = randn(g, n_out, device=device, dtype=dtype).requires_grad_(grad) if bias_on else None
    with sltrain_path(path):
        out = lowrank.sltrain_linear(x, A, B, values, idx, 0.75, bias, check)
        ins64 = [t.detach().double().cpu().requires_grad_(True) if t is not None else None
                 for t in (x, A, B, values, bias)]
        want = ref.sltrain_linear_reference(ins64[0], ins64[1], ins64[2], ins64[3], idx.cpu(), 0.75, ins64[4])
        close("sltrain out", out, want, dtype)
        if grad:
            ours, gy = grads_of(out, (x, A, B, values, bias), g)
            theirs = torch.autograd.grad(want, [t for t in ins64 if t is not None], gy.double().cpu(),
                                         allow_unused=True)
            for name, a, b in zip(("dx", "dA", "dB", "dvalues", "dbias"), ours, theirs):
                close(f"sltrain {name} ({path})", a if a is not None else torch.zeros_like(b), b, dtype)


# ------------------------------------------------------------------------------------------------ projection
@pytest.mark.parametrize("device", devices)
@FUZZ
@given(data=st.data())
def test_projection_ops_match_reference(device, data):
    d = data.draw
    g_dtype = d(st.sampled_from(DTYPES[device]))
    comp = torch.float64 if g_dtype == torch.float64 else torch.float32
    m, n, left = d(st.integers(1, 40)), d(st.integers(1, 40)), d(st.booleans())
    r = d(st.integers(1, m if left else n))
    kind = d(st.sampled_from(LAYOUTS))
    g = torch.Generator().manual_seed(d(st.integers(0, 2 ** 31 - 1)))
    G = layout(randn(g, m, n, device=device, dtype=g_dtype), kind)
    P = randn(g, *((m, r) if left else (r, n)), device=device, dtype=comp)
    P = layout(P, d(st.sampled_from(LAYOUTS)))
    R, sq = lowrank.galore_project(G, P, left, True)
    R64, sq64 = ref.galore_project_reference(G.double().cpu(), P.double().cpu(), left, True)
    close("galore_project R", R, R64, comp)
    close("galore_project sqnorms", sq, sq64, comp)

    Q = lowrank.dct_basis(m if left else n, device=device, dtype=comp)
    close("dct_basis", Q, ref.dct_basis_reference(m if left else n, dtype=torch.float64), comp)
    scores = lowrank.basis_scores(G, Q, left)
    close("basis_scores", scores, ref.basis_scores_reference(G.double().cpu(), Q.double().cpu(), left), comp)
    rank = d(st.integers(1, Q.shape[0]))
    chosen = lowrank.dct_select(G, Q, rank, left).long().cpu()
    assert chosen.shape == (rank,) and (chosen[1:] > chosen[:-1]).all()
    s64 = ref.basis_scores_reference(G.double().cpu(), Q.double().cpu(), left)
    rest = torch.ones_like(s64, dtype=torch.bool)
    rest[chosen] = False
    if rest.any():  # every chosen score at least every other one, up to rounding
        assert s64[chosen].min() >= s64[rest].max() - 2 * TOL[comp] * (s64.max() + 1)

    W = randn(g, m, n, device=device, dtype=g_dtype)
    M = randn(g, *((r, n) if left else (m, r)), device=device, dtype=comp)
    residual = d(st.booleans())
    scale = randn(g, n if left else m, device=device, dtype=comp) if residual else None
    want = W.double().cpu().clone()
    ref.galore_update_reference(want, M.double().cpu(), P.double().cpu(), left, 0.9,
                                G.double().cpu() if residual else None, scale.double().cpu() if residual else None)
    lowrank.galore_update_(W, M, P, left, 0.9, G if residual else None, scale)
    close("galore_update_ W", W, want, g_dtype)

    mom, mom_sq = randn(g, *R.shape, device=device, dtype=comp), randn(g, *R.shape, device=device, dtype=comp).abs()
    m64, v64 = mom.double().cpu().clone(), mom_sq.double().cpu().clone()
    R_in = layout(R, kind)
    N = lowrank.adam_lowrank_(mom, mom_sq, R_in, 0.9, 0.99, 1e-3)
    N64 = ref.adam_lowrank_reference(m64, v64, R_in.double().cpu(), 0.9, 0.99, 1e-3)
    close("adam_lowrank_ N", N, N64, comp)
    close("adam_lowrank_ exp_avg", mom, m64, comp)

    if comp == torch.float32:  # 8-bit moments: float32 state only; codes and absmax must equal the reference's
        state = [torch.zeros(R.shape, dtype=torch.int8, device=device), None,
                 torch.zeros(R.shape, dtype=torch.uint8, device=device), None]
        blocks = (R.numel() + 255) // 256
        state[1], state[3] = (torch.zeros(blocks, device=device) for _ in range(2))
        ref_state = [t.cpu().clone() for t in state]
        for _ in range(2):  # the second step decodes what the first encoded
            N8 = lowrank.adam_lowrank_8bit_(*state, R_in, 0.9, 0.99, 1e-3)
            N8_ref = ref.adam_lowrank_8bit_reference(*ref_state, R_in.cpu(), 0.9, 0.99, 1e-3)
            close("adam_lowrank_8bit_ N", N8, N8_ref, comp)
            assert all(torch.equal(a.cpu(), b) for a, b in zip(state, ref_state))


# ---------------------------------------------------------------------------------------------------- iFairy
@pytest.mark.parametrize("device", devices)
@FUZZ
@given(data=st.data())
def test_ifairy_ops_match_reference_on_finite_input(device, data):
    d = data.draw
    dtype = d(st.sampled_from(DTYPES[device]))
    n_out, n_in = d(st.integers(1, 20)), d(st.integers(1, 70))
    lead = d(batch_shapes())
    act_quant = d(st.booleans())
    kinds = [d(st.sampled_from(LAYOUTS)) for _ in range(2)]
    g = torch.Generator().manual_seed(d(st.integers(0, 2 ** 31 - 1)))
    wr, wi = randn(g, n_out, n_in, device=device), randn(g, n_out, n_in, device=device)
    packed, scales = lowrank.ifairy_quantize(wr, wi)
    p64, s64 = ref.ifairy_quantize_reference(wr.cpu(), wi.cpu())
    assert torch.equal(packed.cpu(), p64)
    torch.testing.assert_close(scales.cpu(), s64, rtol=1e-5, atol=0)
    dr, di = lowrank.ifairy_dequantize(packed, scales, n_in)
    er, ei = ref.ifairy_dequantize_reference(p64, scales.cpu(), n_in)
    close("ifairy_dequantize re", dr, er, torch.float32)
    close("ifairy_dequantize im", di, ei, torch.float32)
    xr = layout(randn(g, *lead, n_in, device=device, dtype=dtype), kinds[0])
    xi = layout(randn(g, *lead, n_in, device=device, dtype=dtype), kinds[1])
    yr, yi = lowrank.ifairy_linear(xr, xi, packed, scales, act_quant)
    wr64, wi64 = ref.ifairy_linear_reference(xr.cpu(), xi.cpu(), packed.cpu(), scales.cpu(), act_quant)
    # act_quant: the int8 codes of a token can differ by one step where x·a lands on a rounding tie in
    # another order of operations; allow one step per element (1/127 of the token's absmax)
    tol_dtype = dtype if not act_quant else torch.bfloat16
    close("ifairy_linear re", yr, wr64, tol_dtype)
    close("ifairy_linear im", yi, wi64, tol_dtype)
    layer = lowrank.nn.IFairyLinear.from_float(wr, wi, act_quant=act_quant)
    mr, mi = layer(xr, xi)
    assert torch.equal(mr, yr) and torch.equal(mi, yi)
    # several linears on the same x in one call equal separate calls exactly (outputs may differ in size)
    n_out2 = d(st.integers(1, 20))
    packed2, scales2 = lowrank.ifairy_quantize(randn(g, n_out2, n_in, device=device), randn(g, n_out2, n_in, device=device))
    multi = lowrank.ifairy_linear_multi(xr, xi, [packed, packed2], [scales, scales2], act_quant, n_in)
    single2 = lowrank.ifairy_linear(xr, xi, packed2, scales2, act_quant)
    assert torch.equal(multi[0][0], yr) and torch.equal(multi[0][1], yi)
    assert torch.equal(multi[1][0], single2[0]) and torch.equal(multi[1][1], single2[1])


# --------------------------------------------------------------------------------------------------- modules
@pytest.mark.parametrize("device", devices)
@FUZZ
@given(data=st.data())
def test_modules_match_dense_layers(device, data):
    d = data.draw
    dtype = d(st.sampled_from([t for t in DTYPES[device] if t != torch.float16]))
    n_in, n_out = d(st.integers(1, 40)), d(st.integers(1, 40))
    lead = d(batch_shapes())
    g = torch.Generator().manual_seed(d(st.integers(0, 2 ** 31 - 1)))
    torch.manual_seed(d(st.integers(0, 2 ** 31 - 1)))
    x = layout(randn(g, *lead, n_in, device=device, dtype=dtype), d(st.sampled_from(LAYOUTS)))
    nblocks = d(st.sampled_from([1, 2, 3, 4]))
    mon = lowrank.nn.MonarchLinear(n_in, n_out, nblocks=nblocks, bias=d(st.booleans()), device=device, dtype=dtype)
    b64 = mon.bias.double().cpu() if mon.bias is not None else None
    close("MonarchLinear", mon(x), F.linear(x.double().cpu(), mon.to_dense().double().cpu(), b64), dtype)
    rank = d(st.integers(1, 6))
    sl = lowrank.nn.SLTrainLinear(n_in, n_out, rank=rank, density=d(st.sampled_from([0.0, 0.05, 0.3])),
                                  bias=d(st.booleans()), device=device, dtype=dtype)
    with torch.no_grad():
        sl.B.normal_()
    want = ref.sltrain_linear_reference(x.double().cpu(), sl.A.double().cpu(), sl.B.double().cpu(),
                                        sl.values.double().cpu(), sl.indices.cpu(), sl.scale,
                                        sl.bias.double().cpu() if sl.bias is not None else None)
    close("SLTrainLinear", sl(x), want, dtype)


# ------------------------------------------------------------------------------------------------ optimizer
@pytest.mark.parametrize("device", devices)
@FUZZ
@given(data=st.data())
def test_galore_adamw_matches_reference_steps(device, data):
    """A few GaLoreAdamW steps (GaLore or Fira, SVD or DCT basis, either side) against the reference step."""
    from lowrank.optim import GaLoreAdamW
    d = data.draw
    dtype = d(st.sampled_from([torch.float32] + ([torch.float64] if device == "cpu" else [])))
    m, n = d(st.integers(2, 24)), d(st.integers(2, 24))
    rank, gap, fira = d(st.integers(1, min(m, n))), d(st.integers(1, 3)), d(st.booleans())
    basis, wd = d(st.sampled_from(["svd", "dct"])), d(st.sampled_from([0.0, 0.1]))
    g = torch.Generator().manual_seed(d(st.integers(0, 2 ** 31 - 1)))
    W0 = randn(g, m, n, dtype=dtype)
    grads = [randn(g, m, n, dtype=dtype) for _ in range(3)]
    p = torch.nn.Parameter(W0.clone().to(device))
    opt = GaLoreAdamW([{"params": [p], "rank": rank, "update_proj_gap": gap, "scale": 0.5, "fira": fira,
                        "basis": basis}], lr=1e-2, weight_decay=wd)
    W, state = W0.clone(), {}
    for G in grads:
        p.grad = G.to(device)
        opt.step()
        ref.projected_adamw_step_reference(W, G, state, lr=1e-2, weight_decay=wd, rank=rank, update_proj_gap=gap,
                                           scale=0.5, fira=fira, basis=basis)
    # W moves by ~lr per step; the bound is relative to that motion (SVD bases agree up to sign, which the
    # update does not depend on; near-equal singular values make the fp32 subspace itself uncertain)
    motion = (W - W0).abs().max().item()
    err = (p.detach().cpu() - W).abs().max().item()
    assert err <= (1e-9 if dtype == torch.float64 else 2e-3) * (motion + 1e-3) + (1e-12 if dtype == torch.float64
                                                                               else 1e-6), (err, motion)


# ------------------------------------------------------------------------------------------------ bad inputs
def _monarch_args(dev):
    return [torch.randn(3, 8, device=dev), torch.randn(2, 4, 4, device=dev), torch.randn(2, 6, 4, device=dev)]


def _sltrain_args(dev):
    return [torch.randn(3, 6, device=dev), torch.randn(2, 6, device=dev), torch.randn(5, 2, device=dev),
            torch.randn(3, device=dev), torch.tensor([0, 7, 29], device=dev)]


def _project_args(dev):
    return [torch.randn(8, 5, device=dev), torch.randn(3, 5, device=dev)]


def _scores_args(dev):
    return [torch.randn(8, 5, device=dev), torch.randn(5, 5, device=dev)]


def _update_args(dev):
    return [torch.randn(8, 5, device=dev), torch.randn(8, 3, device=dev), torch.randn(3, 5, device=dev)]


OPS = torch.ops.lowrank
CALLS = {
    "monarch_matmul": (_monarch_args, lambda *a: OPS.monarch_matmul(*a)),
    "sltrain_linear": (_sltrain_args, lambda *a: OPS.sltrain_linear(*a, 0.5, None, True)),
    "galore_project": (_project_args, lambda *a: OPS.galore_project(*a, False, True)),
    "basis_scores": (_scores_args, lambda *a: OPS.basis_scores(*a, False)),
    "galore_update_": (_update_args, lambda *a: OPS.galore_update_(*a, False, 1.0, None, None)),
}

# Mutations that make any argument invalid for every op above (all take >= 2-D float tensors first).
MUTATIONS = {
    "int_dtype": lambda t: t.to(torch.int32) if t.is_floating_point() else t.float(),
    "extra_dim": lambda t: t.unsqueeze(0).expand(2, *t.shape),
    "zero_dim": lambda t: t.sum(),
    "grow_last": lambda t: torch.cat([t, t[..., :1]], dim=-1) if t.dim() else t.reshape(1),
    "meta": lambda t: t.to("meta"),
    "half_weight": lambda t: t.half() if t.is_floating_point() else t.float(),
}


@pytest.mark.parametrize("device", devices)
@FUZZ
@given(data=st.data())
def test_bad_inputs_raise_clean_errors(device, data):
    d = data.draw
    op = d(st.sampled_from(list(CALLS)))
    make, call = CALLS[op]
    args = make(device)
    which = d(st.integers(0, len(args) - 1))
    mutation = d(st.sampled_from(list(MUTATIONS)))
    if mutation == "half_weight" and (op != "monarch_matmul" or which == 0):
        return  # a float16 G / x is legal elsewhere; covered by the dtype fuzz
    if mutation == "extra_dim" and which == 0 and op in ("monarch_matmul", "sltrain_linear"):
        return  # x takes any leading dims
    args[which] = MUTATIONS[mutation](args[which])
    with pytest.raises((RuntimeError, ValueError, TypeError, NotImplementedError, IndexError)) as e:
        call(*args)
    msg = str(e.value)
    assert "lowrank." in msg or mutation == "zero_dim" and "dimension" in msg.lower(), msg
    assert not _PATH.search(msg), msg
