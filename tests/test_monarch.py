"""Tests of lowrank.monarch_matmul (forward, backward, registration) and lowrank.nn.MonarchLinear.

Ground truth is lowrank.reference run in float64, plus a dense Monarch matrix built here from
torch.block_diag and fly's two permutations (checked against explicit permutation matrices). Low-precision results must be at most twice as far from
the float64 truth as PyTorch's own path in the same dtype (flash-attention's rule); errors are printed
before each assert (`pytest -s` shows them).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowrank
from lowrank.nn import MonarchLinear
from lowrank.nn.monarch import monarch_factor_shapes, project_to_monarch
from lowrank.reference import monarch_matmul_bmm, monarch_matmul_reference, monarch_to_dense

from conftest import HAS_CUDA, devices, noncontiguous_like

LOW_PRECISION = (torch.float16, torch.bfloat16)
RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}
# Small absolute slack (relative to the output's scale) on top of the 2x rule for fp16 / bf16.
LOW_ATOL = {torch.float16: 1e-4, torch.bfloat16: 5e-4}


def dtypes_on(device: str) -> list[torch.dtype]:
    extra = [torch.float64] if device == "cpu" else []  # float64 on CUDA is an error, tested below
    return [torch.float32, torch.float16, torch.bfloat16, *extra]


DEVICE_DTYPES = [(dev, dt) for dev in devices for dt in dtypes_on(dev)]


def _id(v):
    return str(v).replace("torch.", "")


# --------------------------------------------------------------------------------------------------------------
# Shapes: (name, x's leading dims, w1 (k, q, p), w2 (l, s, r)) with k·p = n and l·r = k·q.
# --------------------------------------------------------------------------------------------------------------
SQRT_16 = ("sqrt_n16", (3,), (4, 4, 4), (4, 4, 4))
SQRT_1024 = ("sqrt_n1024", (3,), (32, 32, 32), (32, 32, 32))
FLY_RECT = ("fly_rect_768_384", (3,), (8, 192, 96), (24, 16, 64))
ML_768_3072 = ("linear_768_3072_nb4", (5,), (4, 192, 192), (4, 768, 192))
ML_3072_768 = ("linear_3072_768_nb4", (5,), (4, 192, 768), (4, 192, 192))
ML_PAD = ("linear_pad_12_8_nb4", (5,), (4, 2, 3), (4, 2, 2))
ODD = ("odd_k3q5p7_l5s9r3", (7,), (3, 5, 7), (5, 9, 3))
P1 = ("p1", (4,), (6, 5, 1), (10, 2, 3))
Q1 = ("q1", (4,), (6, 1, 5), (2, 7, 3))
K1 = ("k1_dense_w1", (4,), (1, 6, 9), (3, 4, 2))
L1 = ("l1_dense_w2", (4,), (2, 3, 4), (1, 5, 6))
BATCH_DIMS = ("batch_2x5", (2, 5), (3, 5, 7), (5, 9, 3))
BATCH_1 = ("batch_1", (1,), (8, 192, 96), (24, 16, 64))
BATCH_769 = ("batch_769", (769,), (3, 5, 7), (5, 9, 3))
VECTOR_X = ("x_1d", (), (4, 4, 4), (4, 4, 4))
# Past every CPU GEMM tile edge (MC=96, MT=192, NC=1024 floats, KC=256): odd K > KC, N > NC, M > MT.
TILE_EDGES = ("tile_edges", (397,), (2, 259, 257), (2, 385, 259))
TILE_EDGES_WIDE = ("tile_edges_wide", (397,), (1, 1031, 13), (1, 7, 1031))
# Large blocks with more than 512 rows: the GEMMs' row-tiled schedule (up to 512 rows, one task per group).
TALL_TWO_PASS = ("tall_two_pass_b600", (600,), (2, 130, 3), (2, 5, 130))

VALUE_SHAPES = [SQRT_16, SQRT_1024, FLY_RECT, ML_768_3072, ML_3072_768, ML_PAD, ODD, P1, Q1, K1, L1,
                BATCH_DIMS, BATCH_1, BATCH_769, VECTOR_X, TILE_EDGES, TILE_EDGES_WIDE, TALL_TWO_PASS]
GRADCHECK_SHAPES = [SQRT_16, ("odd_small", (2,), (3, 5, 7), (5, 9, 3)), ("rect_small", (2,), (4, 3, 2), (2, 5, 6)),
                    P1, Q1, ("batch_2x3", (2, 3), (2, 3, 4), (3, 2, 2)), ML_PAD]
GRAD_SHAPES = [("sqrt_n1024_b8", (8,), (32, 32, 32), (32, 32, 32)), FLY_RECT, ML_768_3072, ML_3072_768,
               ("odd_b33", (33,), (3, 5, 7), (5, 9, 3)), BATCH_DIMS, TILE_EDGES, TILE_EDGES_WIDE, TALL_TWO_PASS]
OPCHECK_SHAPES = [SQRT_16, ODD, BATCH_DIMS]
DENSE_SHAPES = [SQRT_16, ODD, FLY_RECT, ML_PAD, P1, Q1]


def shape_id(shape) -> str:
    return shape[0]


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------
def make_inputs(lead, s1, s2, dtype=torch.float32, device="cpu", requires_grad=False):
    """x, w1, w2 scaled so the output is O(1); drawn in fp32 on the CPU, then cast and moved."""
    k, q, p = s1
    x = torch.randn(*lead, k * p)
    w1 = torch.randn(s1) / math.sqrt(p)
    w2 = torch.randn(s2) / math.sqrt(s2[2])
    return [t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in (x, w1, w2)]


def as64(*tensors):
    return [t.detach().to(device="cpu", dtype=torch.float64) for t in tensors]


def reference64(x, w1, w2):
    return monarch_matmul_reference(*as64(x, w1, w2))


def report(name: str, ours: torch.Tensor, ref64: torch.Tensor) -> float:
    err = (ours.detach().to("cpu", torch.float64) - ref64).abs()
    max_err = err.max().item() if err.numel() else 0.0
    mean_err = err.mean().item() if err.numel() else 0.0
    print(f"{name}: max err {max_err:.3e}, mean err {mean_err:.3e}")
    return max_err


def scale_of(ref64: torch.Tensor) -> float:
    return max(ref64.abs().max().item(), 1.0) if ref64.numel() else 1.0


def assert_close_to_ref(name, ours, ref64, torch_same_dtype=None):
    """fp32/fp64: max error within RTOL of the output's scale. fp16/bf16: at most twice the error of
    `torch_same_dtype` (PyTorch computing the same thing in that dtype) plus a small slack."""
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    max_err = report(f"{name} ours", ours, ref64)
    scale = scale_of(ref64)
    if ours.dtype in LOW_PRECISION:
        base = report(f"{name} torch {_id(ours.dtype)}", torch_same_dtype, ref64)
        bound = 2 * base + LOW_ATOL[ours.dtype] * scale
    else:
        bound = RTOL[ours.dtype] * scale
    assert max_err <= bound, f"{name}: max err {max_err:.3e} > bound {bound:.3e}"


def block_diag_matrix(w: torch.Tensor) -> torch.Tensor:
    return torch.block_diag(*w.unbind(0))


def permutation_matrix(rows_from: list[int]) -> torch.Tensor:
    """P with (P v)[i] = v[rows_from[i]]."""
    n = len(rows_from)
    P = torch.zeros(n, n, dtype=torch.float64)
    P[torch.arange(n), torch.tensor(rows_from)] = 1.0
    return P


def monarch_permutations(l: int, s: int, r: int) -> tuple[list[int], list[int]]:
    """Row sources of fly's two permutations: P1 regroups y (index a·l + c) into l blocks of r (index
    c·r + a); P2 reorders BD(w2)'s output (index c·s + d) into fly's output order (index d·l + c)."""
    p1 = [a * l + c for c in range(l) for a in range(r)]
    p2 = [c * s + d for d in range(s) for c in range(l)]
    return p1, p2


def monarch_dense_independent(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """M = P2 · BD(w2) · P1 · BD(w1) in float64, written from fly's definition without lowrank.reference.
    The permutations are applied as row gathers (P·A = A[rows_from]); test_dense_matrix_is_permuted_block_diagonals
    checks this against explicit permutation matrices."""
    w1, w2 = as64(w1, w2)
    p1, p2 = monarch_permutations(*w2.shape)
    return (block_diag_matrix(w2) @ block_diag_matrix(w1)[p1])[p2]


def grads_of_reference64(x, w1, w2, grad_out):
    """dx, dw1, dw2 by autograd through the reference in float64."""
    x64, w164, w264 = (t.requires_grad_(True) for t in as64(x, w1, w2))
    monarch_matmul_reference(x64, w164, w264).backward(grad_out.detach().to("cpu", torch.float64))
    return x64.grad, w164.grad, w264.grad


def grads_of(fn, x, w1, w2, grad_out):
    x, w1, w2 = (t.detach().clone().requires_grad_(True) for t in (x, w1, w2))
    fn(x, w1, w2).backward(grad_out)
    return x.grad, w1.grad, w2.grad


# --------------------------------------------------------------------------------------------------------------
# 1. Forward values
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", VALUE_SHAPES, ids=shape_id)
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES, ids=_id)
def test_forward_matches_reference(shape, device, dtype):
    name, lead, s1, s2 = shape
    x, w1, w2 = make_inputs(lead, s1, s2, dtype, device)
    out = lowrank.monarch_matmul(x, w1, w2)
    assert out.dtype == dtype and out.device.type == device
    assert out.shape == (*lead, s2[0] * s2[1])
    assert_close_to_ref(name, out, reference64(x, w1, w2), monarch_matmul_reference(x, w1, w2))


@pytest.mark.parametrize("device", devices)
def test_forward_matches_bmm_path(device):
    """fly's two-bmm path, the benchmark baseline, agrees with the op (and with the reference)."""
    x, w1, w2 = make_inputs(*FLY_RECT[1:], device=device)
    ref64 = reference64(x, w1, w2)
    assert_close_to_ref("bmm path", monarch_matmul_bmm(x, w1, w2), ref64)
    assert_close_to_ref("op", lowrank.monarch_matmul(x, w1, w2), ref64)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("shape", [TILE_EDGES, ("small_blocks_b4000", (4000,), (8, 16, 16), (8, 16, 16))],
                         ids=shape_id)
