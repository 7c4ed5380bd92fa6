"""Tests of the iFairy decode work: every CPU W2A8 kernel (AVX-512 VBMI+VNNI, AVX2, portable) bit for bit
against the integer reference, ``lowrank.ifairy_linear_multi``, the ``in_features`` argument, the W2A8 width
cap, and the non-finite rule shared by every path: a token whose input holds a NaN or ±Inf gets NaN in all of
its outputs, the other tokens are untouched; ``ifairy_quantize`` refuses a NaN or Inf weight.

Which CPU kernel runs is chosen once per process (CPUID, capped by LOWRANK_IFAIRY_CPU_KERNEL=avx2|portable),
so the capped kernels run in child processes fed the same inputs.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import lowrank
from lowrank.ops.ifairy import MAX_W2A8_IN_FEATURES
from lowrank.reference import ifairy_linear_reference, ifairy_pack_codes

from conftest import HAS_CUDA, devices, noncontiguous_like

BAD_INPUT_ERRORS = (RuntimeError, ValueError, TypeError)

# (out, in): row counts around the 4-row and 8-row blocks, widths around the AVX2 kernel's 64-weight steps and
# the AVX-512 kernel's 256-weight chunks (a full last chunk, a masked one, one byte short); (24, 2) puts many
# zero and power-of-two quotients in the AVX-512 epilogue (its division-free path refuses those)
KERNEL_SHAPES = [(1, 1), (3, 5), (4, 63), (5, 64), (9, 65), (13, 127), (8, 129), (7, 261), (17, 1000), (24, 2),
                 (6, 255), (5, 256), (12, 257), (4, 511), (9, 768), (3, 1029)]
KERNEL_TOKENS = [1, 2, 3, 4, 5, 7, 9, 17]


def _layer(out, fin, gen):
    codes = torch.randint(0, 4, (out, fin), generator=gen)
    scales = torch.rand(2, generator=gen) + 0.05
    return ifairy_pack_codes(codes), scales


def _x(tokens, fin, gen, dtype=torch.float32):
    return (torch.randn(tokens, fin, generator=gen).to(dtype), torch.randn(tokens, fin, generator=gen).to(dtype))


def _poison(xr, xi, where):
    """Copies of (xr, xi) with the non-finite values of `where` [(part, token, column, value)] put in."""
    xr, xi = xr.clone(), xi.clone()
    for part, t, j, v in where:
        (xr if part == 0 else xi)[t, j] = v
    return xr, xi


POISON = [(0, 1, 0, float("nan")), (1, 3, -1, float("inf")), (0, 4, 2, float("-inf")), (1, 4, 5, float("nan"))]
POISONED_TOKENS = {1, 3, 4}


def _kernel_cases():
    """Inputs of the kernel sweep: exact W2A8 cases, then the non-finite ones (9 tokens, 3 of them poisoned)."""
    gen = torch.Generator().manual_seed(17)
    cases = []
    for out, fin in KERNEL_SHAPES:
        packed, scales = _layer(out, fin, gen)
        xr, xi = _x(max(KERNEL_TOKENS), fin, gen)
        cases.append(("exact", packed, scales, xr, xi))
    packed, scales = _layer(11, 70, gen)
    xr, xi = _x(9, 70, gen)
    cases.append(("nonfinite", packed, scales, *_poison(xr, xi, POISON)))
    return cases


_CHILD = """
import sys, torch, lowrank
cases = torch.load(sys.argv[1])
out = []
for kind, packed, scales, xr, xi in cases:
    if kind == "exact":
        out.append([lowrank.ifairy_linear(xr[:t], xi[:t], packed, scales) for t in {tokens}])
    else:
        out.append([lowrank.ifairy_linear(xr, xi, packed, scales, aq) for aq in (True, False)]
                   + [lowrank.ifairy_linear(xr.bfloat16(), xi.bfloat16(), packed, scales)])
