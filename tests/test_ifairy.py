"""Tests of the iFairy ops (lowrank.ifairy_quantize / ifairy_dequantize / ifairy_linear), lowrank.nn.IFairyLinear
and the example block lowrank.nn.IFairyBlock.

Format: codes 0 = -1, 1 = +1, 2 = -i, 3 = +i; packed uint8 (out, ceil(in/4)), element j of a row in byte j//4 at
bits 2·(j%4); scales float32 [s_re, s_im]. The layer is y = W·conj(x): y_re = x_re·Wrᵀ + x_im·Wiᵀ,
y_im = x_re·Wiᵀ − x_im·Wrᵀ. With act_quant each part of x is quantized per token (a = 127/max(max|x|, 1e-5),
q = clamp(round_half_even(x·a), −128, 127)) and the integer sums are exact.

Ground truth is lowrank.reference (float64), cross-checked here against numpy's complex product and against
an integer reference written out from the per-code contribution table (int64). Errors are printed before each
assert (`pytest -s` shows them).
"""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lowrank
from lowrank.nn import IFairyBlock, IFairyConfig, IFairyLinear
from lowrank.reference import (ifairy_dequantize_reference, ifairy_linear_reference,
                               ifairy_pack_codes, ifairy_quantize_activations_reference, ifairy_quantize_reference,
                               ifairy_unpack_codes)

from conftest import HAS_CUDA, devices, noncontiguous_like
from ifairy_complex128 import block_complex128 as shared_block_complex128

LOW_PRECISION = (torch.float16, torch.bfloat16)
BAD_INPUT_ERRORS = (RuntimeError, ValueError, TypeError)
# Relative Frobenius error allowed against the float64 truth (full precision; TF32 off)
REL_FRO = {torch.float64: 1e-12, torch.float32: 1e-5}
LOW_ATOL = {torch.float16: 1e-3, torch.bfloat16: 4e-3}  # slack relative to the output's scale on top of the 2x rule
# code -> (re, im) of the unit weight, straight from the format
CODE_VALUE = {0: (-1, 0), 1: (1, 0), 2: (0, -1), 3: (0, 1)}


def dtypes_on(device: str) -> list[torch.dtype]:
    return [torch.float32, torch.float16, torch.bfloat16] + ([torch.float64] if device == "cpu" else [])


DEVICE_DTYPES = [(dev, dt) for dev in devices for dt in dtypes_on(dev)]


def _id(v):
    return str(v).replace("torch.", "")


# ------------------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------------------
def random_codes(out: int, fin: int, all_four_per_row: bool = True) -> torch.Tensor:
    codes = torch.randint(0, 4, (out, fin))
    if all_four_per_row and fin >= 4:  # every row holds every code, so every table entry is exercised
        codes[:, :4] = torch.arange(4)[torch.stack([torch.randperm(4) for _ in range(out)])]
    return codes


def make_layer(out: int, fin: int, device="cpu", scales=None):
    """(codes, packed, scales) with random codes and, unless given, random positive scales."""
    codes = random_codes(out, fin)
    s = torch.tensor(scales if scales is not None else [0.02 + torch.rand(()).item(), 0.02 + torch.rand(()).item()],
                     dtype=torch.float32)
    return codes, ifairy_pack_codes(codes).to(device), s.to(device)


def make_x(lead, fin, dtype=torch.float32, device="cpu"):
    return (torch.randn(*lead, fin).to(device=device, dtype=dtype),
            torch.randn(*lead, fin).to(device=device, dtype=dtype))


def report(name: str, ours: torch.Tensor, ref64: torch.Tensor) -> tuple[float, float]:
    err = ours.detach().to("cpu", torch.float64) - ref64.cpu()
    max_err = err.abs().max().item() if err.numel() else 0.0
    norm = ref64.norm().item()
    rel = err.norm().item() / norm if norm > 0 else err.norm().item()
    print(f"{name}: max err {max_err:.3e}, rel fro {rel:.3e}")
    return max_err, rel


def assert_pair_close(name, ours, ref64, torch_same_dtype=None, rel=None):
    """fp32/fp64: relative Frobenius error within REL_FRO (or ``rel``). fp16/bf16: max error at most twice that
    of ``torch_same_dtype`` (PyTorch computing the same layer in that dtype) plus a small slack."""
    for part, got, want, same in zip(("re", "im"), ours, ref64, torch_same_dtype or (None, None)):
        assert got.shape == want.shape, f"{name} {part}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        assert torch.isfinite(got).all(), f"{name} {part}: non-finite values"
        max_err, r = report(f"{name} {part}", got, want)
        if got.dtype in LOW_PRECISION:
            base, _ = report(f"{name} {part} torch {_id(got.dtype)}", same, want)
            scale = max(want.abs().max().item(), 1e-30) if want.numel() else 1.0
            bound = 2 * base + LOW_ATOL[got.dtype] * scale
            assert max_err <= bound, f"{name} {part}: max err {max_err:.3e} > bound {bound:.3e}"
        else:
            tol = rel if rel is not None else REL_FRO[got.dtype]
            assert r <= tol, f"{name} {part}: relative Frobenius error {r:.3e} > {tol:.0e}"


def torch_same_dtype(x_real, x_imag, packed, scales):
    """The layer computed by PyTorch in x's dtype on the dequantized weights (the 2x rule's yardstick)."""
    wr, wi = ifairy_dequantize_reference(packed.cpu(), scales.cpu(), x_real.shape[-1], x_real.dtype)
    xr, xi = x_real.cpu(), x_imag.cpu()
    return F.linear(xr, wr) + F.linear(xi, wi), F.linear(xr, wi) - F.linear(xi, wr)


def integer_reference(q_r, q_i, codes, s_re, s_im, a_r=1.0, a_i=1.0):
    """y from int64 sums written out from the contribution table of w·conj(x): +1: (q_r, −q_i); −1: (−q_r, q_i);
    +i: (q_i, q_r); −i: (−q_i, −q_r). Returns float64 (y_re, y_im) and the sums A, B, C, D."""
    q_r, q_i = q_r.to(torch.int64), q_i.to(torch.int64)
    m = {c: (codes == c).to(torch.int64).T for c in range(4)}  # (in, out)
    A = q_r @ m[1] - q_r @ m[0]
    B = q_i @ m[3] - q_i @ m[2]
    C = q_i @ m[1] - q_i @ m[0]
    D = q_r @ m[3] - q_r @ m[2]
    y_re = s_re * A.double() / a_r + s_im * B.double() / a_i
    y_im = s_im * D.double() / a_r - s_re * C.double() / a_i
    return (y_re, y_im), (A, B, C, D)


