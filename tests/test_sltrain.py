"""Tests of lowrank.sltrain_linear (forward, backward, registration), lowrank.nn.SLTrainLinear and
lowrank.nn.convert_to_sltrain.

SLTrain: y = x·(scale·B·A + S)ᵀ + bias with S.view(-1)[indices] = values (flat row-major positions
row·in + col in the (out, in) weight). Ground truth is lowrank.reference.sltrain_linear_reference run in
float64 on the CPU, plus the closed-form gradients of /work/shared/research/sltrain.md written out here.
fp32 / fp64 results must be within a relative Frobenius error of the truth; fp16 / bf16 results at most
twice as far from the float64 truth as PyTorch's own path in the same dtype (flash-attention's rule).
Errors are printed before each assert (`pytest -s` shows them).
"""
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowrank
from lowrank.nn import SLTrainLinear, convert_to_sltrain
from lowrank.reference import sltrain_linear_reference, sltrain_weight

from conftest import HAS_CUDA, devices, noncontiguous_like

LOW_PRECISION = (torch.float16, torch.bfloat16)
# Relative Frobenius error ‖ours − truth‖ / ‖truth‖ allowed for the full-precision dtypes (TF32 off).
REL_FRO = {torch.float64: 1e-12, torch.float32: 1e-5}
# Small absolute slack (relative to the output's scale) on top of the 2x rule for fp16 / bf16.
LOW_ATOL = {torch.float16: 1e-4, torch.bfloat16: 5e-4}
BAD_INPUT_ERRORS = (RuntimeError, ValueError, TypeError)
INDEX_DTYPES = [torch.int64, torch.int32]


def dtypes_on(device: str) -> list[torch.dtype]:
    extra = [torch.float64] if device == "cpu" else []
    return [torch.float32, torch.float16, torch.bfloat16, *extra]


DEVICE_DTYPES = [(dev, dt) for dev in devices for dt in dtypes_on(dev)]
GRAD_DTYPES = [(dev, dt) for dev in devices for dt in (torch.float32, torch.bfloat16, torch.float16)]


def _id(v):
    return str(v).replace("torch.", "")


# --------------------------------------------------------------------------------------------------------------
# Shapes: (name, x's leading dims, in, out, rank, nnz, scale, bias, support)
# support: "random" (sorted, uniform without replacement), "unsorted" (same, shuffled), "first" / "last"
# (one nonzero at flat index 0 / out·in − 1).
# --------------------------------------------------------------------------------------------------------------
TINY = ("tiny", (5,), 7, 6, 3, 12, 0.7, True, "random")
BATCH = ("batch_2x3", (2, 3), 7, 6, 3, 12, 0.7, True, "random")
VECTOR_X = ("x_1d", (), 7, 6, 3, 12, 0.7, True, "random")
ATTN_60M = ("60m_attn_512", (4, 64), 512, 512, 128, int(0.03 * 512 * 512), 32 / 128, False, "random")
MLP_60M = ("60m_mlp_512_1376", (2, 16), 512, 1376, 128, int(0.03 * 512 * 1376), 32 / 128, False, "random")
UNALIGNED = ("unaligned_256_683", (9,), 256, 683, 64, int(0.03 * 256 * 683), 8 / 64, True, "random")
UNALIGNED_T = ("unaligned_683_256", (9,), 683, 256, 64, int(0.03 * 683 * 256), 8 / 64, False, "random")
R1 = ("r1", (4,), 16, 12, 1, 20, 2.0, True, "random")
NNZ1_FIRST = ("nnz1_first", (3,), 9, 5, 2, 1, 0.5, False, "first")
NNZ1_LAST = ("nnz1_last", (3,), 9, 5, 2, 1, 0.5, True, "last")
UNSORTED = ("unsorted_support", (6,), 24, 20, 4, 50, 1.5, True, "unsorted")
FULL_SUPPORT = ("full_support", (4,), 8, 6, 2, 48, 1.0, True, "random")  # δ = 1: every entry is a nonzero
# LLaMA-1B MLP widths (2048 <-> 5461, 5461 not a multiple of 8) with a small rank and few tokens for CPU time
LLAMA1B_UP = ("llama1b_2048_5461", (2, 3), 2048, 5461, 16, int(0.03 * 2048 * 5461), 8 / 16, False, "random")
LLAMA1B_DOWN = ("llama1b_5461_2048", (5,), 5461, 2048, 16, int(0.03 * 5461 * 2048), 8 / 16, True, "random")
MEDIUM = ("medium_256_192", (3, 40), 256, 192, 32, int(0.05 * 256 * 192), 0.5, True, "random")

VALUE_SHAPES = [TINY, BATCH, VECTOR_X, ATTN_60M, MLP_60M, UNALIGNED, UNALIGNED_T, R1, NNZ1_FIRST, NNZ1_LAST,
                UNSORTED, FULL_SUPPORT, LLAMA1B_UP, LLAMA1B_DOWN]
GRAD_SHAPES = [MEDIUM, BATCH, UNALIGNED, R1, NNZ1_LAST, UNSORTED, LLAMA1B_DOWN]
GRADCHECK_SHAPES = [TINY, BATCH, VECTOR_X, ("r1_small", (3,), 5, 4, 1, 6, 1.3, True, "random"),
                    ("nnz1_last_small", (2,), 5, 4, 2, 1, 0.9, True, "last")]
OPCHECK_SHAPES = [TINY, BATCH, NNZ1_FIRST]


def shape_id(shape) -> str:
    return shape[0]


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------
ARG_NAMES = ("x", "A", "B", "values", "indices", "scale", "bias")
FLOAT_ARGS = ("x", "A", "B", "values", "bias")


def make_support(fin: int, fout: int, nnz: int, kind: str = "random", index_dtype=torch.int64) -> torch.Tensor:
    if kind == "first":
        idx = torch.tensor([0])
    elif kind == "last":
        idx = torch.tensor([fout * fin - 1])
    else:
        idx = torch.randperm(fout * fin)[:nnz].sort().values
        if kind == "unsorted":
            idx = idx[torch.randperm(nnz)]
            assert not torch.equal(idx, idx.sort().values)
    assert idx.numel() == nnz
    return idx.to(index_dtype)


def make_inputs(shape, dtype=torch.float32, device="cpu", index_dtype=torch.int64, requires_grad=False,
                zero_B=False) -> dict:
    """All arguments of sltrain_linear as a dict, drawn in fp32 on the CPU, then cast and moved. B is random
    (not SLTrain's zero init) unless zero_B, so both terms of W matter."""
    _, lead, fin, fout, r, nnz, scale, bias, support = shape
    x = torch.randn(*lead, fin)
    A = torch.randn(r, fin) / math.sqrt(fin)
    B = torch.zeros(fout, r) if zero_B else torch.randn(fout, r) / math.sqrt(r)
    values = torch.randn(nnz)
    b = torch.randn(fout) if bias else None
    idx = make_support(fin, fout, nnz, support, index_dtype).to(device)
    out = {"x": x, "A": A, "B": B, "values": values, "indices": idx, "scale": scale, "bias": b}
    for name in FLOAT_ARGS:
        if out[name] is not None:
            out[name] = out[name].to(device=device, dtype=dtype).requires_grad_(requires_grad)
    return out