torch.save(out, sys.argv[2])
""".replace("{tokens}", repr(KERNEL_TOKENS))


def _run_default(cases):
    return [([lowrank.ifairy_linear(xr[:t], xi[:t], p, s) for t in KERNEL_TOKENS] if kind == "exact" else
             [lowrank.ifairy_linear(xr, xi, p, s, aq) for aq in (True, False)]
             + [lowrank.ifairy_linear(xr.bfloat16(), xi.bfloat16(), p, s)])
            for kind, p, s, xr, xi in cases]


def test_cpu_w2a8_kernels_exact_and_nonfinite(tmp_path):
    """Each CPU kernel (the default, and the AVX2 and portable ones in children run side by side) equals the
    float64 integer-sum reference bit for bit (rounded once to float32) over odd shapes and 1-17 tokens, and
    follows the non-finite rule in W2A8, float32 adds and bfloat16 W2A8."""
    cases = _kernel_cases()
    torch.save(cases, tmp_path / "in.pt")
    children = {k: subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path / "in.pt"), str(tmp_path / f"{k}.pt")],
                                    env=dict(os.environ, LOWRANK_IFAIRY_CPU_KERNEL=k)) for k in ("avx2", "portable")}
    results = {"default": _run_default(cases)}
    for k, child in children.items():
        assert child.wait() == 0, k
        results[k] = torch.load(tmp_path / f"{k}.pt")
    for kernel, result in results.items():
        _check_kernel(kernel, cases, result)


def _check_kernel(kernel, cases, results):
    for (kind, packed, scales, xr, xi), got in zip(cases, results):
        if kind == "exact":
            for t, y in zip(KERNEL_TOKENS, got):
                want = ifairy_linear_reference(xr[:t], xi[:t], packed, scales)
                for g, w in zip(y, want):
                    assert torch.equal(g, w.float()), f"{kernel} {tuple(packed.shape)} {t} tokens"
            continue
        for y, aq in zip(got, (True, False, True)):
            want = ifairy_linear_reference(xr, xi, packed, scales, aq)
            for g, w in zip(y, want):
                for t in range(xr.shape[0]):
                    if t in POISONED_TOKENS:
                        assert torch.isnan(g[t]).all(), f"{kernel} act_quant={aq}: token {t} {g[t]}"
                        assert torch.isnan(w[t]).all(), "the reference follows the same rule"
                    else:
                        assert torch.isfinite(g[t]).all(), f"{kernel} act_quant={aq}: token {t}"
                        if g.dtype == torch.float32 and aq:
                            assert torch.equal(g[t], w[t].float())


@pytest.mark.parametrize("act_quant", [True, False], ids=["W2A8", "float"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens", [6, 45], ids=["few_tokens", "gemm_tokens"])
@pytest.mark.parametrize("device", devices)
def test_nonfinite_rule_every_path(device, tokens, dtype, act_quant):
    """Under and over the 40-token switch of the float path (add/subtract kernel vs decoded GEMM), every dtype:
    poisoned tokens are all NaN, the others equal the same call on clean input."""
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is CPU only")
    gen = torch.Generator().manual_seed(3)
    packed, scales = _layer(19, 37, gen)
    xr, xi = _x(tokens, 37, gen, dtype)
    bad_r, bad_i = _poison(xr, xi, POISON)
    to = {"device": device}
    y = lowrank.ifairy_linear(bad_r.to(**to), bad_i.to(**to), packed.to(**to), scales.to(**to), act_quant)
    clean = lowrank.ifairy_linear(xr.to(**to), xi.to(**to), packed.to(**to), scales.to(**to), act_quant)
    keep = [t for t in range(tokens) if t not in POISONED_TOKENS]
    for g, c in zip(y, clean):
        assert torch.isnan(g[sorted(POISONED_TOKENS)]).all()
        assert torch.equal(g[keep], c[keep])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("part", ["w_real", "w_imag"])
@pytest.mark.parametrize("device", devices)
def test_quantize_refuses_nonfinite_weight(device, part, value):
    wr, wi = torch.randn(5, 9, device=device), torch.randn(5, 9, device=device)
    (wr if part == "w_real" else wi)[3, 4] = value
    with pytest.raises(RuntimeError, match="ifairy_quantize: w_real and w_imag must be finite"):
        lowrank.ifairy_quantize(wr, wi)


# ------------------------------------------------------------------------------------------- limits
def test_w2a8_width_cap():
    """int32 sums are exact up to in = (2^31 − 1) // 127; past it W2A8 refuses (CPU and fake kernel), without
    the memory such a call would take (expanded inputs: the check comes before any copy)."""
    assert MAX_W2A8_IN_FEATURES == 16_909_320 and 127 * MAX_W2A8_IN_FEATURES <= 2**31 - 1
    assert 127 * (MAX_W2A8_IN_FEATURES + 1) > 2**31 - 1
    for fin, ok in ((MAX_W2A8_IN_FEATURES, True), (MAX_W2A8_IN_FEATURES + 1, False)):
        nb = (fin + 3) // 4
        meta = dict(device="meta")
        args_meta = (torch.empty(1, fin, **meta), torch.empty(1, fin, **meta),
                     torch.empty(2, nb, dtype=torch.uint8, **meta), torch.empty(2, **meta))
        if ok:
            assert lowrank.ifairy_linear(*args_meta)[0].shape == (1, 2)
            continue
        with pytest.raises(BAD_INPUT_ERRORS, match="at most 16909320 with act_quant=True"):
            lowrank.ifairy_linear(*args_meta)
        assert lowrank.ifairy_linear(*args_meta, act_quant=False)[0].shape == (1, 2)
        x = torch.zeros(1, 1).expand(1, fin)
        packed = torch.zeros(1, 1, dtype=torch.uint8).expand(2, nb)
        with pytest.raises(RuntimeError, match="at most 16909320 with act_quant=True"):
            lowrank.ifairy_linear(x, x, packed, torch.ones(2))
        with pytest.raises(RuntimeError, match="at most 16909320"):
            lowrank.ifairy_linear_multi(x, x, [packed], [torch.ones(2)])


@pytest.mark.parametrize("device", devices + ["meta"])
def test_in_features_argument(device):
    """The packed width of 130 inputs is also that of 129: in_features settles which one the caller means."""
    gen = torch.Generator().manual_seed(5)
    packed, scales = _layer(6, 130, gen)
    xr, xi = _x(2, 129, gen)
    args = [t.to(device) for t in (xr, xi, packed, scales)]
    with pytest.raises(BAD_INPUT_ERRORS, match=r"lowrank.ifairy_linear: in_features must equal x_real's last "
                                               r"dimension \(got in_features 130, x_real of shape \(2, 129\)\)"):
        lowrank.ifairy_linear(*args, in_features=130)
    with pytest.raises(BAD_INPUT_ERRORS,
                       match=r"lowrank.ifairy_linear_multi: in_features must equal .* \(got in_features 130, "):
        lowrank.ifairy_linear_multi(args[0], args[1], [args[2]], [args[3]], in_features=130)
    y = lowrank.ifairy_linear(*args, in_features=129)
    if device != "meta":
        assert all(torch.equal(a, b) for a, b in zip(y, lowrank.ifairy_linear(*args)))


# ---------------------------------------------------------------------------------- ifairy_linear_multi
MULTI_OUTS = [7, 0, 12, 5]  # q/k/v-like, one empty


@pytest.mark.parametrize("act_quant", [True, False], ids=["W2A8", "float"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("device", devices)
def test_multi_equals_separate_calls(device, dtype, act_quant):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is CPU only")
    gen = torch.Generator().manual_seed(11)
    layers = [_layer(o, 45, gen) for o in MULTI_OUTS]
    packed = [p.to(device) for p, _ in layers]
    scales = [s.to(device) for _, s in layers]
    xr, xi = (t.to(device) for t in _x(6, 45, gen, dtype))
    xr, xi = xr.reshape(2, 3, 45), noncontiguous_like(xi.reshape(2, 3, 45), "transposed")
    got = lowrank.ifairy_linear_multi(xr, xi, packed, scales, act_quant, in_features=45)
    assert len(got) == len(MULTI_OUTS)
    for (g_re, g_im), p, s, o in zip(got, packed, scales, MULTI_OUTS):
        w_re, w_im = lowrank.ifairy_linear(xr, xi, p, s, act_quant)
        assert g_re.shape == g_im.shape == (2, 3, o) and g_re.dtype == dtype
        assert torch.equal(g_re, w_re) and torch.equal(g_im, w_im)
    assert lowrank.ifairy_linear_multi(xr, xi, [], [], act_quant) == []


MULTI_BAD_INPUTS = [  # the C++ kernels and the fake (meta) name the list index alike
    ("lengths_differ", lambda p, s: (p, s[:1]), r"packed and scales must be lists of the same length"),
    ("width", lambda p, s: ([p[0], p[1][:, :-1]], s),
     r"packed\[1\] must be \(out, ceil\(in/4\)\) = \(out, 3\) for in = x_real's last dimension \(got packed\[1\] "
     r"of shape \(4, 2\), x_real of shape \(2, 10\)\)"),
    ("packed_dtype", lambda p, s: ([p[0], p[1].to(torch.int8)], s), r"packed\[1\] must be uint8 \(got int8\)"),
    ("scales_dtype", lambda p, s: (p, [s[0].double(), s[1]]), r"scales\[0\] must be float32 \[s_re, s_im\] "
                                                               r"\(got float64\)"),
    ("scales_device", lambda p, s: (p, [s[0], s[1].to("meta")]),
     r"scales\[1\] must be on packed\[1\]'s device \(got packed\[1\] on \w+, scales\[1\] on meta\)"),
]


@pytest.mark.parametrize("case", MULTI_BAD_INPUTS, ids=lambda c: c[0])
@pytest.mark.parametrize("device", devices + ["meta"])
def test_multi_bad_input_raises(device, case):
    _, change, pattern = case
    gen = torch.Generator().manual_seed(2)
    layers = [_layer(o, 10, gen) for o in (3, 4)]
    packed, scales = change([p.to(device) for p, _ in layers], [s.to(device) for _, s in layers])
    xr, xi = (t.to(device) for t in _x(2, 10, gen))
    if device == "meta" and case[0] == "scales_device":
        pytest.skip("every argument is already on meta")
    with pytest.raises(BAD_INPUT_ERRORS, match="lowrank.ifairy_linear_multi: " + pattern):
        lowrank.ifairy_linear_multi(xr, xi, packed, scales)


@pytest.mark.parametrize("device", devices)
def test_multi_opcheck_and_compile(device):
    gen = torch.Generator().manual_seed(4)
    layers = [_layer(o, 21, gen) for o in (5, 3)]
    packed = [p.to(device) for p, _ in layers]
    scales = [s.to(device) for _, s in layers]
    xr, xi = (t.to(device) for t in _x(3, 21, gen))
    for act_quant in (True, False):
        torch.library.opcheck(torch.ops.lowrank.ifairy_linear_multi.default, (xr, xi, packed, scales, act_quant, 21))
    torch.library.opcheck(torch.ops.lowrank.ifairy_linear.default, (xr, xi, packed[0], scales[0], True, 21))
    torch._dynamo.reset()

    def f(xr, xi):
        (a_re, a_im), (b_re, b_im) = lowrank.ifairy_linear_multi(xr, xi, packed, scales, in_features=21)
        return a_re, a_im * 2, b_re, b_im

    for g, w in zip(torch.compile(f, fullgraph=True)(xr, xi), f(xr, xi)):
        assert torch.equal(g, w)


@pytest.mark.skipif(HAS_CUDA, reason="the gradient refusal of the multi op is device independent")
def test_multi_gradient_request_raises():
    gen = torch.Generator().manual_seed(8)
    packed, scales = _layer(4, 8, gen)
    xr, xi = _x(2, 8, gen)
    xr.requires_grad_(True)
    (y_re, _), = lowrank.ifairy_linear_multi(xr, xi, [packed], [scales])
    with pytest.raises(RuntimeError, match="inference only"):
        y_re.sum().backward()


@pytest.mark.skipif(HAS_CUDA, reason="the wrappers' choice of path is device independent")
def test_wrappers_skip_the_refusal_only_when_no_gradient_can_flow():
    # The wrappers run below autograd when no input needs a gradient (the fixed cost of a decode step); any
    # input that does, scales included, still meets the refusal, and so do functorch's gradient transforms.
    gen = torch.Generator().manual_seed(9)
    packed, scales = _layer(5, 12, gen)
    xr, xi = _x(3, 12, gen)
    with torch.inference_mode():
        want = lowrank.ifairy_linear(xr, xi, packed, scales)
    for ys in (lowrank.ifairy_linear(xr, xi, packed, scales), lowrank.ifairy_linear_multi(xr, xi, [packed], [scales])[0]):
        assert all(torch.equal(y, w) and y.grad_fn is None and not y.requires_grad for y, w in zip(ys, want))
    for leaf in ("x_imag", "scales"):
        args = {"x_real": xr, "x_imag": xi.clone(), "scales": scales.clone()}
        args[leaf].requires_grad_(True)
        for run in (lambda: lowrank.ifairy_linear(args["x_real"], args["x_imag"], packed, args["scales"]),
                    lambda: lowrank.ifairy_linear_multi(args["x_real"], args["x_imag"], [packed], [args["scales"]])[0]):
            y_re, _ = run()
            assert y_re.requires_grad
            with pytest.raises(RuntimeError, match="inference only"):
                y_re.sum().backward()
    with pytest.raises(RuntimeError, match="inference only|functorch"):  # either refusal, never a silent zero
        torch.func.grad(lambda x: lowrank.ifairy_linear(x, xi, packed, scales)[0].sum())(xr)