def integer_x(tokens: int, fin: int, dtype, device):
    """Integer-valued parts in [−127, 127] with max|·| = 127 in every token, so a = 127/127 = 1 and q = x."""
    def part():
        q = torch.randint(-127, 128, (tokens, fin))
        q[torch.arange(tokens), torch.randint(0, fin, (tokens,))] = 127 * (2 * torch.randint(0, 2, (tokens,)) - 1)
        return q
    q_r, q_i = part(), part()
    return q_r, q_i, q_r.to(device=device, dtype=dtype), q_i.to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------------------------
# 1. The reference is the spec: check it against numpy's complex arithmetic and the notes' cases
# ------------------------------------------------------------------------------------------------------------
def test_reference_is_w_times_conj_x():
    codes, packed, scales = make_layer(9, 13)
    xr, xi = make_x((5,), 13, torch.float64)
    wr, wi = ifairy_dequantize_reference(packed, scales, 13, torch.float64)
    w = wr.numpy() + 1j * wi.numpy()
    expected = np.conj(xr.numpy() + 1j * xi.numpy()) @ w.T
    yr, yi = ifairy_linear_reference(xr, xi, packed, scales, act_quant=False)
    np.testing.assert_allclose(yr.numpy(), expected.real, atol=1e-12)
    np.testing.assert_allclose(yi.numpy(), expected.imag, atol=1e-12)
    # code values straight from the format
    for c, (re, im) in CODE_VALUE.items():
        assert (wr[codes == c] == re * scales[0].double()).all() and (wi[codes == c] == im * scales[1].double()).all()


def test_reference_act_quant_matches_integer_table():
    codes, packed, scales = make_layer(7, 21)
    xr, xi = make_x((4,), 21)
    q_r, a_r = ifairy_quantize_activations_reference(xr)
    q_i, a_i = ifairy_quantize_activations_reference(xi)
    expected, _ = integer_reference(q_r, q_i, codes, *scales.double().tolist(), a_r.double(), a_i.double())
    got = ifairy_linear_reference(xr, xi, packed, scales)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-14, atol=1e-14)


# ------------------------------------------------------------------------------------------------------------
# 2. Packing
# ------------------------------------------------------------------------------------------------------------
def test_pack_roundtrip_every_byte_value():
    every = torch.arange(256, dtype=torch.uint8).reshape(64, 4)
    codes = ifairy_unpack_codes(every, 16)
    assert torch.equal(ifairy_pack_codes(codes), every)
    for b in (0, 1, 0b11100100, 255):  # element j at bits 2·(j%4), low bits first
        row = ifairy_unpack_codes(torch.tensor([[b]], dtype=torch.uint8), 4)[0].tolist()
        assert row == [(b >> (2 * j)) & 3 for j in range(4)]


@pytest.mark.parametrize("out,fin", [(1, 1), (7, 3), (33, 5), (3, 4097), (2, 1536), (1, 5460)])
def test_pack_layout_and_roundtrip(out, fin):
    codes = random_codes(out, fin)
    packed = ifairy_pack_codes(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (out, math.ceil(fin / 4))
    assert torch.equal(ifairy_unpack_codes(packed, fin), codes.to(torch.uint8))
    j = fin - 1  # the last element: byte j//4, bits 2·(j%4); the padding codes after it are 0
    assert (packed[:, j // 4].long() >> (2 * (j % 4))).tolist() == codes[:, j].tolist()


@pytest.mark.parametrize("device", devices)
def test_dequantize_decodes_every_byte_value(device):
    """Each of the 256 bytes, as a row of 4 elements, decodes to the four weights its bit pairs name."""
    packed = torch.arange(256, dtype=torch.uint8).reshape(256, 1).to(device)
    scales = torch.tensor([0.75, 1.5], device=device)
    wr, wi = lowrank.ifairy_dequantize(packed, scales, 4)
    assert wr.dtype == wi.dtype == torch.float32 and wr.shape == (256, 4) and wr.device.type == device
    expected = torch.tensor([[CODE_VALUE[(b >> (2 * j)) & 3] for j in range(4)] for b in range(256)],
                            dtype=torch.float32)
    assert torch.equal(wr.cpu(), 0.75 * expected[..., 0]) and torch.equal(wi.cpu(), 1.5 * expected[..., 1])


@pytest.mark.parametrize("out,fin", [(1, 1), (7, 3), (33, 5), (5, 37), (3, 4097)])
@pytest.mark.parametrize("device", devices)
def test_dequantize_matches_reference(device, out, fin):
    _, packed, scales = make_layer(out, fin, device)
    got = lowrank.ifairy_dequantize(packed, scales, fin)
    want = ifairy_dequantize_reference(packed.cpu(), scales.cpu(), fin)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and g.shape == (out, fin)
        assert torch.equal(g.cpu(), w)


@pytest.mark.parametrize("device", devices)
def test_padding_codes_are_ignored(device):
    fin = 5  # the last byte holds one element and three padding codes
    codes, packed, scales = make_layer(4, fin)
    dirty = packed.clone()
    dirty[:, -1] |= 0b11111100
    xr, xi = make_x((3,), fin, device=device)
    clean_w = lowrank.ifairy_dequantize(packed.to(device), scales.to(device), fin)
    dirty_w = lowrank.ifairy_dequantize(dirty.to(device), scales.to(device), fin)
    assert all(torch.equal(a, b) for a, b in zip(clean_w, dirty_w))
    for act_quant in (True, False):
        clean = lowrank.ifairy_linear(xr, xi, packed.to(device), scales.to(device), act_quant)
        dirty_y = lowrank.ifairy_linear(xr, xi, dirty.to(device), scales.to(device), act_quant)
        assert all(torch.equal(a, b) for a, b in zip(clean, dirty_y))


# ------------------------------------------------------------------------------------------------------------
# 3. PhaseQuant
# ------------------------------------------------------------------------------------------------------------
# (w, expected code) from the notes: sectors [−π/4, π/4) -> +1, [π/4, 3π/4) -> +i, [−3π/4, −π/4) -> −i, else −1
ANGLE_CASES = [(1 + 0.5j, 1), (0.5 + 1j, 3), (-1 + 0.2j, 0), (0.2 - 1j, 2), (1 + 1j, 3), (1 - 1j, 1),
               (-1 + 1j, 0), (-1 - 1j, 2), (0j, 1),
               # more boundaries and axes, at several magnitudes
               (7 + 7j, 3), (1e-3 - 1e-3j, 1), (-1e20 + 1e20j, 0), (-3 - 3j, 2), (1 + 0j, 1), (-1 + 0j, 0),
               (1j, 3), (-1j, 2), (2.5 - 0j, 1)]


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES, ids=_id)
def test_phasequant_angle_cases(device, dtype):
    w = torch.tensor([c for c, _ in ANGLE_CASES], dtype=torch.complex128)
    wr, wi = w.real.to(dtype), w.imag.to(dtype)
    if dtype == torch.float16:  # 1e20 overflows fp16: keep the direction, shrink the magnitude
        wr, wi = w.real.clamp(-1e4, 1e4).to(dtype), w.imag.clamp(-1e4, 1e4).to(dtype)
    packed, scales = lowrank.ifairy_quantize(wr.reshape(1, -1).to(device), wi.reshape(1, -1).to(device))
    got = ifairy_unpack_codes(packed.cpu(), len(ANGLE_CASES))[0].tolist()
    assert got == [c for _, c in ANGLE_CASES]
    ref_packed, _ = ifairy_quantize_reference(wr.reshape(1, -1), wi.reshape(1, -1))
    assert torch.equal(packed.cpu(), ref_packed)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES, ids=_id)
def test_phasequant_scales_example(device, dtype):
    """W = [[2+0.1i, 0.1+4i], [−6+0i, 0−8i]]: s_re = mean(2, 6) = 4, s_im = mean(4, 8) = 6."""
    w = torch.tensor([[2 + 0.1j, 0.1 + 4j], [-6 + 0j, -8j]], dtype=torch.complex128)
    packed, scales = lowrank.ifairy_quantize(w.real.to(device, dtype), w.imag.to(device, dtype))
    assert packed.dtype == torch.uint8 and packed.shape == (2, 1)
    assert scales.dtype == torch.float32 and scales.shape == (2,)
    assert ifairy_unpack_codes(packed.cpu(), 2).tolist() == [[1, 3], [0, 2]]
    assert scales.cpu().tolist() == [4.0, 6.0]


@pytest.mark.parametrize("out,fin", [(1, 1), (7, 3), (33, 5), (64, 257), (16, 1536)])
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES, ids=_id)
def test_phasequant_random_matches_reference(device, dtype, out, fin):
    wr, wi = torch.randn(out, fin).to(dtype), torch.randn(out, fin).to(dtype)
    packed, scales = lowrank.ifairy_quantize(wr.to(device), wi.to(device))
    ref_packed, ref_scales = ifairy_quantize_reference(wr, wi)
    assert packed.shape == (out, math.ceil(fin / 4)) and packed.device.type == device
    mismatch = (ifairy_unpack_codes(packed.cpu(), fin) != ifairy_unpack_codes(ref_packed, fin)).sum().item()
    print(f"{out}x{fin} {_id(dtype)}: {mismatch} codes differ, scales {scales.tolist()} vs {ref_scales.tolist()}")
    assert mismatch == 0
    if fin % 4:
        assert (packed[:, -1].cpu().long() >> (2 * (fin % 4))).eq(0).all(), "padding codes must be 0"
    torch.testing.assert_close(scales.cpu(), ref_scales, rtol=1e-5, atol=0)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES, ids=_id)