def test_deterministic(device, shape):
    """Same inputs, bit-identical outputs and gradients (no atomics, fixed reduction order), for the
    two-pass and the fused (small blocks, per-thread weight-gradient partials) CPU schedules."""
    x, w1, w2 = make_inputs(*shape[1:], device=device)
    grad_out = torch.randn(*shape[1], shape[3][0] * shape[3][1], device=device)  # (..., l·s)
    assert torch.equal(lowrank.monarch_matmul(x, w1, w2), lowrank.monarch_matmul(x, w1, w2))
    for _ in range(3):
        first = torch.ops.lowrank.monarch_matmul_backward(grad_out, x, w1, w2, True, True)
        second = torch.ops.lowrank.monarch_matmul_backward(grad_out, x, w1, w2, True, True)
        assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_op_and_wrapper_are_the_same():
    x, w1, w2 = make_inputs(*ODD[1:])
    assert torch.equal(lowrank.monarch_matmul(x, w1, w2), torch.ops.lowrank.monarch_matmul(x, w1, w2))


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("shape", [BATCH_DIMS, ("batch_2x3x4_rect", (2, 3, 4), (8, 192, 96), (24, 16, 64))],
                         ids=shape_id)
def test_leading_dims_equal_flattened(shape, device):
    _, lead, s1, s2 = shape
    x, w1, w2 = make_inputs(lead, s1, s2, device=device)
    out = lowrank.monarch_matmul(x, w1, w2)
    flat = lowrank.monarch_matmul(x.reshape(-1, x.shape[-1]), w1, w2)
    assert out.shape == (*lead, s2[0] * s2[1])
    assert torch.equal(out.reshape(flat.shape), flat)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES, ids=_id)
@pytest.mark.parametrize("shape", [SQRT_16, FLY_RECT, ML_PAD], ids=shape_id)
def test_empty_batch(shape, device, dtype):
    """B = 0: an empty output of the right shape; backward gives an empty dx and all-zero dw1, dw2."""
    _, _, s1, s2 = shape
    x, w1, w2 = make_inputs((0,), s1, s2, dtype, device, requires_grad=True)
    out = lowrank.monarch_matmul(x, w1, w2)
    assert out.shape == (0, s2[0] * s2[1]) and out.dtype == dtype
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w1.grad, torch.zeros_like(w1)) and torch.equal(w2.grad, torch.zeros_like(w2))

    x3 = torch.empty(2, 0, s1[0] * s1[2], dtype=dtype, device=device)
    assert lowrank.monarch_matmul(x3, w1.detach(), w2.detach()).shape == (2, 0, s2[0] * s2[1])


NONCONTIG_CASES = [
    ("x_transposed", "x", "transposed"),
    ("x_sliced", "x", "sliced"),
    ("x_rows_strided", "x", "leading_sliced"),
    ("w1_transposed", "w1", "transposed"),
    ("w1_sliced", "w1", "sliced"),
    ("w2_transposed", "w2", "transposed"),
    ("w2_blocks_strided", "w2", "leading_sliced"),
]