def as64(t):
    if t is None or not isinstance(t, torch.Tensor):
        return t
    t = t.detach().to("cpu")
    return t if not t.is_floating_point() else t.to(torch.float64)


def inputs64(inputs: dict) -> dict:
    return {k: as64(v) for k, v in inputs.items()}


def reference64(inputs: dict) -> torch.Tensor:
    return sltrain_linear_reference(**inputs64(inputs))


def call(inputs: dict, **kw) -> torch.Tensor:
    return lowrank.sltrain_linear(**inputs, **kw)


def report(name: str, ours: torch.Tensor, ref64: torch.Tensor) -> tuple[float, float]:
    """Prints and returns (max abs error, relative Frobenius error)."""
    err = ours.detach().to("cpu", torch.float64) - ref64
    max_err = err.abs().max().item() if err.numel() else 0.0
    mean_err = err.abs().mean().item() if err.numel() else 0.0
    ref_norm = ref64.norm().item()
    rel = err.norm().item() / ref_norm if ref_norm > 0 else err.norm().item()
    print(f"{name}: max err {max_err:.3e}, mean err {mean_err:.3e}, rel fro {rel:.3e}")
    return max_err, rel


def scale_of(ref64: torch.Tensor) -> float:
    return max(ref64.abs().max().item(), 1.0) if ref64.numel() else 1.0


def assert_close_to_ref(name, ours, ref64, torch_same_dtype=None):
    """fp32/fp64: relative Frobenius error within REL_FRO. fp16/bf16: max error at most twice the error of
    `torch_same_dtype` (PyTorch computing the same thing in that dtype) plus a small slack."""
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    max_err, rel = report(f"{name} ours", ours, ref64)
    if ours.dtype in LOW_PRECISION:
        base, _ = report(f"{name} torch {_id(ours.dtype)}", torch_same_dtype, ref64)
        bound = 2 * base + LOW_ATOL[ours.dtype] * scale_of(ref64)
        assert max_err <= bound, f"{name}: max err {max_err:.3e} > bound {bound:.3e}"
    else:
        assert rel <= REL_FRO[ours.dtype], f"{name}: relative Frobenius error {rel:.3e} > {REL_FRO[ours.dtype]:.0e}"


def grads_of(fn, inputs: dict, grad_out, wrt=FLOAT_ARGS) -> dict:
    """Gradients of fn(**inputs) w.r.t. the float arguments in `wrt` (those that are not None)."""
    inputs = dict(inputs)
    names = [n for n in wrt if inputs[n] is not None]
    for n in names:
        inputs[n] = inputs[n].detach().clone().requires_grad_(True)
    fn(**inputs).backward(grad_out)
    return {n: inputs[n].grad for n in names}


def grads_of_reference64(inputs: dict, grad_out, wrt=FLOAT_ARGS) -> dict:
    return grads_of(sltrain_linear_reference, inputs64(inputs), as64(grad_out), wrt)


def closed_form_grads64(inputs: dict, grad_out) -> dict:
    """The gradients of research/sltrain.md, written without autograd (float64, CPU)."""
    p = inputs64(inputs)
    x, A, B, v, idx, s = p["x"], p["A"], p["B"], p["values"], p["indices"].long(), p["scale"]
    fout, fin = B.shape[0], A.shape[1]
    x2 = x.reshape(-1, fin)
    dy = as64(grad_out).reshape(-1, fout)
    S = torch.zeros(fout * fin, dtype=torch.float64).index_put_((idx,), v, accumulate=True).reshape(fout, fin)
    rows, cols = idx // fin, idx % fin
    out = {
        "x": (s * (dy @ B) @ A + dy @ S).reshape(x.shape),
        "A": s * (dy @ B).T @ x2,
        "B": s * dy.T @ (x2 @ A.T),
        "values": (dy[:, rows] * x2[:, cols]).sum(0),
    }
    if p["bias"] is not None:
        out["bias"] = dy.sum(0)
    return out


# --------------------------------------------------------------------------------------------------------------
# 1. Forward values
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=_id)
@pytest.mark.parametrize("shape", VALUE_SHAPES, ids=shape_id)
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES, ids=_id)
def test_forward_matches_reference(shape, device, dtype, index_dtype):
    name, lead, _, fout = shape[:4]
    inputs = make_inputs(shape, dtype, device, index_dtype)
    out = call(inputs)
    assert out.dtype == dtype and out.device.type == device
    assert out.shape == (*lead, fout)
    same_dtype = sltrain_linear_reference(**inputs) if dtype in LOW_PRECISION else None
    assert_close_to_ref(name, out, reference64(inputs), same_dtype)


def test_op_and_wrapper_are_the_same():
    inputs = make_inputs(TINY)
    args = [inputs[n] for n in ARG_NAMES]
    assert torch.equal(lowrank.sltrain_linear(*args), torch.ops.lowrank.sltrain_linear(*args))
    assert torch.equal(lowrank.sltrain_linear(*args, check=False), torch.ops.lowrank.sltrain_linear(*args, False))


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("shape", [BATCH, UNALIGNED], ids=shape_id)
def test_check_false_gives_the_same_result(shape, device):
    inputs = make_inputs(shape, device=device)
    assert torch.equal(call(inputs, check=False), call(inputs, check=True))