def test_phasequant_exact_boundaries(device, dtype):
    """A third of the weights sit exactly on a sector boundary (|wr| = |wi|, every sign combination): the
    half-open sectors decide, not an atan2 rounded near π/4."""
    wr = torch.randn(40, 60).to(dtype)
    wi = torch.randn(40, 60).to(dtype)
    on_boundary = torch.rand(40, 60) < 0.33
    wi[on_boundary] = wr[on_boundary] * (2 * torch.randint(0, 2, (int(on_boundary.sum()),)) - 1).to(dtype)
    packed, scales = lowrank.ifairy_quantize(wr.to(device), wi.to(device))
    ref_packed, ref_scales = ifairy_quantize_reference(wr, wi)
    assert torch.equal(ifairy_unpack_codes(packed.cpu(), 60), ifairy_unpack_codes(ref_packed, 60))
    torch.testing.assert_close(scales.cpu(), ref_scales, rtol=1e-5, atol=0)


@pytest.mark.parametrize("device", devices)
def test_phasequant_scale_clamps(device):
    """Scales clamp to 1e-5: no weight on an axis (mean over nothing), and weights far below 1e-5."""
    wr = torch.tensor([[1.0, -2.0, 3.0]], device=device)
    packed, scales = lowrank.ifairy_quantize(wr, torch.zeros_like(wr))
    assert ifairy_unpack_codes(packed.cpu(), 3).tolist() == [[1, 0, 1]]
    assert scales[0].item() == 2.0
    assert scales[1].item() == pytest.approx(1e-5, rel=1e-6)
    tiny = torch.full((2, 4), 1e-8, device=device)
    _, scales = lowrank.ifairy_quantize(tiny, -3 * tiny)  # all −i
    assert scales.cpu().tolist() == pytest.approx([1e-5, 1e-5], rel=1e-6)


@pytest.mark.parametrize("device", devices)
def test_quantize_noncontiguous_weights(device):
    wr, wi = torch.randn(9, 13, device=device), torch.randn(9, 13, device=device)
    want = lowrank.ifairy_quantize(wr, wi)
    for kind in ("transposed", "sliced"):
        got = lowrank.ifairy_quantize(noncontiguous_like(wr, kind), noncontiguous_like(wi, kind))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), kind


@pytest.mark.parametrize("device", devices)
def test_quantize_dequantize_structure(device):
    """Every dequantized element has exactly one nonzero part: ±s_re on the real axis or ±s_im on the imaginary."""
    wr, wi = torch.randn(17, 29, device=device), torch.randn(17, 29, device=device)
    packed, scales = lowrank.ifairy_quantize(wr, wi)
    qr, qi = lowrank.ifairy_dequantize(packed, scales, 29)
    assert torch.equal((qr != 0) ^ (qi != 0), torch.ones_like(qr, dtype=torch.bool))
    assert torch.equal(qr.abs()[qr != 0].unique(), scales[:1]) and torch.equal(qi.abs()[qi != 0].unique(), scales[1:])
    # the sign of the nonzero part follows the weight's dominant axis
    on_re = wr.abs() > wi.abs()
    assert torch.equal(qr[on_re].sign(), wr[on_re].sign()) and torch.equal(qi[~on_re].sign(), wi[~on_re].sign())


# ------------------------------------------------------------------------------------------------------------
# 4. ifairy_linear with act_quant=True: exact integer sums
# ------------------------------------------------------------------------------------------------------------
EXACT_SHAPES = [(1, 1, 4), (3, 7, 5), (17, 33, 64), (4, 8, 1025), (2, 3, 4097)]  # (tokens, out, in)