@pytest.mark.parametrize("case", NONCONTIG_CASES, ids=lambda c: c[0])
@pytest.mark.parametrize("device", devices)
def test_noncontiguous_inputs(case, device):
    """A strided view gives the same values and gradients as its contiguous copy."""
    _, which, kind = case
    inputs = dict(zip(("x", "w1", "w2"), make_inputs((6,), (3, 5, 7), (5, 9, 3), device=device)))
    strided = dict(inputs, **{which: noncontiguous_like(inputs[which], kind)})
    out = lowrank.monarch_matmul(**strided)
    assert_close_to_ref("noncontiguous", out, reference64(**inputs))
    assert torch.equal(out, lowrank.monarch_matmul(**inputs))

    grad_out = torch.randn_like(out)
    for name in ("x", "w1", "w2"):
        strided[name] = strided[name].detach().requires_grad_(True)
    lowrank.monarch_matmul(**strided).backward(grad_out)
    expected = grads_of(lowrank.monarch_matmul, *inputs.values(), grad_out)
    for name, want in zip(("x", "w1", "w2"), expected):
        torch.testing.assert_close(strided[name].grad, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", devices)
def test_expanded_x(device):
    """x with a stride-0 batch dimension (one row broadcast to 4)."""
    x, w1, w2 = make_inputs((1,), (3, 5, 7), (5, 9, 3), device=device)
    xe = x.expand(4, -1)
    out = lowrank.monarch_matmul(xe, w1, w2)
    assert_close_to_ref("expanded x", out, reference64(xe, w1, w2))


# --------------------------------------------------------------------------------------------------------------
# 2. Gradients
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", GRADCHECK_SHAPES, ids=shape_id)
def test_gradcheck_float64(shape):
    _, lead, s1, s2 = shape
    inputs = make_inputs(lead, s1, s2, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lowrank.monarch_matmul, inputs)


def test_gradcheck_monarch_linear_padded():
    """in=10 -> out=7 pads x to 12 and cuts the output from 8: gradients of x, both factors and the bias."""
    layer = MonarchLinear(10, 7, nblocks=4, dtype=torch.float64)
    names = [n for n, _ in layer.named_parameters()]

    def f(x, *params):
        return torch.func.functional_call(layer, dict(zip(names, params)), (x,))

    x = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]
    assert torch.autograd.gradcheck(f, (x, *params))