@pytest.mark.parametrize("device", devices)
def test_leading_dims_equal_flattened(device):
    inputs = make_inputs(("b2x3x4", (2, 3, 4), 24, 20, 4, 50, 1.5, True, "random"), device=device)
    out = call(inputs)
    flat = call(dict(inputs, x=inputs["x"].reshape(-1, 24)))
    assert out.shape == (2, 3, 4, 20)
    torch.testing.assert_close(out.reshape(flat.shape), flat, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("device", devices)
def test_zero_B_is_sparse_only(device, bias):
    """B = 0 (SLTrain's init): y = x·Sᵀ + bias, S built here by index_put."""
    shape = ("b0", (6,), 24, 20, 4, 50, 1.5, bias, "random")
    inputs = make_inputs(shape, device=device, zero_B=True)
    p = inputs64(inputs)
    S = torch.zeros(20 * 24, dtype=torch.float64).index_put_((p["indices"].long(),), p["values"]).reshape(20, 24)
    expected = p["x"] @ S.T + (p["bias"] if bias else 0)
    assert_close_to_ref("B = 0", call(inputs), expected)


@pytest.mark.parametrize("device", devices)
def test_zero_values_is_lowrank_only(device):
    inputs = make_inputs(UNALIGNED, device=device)
    inputs["values"] = torch.zeros_like(inputs["values"])
    p = inputs64(inputs)
    expected = p["scale"] * (p["x"] @ p["A"].T) @ p["B"].T + p["bias"]
    assert_close_to_ref("values = 0", call(inputs), expected)


@pytest.mark.parametrize("device", devices)
def test_unsorted_indices_equal_sorted(device):
    """The support need not be sorted: permuting (indices, values) together changes nothing."""
    inputs = make_inputs(("perm", (6,), 24, 20, 4, 50, 1.5, True, "random"), device=device)
    perm = torch.randperm(50, device=device)
    shuffled = dict(inputs, indices=inputs["indices"][perm], values=inputs["values"][perm])
    torch.testing.assert_close(call(shuffled), call(inputs), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", devices)
def test_scale_is_applied_to_lowrank_term_only(device):
    inputs = make_inputs(("scale", (6,), 24, 20, 4, 50, 1.0, False, "random"), device=device)
    for s in (0.0, 0.25, 3.0):
        assert_close_to_ref(f"scale {s}", call(dict(inputs, scale=s)), reference64(dict(inputs, scale=s)))


NONCONTIG_CASES = [
    ("x_transposed", "x", "transposed"),
    ("x_sliced", "x", "sliced"),
    ("A_transposed", "A", "transposed"),
    ("B_transposed", "B", "transposed"),
    ("B_sliced", "B", "sliced"),
    ("values_strided", "values", "sliced"),
    ("indices_strided", "indices", "sliced"),
]


@pytest.mark.parametrize("case", NONCONTIG_CASES, ids=lambda c: c[0])
@pytest.mark.parametrize("device", devices)
def test_noncontiguous_inputs(case, device):
    """A strided view gives the same values and gradients as its contiguous copy."""
    _, which, kind = case
    inputs = make_inputs(("nc", (6,), 24, 20, 4, 50, 1.5, True, "random"), device=device)
    strided = dict(inputs, **{which: noncontiguous_like(inputs[which], kind)})
    out = call(strided)
    assert_close_to_ref("noncontiguous", out, reference64(inputs))
    torch.testing.assert_close(out, call(inputs), rtol=1e-6, atol=1e-6)

    # Gradients through the strided view (built from a leaf inside the graph, so it stays strided).
    grad_out = torch.randn_like(out)
    leaves = {n: inputs[n].detach().clone().requires_grad_(True) for n in FLOAT_ARGS}
    args = dict(inputs, **leaves)
    if which in leaves:
        args[which] = noncontiguous_like(leaves[which], kind)
        assert not args[which].is_contiguous()
    else:
        args[which] = strided[which]
    lowrank.sltrain_linear(**args).backward(grad_out)
    expected = grads_of(lowrank.sltrain_linear, inputs, grad_out)
    for name in FLOAT_ARGS:
        torch.testing.assert_close(leaves[name].grad, expected[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("device", devices)
def test_expanded_x(device):
    """x with a stride-0 batch dimension (one row broadcast to 4)."""
    inputs = make_inputs(("exp", (1,), 24, 20, 4, 50, 1.5, True, "random"), device=device)
    inputs["x"] = inputs["x"].expand(4, -1)
    assert_close_to_ref("expanded x", call(inputs), reference64(inputs))


@pytest.mark.parametrize("device", devices)
def test_empty_batch(device):
    """T = 0: an empty output; backward gives an empty dx and all-zero dA, dB, dvalues, dbias."""
    inputs = make_inputs(("empty", (0,), 24, 20, 4, 50, 1.5, True, "random"), device=device, requires_grad=True)
    out = call(inputs)
    assert out.shape == (0, 20)
    out.sum().backward()
    assert inputs["x"].grad.shape == (0, 24)
    for name in ("A", "B", "values", "bias"):
        assert torch.equal(inputs[name].grad, torch.zeros_like(inputs[name])), name


# --------------------------------------------------------------------------------------------------------------
# 2. Gradients
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=_id)
@pytest.mark.parametrize("shape", GRADCHECK_SHAPES, ids=shape_id)
def test_gradcheck_float64(shape, index_dtype):
    """Finite differences of x, A, B, values and bias (indices fixed)."""
    inputs = make_inputs(shape, torch.float64, index_dtype=index_dtype, requires_grad=True)
    idx, scale = inputs["indices"], inputs["scale"]

    def f(x, A, B, values, bias):
        return lowrank.sltrain_linear(x, A, B, values, idx, scale, bias)

    assert torch.autograd.gradcheck(f, tuple(inputs[n] for n in FLOAT_ARGS))


def test_gradcheck_float64_no_bias():
    inputs = make_inputs(("tiny_nobias", (5,), 7, 6, 3, 12, 0.7, False, "random"), torch.float64, requires_grad=True)
    idx, scale = inputs["indices"], inputs["scale"]

    def f(x, A, B, values):
        return lowrank.sltrain_linear(x, A, B, values, idx, scale)

    assert torch.autograd.gradcheck(f, tuple(inputs[n] for n in ("x", "A", "B", "values")))


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=_id)
@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=shape_id)
@pytest.mark.parametrize("device,dtype", GRAD_DTYPES, ids=_id)
def test_gradients_match_reference(shape, device, dtype, index_dtype):
    name, lead, _, fout = shape[:4]
    inputs = make_inputs(shape, dtype, device, index_dtype)
    grad_out = torch.randn(*lead, fout).to(device=device, dtype=dtype)
    ours = grads_of(lowrank.sltrain_linear, inputs, grad_out)
    truth = grads_of_reference64(inputs, grad_out)
    same = grads_of(sltrain_linear_reference, inputs, grad_out) if dtype in LOW_PRECISION else {}
    assert ours.keys() == truth.keys()
    for label in ours:
        assert ours[label].dtype == dtype and ours[label].device.type == device
        assert_close_to_ref(f"{name} d{label}", ours[label], truth[label], same.get(label))


@pytest.mark.parametrize("shape", [TINY, BATCH, UNSORTED, NNZ1_FIRST], ids=shape_id)
def test_gradients_match_closed_forms(shape):
    """dx = s(dy·B)A + dy·S, dA = s(dy·B)ᵀx, dB = s·dyᵀ(xAᵀ), dv_k = Σ_t dy[t, i_k]·x[t, j_k], db = Σ_t dy."""
    inputs = make_inputs(shape, torch.float64)
    grad_out = torch.randn(*shape[1], shape[3], dtype=torch.float64)
    ours = grads_of(lowrank.sltrain_linear, inputs, grad_out)
    truth = closed_form_grads64(inputs, grad_out)
    assert ours.keys() == truth.keys()
    for label in ours:
        assert_close_to_ref(f"closed form d{label}", ours[label], truth[label])


@pytest.mark.parametrize("device", devices)
def test_zero_B_gives_zero_dA_and_nonzero_dB(device):
    """At SLTrain's init (B = 0) dA = s·Bᵀ·G is exactly 0, while dB = s·G·Aᵀ is not."""
    inputs = make_inputs(MEDIUM, device=device, zero_B=True)
    grad_out = torch.randn(*MEDIUM[1], MEDIUM[3], device=device)
    ours = grads_of(lowrank.sltrain_linear, inputs, grad_out)
    assert torch.equal(ours["A"], torch.zeros_like(inputs["A"]))
    assert ours["B"].abs().max() > 0
    truth = grads_of_reference64(inputs, grad_out)
    for label in ("x", "B", "values", "bias"):
        assert_close_to_ref(f"B = 0 d{label}", ours[label], truth[label])


@pytest.mark.parametrize("device", devices)
def test_scale_reaches_lowrank_gradients(device):
    """dA and dB carry the factor s (SLTrain hands autograd s·A); dvalues does not depend on s."""
    shape = ("scale_grad", (8,), 24, 20, 4, 50, 1.0, True, "random")
    inputs = make_inputs(shape, device=device)
    grad_out = torch.randn(8, 20, device=device)
    g1 = grads_of(lowrank.sltrain_linear, dict(inputs, scale=0.5), grad_out)
    g3 = grads_of(lowrank.sltrain_linear, dict(inputs, scale=1.5), grad_out)
    for label in ("A", "B"):
        torch.testing.assert_close(g3[label], 3 * g1[label], rtol=1e-5, atol=1e-6, msg=label)
    torch.testing.assert_close(g3["values"], g1["values"], rtol=1e-6, atol=1e-6)
    for s, g in ((0.5, g1), (1.5, g3)):
        truth = closed_form_grads64(dict(inputs, scale=s), grad_out)
        for label in g:
            assert_close_to_ref(f"scale {s} d{label}", g[label], truth[label])


NEEDS_GRAD = [("x",), ("values",), ("A", "B"), ("A",), ("B",), ("bias",), ("x", "values"), ("A", "B", "values"),
              ("x", "A", "B", "values", "bias")]


@pytest.mark.parametrize("needs", NEEDS_GRAD, ids="+".join)
@pytest.mark.parametrize("device", devices)
def test_needs_input_grad_combinations(needs, device):
    """Only the inputs that require grad get a gradient, and those are right."""
    inputs = make_inputs(("needs", (7,), 24, 20, 4, 50, 1.5, True, "random"), device=device)
    for name in needs:
        inputs[name].requires_grad_(True)
    out = call(inputs)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    truth = grads_of_reference64(inputs, grad_out)
    for name in FLOAT_ARGS:
        if name in needs:
            assert_close_to_ref(f"d{name}", inputs[name].grad, truth[name])
        else:
            assert inputs[name].grad is None, name


def test_no_grad_needed_gives_no_graph():
    inputs = make_inputs(TINY)
    assert call(inputs).grad_fn is None


def test_double_backward_matches_reference_or_raises():
    """Second-order gradients (e.g. a gradient penalty) must be right or refused, never silently zero."""
    inputs = make_inputs(TINY, torch.float64, requires_grad=True)
    wrt = [inputs[n] for n in FLOAT_ARGS]

    def second_order(fn):
        gx, = torch.autograd.grad(fn(**inputs).square().sum(), inputs["x"], create_graph=True)
        return torch.autograd.grad(gx.square().sum(), wrt, allow_unused=True)

    truth = second_order(sltrain_linear_reference)
    try:
        ours = second_order(lowrank.sltrain_linear)
    except (RuntimeError, NotImplementedError):
        return  # refusing is acceptable
    for o, t in zip(ours, truth):
        if t is None:
            continue
        assert o is not None
        torch.testing.assert_close(o, t)


BACKWARD_FLAGS = [  # (has_bias, need_grad_x, need_grad_lowrank, need_grad_values)
    (True, True, True, True), (False, True, True, True), (True, True, False, False), (True, False, True, False),
    (True, False, False, True), (False, False, False, False), (False, True, False, True),
]


@pytest.mark.parametrize("flags", BACKWARD_FLAGS, ids=lambda f: "".join("1" if v else "0" for v in f))
@pytest.mark.parametrize("device", devices)
def test_backward_op_flags(flags, device):
    """Gradients not asked for come back as (0,)-shaped empties; the others are right."""
    has_bias, need_x, need_lr, need_v = flags
    inputs = make_inputs(("flags", (4,), 24, 20, 4, 50, 1.5, has_bias, "random"), device=device)
    grad_out = torch.randn(4, 20, device=device)
    dx, dA, dB, dv, db = torch.ops.lowrank.sltrain_linear_backward(
        grad_out, inputs["x"], inputs["A"], inputs["B"], inputs["values"], inputs["indices"], inputs["scale"],
        has_bias, need_x, need_lr, need_v)
    truth = closed_form_grads64(inputs, grad_out)
    for label, got, asked in (("x", dx, need_x), ("A", dA, need_lr), ("B", dB, need_lr), ("values", dv, need_v),
                              ("bias", db, has_bias)):
        if asked:
            assert_close_to_ref(f"d{label}", got, truth[label])
        else:
            assert got.shape == (0,), f"d{label}: {tuple(got.shape)}"


@pytest.mark.parametrize("device", devices)
def test_backward_with_noncontiguous_grad_out(device):
    """out.sum() and a transposed upstream gradient both reach the kernel as strided grad_out."""
    inputs = make_inputs(("nc_grad", (6,), 24, 20, 4, 50, 1.5, True, "random"), device=device)
    grad_out = torch.randn(20, 6, device=device).T
    ours = grads_of(lowrank.sltrain_linear, inputs, grad_out)
    truth = closed_form_grads64(inputs, grad_out)
    for label in ours:
        assert_close_to_ref(f"d{label}", ours[label], truth[label])
    ours = grads_of(lambda **kw: lowrank.sltrain_linear(**kw).sum(), inputs, torch.tensor(1.0, device=device))
    truth = closed_form_grads64(inputs, torch.ones(6, 20))
    for label in ours:
        assert_close_to_ref(f"d{label} (sum)", ours[label], truth[label])


# --------------------------------------------------------------------------------------------------------------
# 3. Memory: W (out, in) is recomputed in the backward, never saved
# --------------------------------------------------------------------------------------------------------------
MEM_SHAPE = ("mem_256", (16,), 256, 256, 16, int(0.03 * 256 * 256), 2.0, True, "random")


def tensors_held_by_graph(root) -> list[torch.Tensor]:
    """Tensors reachable from the autograd graph: C++ nodes' `_saved_*` fields and Python nodes' (ctx)
    attributes, including tuples / lists of tensors."""
    found, seen, stack = [], set(), [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        candidates = []
        for attr in dir(node):
            if attr.startswith("_saved_"):
                try:
                    candidates.append(getattr(node, attr))
                except RuntimeError:
                    pass
        candidates.extend(getattr(node, "__dict__", {}).values())
        for c in candidates:
            items = c if isinstance(c, (tuple, list)) else [c]
            found.extend(t for t in items if isinstance(t, torch.Tensor))
        stack.extend(fn for fn, _ in node.next_functions)
    return found


def saved_by_forward(fn):
    """Runs fn() under saved_tensors_hooks; returns (output, shapes of every tensor saved for backward)."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, shapes


@pytest.mark.parametrize("which", ["op", "module"])
@pytest.mark.parametrize("device", devices)
def test_nothing_of_size_out_by_in_is_saved(which, device):
    _, lead, fin, fout, r, nnz = MEM_SHAPE[:6]
    inputs = make_inputs(MEM_SHAPE, device=device, requires_grad=True)
    largest_input = max(t.numel() for t in inputs.values() if isinstance(t, torch.Tensor))
    assert largest_input < fout * fin
    if which == "op":
        out, shapes = saved_by_forward(lambda: call(inputs))
    else:
        layer = SLTrainLinear(fin, fout, rank=r, density=0.03, bias=True, device=device)
        out, shapes = saved_by_forward(lambda: layer(inputs["x"]))
    print(f"saved for backward: {shapes}")
    big = [s for s in shapes if math.prod(s) >= fout * fin]
    assert not big, f"the forward saved tensors of size >= out·in = {fout * fin}: {big}"
    held = [tuple(t.shape) for t in tensors_held_by_graph(out.grad_fn) if t.numel() >= fout * fin]
    assert not held, f"the autograd graph holds tensors of size >= out·in: {held}"
    out.sum().backward()  # and the backward still runs from what was saved


# --------------------------------------------------------------------------------------------------------------
# 4. Registration: opcheck, torch.compile
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=_id)
@pytest.mark.parametrize("shape", OPCHECK_SHAPES, ids=shape_id)
@pytest.mark.parametrize("device", devices)
def test_opcheck_forward(shape, device, index_dtype):
    inputs = make_inputs(shape, device=device, index_dtype=index_dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.lowrank.sltrain_linear.default, tuple(inputs[n] for n in ARG_NAMES))


@pytest.mark.parametrize("device", devices)
def test_opcheck_forward_bfloat16_check_false(device):
    inputs = make_inputs(TINY, torch.bfloat16, device, requires_grad=True)
    torch.library.opcheck(torch.ops.lowrank.sltrain_linear.default, (*[inputs[n] for n in ARG_NAMES], False))


@pytest.mark.parametrize("flags", BACKWARD_FLAGS[:4], ids=lambda f: "".join("1" if v else "0" for v in f))
@pytest.mark.parametrize("device", devices)
def test_opcheck_backward(device, flags):
    has_bias = flags[0]
    inputs = make_inputs(("opb", (2, 3), 7, 6, 3, 12, 0.7, has_bias, "random"), device=device)
    grad_out = torch.randn(2, 3, 6, device=device)
    args = (grad_out, *[inputs[n] for n in ("x", "A", "B", "values", "indices", "scale")], *flags)
    torch.library.opcheck(torch.ops.lowrank.sltrain_linear_backward.default, args)


def test_compile_function_fullgraph():
    torch._dynamo.reset()

    def f(x, A, B, values, indices, bias):
        return torch.relu(lowrank.sltrain_linear(x * 2, A, B, values, indices, 0.25, bias)).sum(-1)

    inputs = make_inputs(("compile", (2, 3), 24, 20, 4, 50, 0.25, True, "random"), requires_grad=True)
    args = tuple(inputs[n] for n in ("x", "A", "B", "values", "indices", "bias"))
    compiled = torch.compile(f, fullgraph=True)
    out_c = compiled(*args)
    out_e = f(*args)
    torch.testing.assert_close(out_c, out_e)
    wrt = [inputs[n] for n in FLOAT_ARGS]
    grads_c = torch.autograd.grad(out_c.sum(), wrt)
    grads_e = torch.autograd.grad(out_e.sum(), wrt)
    for name, gc, ge in zip(FLOAT_ARGS, grads_c, grads_e):
        torch.testing.assert_close(gc, ge, msg=name)


def test_compile_sltrain_linear_module_fullgraph():
    torch._dynamo.reset()
    layer = SLTrainLinear(24, 20, rank=4, density=0.1, alpha=8.0, bias=True)
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(5, 24, requires_grad=True)
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
# 5. SLTrainLinear and convert_to_sltrain
# --------------------------------------------------------------------------------------------------------------
# (in, out, rank, density, alpha, bias)
MODULE_CONFIGS = [
    (64, 48, 8, 0.05, 16.0, False),
    (512, 512, 128, 0.03, 32.0, True),
    (33, 17, 1, 0.2, 4.0, True),
    (256, 683, 64, 0.03, 8.0, False),
]


def _cfg_id(cfg):
    return f"{cfg[0]}to{cfg[1]}_r{cfg[2]}"


def randomize_B(layer: SLTrainLinear):
    with torch.no_grad():
        layer.B.copy_(torch.randn_like(layer.B) / math.sqrt(layer.B.shape[1]))
    return layer


@pytest.mark.parametrize("cfg", MODULE_CONFIGS, ids=_cfg_id)
def test_module_parameters_and_init(cfg):
    fin, fout, r, density, alpha, bias = cfg
    layer = SLTrainLinear(fin, fout, r, density=density, alpha=alpha, bias=bias)
    nnz = int(density * fout * fin)
    bound = 1 / math.sqrt(fin)
    params = dict(layer.named_parameters())
    assert set(params) == {"A", "B", "values"} | ({"bias"} if bias else set())
    assert layer.A.shape == (r, fin) and layer.B.shape == (fout, r) and layer.values.shape == (nnz,)
    assert torch.equal(layer.B, torch.zeros(fout, r)), "B must start at zero"
    for name, t in (("A", layer.A), ("values", layer.values)):
        assert t.abs().max() <= bound * (1 + 1e-6), f"{name} outside U(±1/sqrt(in))"
        if t.numel() >= 200:  # U(-b, b): std b/√3, and it fills the range
            print(f"{name}: std {t.std().item():.4f} vs {bound / math.sqrt(3):.4f}, max {t.abs().max().item():.4f}")
            assert t.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15), name
            assert t.abs().max() > 0.9 * bound, name
    if bias:
        assert layer.bias.shape == (fout,)
    else:
        assert layer.bias is None
    assert layer.scale == pytest.approx(alpha / r)

    idx = layer.indices
    assert "indices" in dict(layer.named_buffers()) and "indices" not in params
    assert idx.dtype in (torch.int32, torch.int64) and idx.shape == (nnz,)
    assert idx.min() >= 0 and idx.max() < fout * fin
    assert (idx[1:] > idx[:-1]).all(), "indices must be sorted and unique"


def test_module_support_is_random_over_the_whole_weight():
    """Uniform without replacement over all out·in entries (not the first nnz, not the same every seed)."""
    torch.manual_seed(0)
    a = SLTrainLinear(128, 96, 8, density=0.05)
    torch.manual_seed(1)
    b = SLTrainLinear(128, 96, 8, density=0.05)
    assert not torch.equal(a.indices, b.indices)
    rows = a.indices.long() // 128
    print(f"rows used {rows.unique().numel()}/96, last index {a.indices.max().item()}")
    assert a.indices.max() > 0.9 * 128 * 96 and rows.unique().numel() > 80


@pytest.mark.parametrize("cfg", MODULE_CONFIGS, ids=_cfg_id)
def test_module_to_dense_equals_reference_weight(cfg):
    fin, fout, r, density, alpha, bias = cfg
    layer = randomize_B(SLTrainLinear(fin, fout, r, density=density, alpha=alpha, bias=bias))
    with torch.no_grad():
        dense = layer.to_dense()
    assert dense.shape == (fout, fin)
    expected = sltrain_weight(*(as64(t) for t in (layer.A, layer.B, layer.values, layer.indices)), alpha / r)
    assert_close_to_ref("to_dense", dense, expected)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("cfg", MODULE_CONFIGS[:3], ids=_cfg_id)
@pytest.mark.parametrize("device", devices)
def test_module_forward_equals_reference(cfg, device, bias):
    fin, fout, r, density, alpha, _ = cfg
    layer = randomize_B(SLTrainLinear(fin, fout, r, density=density, alpha=alpha, bias=bias, device=device))
    x = torch.randn(2, 3, fin, device=device)
    out = layer(x)
    assert out.shape == (2, 3, fout)
    expected = sltrain_linear_reference(as64(x), as64(layer.A), as64(layer.B), as64(layer.values),
                                        as64(layer.indices), alpha / r, as64(layer.bias))
    assert_close_to_ref("SLTrainLinear", out, expected)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES, ids=_id)
def test_module_dtype_device_kwargs(device, dtype):
    layer = SLTrainLinear(33, 17, 4, density=0.1, bias=True, device=device, dtype=dtype)
    for p in layer.parameters():
        assert p.dtype == dtype and p.device.type == device
    assert layer.indices.device.type == device and not layer.indices.is_floating_point()
    out = layer(torch.randn(4, 33, device=device).to(dtype))
    assert out.dtype == dtype and out.device.type == device and out.shape == (4, 17)


@pytest.mark.parametrize("device", devices)
def test_module_gradients_flow(device):
    """Gradients reach A, B, values, bias and x and equal those of the dense formulation."""
    layer = randomize_B(SLTrainLinear(48, 40, 6, density=0.1, alpha=12.0, bias=True, device=device))
    x = torch.randn(6, 48, device=device, requires_grad=True)
    target = torch.randn(6, 40, device=device)
    params = (x, layer.A, layer.B, layer.values, layer.bias)
    ours = torch.autograd.grad(F.mse_loss(layer(x), target), params)
    ref = torch.autograd.grad(F.mse_loss(sltrain_linear_reference(x, layer.A, layer.B, layer.values, layer.indices,
                                                                  layer.scale, layer.bias), target), params)
    for name, o, d in zip(("x", "A", "B", "values", "bias"), ours, ref):
        assert o.shape == d.shape and o.abs().sum() > 0, name
        torch.testing.assert_close(o, d, rtol=1e-4, atol=1e-6, msg=name)


def test_module_state_dict_round_trip():
    """The support travels in the state dict: a fresh module (other seed, other support) loads it and then
    computes the same function; so does one loaded from torch.save bytes."""
    torch.manual_seed(0)
    src = randomize_B(SLTrainLinear(40, 30, 5, density=0.1, alpha=10.0, bias=True))
    sd = src.state_dict()
    assert {"A", "B", "values", "indices", "bias"} <= set(sd)
    torch.manual_seed(1)
    dst = SLTrainLinear(40, 30, 5, density=0.1, alpha=10.0, bias=True)
    assert not torch.equal(dst.indices, src.indices)
    dst.load_state_dict(sd)
    assert torch.equal(dst.indices, src.indices)
    x = torch.randn(7, 40)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))
        assert torch.equal(dst.to_dense(), src.to_dense())

    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(2)
    loaded = SLTrainLinear(40, 30, 5, density=0.1, alpha=10.0, bias=True)
    loaded.load_state_dict(torch.load(buf))
    with torch.no_grad():
        assert torch.equal(loaded(x), src(x))


def test_module_training_loss_falls():
    """~100 Adam steps fitting a low-rank dense target drive the loss down (B starts at 0, so A first
    moves through B)."""
    student = SLTrainLinear(32, 24, rank=4, density=0.1, alpha=8.0)
    target = torch.randn(24, 2) @ torch.randn(2, 32) / math.sqrt(32)
    x = torch.randn(128, 32)
    y = x @ target.T
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    indices_before = student.indices.clone()
    losses = []
    for _ in range(100):
        loss = F.mse_loss(student(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.6f}")
    assert losses[-1] < 0.05 * losses[0]
    assert torch.equal(student.indices, indices_before), "the support must stay fixed during training"
    assert student.B.abs().max() > 0 and student.A.grad.abs().max() > 0


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleDict({"q": nn.Linear(32, 32, bias=False), "k": nn.Linear(32, 32, bias=False),
                                   "v": nn.Linear(32, 32, bias=False), "o": nn.Linear(32, 32, bias=False)})
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.lm_head = nn.Linear(32, 50)

    def forward(self, x):
        a = self.attn
        h = x + a["o"](a["q"](x) * a["k"](x) + a["v"](x))
        return self.lm_head(h + self.mlp(h))


def _linear_names(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, SLTrainLinear))}


@pytest.mark.parametrize("target", ["substrings", "callable"])
def test_convert_to_sltrain_replaces_targeted_linears(target):
    model = _Block()
    before = _linear_names(model)
    if target == "substrings":
        tgt = ["attn", "mlp"]
    else:
        tgt = lambda name, module: not name.startswith("lm_head")  # noqa: E731
    report = convert_to_sltrain(model, rank=8, density=0.05, alpha=16.0, target=tgt)
    assert report.model is model and set(report.replaced) == set(before) - {"lm_head"}
    after = _linear_names(model)
    assert set(after) == set(before)
    for name, old in before.items():
        new = after[name]
        if name == "lm_head":
            assert new is old, "lm_head was not targeted and must stay an nn.Linear"
            continue
        assert isinstance(new, SLTrainLinear), name
        assert (new.in_features, new.out_features) == (old.in_features, old.out_features), name
        assert new.A.shape == (8, old.in_features) and new.B.shape == (old.out_features, 8), name
        assert new.values.shape == (int(0.05 * old.in_features * old.out_features),), name
        assert new.scale == pytest.approx(16.0 / 8), name
    out = model(torch.randn(3, 32))
    assert out.shape == (3, 50)
    out.sum().backward()
    assert model.attn["q"].B.grad is not None


def test_convert_to_sltrain_sequential_by_name():
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    convert_to_sltrain(model, rank=2, density=0.1, alpha=4.0, target=["2"])
    assert isinstance(model[0], nn.Linear) and isinstance(model[2], SLTrainLinear)
    assert (model[2].in_features, model[2].out_features) == (24, 8)
    assert model(torch.randn(5, 16)).shape == (5, 8)


def test_convert_to_sltrain_keeps_bias_presence():
    """A Linear with a bias becomes an SLTrainLinear with a bias of the same shape, one without stays without."""
    model = _Block()
    convert_to_sltrain(model, rank=4, density=0.05, alpha=8.0, target=["attn", "mlp"])
    assert model.attn["q"].bias is None
    assert model.mlp[0].bias is not None and model.mlp[0].bias.shape == (64,)


# --------------------------------------------------------------------------------------------------------------
# 6. Bad input: a clear error naming the offending argument, never a crash or a wrong result
# --------------------------------------------------------------------------------------------------------------
BAD_SHAPE = ("bad", (3,), 8, 6, 2, 10, 0.5, True, "random")


def _valid(device="cpu", dtype=torch.float32):
    return make_inputs(BAD_SHAPE, dtype, device)


def _set_index(i, value):
    def build(p):
        idx = p["indices"].clone()
        idx[i] = value if not callable(value) else value(idx)
        return dict(p, indices=idx)
    return build


# (name, builds the bad inputs from valid ones, regex the message must contain, data-dependent check)
BAD_INPUTS = [
    ("index_too_large", _set_index(0, 6 * 8), r"indices", True),
    ("index_way_too_large", _set_index(-1, 10**6), r"indices", True),
    ("index_negative", _set_index(0, -1), r"indices", True),
    ("duplicate_indices", _set_index(1, lambda idx: idx[0]), r"indices", True),
    ("indices_float", lambda p: dict(p, indices=p["indices"].float()), r"indices", False),
    ("indices_int16", lambda p: dict(p, indices=p["indices"].to(torch.int16)), r"indices", False),
    ("indices_2d", lambda p: dict(p, indices=p["indices"].reshape(2, 5)), r"indices", False),
    ("values_shorter", lambda p: dict(p, values=p["values"][:-1]), r"values|indices", False),
    ("values_longer", lambda p: dict(p, values=torch.cat([p["values"], p["values"][:1]])), r"values|indices", False),
    ("values_2d", lambda p: dict(p, values=p["values"].reshape(2, 5), indices=p["indices"].reshape(2, 5)),
     r"values|indices", False),
    ("rank_mismatch", lambda p: dict(p, B=p["B"][:, :1]), r"\bA\b|\bB\b", False),
    ("x_width", lambda p: dict(p, x=p["x"][:, :7]), r"\bx\b|\bA\b", False),
    ("A_1d", lambda p: dict(p, A=p["A"].reshape(-1)), r"\bA\b", False),
    ("B_3d", lambda p: dict(p, B=p["B"][None]), r"\bB\b", False),
    ("x_A_dtype", lambda p: dict(p, A=p["A"].double()), r"\bx\b|\bA\b", False),
    ("x_B_dtype", lambda p: dict(p, B=p["B"].half()), r"\bx\b|\bB\b", False),
    ("values_dtype", lambda p: dict(p, values=p["values"].double()), r"values", False),
    ("bias_shape", lambda p: dict(p, bias=p["bias"][:-1]), r"bias", False),
    ("bias_2d", lambda p: dict(p, bias=p["bias"][None]), r"bias", False),
    ("bias_dtype", lambda p: dict(p, bias=p["bias"].double()), r"bias", False),
    ("int_x", lambda p: {k: (v.int() if k in FLOAT_ARGS and v is not None else v) for k, v in p.items()},
     r"\bx\b|float", False),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda c: c[0])
@pytest.mark.parametrize("device", devices)
def test_forward_bad_input_raises(case, device):
    _, build, message, _ = case
    with pytest.raises(BAD_INPUT_ERRORS, match=message):
        call(build(_valid(device)))


@pytest.mark.parametrize("case", [c for c in BAD_INPUTS if not c[3]], ids=lambda c: c[0])
@pytest.mark.parametrize("device", devices)
def test_check_false_still_rejects_bad_shapes_and_dtypes(case, device):
    """check=False skips only the data-dependent index checks (range, duplicates)."""
    _, build, message, _ = case
    with pytest.raises(BAD_INPUT_ERRORS, match=message):
        call(build(_valid(device)), check=False)


@pytest.mark.parametrize("case", [c for c in BAD_INPUTS if not c[3]], ids=lambda c: c[0])
def test_fake_kernel_rejects_bad_input(case):
    """The fake (meta) kernel used by torch.compile rejects the same inputs, naming the same argument."""
    _, build, message, _ = case
    with pytest.raises(BAD_INPUT_ERRORS, match=message):
        call(build(_valid("meta")))


def test_fake_kernel_output_shape():
    for check in (True, False):
        out = call(_valid("meta"), check=check)
        assert out.shape == (3, 6) and out.device.type == "meta"


@pytest.mark.parametrize("device", devices)
def test_check_false_with_duplicates_does_not_crash(device):
    """Duplicates are unchecked with check=False: any finite result of the right shape, and a backward."""
    inputs = _set_index(1, lambda idx: idx[0])(make_inputs(BAD_SHAPE, device=device, requires_grad=True))
    out = call(inputs, check=False)
    assert out.shape == (3, 6) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(inputs["values"].grad).all()


@pytest.mark.parametrize("device", devices)
def test_check_false_duplicates_add_up(device):
    """Documented: with check=False duplicates add up in W, and each copy gets the same dvalues."""
    inputs = _set_index(1, lambda idx: idx[0])(make_inputs(BAD_SHAPE, device=device))
    out = call(inputs, check=False)
    assert_close_to_ref("duplicates", out, reference64(inputs))  # the reference index_adds duplicates
    grad_out = torch.randn(3, 6, device=device)
    ours = grads_of(lambda **kw: lowrank.sltrain_linear(**kw, check=False), inputs, grad_out)
    truth = closed_form_grads64(inputs, grad_out)
    for label in ours:
        assert_close_to_ref(f"duplicates d{label}", ours[label], truth[label])
    assert ours["values"][0] == ours["values"][1]


@pytest.mark.parametrize("bad", [48, 10**6, -1, -(10**6)], ids=["out_in", "1e6", "minus1", "minus1e6"])
@pytest.mark.parametrize("device", devices)
def test_check_false_out_of_range_index_is_ignored(device, bad):
    """Documented: with check=False an out-of-range index is never written or read: the output equals that
    without the entry, its dvalues is 0, and the backward op (which has no check flag) does the same."""
    inputs = make_inputs(BAD_SHAPE, device=device)
    bad_inputs = _set_index(3, bad)(inputs)
    kept = torch.arange(10, device=device) != 3
    dropped = dict(inputs, indices=inputs["indices"][kept], values=inputs["values"][kept])
    out = call(bad_inputs, check=False)
    assert_close_to_ref("out-of-range ignored", out, reference64(dropped))
    grad_out = torch.randn(3, 6, device=device)
    ours = grads_of(lambda **kw: lowrank.sltrain_linear(**kw, check=False), bad_inputs, grad_out)
    truth = closed_form_grads64(dropped, grad_out)
    assert ours["values"][3] == 0
    for label in ours:
        got = ours[label][kept] if label == "values" else ours[label]
        assert_close_to_ref(f"out-of-range d{label}", got, truth[label])


@pytest.mark.parametrize("case", [c for c in BAD_INPUTS if c[0] in
                                  ("values_shorter", "rank_mismatch", "x_width", "indices_float", "indices_2d",
                                   "x_A_dtype")], ids=lambda c: c[0])
@pytest.mark.parametrize("device", devices)
def test_backward_op_bad_input_raises(case, device):
    _, build, message, _ = case
    p = build(_valid(device))
    grad_out = torch.randn(3, 6, device=device)
    with pytest.raises(BAD_INPUT_ERRORS, match=message):
        torch.ops.lowrank.sltrain_linear_backward(grad_out, p["x"], p["A"], p["B"], p["values"], p["indices"],
                                                  p["scale"], True, True, True, True)


@pytest.mark.parametrize("bad_grad", [lambda g: g[:, :5], lambda g: g[0], lambda g: g[None], lambda g: g[:2]],
                         ids=["wrong_width", "missing_batch_dim", "extra_dim", "wrong_batch"])
@pytest.mark.parametrize("device", devices)
def test_backward_op_rejects_grad_out_of_wrong_shape(bad_grad, device):
    p = _valid(device)
    grad_out = bad_grad(torch.randn(3, 6, device=device))
    with pytest.raises(BAD_INPUT_ERRORS, match="grad_out"):
        torch.ops.lowrank.sltrain_linear_backward(grad_out, p["x"], p["A"], p["B"], p["values"], p["indices"],
                                                  p["scale"], True, True, True, True)


@pytest.mark.parametrize("bad", [(0, 8, 4), (8, 0, 4), (8, 8, 0), (8, 8, 4, -0.1), (8, 8, 4, 1.5)],
                         ids=["in0", "out0", "rank0", "density_neg", "density_gt1"])
def test_module_rejects_bad_config(bad):
    fin, fout, r, *rest = bad
    with pytest.raises(ValueError):
        SLTrainLinear(fin, fout, r, **({"density": rest[0]} if rest else {}))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and lowrank's CUDA kernels")
def test_cuda_rejects_float64():
    with pytest.raises(RuntimeError):
        call(_valid("cuda", torch.float64))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and lowrank's CUDA kernels")
@pytest.mark.parametrize("on_cpu", ["x", "A", "B", "values", "indices", "bias"])
def test_cuda_rejects_mixed_devices(on_cpu):
    inputs = _valid("cuda")
    inputs[on_cpu] = inputs[on_cpu].cpu()
    with pytest.raises(BAD_INPUT_ERRORS, match="device"):
        call(inputs)


def test_sltrain_ops_are_registered_for_cuda():
    """Like every lowrank op: a real CUDA kernel, or a stub explaining that CUDA kernels were not built."""
    for name in ("sltrain_linear", "sltrain_linear_backward"):
        assert name in lowrank.ops.OP_NAMES
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lowrank::{name}", "CUDA"), name


# ------------------------------------------------------------------------------------------------------------
# The CPU kernel has two paths (materialize W, or low-rank + sparse), chosen per shape; force each one
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["materialize", "lowrank"])
@pytest.mark.parametrize("shape", [TINY, BATCH, UNALIGNED, UNSORTED, NNZ1_LAST], ids=shape_id)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_cpu_paths_match_reference(monkeypatch, path, shape, dtype):
    monkeypatch.setenv("LOWRANK_SLTRAIN_CPU_PATH", path)
    inputs = make_inputs(shape, dtype=dtype, index_dtype=torch.int32, requires_grad=True)
    ref_in = inputs64(inputs)
    for name in FLOAT_ARGS:
        if ref_in[name] is not None:
            ref_in[name].requires_grad_(True)
    out = lowrank.sltrain_linear(**inputs)
    ref = sltrain_linear_reference(**ref_in)
    grad = torch.randn_like(ref)
    names = [n for n in FLOAT_ARGS if inputs[n] is not None]
    ours = torch.autograd.grad(out, [inputs[n] for n in names], grad.to(dtype))
    theirs = torch.autograd.grad(ref, [ref_in[n] for n in names], grad)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for name, got, want in [("y", out, ref)] + list(zip(names, ours, theirs)):
        err = (got.double() - want).norm() / want.norm().clamp_min(1e-30)
        print(f"{path} {dtype} {name}: rel err {err:.2e}")
        assert err <= tol, f"{path} path, {name}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("path", ["materialize", "lowrank"])
def test_cpu_paths_ignore_out_of_range_indices_without_check(monkeypatch, path):
    monkeypatch.setenv("LOWRANK_SLTRAIN_CPU_PATH", path)
    inputs = make_inputs(TINY, dtype=torch.float64, requires_grad=True)
    good = inputs["indices"].clone()
    bad = good.clone()
    bad[0], bad[1] = -1, TINY[3] * TINY[2] + 5  # negative and past out·in
    keep = torch.arange(good.numel()) >= 2
    ref = sltrain_linear_reference(inputs["x"], inputs["A"], inputs["B"], inputs["values"][keep], good[keep],
                                   inputs["scale"], inputs["bias"])
    out = lowrank.sltrain_linear(inputs["x"], inputs["A"], inputs["B"], inputs["values"], bad, inputs["scale"],
                                 inputs["bias"], check=False)
    torch.testing.assert_close(out, ref)
    dv, = torch.autograd.grad(out.sum(), inputs["values"])
    assert torch.all(dv[:2] == 0)