@pytest.mark.parametrize("shape", EXACT_SHAPES, ids=lambda s: "t{}_o{}_i{}".format(*s))
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES, ids=_id)
def test_linear_act_quant_exact(device, dtype, shape):
    """a = 1 (max|x| = 127 per token and part), integer x, scales exact in binary: every step is exact, so
    the result equals the int64 reference (rounded once to the output dtype)."""
    tokens, out, fin = shape
    codes, packed, scales = make_layer(out, fin, device, scales=[0.75, 1.25])
    q_r, q_i, xr, xi = integer_x(tokens, fin, dtype, device)
    (want_re, want_im), _ = integer_reference(q_r, q_i, codes, 0.75, 1.25)
    y_re, y_im = lowrank.ifairy_linear(xr, xi, packed, scales, True)
    assert y_re.dtype == y_im.dtype == dtype and y_re.shape == (tokens, out) and y_re.device.type == device
    report("exact re", y_re, want_re)
    report("exact im", y_im, want_im)
    assert torch.equal(y_re.cpu(), want_re.to(dtype)) and torch.equal(y_im.cpu(), want_im.to(dtype))


@pytest.mark.parametrize("device", devices)
def test_linear_act_quant_integer_sums(device):
    """s = 1 and a = 1: y_re = A + B, y_im = D − C, the four accumulators themselves."""
    codes, packed, scales = make_layer(5, 300, device, scales=[1.0, 1.0])
    q_r, q_i, xr, xi = integer_x(6, 300, torch.float32, device)
    (want_re, want_im), (A, B, C, D) = integer_reference(q_r, q_i, codes, 1.0, 1.0)
    y_re, y_im = lowrank.ifairy_linear(xr, xi, packed, scales)
    assert torch.equal(y_re.cpu().to(torch.int64), A + B) and torch.equal(y_im.cpu().to(torch.int64), D - C)
    # s_re only scales the ±1 sums, s_im only the ±i sums
    for s, expect_re, expect_im in (([2.0, 0.0], 2 * A, -2 * C), ([0.0, 4.0], 4 * B, 4 * D)):
        y_re, y_im = lowrank.ifairy_linear(xr, xi, packed, torch.tensor(s, device=device))
        assert torch.equal(y_re.cpu().to(torch.int64), expect_re) and torch.equal(y_im.cpu().to(torch.int64),
                                                                                    expect_im)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES, ids=_id)
def test_linear_act_quant_random(device, dtype):
    """Random x: the same int8 activations and sums as the reference; only the final scaling rounds."""
    _, packed, scales = make_layer(33, 261, device)
    xr, xi = make_x((2, 9), 261, dtype, device)
    ours = lowrank.ifairy_linear(xr, xi, packed, scales, True)
    ref = ifairy_linear_reference(xr.cpu(), xi.cpu(), packed.cpu(), scales.cpu(), True)
    if dtype in LOW_PRECISION:  # one rounding of the fp32 result to the output dtype
        eps = torch.finfo(dtype).eps
        for got, want in zip(ours, ref):
            report(f"act_quant {_id(dtype)}", got, want)
            bound = eps * want.abs() + eps * 1e-2 * want.abs().max()
            assert ((got.cpu().double() - want).abs() <= bound).all()
    else:
        assert_pair_close(f"act_quant {_id(dtype)}", ours, ref, rel=2e-6)


@pytest.mark.parametrize("device", devices)
def test_activation_rounding_ties_to_even(device):
    """x·a exactly on .5 (a = 1): round half to even (torch.round), not half away from zero."""
    fin = 16
    ties = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, -126.5, 126.5, 4.5, -4.5, 0, 1, -1, 5.5])
    codes, packed, scales = make_layer(6, fin, device, scales=[1.0, 1.0])
    xr, xi = ties[None], ties.flip(0)[None]
    even = integer_reference(torch.round(xr).long(), torch.round(xi).long(), codes, 1.0, 1.0)[0]
    away = integer_reference((xr.sign() * (xr.abs() + 0.5).floor()).long(),
                             (xi.sign() * (xi.abs() + 0.5).floor()).long(), codes, 1.0, 1.0)[0]
    assert not torch.equal(even[0], away[0]), "the test must tell the two roundings apart"
    y = lowrank.ifairy_linear(xr.to(device), xi.to(device), packed, scales)
    assert torch.equal(y[0].cpu().double(), even[0]) and torch.equal(y[1].cpu().double(), even[1])


@pytest.mark.parametrize("device", devices)
def test_activation_absmax_clamp(device):
    """max|x| below 1e-5 is clamped to 1e-5: a token of 1e-7 quantizes to round(1e-7·127/1e-5) = 1, not 127."""
    codes, packed, scales = make_layer(5, 8, device, scales=[1.0, 1.0])
    xr = torch.full((1, 8), 1e-7)
    xi = torch.full((1, 8), -2.2e-7)  # x·a = −2.794: q = −3
    ours = lowrank.ifairy_linear(xr.to(device), xi.to(device), packed, scales)
    a = 127 / 1e-5
    want = integer_reference(torch.ones(1, 8).long(), -3 * torch.ones(1, 8).long(), codes, 1.0, 1.0, a, a)[0]
    ref = ifairy_linear_reference(xr, xi, packed.cpu(), scales.cpu())
    for got, w, r in zip(ours, want, ref):
        torch.testing.assert_close(got.cpu().double(), w, rtol=1e-6, atol=0)
        torch.testing.assert_close(r, w, rtol=1e-6, atol=0)


@pytest.mark.parametrize("act_quant", [True, False], ids=["W2A8", "W2Afloat"])
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES, ids=_id)
def test_zero_token_and_zero_part(device, dtype, act_quant):
    """An all-zero token gives exact zeros (no NaN); a token with one part zero is still right."""
    _, packed, scales = make_layer(7, 37, device)
    xr, xi = make_x((4,), 37, dtype, device)
    xr[1], xi[1] = 0, 0  # all zero
    xi[2] = 0  # imaginary part zero
    xr[3] = 0  # real part zero
    y = lowrank.ifairy_linear(xr, xi, packed, scales, act_quant)
    for part in y:
        assert torch.isfinite(part).all() and torch.equal(part[1].cpu(), torch.zeros(7, dtype=dtype))
    ref = ifairy_linear_reference(xr.cpu(), xi.cpu(), packed.cpu(), scales.cpu(), act_quant)
    same = torch_same_dtype(xr, xi, packed, scales) if dtype in LOW_PRECISION else None
    if act_quant and dtype in LOW_PRECISION:
        same = tuple(r.to(dtype) for r in ref)  # the reference rounded once is the best this dtype can do
    assert_pair_close("zero parts", y, ref, same, rel=2e-6 if act_quant else None)