GRAD_DTYPES = [(dev, dt) for dev in devices for dt in (torch.float32, torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=shape_id)
@pytest.mark.parametrize("device,dtype", GRAD_DTYPES, ids=_id)
def test_gradients_match_reference(shape, device, dtype):
    name, lead, s1, s2 = shape
    x, w1, w2 = make_inputs(lead, s1, s2, dtype, device)
    grad_out = torch.randn(*lead, s2[0] * s2[1], device=device).to(dtype)
    ours = grads_of(lowrank.monarch_matmul, x, w1, w2, grad_out)
    truth = grads_of_reference64(x, w1, w2, grad_out)
    same_dtype = grads_of(monarch_matmul_reference, x, w1, w2, grad_out) if dtype in LOW_PRECISION else [None] * 3
    for label, o, t, s in zip(("dx", "dw1", "dw2"), ours, truth, same_dtype):
        assert o.dtype == dtype and o.shape == t.shape
        assert_close_to_ref(f"{name} {label}", o, t, s)


NEEDS_GRAD = [("x",), ("w1", "w2"), ("w1",), ("w2",), ("x", "w2"), ("x", "w1", "w2")]


@pytest.mark.parametrize("needs", NEEDS_GRAD, ids="+".join)
@pytest.mark.parametrize("device", devices)
def test_needs_input_grad_combinations(needs, device):
    """Only the inputs that require grad get a gradient, and those are right."""
    inputs = dict(zip(("x", "w1", "w2"), make_inputs((5,), (3, 5, 7), (5, 9, 3), device=device)))
    for name in needs:
        inputs[name].requires_grad_(True)
    out = lowrank.monarch_matmul(**inputs)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    truth = dict(zip(("x", "w1", "w2"), grads_of_reference64(*inputs.values(), grad_out)))
    for name, t in inputs.items():
        if name in needs:
            assert_close_to_ref(f"d{name}", t.grad, truth[name])
        else:
            assert t.grad is None


def test_double_backward_matches_reference_or_raises():
    """Second-order gradients (e.g. a gradient penalty) must be right or refused, never silently zero."""
    inputs = make_inputs((3,), (4, 4, 4), (4, 4, 4), torch.float64, requires_grad=True)

    def second_order(fn):
        gx, = torch.autograd.grad(fn(*inputs).square().sum(), inputs[0], create_graph=True)
        return torch.autograd.grad(gx.square().sum(), inputs, allow_unused=True)

    truth = second_order(monarch_matmul_reference)
    try:
        ours = second_order(lowrank.monarch_matmul)
    except RuntimeError:
        return  # refusing is acceptable
    for o, t in zip(ours, truth):
        assert o is not None
        torch.testing.assert_close(o, t)


@pytest.mark.parametrize("need_x,need_w", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("device", devices)
def test_backward_op_flags(need_x, need_w, device):
    """Gradients not asked for come back as (0,)-shaped empties; the others are right."""
    x, w1, w2 = make_inputs((4,), (3, 5, 7), (5, 9, 3), device=device)
    grad_out = torch.randn(4, 45, device=device)
    dx, dw1, dw2 = torch.ops.lowrank.monarch_matmul_backward(grad_out, x, w1, w2, need_x, need_w)
    tx, tw1, tw2 = grads_of_reference64(x, w1, w2, grad_out)
    if need_x:
        assert_close_to_ref("dx", dx, tx)
    else:
        assert dx.shape == (0,)
    if need_w:
        assert_close_to_ref("dw1", dw1, tw1)
        assert_close_to_ref("dw2", dw2, tw2)
    else:
        assert dw1.shape == (0,) and dw2.shape == (0,)


@pytest.mark.parametrize("device", devices)
def test_backward_op_empty_batch_gives_zero_weight_grads(device):
    x, w1, w2 = make_inputs((0,), (3, 5, 7), (5, 9, 3), device=device)
    grad_out = torch.empty(0, 45, device=device)
    dx, dw1, dw2 = torch.ops.lowrank.monarch_matmul_backward(grad_out, x, w1, w2, True, True)
    assert dx.shape == (0, 21)
    assert torch.equal(dw1, torch.zeros_like(w1)) and torch.equal(dw2, torch.zeros_like(w2))


@pytest.mark.parametrize("device", devices)
def test_backward_with_noncontiguous_grad_out(device):
    """out.sum() and a transposed upstream gradient both reach the kernel as strided grad_out."""
    x, w1, w2 = make_inputs((6,), (3, 5, 7), (5, 9, 3), device=device)
    grad_out = torch.randn(45, 6, device=device).T
    ours = grads_of(lowrank.monarch_matmul, x, w1, w2, grad_out)
    truth = grads_of_reference64(x, w1, w2, grad_out)
    for label, o, t in zip(("dx", "dw1", "dw2"), ours, truth):
        assert_close_to_ref(label, o, t)
    ours = grads_of(lambda *a: lowrank.monarch_matmul(*a).sum(), x, w1, w2, torch.tensor(1.0, device=device))
    truth = grads_of_reference64(x, w1, w2, torch.ones(6, 45))
    for label, o, t in zip(("dx", "dw1", "dw2"), ours, truth):
        assert_close_to_ref(label + " (sum)", o, t)


# --------------------------------------------------------------------------------------------------------------
# 2b. Keeping the middle activation (save_middle; CPU only): same gradients, the documented policy
# --------------------------------------------------------------------------------------------------------------
# Blocks of at most 128 run the CPU kernel's fused tile schedule, larger ones the GEMM-per-step schedule:
# both are covered with the middle activation kept and recomputed.
SAVE_SHAPES = [("small_blocks", (9,), (3, 5, 7), (5, 9, 3)), ML_3072_768, ML_768_3072, TILE_EDGES, TALL_TWO_PASS,
               ("two_pass_batch_dims", (2, 3), (2, 130, 3), (2, 5, 130))]


@pytest.mark.parametrize("save_middle", [True, False, None], ids=lambda v: f"save_{v}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=_id)
@pytest.mark.parametrize("shape", SAVE_SHAPES, ids=shape_id)
def test_save_middle_gradients_match_reference(shape, dtype, save_middle):
    name, lead, s1, s2 = shape
    x, w1, w2 = make_inputs(lead, s1, s2, dtype)
    grad_out = torch.randn(*lead, s2[0] * s2[1]).to(dtype)
    out = lowrank.monarch_matmul(x, w1, w2, save_middle=save_middle)
    assert_close_to_ref(f"{name} out", out, reference64(x, w1, w2),
                        monarch_matmul_reference(x, w1, w2) if dtype in LOW_PRECISION else None)
    ours = grads_of(lambda *a: lowrank.monarch_matmul(*a, save_middle=save_middle), x, w1, w2, grad_out)
    truth = grads_of_reference64(x, w1, w2, grad_out)
    same_dtype = grads_of(monarch_matmul_reference, x, w1, w2, grad_out) if dtype in LOW_PRECISION else [None] * 3
    for label, o, t, sd in zip(("dx", "dw1", "dw2"), ours, truth, same_dtype):
        assert o.dtype == dtype
        assert_close_to_ref(f"{name} {label}", o, t, sd)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("shape", [TILE_EDGES, TALL_TWO_PASS, ML_3072_768], ids=shape_id)
def test_gemm_schedules_any_thread_count(shape, threads):
    """The CPU GEMMs pick their task split from the thread count (whole-row tasks, or row tiles over a
    pre-packed B): each split gives the reference's output and gradients."""
    name, lead, s1, s2 = shape
    x, w1, w2 = make_inputs(lead, s1, s2)
    grad_out = torch.randn(*lead, s2[0] * s2[1])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = lowrank.monarch_matmul(x, w1, w2)
        ours = grads_of(lowrank.monarch_matmul, x, w1, w2, grad_out)
    finally:
        torch.set_num_threads(before)
    assert_close_to_ref(f"{name} out", out, reference64(x, w1, w2))
    for label, o, t in zip(("dx", "dw1", "dw2"), ours, grads_of_reference64(x, w1, w2, grad_out)):
        assert_close_to_ref(f"{name} {label}", o, t)


@pytest.mark.parametrize("shape", [("small", (2,), (3, 5, 7), (5, 9, 3)), ("two_pass", (2,), (2, 130, 2), (2, 3, 130))],
                         ids=shape_id)
def test_gradcheck_float64_saving(shape):
    _, lead, s1, s2 = shape
    inputs = make_inputs(lead, s1, s2, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: lowrank.monarch_matmul(*a, save_middle=True), inputs, fast_mode=True)


def _saved_numels(fn) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of every tensor autograd saves while fn runs."""
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=_id)
def test_save_middle_policy(dtype):
    """None keeps y on the CPU exactly when a block dimension exceeds 128 and a weight needs a gradient;
    kept, y is (x's leading dims, k·q) in the accumulation dtype; without grad mode nothing is kept."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    big = make_inputs((2, 3), (2, 130, 3), (2, 5, 130), dtype, requires_grad=True)
    small = make_inputs((2, 3), (3, 5, 7), (5, 9, 3), dtype, requires_grad=True)
    mid_big = ((2, 3, 260), acc)

    assert mid_big in _saved_numels(lambda: lowrank.monarch_matmul(*big))
    assert mid_big in _saved_numels(lambda: lowrank.monarch_matmul(*big, save_middle=True))
    assert mid_big not in _saved_numels(lambda: lowrank.monarch_matmul(*big, save_middle=False))
    assert ((2, 3, 15), acc) not in _saved_numels(lambda: lowrank.monarch_matmul(*small))
    assert ((2, 3, 15), acc) in _saved_numels(lambda: lowrank.monarch_matmul(*small, save_middle=True))
    x, w1, w2 = big
    frozen = (x, w1.detach(), w2.detach())  # only x needs a gradient: dx does not use y
    assert mid_big not in _saved_numels(lambda: lowrank.monarch_matmul(*frozen, save_middle=True))
    with torch.no_grad():
        out = lowrank.monarch_matmul(*big, save_middle=True)
    assert out.grad_fn is None
    torch.testing.assert_close(out, lowrank.monarch_matmul(*big, save_middle=False).detach(), rtol=0, atol=0)


def test_forward_saving_op_values_and_mid():
    """The op's out equals monarch_matmul's bit for bit; mid is y = BD(w1)·x in the accumulation dtype."""
    for s1, s2 in (((3, 5, 7), (5, 9, 3)), ((2, 130, 3), (2, 5, 130))):
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            x, w1, w2 = make_inputs((2, 4), s1, s2, dtype)
            out, mid = torch.ops.lowrank.monarch_matmul_forward_saving(x, w1, w2)
            assert torch.equal(out, torch.ops.lowrank.monarch_matmul(x, w1, w2))
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            assert mid.dtype == acc and mid.shape == (2, 4, s1[0] * s1[1])
            x64, w164 = as64(x, w1)
            y = torch.einsum("bkp,kqp->bkq", x64.reshape(-1, s1[0], s1[2]), w164).reshape(2, 4, -1)
            # fp32 accumulation of bf16 / fp32 products: the mid stays within fp32 rounding of y
            tol = 1e-10 if dtype == torch.float64 else 1e-5
            err = (mid.double() - y).abs().max().item()
            assert err <= tol * max(y.abs().max().item(), 1.0), f"mid of {dtype}: max err {err:.3e}"


def test_backward_saved_rejects_a_wrong_mid():
    x, w1, w2 = make_inputs((4,), (3, 5, 7), (5, 9, 3))
    grad_out = torch.randn(4, 45)
    _, mid = torch.ops.lowrank.monarch_matmul_forward_saving(x, w1, w2)
    bwd = torch.ops.lowrank.monarch_matmul_backward_saved
    with pytest.raises(RuntimeError, match="mid must be float32"):
        bwd(grad_out, x, w1, w2, mid.double(), True, True)
    with pytest.raises(RuntimeError, match="mid must have shape"):
        bwd(grad_out, x, w1, w2, mid[:3], True, True)
    with pytest.raises(RuntimeError, match="mid must have shape"):
        bwd(grad_out, x, w1, w2, mid.reshape(2, 2, 15), True, True)
    # a non-contiguous mid of the right shape is fine
    dx, dw1, dw2 = bwd(grad_out, x, w1, w2, mid.T.contiguous().T, True, True)
    truth = grads_of_reference64(x, w1, w2, grad_out)
    for label, o, t in zip(("dx", "dw1", "dw2"), (dx, dw1, dw2), truth):
        assert_close_to_ref(label, o, t)


@pytest.mark.parametrize("save_middle", [None, True, False], ids=lambda v: f"save_{v}")
def test_meta_device_shapes_and_backward(save_middle):
    """Meta tensors (shape-only model construction and tracing) go through either training path."""
    x, w1, w2 = (torch.randn(s, device="meta", requires_grad=True) for s in ((5, 2, 12), (4, 2, 3), (4, 2, 2)))
    out = lowrank.monarch_matmul(x, w1, w2, save_middle=save_middle)
    assert out.shape == (5, 2, 8) and out.device.type == "meta"
    out.sum().backward()
    assert x.grad.shape == x.shape and w1.grad.shape == w1.shape and w2.grad.shape == w2.shape
    layer = MonarchLinear(10, 7, device="meta", save_middle=save_middle)
    assert layer(torch.randn(3, 10, device="meta")).shape == (3, 7)


@pytest.mark.parametrize("flags", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("shape", [ODD, ("two_pass", (3,), (2, 130, 3), (2, 5, 130))], ids=shape_id)
def test_opcheck_saving_ops(shape, flags):
    _, lead, s1, s2 = shape
    x, w1, w2 = make_inputs(lead, s1, s2, requires_grad=True)
    torch.library.opcheck(torch.ops.lowrank.monarch_matmul_forward_saving.default, (x, w1, w2))
    _, mid = torch.ops.lowrank.monarch_matmul_forward_saving(x.detach(), w1.detach(), w2.detach())
    grad_out = torch.randn(*lead, s2[0] * s2[1])
    torch.library.opcheck(torch.ops.lowrank.monarch_matmul_backward_saved.default,
                          (grad_out, x.detach(), w1.detach(), w2.detach(), mid, *flags))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and lowrank's CUDA kernels")
def test_save_middle_on_cuda_is_refused_or_recomputed():
    x, w1, w2 = make_inputs((4,), (3, 5, 7), (5, 9, 3), device="cuda", requires_grad=True)
    with pytest.raises(NotImplementedError, match="CPU only"):
        lowrank.monarch_matmul(x, w1, w2, save_middle=True)
    with pytest.raises(RuntimeError, match="CPU only"):
        torch.ops.lowrank.monarch_matmul_forward_saving(x, w1, w2)
    out = lowrank.monarch_matmul(x, w1, w2)  # None: recompute on CUDA
    assert "forward_saving" not in type(out.grad_fn).__name__


# --------------------------------------------------------------------------------------------------------------
# 3. Registration: schema, fake, autograd, AOT dispatch
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", OPCHECK_SHAPES, ids=shape_id)
@pytest.mark.parametrize("device", devices)
def test_opcheck_forward(shape, device):
    _, lead, s1, s2 = shape
    inputs = make_inputs(lead, s1, s2, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.lowrank.monarch_matmul.default, tuple(inputs))


@pytest.mark.parametrize("flags", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("shape", OPCHECK_SHAPES, ids=shape_id)
@pytest.mark.parametrize("device", devices)
def test_opcheck_backward(shape, device, flags):
    _, lead, s1, s2 = shape
    x, w1, w2 = make_inputs(lead, s1, s2, device=device)
    grad_out = torch.randn(*lead, s2[0] * s2[1], device=device)
    torch.library.opcheck(torch.ops.lowrank.monarch_matmul_backward.default, (grad_out, x, w1, w2, *flags))


@pytest.mark.parametrize("device", devices)
def test_opcheck_forward_bfloat16(device):
    inputs = make_inputs(*ODD[1:], dtype=torch.bfloat16, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.lowrank.monarch_matmul.default, tuple(inputs))


# --------------------------------------------------------------------------------------------------------------
# 4. torch.compile (slow on a small CPU: three tests in all)
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("save_middle", [None, True], ids=lambda v: f"save_{v}")
def test_compile_function_fullgraph(save_middle):
    torch._dynamo.reset()

    def f(x, w1, w2):
        return torch.relu(lowrank.monarch_matmul(x * 2, w1, w2, save_middle=save_middle)).sum(-1)

    x, w1, w2 = make_inputs((2, 3), (3, 5, 7), (5, 9, 3), requires_grad=True)
    compiled = torch.compile(f, fullgraph=True)
    out_c = compiled(x, w1, w2)
    out_e = f(x, w1, w2)
    torch.testing.assert_close(out_c, out_e)
    grads_c = torch.autograd.grad(out_c.sum(), (x, w1, w2))
    grads_e = torch.autograd.grad(out_e.sum(), (x, w1, w2))
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge)


def test_compile_monarch_linear_fullgraph():
    torch._dynamo.reset()
    layer = MonarchLinear(10, 7, nblocks=4)
    x = torch.randn(5, 10, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    out_c = compiled(x)
    out_e = layer(x)
    torch.testing.assert_close(out_c, out_e)
    params = (x, *layer.parameters())
    grads_c = torch.autograd.grad(out_c.square().sum(), params)
    grads_e = torch.autograd.grad(out_e.square().sum(), params)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge)


# --------------------------------------------------------------------------------------------------------------
# 5. Identities and the dense matrix
# --------------------------------------------------------------------------------------------------------------
IDENTITY_SHAPES = [((4, 4, 4), (4, 4, 4)), ((3, 5, 5), (5, 3, 3)), ((2, 6, 6), (3, 4, 4)), ((32, 32, 32), (32, 32, 32))]


@pytest.mark.parametrize("s1,s2", IDENTITY_SHAPES, ids=str)
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES, ids=_id)
def test_identity_blocks_give_identity(s1, s2, device, dtype):
    """With identity blocks the two permutations cancel (square, r = s): out = x exactly."""
    k, q, p = s1
    l, s, r = s2
    w1 = torch.eye(p, dtype=dtype, device=device).expand(k, p, p).contiguous()
    w2 = torch.eye(r, dtype=dtype, device=device).expand(l, r, r).contiguous()
    x = torch.randn(5, k * p, device=device).to(dtype)
    assert torch.equal(lowrank.monarch_matmul(x, w1, w2), x)


@pytest.mark.parametrize("s1,s2", [((4, 4, 4), (4, 4, 4)), ((3, 5, 7), (5, 3, 3)), ((6, 2, 5), (4, 3, 3))], ids=str)
@pytest.mark.parametrize("device", devices)
def test_identity_w2_gives_block_diagonal(s1, s2, device):
    """w2 = I (r = s): out = BD(w1)·x, with BD built by torch.block_diag."""
    _, w1, _ = make_inputs((1,), s1, s2, torch.float64 if device == "cpu" else torch.float32, device)
    l, s, r = s2
    w2 = torch.eye(r, dtype=w1.dtype, device=device).expand(l, r, r).contiguous()
    x = torch.randn(5, s1[0] * s1[2], dtype=w1.dtype, device=device)
    expected = as64(x)[0] @ block_diag_matrix(as64(w1)[0]).T
    assert_close_to_ref("w2 = I", lowrank.monarch_matmul(x, w1, w2), expected)


@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=shape_id)
def test_dense_matrix_is_permuted_block_diagonals(shape):
    """M == P·BD(w2)·P·BD(w1): lowrank.reference.monarch_to_dense, the op applied to I, and the op on x."""
    _, _, s1, s2 = shape
    x, w1, w2 = make_inputs((6,), s1, s2, torch.float64)
    p1, p2 = monarch_permutations(*w2.shape)
    M = permutation_matrix(p2) @ block_diag_matrix(w2) @ permutation_matrix(p1) @ block_diag_matrix(w1)
    torch.testing.assert_close(monarch_dense_independent(w1, w2), M, rtol=0, atol=0)
    torch.testing.assert_close(monarch_to_dense(w1, w2), M, rtol=1e-12, atol=1e-12)
    eye = torch.eye(x.shape[-1], dtype=torch.float64)
    torch.testing.assert_close(lowrank.monarch_matmul(eye, w1, w2).T, M, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lowrank.monarch_matmul(x, w1, w2), x @ M.T, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------------------------
# 6. MonarchLinear
# --------------------------------------------------------------------------------------------------------------
# (in, out, nblocks, w1 shape, w2 shape, saving or None)
LINEAR_CONFIGS = [
    (768, 3072, 4, (4, 192, 192), (4, 768, 192), 0.3125),
    (3072, 768, 4, (4, 192, 768), (4, 192, 192), 0.3125),
    (10, 7, 4, (4, 2, 3), (4, 2, 2), None),
    (1024, 1024, 32, (32, 32, 32), (32, 32, 32), 0.0625),
    (33, 17, 3, (3, 6, 11), (3, 6, 6), None),
    (16, 16, 4, (4, 4, 4), (4, 4, 4), 0.5),
]


def _linear_id(cfg):
    return f"{cfg[0]}to{cfg[1]}_nb{cfg[2]}"


@pytest.mark.parametrize("cfg", LINEAR_CONFIGS, ids=_linear_id)
def test_monarch_linear_factor_shapes(cfg):
    fin, fout, nb, s1, s2, saving = cfg
    assert monarch_factor_shapes(fin, fout, nb) == (s1, s2)
    layer = MonarchLinear(fin, fout, nblocks=nb)
    assert layer.blkdiag1.shape == s1 and layer.blkdiag2.shape == s2
    assert layer.bias.shape == (fout,)
    expected = saving if saving is not None else (math.prod(s1) + math.prod(s2)) / (fin * fout)
    assert layer.saving == pytest.approx(expected)
    assert layer.to_dense().shape == (fout, fin)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cfg", LINEAR_CONFIGS, ids=_linear_id)
@pytest.mark.parametrize("device", devices)
def test_monarch_linear_forward_equals_dense(cfg, device, bias):
    fin, fout, nb = cfg[:3]
    layer = MonarchLinear(fin, fout, nblocks=nb, bias=bias, device=device)
    assert (layer.bias is not None) == bias
    x = torch.randn(2, 3, fin, device=device)
    out = layer(x)
    assert out.shape == (2, 3, fout)
    dense = monarch_dense_independent(layer.blkdiag1, layer.blkdiag2)[:fout, :fin]
    torch.testing.assert_close(layer.to_dense().detach().cpu().double(), dense, rtol=1e-6, atol=1e-6)
    expected = as64(x)[0] @ dense.T
    if bias:
        expected = expected + as64(layer.bias)[0]
    assert_close_to_ref("MonarchLinear", out, expected)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES, ids=_id)
def test_monarch_linear_dtype_device_kwargs(device, dtype):
    layer = MonarchLinear(33, 17, nblocks=3, device=device, dtype=dtype)
    for p in layer.parameters():
        assert p.dtype == dtype and p.device.type == device
    out = layer(torch.randn(4, 33, device=device).to(dtype))
    assert out.dtype == dtype and out.device.type == device and out.shape == (4, 17)


@pytest.mark.parametrize("cfg", [LINEAR_CONFIGS[2], LINEAR_CONFIGS[4], LINEAR_CONFIGS[0]], ids=_linear_id)
@pytest.mark.parametrize("device", devices)
def test_monarch_linear_gradients_flow(cfg, device):
    """Gradients reach blkdiag1, blkdiag2, bias and x, and equal those of the dense formulation."""
    fin, fout, nb = cfg[:3]
    layer = MonarchLinear(fin, fout, nblocks=nb, device=device)
    x = torch.randn(6, fin, device=device, requires_grad=True)
    target = torch.randn(6, fout, device=device)
    params = (x, layer.blkdiag1, layer.blkdiag2, layer.bias)
    ours = torch.autograd.grad(F.mse_loss(layer(x), target), params)
    dense = torch.autograd.grad(F.mse_loss(x @ layer.to_dense().T + layer.bias, target), params)
    for name, o, d in zip(("x", "blkdiag1", "blkdiag2", "bias"), ours, dense):
        assert o.shape == d.shape and o.abs().sum() > 0, name
        torch.testing.assert_close(o, d, rtol=1e-4, atol=1e-6, msg=name)


def test_monarch_linear_training_loss_falls():
    """A few Adam steps fitting a fixed linear map bring the loss down."""
    teacher = nn.Linear(32, 24)
    student = MonarchLinear(32, 24, nblocks=4)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    x = torch.randn(64, 32)
    with torch.no_grad():
        y = teacher(x)
    losses = []
    for _ in range(60):
        loss = F.mse_loss(student(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("device", devices)
def test_monarch_linear_wrong_width(device):
    layer = MonarchLinear(10, 7, device=device)
    with pytest.raises(ValueError, match=r"expected input \(\.\.\., 10\)"):
        layer(torch.randn(3, 12, device=device))


@pytest.mark.parametrize("args", [(0, 8, 4), (8, 0, 4), (8, 8, 0)])
def test_monarch_factor_shapes_rejects_nonpositive(args):
    with pytest.raises(ValueError, match="positive sizes"):
        monarch_factor_shapes(*args)


# --------------------------------------------------------------------------------------------------------------
# 7. Projection of a dense weight onto Monarch matrices
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture
def one_thread():
    """torch's batched CPU SVD slows down 10-300x with 2 threads on a small (and busy) machine; one is enough."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_monarch_dense(s1, s2, dtype=torch.float64):
    _, w1, w2 = make_inputs((1,), s1, s2, dtype)
    return monarch_dense_independent(w1, w2).to(dtype)


def eckart_young_error_sq(weight: torch.Tensor, s1, s2) -> float:
    """The least squared Frobenius error of any Monarch (s1, s2) approximation of `weight` (zero-padded):
    block (c, i) — rows {d·l + c}, columns {i·p + t} — is fit alone at rank |{j : (i·q + j) mod l = c}|,
    so the error is the sum over blocks of the discarded squared singular values."""
    k, q, p = s1
    l, s, r = s2
    W = torch.zeros(l * s, k * p, dtype=torch.float64)
    W[: weight.shape[0], : weight.shape[1]] = weight.double()
    total = 0.0
    for c in range(l):
        rows = [d * l + c for d in range(s)]
        for i in range(k):
            cols = [i * p + t for t in range(p)]
            rank = sum(1 for j in range(q) if (i * q + j) % l == c)
            sig = torch.linalg.svdvals(W[rows][:, cols])
            total += sig[rank:].square().sum().item()
    return total


# (name, w1 shape, w2 shape, out, in)
PROJECTION_CASES = [
    ("sqrt_n16", (4, 4, 4), (4, 4, 4), 16, 16),
    ("sqrt_n1024_nb32", (32, 32, 32), (32, 32, 32), 1024, 1024),
    ("n768_32x24", (32, 24, 24), (24, 32, 32), 768, 768),
    ("linear_768_3072_nb4", (4, 192, 192), (4, 768, 192), 3072, 768),
    ("linear_3072_768_nb4", (4, 192, 768), (4, 192, 192), 768, 3072),
    ("fly_rect", (8, 192, 96), (24, 16, 64), 384, 768),
    ("odd", (3, 5, 7), (5, 9, 3), 45, 21),
    ("padded_10_7_nb4", (4, 2, 3), (4, 2, 2), 7, 10),
]


@pytest.mark.parametrize("case", PROJECTION_CASES, ids=lambda c: c[0])
@pytest.mark.usefixtures("one_thread")
def test_projection_round_trips(case):
    """Projecting the dense matrix of a Monarch operator gives back that operator."""
    name, s1, s2, fout, fin = case
    dense = random_monarch_dense(s1, s2)[:fout, :fin].float()
    w1, w2 = project_to_monarch(dense, s1, s2)
    assert w1.shape == s1 and w2.shape == s2 and w1.dtype == torch.float32
    back = monarch_dense_independent(w1, w2)[:fout, :fin]
    report(f"{name} round trip", back, dense.double())
    torch.testing.assert_close(back, dense.double(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cfg", [LINEAR_CONFIGS[0], LINEAR_CONFIGS[1], LINEAR_CONFIGS[2], LINEAR_CONFIGS[3]],
                         ids=_linear_id)
@pytest.mark.usefixtures("one_thread")
def test_from_dense_round_trips(cfg):
    fin, fout, nb = cfg[:3]
    original = MonarchLinear(fin, fout, nblocks=nb)
    with torch.no_grad():
        dense = original.to_dense()
    rebuilt = MonarchLinear.from_dense(dense, nblocks=nb)
    assert rebuilt.bias is None
    assert rebuilt.blkdiag1.shape == original.blkdiag1.shape and rebuilt.blkdiag2.shape == original.blkdiag2.shape
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.to_dense(), dense, rtol=1e-4, atol=1e-4)


OPTIMALITY_CASES = [PROJECTION_CASES[0], PROJECTION_CASES[2], PROJECTION_CASES[6], PROJECTION_CASES[7],
                    ("linear_48_96_nb4", (4, 12, 12), (4, 24, 12), 96, 48),
                    ("linear_96_48_nb4", (4, 12, 24), (4, 12, 12), 48, 96),
                    # each block (c, i) gets more rank slots (4) than its size (2 x 2): exact fit, spare slots zero
                    ("rank_slots_exceed_block", (2, 8, 2), (2, 2, 8), 4, 4)]


@pytest.mark.parametrize("case", OPTIMALITY_CASES, ids=lambda c: c[0])
@pytest.mark.usefixtures("one_thread")
def test_projection_attains_eckart_young_bound(case):
    """For a random dense W the projection's error equals the per-block truncated-SVD bound, and random
    perturbations of the factors never lower it. The padded case is optimal for the zero-padded W."""
    name, s1, s2, fout, fin = case
    W = torch.randn(fout, fin, dtype=torch.float64)
    w1, w2 = project_to_monarch(W, s1, s2)
    k, _, p = s1
    l, s, _ = s2
    W_padded = torch.zeros(l * s, k * p, dtype=torch.float64)
    W_padded[:fout, :fin] = W

    def error_sq(a, b):
        return (W_padded - monarch_dense_independent(a, b)).square().sum().item()

    best = error_sq(w1, w2)
    bound = eckart_young_error_sq(W, s1, s2)
    print(f"{name}: error^2 {best:.6f}, Eckart-Young bound {bound:.6f}, |W|^2 {W.square().sum().item():.3f}")
    assert best == pytest.approx(bound, rel=1e-9, abs=1e-9)
    if (fout, fin) == (l * s, k * p):
        assert (W - monarch_dense_independent(w1, w2)).square().sum().item() == pytest.approx(bound, rel=1e-9)
    for eps in (1e-6, 1e-3, 1e-1):
        for _ in range(3):
            worse = error_sq(w1 + eps * torch.randn_like(w1), w2 + eps * torch.randn_like(w2))
            assert worse >= best - 1e-9 * max(best, 1.0), f"eps={eps}: {worse} < {best}"


@pytest.mark.usefixtures("one_thread")
def test_from_dense_linear_copies_bias():
    linear = nn.Linear(10, 7)
    layer = MonarchLinear.from_dense(linear, nblocks=4)
    assert layer.in_features == 10 and layer.out_features == 7
    assert torch.equal(layer.bias.detach(), linear.bias.detach())
    linear_nobias = nn.Linear(16, 16, bias=False)
    assert MonarchLinear.from_dense(linear_nobias, nblocks=4).bias is None


@pytest.mark.usefixtures("one_thread")
def test_from_dense_linear_exact_for_monarch_weight():
    """A Linear whose weight is a Monarch matrix becomes a MonarchLinear computing the same function."""
    source = MonarchLinear(48, 96, nblocks=4)
    linear = nn.Linear(48, 96)
    with torch.no_grad():
        linear.weight.copy_(source.to_dense())
    layer = MonarchLinear.from_dense(linear, nblocks=4)
    x = torch.randn(5, 48)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), linear(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad", [torch.randn(2, 3, 4), torch.randn(5), "weight"], ids=["3d", "1d", "str"])
def test_from_dense_rejects_bad_input(bad):
    with pytest.raises(TypeError, match="nn.Linear or a 2-D"):
        MonarchLinear.from_dense(bad)


def test_project_to_monarch_rejects_bad_shapes():
    with pytest.raises(ValueError, match="k·q = l·r"):
        project_to_monarch(torch.randn(16, 16), (4, 4, 4), (4, 4, 3))
    with pytest.raises(ValueError, match="larger than the Monarch operator"):
        project_to_monarch(torch.randn(17, 16), (4, 4, 4), (4, 4, 4))


# --------------------------------------------------------------------------------------------------------------
# 8. Bad input: a clear error, never a crash or a wrong result
# --------------------------------------------------------------------------------------------------------------
def _valid(device, dtype=torch.float32):
    return make_inputs((3,), (3, 5, 7), (5, 9, 3), dtype, device)


# (name, builds (x, w1, w2) from valid ones, message substring)
BAD_FORWARD_INPUTS = [
    ("w1_2d", lambda x, w1, w2: (x, w1.reshape(15, 7), w2), "w1 must be 3-D"),
    ("w1_4d", lambda x, w1, w2: (x, w1[None], w2), "w1 must be 3-D"),
    ("w2_2d", lambda x, w1, w2: (x, w1, w2.reshape(45, 3)), "w2 must be 3-D"),
    ("x_width", lambda x, w1, w2: (x[:, :20], w1, w2), "x's last dimension"),
    ("lr_ne_kq", lambda x, w1, w2: (x, w1, w2[:, :, :2]), "l·r = k·q"),
    ("x_w1_dtype", lambda x, w1, w2: (x, w1.double(), w2), "w1 must have x's dtype"),
    ("x_w2_dtype", lambda x, w1, w2: (x, w1, w2.half()), "w2 must have x's dtype"),
    ("int_dtype", lambda x, w1, w2: (x.int(), w1.int(), w2.int()), "must be float32, float16 or bfloat16"),
    ("x_0d", lambda x, w1, w2: (x[0, 0], w1, w2), "at least 1 dimension"),
    ("zero_sized_w1", lambda x, w1, w2: (x[:, :0], w1[:, :, :0], w2), "zero-sized"),
]


@pytest.mark.parametrize("case", BAD_FORWARD_INPUTS, ids=lambda c: c[0])
@pytest.mark.parametrize("device", devices)
def test_forward_bad_input_raises(case, device):
    _, build, message = case
    with pytest.raises(RuntimeError, match=message):
        lowrank.monarch_matmul(*build(*_valid(device)))


@pytest.mark.parametrize("case", BAD_FORWARD_INPUTS, ids=lambda c: c[0])
@pytest.mark.parametrize("device", devices)
def test_backward_op_bad_input_raises(case, device):
    _, build, message = case
    x, w1, w2 = build(*_valid(device))
    grad_out = torch.zeros(3, 45, device=device).to(x.dtype)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.lowrank.monarch_matmul_backward(grad_out, x, w1, w2, True, True)


META_CASES = [c for c in BAD_FORWARD_INPUTS if c[0] != "zero_sized_w1"]


@pytest.mark.parametrize("case", META_CASES, ids=lambda c: c[0])
def test_fake_kernel_rejects_bad_input(case):
    """The fake (meta) kernel used by torch.compile rejects the same inputs with the same message."""
    _, build, message = case
    with pytest.raises(RuntimeError, match=message):
        lowrank.monarch_matmul(*build(*_valid("meta")))


BAD_GRAD_OUT = [
    ("wrong_width", lambda g: g[:, :44]),
    ("missing_batch_dim", lambda g: g[0]),
    ("extra_dim", lambda g: g[None]),
    ("wrong_batch", lambda g: g[:2]),
]


def test_fake_kernel_rejects_zero_sized_weights():
    x, w1, w2 = _valid("meta")
    with pytest.raises(RuntimeError, match="zero-sized"):
        lowrank.monarch_matmul(x[:, :0], w1[:, :, :0], w2)


@pytest.mark.parametrize("case", BAD_GRAD_OUT, ids=lambda c: c[0])
@pytest.mark.parametrize("device", devices)
def test_backward_op_rejects_grad_out_of_wrong_shape(case, device):
    x, w1, w2 = _valid(device)
    grad_out = case[1](torch.randn(3, 45, device=device))
    with pytest.raises(RuntimeError, match="grad_out must have"):
        torch.ops.lowrank.monarch_matmul_backward(grad_out, x, w1, w2, True, True)


@pytest.mark.parametrize("device", devices)
def test_backward_op_rejects_grad_out_dtype(device):
    x, w1, w2 = _valid(device)
    with pytest.raises(RuntimeError, match="grad_out must have x's dtype"):
        torch.ops.lowrank.monarch_matmul_backward(torch.randn(3, 45, device=device).double(), x, w1, w2, True, True)


def test_fake_backward_rejects_grad_out_of_wrong_shape():
    x, w1, w2 = _valid("meta")
    with pytest.raises(RuntimeError, match="grad_out"):
        torch.ops.lowrank.monarch_matmul_backward(torch.randn(3, 44, device="meta"), x, w1, w2, True, True)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and lowrank's CUDA kernels")
def test_cuda_rejects_float64():
    x, w1, w2 = _valid("cuda", torch.float64)
    with pytest.raises(RuntimeError, match="float64 on CUDA"):
        lowrank.monarch_matmul(x, w1, w2)
    with pytest.raises(RuntimeError, match="float64 on CUDA"):
        grad_out = torch.randn(3, 45, device="cuda", dtype=torch.float64)
        torch.ops.lowrank.monarch_matmul_backward(grad_out, x, w1, w2, True, True)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and lowrank's CUDA kernels")
@pytest.mark.parametrize("on_cpu", ["x", "w1", "w2"])
def test_cuda_rejects_mixed_devices(on_cpu):
    inputs = dict(zip(("x", "w1", "w2"), _valid("cuda")))
    inputs[on_cpu] = inputs[on_cpu].cpu()
    other = "w1" if on_cpu == "x" else on_cpu
    with pytest.raises(RuntimeError, match=f"{other} must be on x's device \\(got x on"):
        torch.ops.lowrank.monarch_matmul(*inputs.values())


def test_every_op_has_a_cuda_kernel_or_an_explaining_stub():
    """With the CUDA library loaded the real kernels are registered; without it (CPU-only torch, or a
    build without nvcc) each op gets a CUDA kernel that raises 'built without CUDA kernels' instead of
    the dispatcher's generic error."""
    for name in lowrank.ops.OP_NAMES:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lowrank::{name}", "CUDA"), name
    if not lowrank.has_cuda_kernels():
        assert lowrank._loader.cuda_error()