# ------------------------------------------------------------------------------------------------------------
# 5. ifairy_linear with act_quant=False: within tolerance of float64
# ------------------------------------------------------------------------------------------------------------
# ((2, 25), 515, 37): 50 tokens take the CPU's decoded-GEMM path (>= 40 tokens), in two row chunks (512 + 3)
FLOAT_SHAPES = [((5,), 7, 3), ((2, 3), 33, 5), ((), 7, 37), ((16,), 64, 1536), ((3,), 33, 4097), ((1,), 1, 1),
                ((2, 25), 515, 37)]


@pytest.mark.parametrize("shape", FLOAT_SHAPES, ids=lambda s: f"{'x'.join(map(str, s[0])) or 'vec'}_o{s[1]}_i{s[2]}")
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES, ids=_id)
def test_linear_float_matches_float64(device, dtype, shape):
    lead, out, fin = shape
    _, packed, scales = make_layer(out, fin, device)
    xr, xi = make_x(lead, fin, dtype, device)
    y = lowrank.ifairy_linear(xr, xi, packed, scales, act_quant=False)
    assert all(p.dtype == dtype and p.shape == (*lead, out) and p.device.type == device for p in y)
    ref = ifairy_linear_reference(xr.cpu(), xi.cpu(), packed.cpu(), scales.cpu(), act_quant=False)
    same = torch_same_dtype(xr, xi, packed, scales) if dtype in LOW_PRECISION else None
    assert_pair_close(f"float {_id(dtype)}", y, ref, same)


# Token counts on both sides of any decode (GEMV) / prefill (GEMM) switch
TOKENS = list(range(1, 17)) + [17, 64, 300]


@pytest.mark.parametrize("act_quant", [True, False], ids=["W2A8", "W2Afloat"])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("device", devices)
def test_token_counts(device, tokens, act_quant):
    _, packed, scales = make_layer(33, 261, device)
    xr, xi = make_x((tokens,), 261, torch.float32, device)
    y = lowrank.ifairy_linear(xr, xi, packed, scales, act_quant)
    ref = ifairy_linear_reference(xr.cpu(), xi.cpu(), packed.cpu(), scales.cpu(), act_quant)
    assert_pair_close(f"{tokens} tokens", y, ref, rel=2e-6 if act_quant else None)
    # every token is computed alone: the first token's output does not depend on how many follow
    first = lowrank.ifairy_linear(xr[:1], xi[:1], packed, scales, act_quant)
    assert_pair_close("first token alone", tuple(p[:1] for p in y), tuple(p.cpu().double() for p in first), rel=1e-6)


_PORTABLE_SCRIPT = """
import sys, torch, lowrank
packed, scales, xr, xi = torch.load(sys.argv[1])
out = {(t, aq): lowrank.ifairy_linear(xr[:t], xi[:t], packed, scales, aq) for t in (1, 5, 64) for aq in (True, False)}
torch.save(out, sys.argv[2])
"""


def test_cpu_portable_kernels_and_forced_add_path(tmp_path):
    """The kernels an AVX2 machine never runs by itself: the portable int8 / float row loops (the only path
    on CPUs without AVX2; LOWRANK_IFAIRY_CPU_KERNEL=portable) and the add/subtract float path at 64 tokens,
    where the default takes the decoded GEMM (LOWRANK_IFAIRY_CPU_FLOAT=adds). Both switches are read once
    per process, so they run in a child process."""
    import os
    import subprocess
    import sys

    _, packed, scales = make_layer(37, 261, "cpu")
    xr, xi = make_x((64,), 261)
    torch.save((packed, scales, xr, xi), tmp_path / "in.pt")
    env = dict(os.environ, LOWRANK_IFAIRY_CPU_KERNEL="portable", LOWRANK_IFAIRY_CPU_FLOAT="adds")
    subprocess.run([sys.executable, "-c", _PORTABLE_SCRIPT, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                   env=env, check=True)
    portable = torch.load(tmp_path / "out.pt")
    for (t, aq), y in portable.items():
        ref = ifairy_linear_reference(xr[:t], xi[:t], packed, scales, aq)
        assert_pair_close(f"portable {t} tokens act_quant={aq}", y, ref, rel=2e-6 if aq else None)
        if aq:  # exact integer sums: the portable int8 kernel equals the default one bit for bit
            default = lowrank.ifairy_linear(xr[:t], xi[:t], packed, scales, aq)
            assert all(torch.equal(a, b) for a, b in zip(y, default))


@pytest.mark.parametrize("act_quant", [True, False], ids=["W2A8", "W2Afloat"])
def test_cpu_result_does_not_depend_on_thread_count(act_quant):
    _, packed, scales = make_layer(67, 300, "cpu")
    xr, xi = make_x((9,), 300)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = lowrank.ifairy_linear(xr, xi, packed, scales, act_quant)
        q_one = lowrank.ifairy_quantize(xr, xi)
        torch.set_num_threads(max(threads, 3))
        many = lowrank.ifairy_linear(xr, xi, packed, scales, act_quant)
        q_many = lowrank.ifairy_quantize(xr, xi)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one + q_one, many + q_many))


@pytest.mark.parametrize("act_quant", [True, False], ids=["W2A8", "W2Afloat"])
@pytest.mark.parametrize("device", devices)
def test_batch_dims_equal_flattened(device, act_quant):
    _, packed, scales = make_layer(20, 24, device)
    xr, xi = make_x((2, 3, 4), 24, device=device)
    y = lowrank.ifairy_linear(xr, xi, packed, scales, act_quant)
    flat = lowrank.ifairy_linear(xr.reshape(-1, 24), xi.reshape(-1, 24), packed, scales, act_quant)
    for a, b in zip(y, flat):
        assert a.shape == (2, 3, 4, 20)
        torch.testing.assert_close(a.reshape(b.shape), b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", devices)
def test_empty_batch(device):
    _, packed, scales = make_layer(20, 24, device)
    xr, xi = make_x((0,), 24, device=device)
    for act_quant in (True, False):
        y = lowrank.ifairy_linear(xr, xi, packed, scales, act_quant)
        assert y[0].shape == y[1].shape == (0, 20)


NONCONTIG = [("x_real", "transposed"), ("x_real", "sliced"), ("x_imag", "sliced"), ("both", "transposed"),
             ("packed", "sliced"), ("scales", "sliced")]


@pytest.mark.parametrize("act_quant", [True, False], ids=["W2A8", "W2Afloat"])
@pytest.mark.parametrize("case", NONCONTIG, ids=lambda c: f"{c[0]}_{c[1]}")
@pytest.mark.parametrize("device", devices)
def test_noncontiguous_inputs(device, case, act_quant):
    which, kind = case
    _, packed, scales = make_layer(20, 24, device)
    xr, xi = make_x((6,), 24, device=device)
    args = {"x_real": xr, "x_imag": xi, "packed": packed, "scales": scales}
    for name in (("x_real", "x_imag") if which == "both" else (which,)):
        args[name] = noncontiguous_like(args[name], kind)
    y = lowrank.ifairy_linear(args["x_real"], args["x_imag"], args["packed"], args["scales"], act_quant)
    want = lowrank.ifairy_linear(xr, xi, packed, scales, act_quant)
    for a, b in zip(y, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", devices)
def test_expanded_x(device):
    _, packed, scales = make_layer(20, 24, device)
    xr, xi = make_x((1,), 24, device=device)
    y = lowrank.ifairy_linear(xr.expand(4, -1), xi.expand(4, -1), packed, scales)
    one = lowrank.ifairy_linear(xr, xi, packed, scales)
    for a, b in zip(y, one):
        torch.testing.assert_close(a, b.expand(4, -1))


# ------------------------------------------------------------------------------------------------------------
# 6. Gradients, bad input, registration, torch.compile
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", devices)
def test_gradient_request_raises(device):
    _, packed, scales = make_layer(6, 8, device)
    xr, xi = make_x((3,), 8, device=device)
    for leaf in ("x_real", "x_imag"):
        args = [xr.clone(), xi.clone()]
        args[0 if leaf == "x_real" else 1].requires_grad_(True)
        with pytest.raises((RuntimeError, NotImplementedError), match=r"(?i)grad|inference|differentiab"):
            y_re, y_im = lowrank.ifairy_linear(*args, packed, scales)
            (y_re.sum() + y_im.sum()).backward()
    # Inference on leaves that require grad is fine once gradients are off
    with torch.no_grad():
        y = lowrank.ifairy_linear(xr.clone().requires_grad_(True), xi, packed, scales)
    with torch.inference_mode():
        y_inf = lowrank.ifairy_linear(xr, xi, packed, scales)
    assert torch.equal(y[0], y_inf[0]) and y[0].grad_fn is None


def _valid(device, dtype=torch.float32):
    _, packed, scales = make_layer(6, 10, device)
    xr, xi = make_x((3,), 10, dtype, device)
    return {"x_real": xr, "x_imag": xi, "packed": packed, "scales": scales}


def _set(**changes):
    return lambda p: {**p, **{k: f(p) for k, f in changes.items()}}


# (id, change, pattern the message must match)
LINEAR_BAD_INPUTS = [
    ("packed_int8", _set(packed=lambda p: p["packed"].to(torch.int8)), "packed"),
    ("packed_int32", _set(packed=lambda p: p["packed"].to(torch.int32)), "packed"),
    ("packed_1d", _set(packed=lambda p: p["packed"].reshape(-1)), "packed"),
    ("packed_too_wide", _set(packed=lambda p: torch.cat([p["packed"], p["packed"][:, :1]], 1)), "packed|in"),
    ("packed_too_narrow", _set(packed=lambda p: p["packed"][:, :-1]), "packed|in"),
    ("x_parts_shapes", _set(x_imag=lambda p: p["x_imag"][:2]), "x_"),
    ("x_parts_widths", _set(x_imag=lambda p: torch.cat([p["x_imag"], p["x_imag"]], -1)), "x_|packed|in"),
    ("x_parts_dtypes", _set(x_imag=lambda p: p["x_imag"].to(torch.bfloat16)), "x_|dtype"),
    ("x_int", _set(x_real=lambda p: p["x_real"].to(torch.int32), x_imag=lambda p: p["x_imag"].to(torch.int32)),
     "x_|dtype|float"),
    ("x_0d", _set(x_real=lambda p: p["x_real"][0, 0], x_imag=lambda p: p["x_imag"][0, 0]), "x_|dim"),
    ("scales_float64", _set(scales=lambda p: p["scales"].double()), "scales"),
    ("scales_float16", _set(scales=lambda p: p["scales"].half()), "scales"),
    ("scales_3", _set(scales=lambda p: torch.cat([p["scales"], p["scales"][:1]])), "scales"),
    ("scales_1", _set(scales=lambda p: p["scales"][:1]), "scales"),
]


def _call_linear(p):
    return lowrank.ifairy_linear(p["x_real"], p["x_imag"], p["packed"], p["scales"])


@pytest.mark.parametrize("case", LINEAR_BAD_INPUTS, ids=lambda c: c[0])
@pytest.mark.parametrize("device", devices)
def test_linear_bad_input_raises(device, case):
    _, change, pattern = case
    with pytest.raises(BAD_INPUT_ERRORS, match=pattern):
        _call_linear(change(_valid(device)))


@pytest.mark.parametrize("case", LINEAR_BAD_INPUTS, ids=lambda c: c[0])
def test_fake_kernel_rejects_bad_input(case):
    """The fake (meta) kernel that torch.compile traces with rejects the same inputs."""
    _, change, pattern = case
    p = {k: v.to("meta") for k, v in change(_valid("cpu")).items()}
    with pytest.raises(BAD_INPUT_ERRORS, match=pattern):
        _call_linear(p)


def test_fake_kernels_shapes():
    p = {k: v.to("meta") for k, v in _valid("cpu", torch.bfloat16).items()}
    for act_quant in (True, False):
        y_re, y_im = lowrank.ifairy_linear(p["x_real"], p["x_imag"], p["packed"], p["scales"], act_quant)
        assert y_re.shape == y_im.shape == (3, 6) and y_re.dtype == torch.bfloat16 and y_re.device.type == "meta"
    packed, scales = lowrank.ifairy_quantize(torch.empty(5, 9, device="meta"), torch.empty(5, 9, device="meta"))
    assert packed.shape == (5, 3) and packed.dtype == torch.uint8 and scales.shape == (2,)
    assert scales.dtype == torch.float32
    wr, wi = lowrank.ifairy_dequantize(packed, scales, 9)
    assert wr.shape == wi.shape == (5, 9) and wr.dtype == torch.float32


QUANTIZE_BAD_INPUTS = [
    ("shapes_differ", lambda wr, wi: (wr, wi[:, :-1]), "w_|shape"),
    ("w_1d", lambda wr, wi: (wr[0], wi[0]), "w_|dim|2"),
    ("w_int", lambda wr, wi: (wr.to(torch.int32), wi.to(torch.int32)), "w_|dtype|float"),
    ("dtypes_differ", lambda wr, wi: (wr, wi.double()), "w_|dtype"),
]


@pytest.mark.parametrize("case", QUANTIZE_BAD_INPUTS, ids=lambda c: c[0])
@pytest.mark.parametrize("device", devices)
def test_quantize_bad_input_raises(device, case):
    _, change, pattern = case
    wr, wi = torch.randn(4, 6, device=device), torch.randn(4, 6, device=device)
    with pytest.raises(BAD_INPUT_ERRORS, match=pattern):
        lowrank.ifairy_quantize(*change(wr, wi))


DEQUANTIZE_BAD_INPUTS = [
    ("packed_int8", lambda p, s, n: (p.to(torch.int8), s, n), "packed"),
    ("wrong_width", lambda p, s, n: (p, s, n + 4), "packed|in_features"),
    ("in_features_0", lambda p, s, n: (p, s, 0), "in_features|packed"),
    ("scales_float64", lambda p, s, n: (p, s.double(), n), "scales"),
    ("scales_3", lambda p, s, n: (p, torch.cat([s, s[:1]]), n), "scales"),
]


@pytest.mark.parametrize("case", DEQUANTIZE_BAD_INPUTS, ids=lambda c: c[0])
@pytest.mark.parametrize("device", devices)
def test_dequantize_bad_input_raises(device, case):
    _, change, pattern = case
    _, packed, scales = make_layer(4, 10, device)
    with pytest.raises(BAD_INPUT_ERRORS, match=pattern):
        lowrank.ifairy_dequantize(*change(packed, scales, 10))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and lowrank's CUDA kernels")
@pytest.mark.parametrize("on_cpu", ["x_real", "x_imag", "packed", "scales"])
def test_cuda_rejects_mixed_devices(on_cpu):
    p = _valid("cuda")
    p[on_cpu] = p[on_cpu].cpu()
    with pytest.raises(BAD_INPUT_ERRORS, match="device|cuda|cpu"):
        _call_linear(p)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and lowrank's CUDA kernels")
def test_cuda_mixed_devices_in_quantize_and_dequantize():
    wr = torch.randn(4, 8, device="cuda")
    with pytest.raises(BAD_INPUT_ERRORS):
        lowrank.ifairy_quantize(wr, wr.cpu())
    packed, scales = lowrank.ifairy_quantize(wr, wr)
    with pytest.raises(BAD_INPUT_ERRORS):
        lowrank.ifairy_dequantize(packed, scales.cpu(), 8)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and lowrank's CUDA kernels")
def test_cuda_rejects_float64():
    """float64 is a CPU-only dtype of these ops."""
    p = _valid("cuda", torch.float64)
    with pytest.raises(BAD_INPUT_ERRORS, match="x_|dtype|float"):
        _call_linear(p)


def test_ifairy_ops_are_registered_for_cpu_and_cuda():
    """A real kernel on each backend, or (CUDA without the CUDA library) the stub explaining why."""
    for name in ("ifairy_quantize", "ifairy_dequantize", "ifairy_linear"):
        assert name in lowrank.ops.OP_NAMES and name in lowrank.__all__
        for key in ("CPU", "CUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lowrank::{name}", key), (name, key)


@pytest.mark.parametrize("device", devices)
def test_opcheck(device):
    wr, wi = torch.randn(6, 10, device=device), torch.randn(6, 10, device=device)
    torch.library.opcheck(torch.ops.lowrank.ifairy_quantize.default, (wr, wi))
    packed, scales = lowrank.ifairy_quantize(wr, wi)
    torch.library.opcheck(torch.ops.lowrank.ifairy_dequantize.default, (packed, scales, 10))
    xr, xi = make_x((2, 3), 10, device=device)
    for act_quant in (True, False):
        torch.library.opcheck(torch.ops.lowrank.ifairy_linear.default, (xr, xi, packed, scales, act_quant))
    xr16, xi16 = make_x((4,), 10, torch.bfloat16, device)
    torch.library.opcheck(torch.ops.lowrank.ifairy_linear.default, (xr16, xi16, packed, scales))


def test_wrappers_equal_ops():
    p = _valid("cpu")
    args = (p["x_real"], p["x_imag"], p["packed"], p["scales"])
    for act_quant in (True, False):
        a, b = lowrank.ifairy_linear(*args, act_quant), torch.ops.lowrank.ifairy_linear(*args, act_quant)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(torch.equal(a, b) for a, b in zip(lowrank.ifairy_linear(*args), torch.ops.lowrank.ifairy_linear(*args)))


def test_compile_ops_fullgraph():
    torch._dynamo.reset()

    def f(wr, wi, xr, xi):
        packed, scales = lowrank.ifairy_quantize(wr, wi)
        dr, di = lowrank.ifairy_dequantize(packed, scales, wr.shape[1])
        y_re, y_im = lowrank.ifairy_linear(2 * xr, xi, packed, scales)
        z_re, z_im = lowrank.ifairy_linear(xr, xi, packed, scales, act_quant=False)
        return torch.relu(y_re) + y_im + z_re - z_im, dr.sum() + di.sum()

    wr, wi = torch.randn(12, 18), torch.randn(12, 18)
    xr, xi = make_x((2, 3), 18)
    got = torch.compile(f, fullgraph=True)(wr, wi, xr, xi)
    want = f(wr, wi, xr, xi)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


# ------------------------------------------------------------------------------------------------------------
# 7. IFairyLinear
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act_quant", [True, False], ids=["W2A8", "W2Afloat"])
@pytest.mark.parametrize("device", devices)
def test_module_from_float(device, act_quant):
    wr, wi = torch.randn(33, 37, device=device), torch.randn(33, 37, device=device)
    layer = IFairyLinear.from_float(wr, wi, act_quant=act_quant)
    packed, scales = lowrank.ifairy_quantize(wr, wi)
    assert torch.equal(layer.packed, packed) and torch.equal(layer.scales, scales)
    assert layer.in_features == 37 and layer.out_features == 33 and layer.act_quant == act_quant
    assert list(layer.parameters()) == []
    xr, xi = make_x((2, 5), 37, device=device)
    y = layer(xr, xi)
    want = lowrank.ifairy_linear(xr, xi, packed, scales, act_quant)
    assert torch.equal(y[0], want[0]) and torch.equal(y[1], want[1])
    deq = layer.dequantize()
    ref = ifairy_dequantize_reference(packed.cpu(), scales.cpu(), 37)
    assert torch.equal(deq[0].cpu(), ref[0]) and torch.equal(deq[1].cpu(), ref[1])
    ref = ifairy_linear_reference(xr.cpu(), xi.cpu(), packed.cpu(), scales.cpu(), act_quant)
    assert_pair_close("module vs reference", y, ref, rel=2e-6 if act_quant else 1e-5)


def test_module_fresh_init_is_usable():
    layer = IFairyLinear(10, 7)
    assert layer.packed.shape == (7, 3) and layer.packed.dtype == torch.uint8
    assert layer.scales.dtype == torch.float32 and torch.allclose(layer.scales, torch.full((2,), 10 ** -0.5))
    assert (layer.packed[:, -1].long() >> 4).eq(0).all(), "padding codes must be 0"
    y = layer(*make_x((3,), 10))
    assert all(torch.isfinite(p).all() and p.shape == (3, 7) for p in y)
    assert "in_features=10" in repr(layer) and "out_features=7" in repr(layer) and "act_quant=True" in repr(layer)
    lazy = IFairyLinear(10, 7, device="meta")  # lazy init: shapes only, filled by load_state_dict later
    assert lazy.packed.is_meta and lazy.packed.shape == (7, 3) and lazy.scales.dtype == torch.float32
    lazy = lazy.to_empty(device="cpu")
    lazy.load_state_dict(layer.state_dict())
    x = make_x((2,), 10)
    assert all(torch.equal(a, b) for a, b in zip(lazy(*x), layer(*x)))


@pytest.mark.parametrize("device", devices)
def test_module_state_dict_roundtrip(device):
    layer = IFairyLinear.from_float(torch.randn(9, 13), torch.randn(9, 13)).to(device)
    sd = layer.state_dict()
    assert set(sd) == {"packed", "scales", "_extra_state"} and sd["_extra_state"].tolist() == [13]
    assert sd["packed"].dtype == torch.uint8 and sd["packed"].shape == (9, 4) and sd["scales"].dtype == torch.float32
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = IFairyLinear(13, 9, device=device)
    fresh.load_state_dict(torch.load(buf))
    xr, xi = make_x((4,), 13, device=device)
    for a, b in zip(fresh(xr, xi), layer(xr, xi)):
        assert torch.equal(a, b)


LOAD_BAD = [
    ("packed_int8", "packed", lambda t: t.to(torch.int8)),
    ("packed_shape", "packed", lambda t: t[:, :-1]),
    ("packed_rows", "packed", lambda t: t[:-1]),
    ("scales_float64", "scales", lambda t: t.double()),
    ("scales_shape", "scales", lambda t: t[:1]),
    ("scales_nan", "scales", lambda t: torch.tensor([float("nan"), 1.0])),
]


@pytest.mark.parametrize("case", LOAD_BAD, ids=lambda c: c[0])
def test_module_load_validation(case):
    _, key, change = case
    layer = IFairyLinear(13, 9)
    sd = IFairyLinear(13, 9).state_dict()
    sd[key] = change(sd[key])
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=key):
        layer.load_state_dict(sd)
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items()), "a failed load must change nothing"


def test_module_keeps_scales_float32_under_dtype_casts():
    layer = IFairyLinear.from_float(torch.randn(5, 8), torch.randn(5, 8))
    scales = layer.scales.clone()
    for cast in (lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.double()):
        cast(layer)
        assert layer.scales.dtype == torch.float32 and torch.equal(layer.scales, scales)
        assert layer.packed.dtype == torch.uint8


@pytest.mark.parametrize("bad", [(0, 4), (4, 0), (-1, 3)])
def test_module_rejects_bad_sizes(bad):
    with pytest.raises(ValueError):
        IFairyLinear(*bad)


def test_module_forward_rejects_bad_x():
    layer = IFairyLinear(8, 4)
    x = torch.randn(3, 8)
    for xr, xi in ((x[:, :7], x[:, :7]), (x, x[:2]), (x[0, 0], x[0, 0])):
        with pytest.raises(ValueError, match="IFairyLinear"):
            layer(xr, xi)


def test_module_gradient_request_raises():
    layer = IFairyLinear(8, 4)
    xr, xi = make_x((3,), 8)
    with pytest.raises((RuntimeError, NotImplementedError)):
        y = layer(xr.requires_grad_(True), xi)
        y[0].sum().backward()


def test_compile_module_fullgraph():
    torch._dynamo.reset()
    layer = IFairyLinear.from_float(torch.randn(12, 20), torch.randn(12, 20))
    xr, xi = make_x((2, 3), 20)
    got = torch.compile(layer, fullgraph=True)(xr, xi)
    want = layer(xr, xi)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


# ------------------------------------------------------------------------------------------------------------
# 8. The example block
# ------------------------------------------------------------------------------------------------------------
SMALL = IFairyConfig(hidden_size=32, intermediate_size=56, num_heads=4)


def block_complex128(block: IFairyBlock, x: torch.Tensor) -> torch.Tensor:
    cfg = block.config
    return shared_block_complex128(block, x, cfg.num_heads, cfg.num_heads, cfg.rope_theta)


def test_example_block_matches_complex_arithmetic():
    block = IFairyBlock(IFairyConfig(**{**SMALL.__dict__, "act_quant": False})).double()
    with torch.no_grad():
        for n in (m for m in block.modules() if hasattr(m, "weight_real")):
            n.weight_real.uniform_(0.5, 1.5)
            n.weight_imag.uniform_(0.5, 1.5)
    xr, xi = make_x((2, 6), 32, torch.float64)
    with torch.no_grad():
        y_re, y_im = block(xr, xi)
        want = block_complex128(block, torch.complex(xr, xi))
    torch.testing.assert_close(y_re, want.real, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(y_im, want.imag, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
@pytest.mark.parametrize("device", devices)
def test_example_block_runs_end_to_end(device, dtype):
    block = IFairyBlock(SMALL).to(device=device, dtype=dtype)
    xr, xi = make_x((2, 7), 32, dtype, device)
    with torch.inference_mode():
        y_re, y_im = block(xr, xi)
        assert y_re.shape == y_im.shape == (2, 7, 32) and y_re.dtype == dtype
        assert torch.isfinite(y_re).all() and torch.isfinite(y_im).all()
        assert not torch.equal(y_re, xr), "the block must change its input"
        # causal: the first 4 positions do not see the last 3
        short = block(xr[:, :4], xi[:, :4])
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(short[0], y_re[:, :4], rtol=tol, atol=tol)
    torch.testing.assert_close(short[1], y_im[:, :4], rtol=tol, atol=tol)


def test_compile_in_grad_mode_then_backward_raises():
    """torch.compile traces the backward of a call whose inputs require grad: the refusal must be a graph node
    that raises when run, not an exception while tracing (a compiled model with trainable norms around the
    op must compile for inference)."""
    layer = IFairyLinear(16, 8)
    xr = torch.randn(3, 16, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager")
    yr, yi = compiled(xr, xr.detach())
    want = layer(xr.detach(), xr.detach())
    assert torch.equal(yr.detach(), want[0]) and torch.equal(yi.detach(), want[1])
    with pytest.raises(RuntimeError, match="inference only"):
        yr.sum().backward()
