"""Tests of lowrank.adam_lowrank_8bit_ (adam_lowrank_ on blockwise 8-bit moments) against
lowrank.reference.adam_lowrank_8bit_reference, which uses the same IEEE float32 ops, so codes and absmax must
agree exactly and N to a few float32 ulps; plus the maps' accuracy, opcheck, bad input and torch.compile."""
from __future__ import annotations

import pytest
import torch

import lowrank
from lowrank.reference import (STATE8_BLOCK, adam_lowrank_8bit_reference, adam_lowrank_reference,
                               dequantize_exp_avg_reference, dequantize_exp_avg_sq_reference,
                               quantize_exp_avg_reference, quantize_exp_avg_sq_reference)

from conftest import devices

BAD_INPUT_ERRORS = (RuntimeError, ValueError)


def zero_state(shape, device):
    blocks = (torch.Size(shape).numel() + STATE8_BLOCK - 1) // STATE8_BLOCK
    return [torch.zeros(shape, dtype=torch.int8, device=device), torch.zeros(blocks, device=device),
            torch.zeros(shape, dtype=torch.uint8, device=device), torch.zeros(blocks, device=device)]


def gradient(shape, gen, device):
    """Entries spread over ~4 decades, as rows of a projected gradient are: the maps are tested over a range."""
    g = torch.randn(shape, generator=gen) * torch.rand(shape, generator=gen) ** 3
    return g.to(device)


# (37, 29): 1073 elements, a partial last block; (5, 256): exactly whole blocks; (1, 1); a 3-D state
SHAPES = [(37, 29), (5, 256), (1, 1), (3, 4, 100)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("device", devices)
def test_8bit_matches_reference(shape, device):
    gen = torch.Generator().manual_seed(0)
    state = zero_state(shape, device)
    ref = [t.cpu().clone() for t in state]
    ptrs = [t.data_ptr() for t in state]
    for step in range(12):
        R = gradient(shape, gen, device)
        N = lowrank.adam_lowrank_8bit_(*state, R, 0.9, 0.999, 1e-8)
        N_ref = adam_lowrank_8bit_reference(*ref, R.cpu(), 0.9, 0.999, 1e-8)
        for name, got, want in zip(("exp_avg", "exp_avg_absmax", "exp_avg_sq", "exp_avg_sq_absmax"), state, ref):
            assert torch.equal(got.cpu(), want), f"{name} differs at step {step}"
        err = ((N.cpu() - N_ref).abs() / N_ref.abs().clamp_min(1e-3)).max().item()
        assert N.dtype == torch.float32 and err <= 1e-6, err
    assert [t.data_ptr() for t in state] == ptrs, "the state must be updated in place"
    assert state[0].abs().max() == 127 and state[2].max() == 255  # the block maxima are coded exactly


@pytest.mark.parametrize("device", devices)
def test_8bit_tracks_fp32_adam(device):
    """Over 30 steps the 8-bit moments stay within the maps' resolution of fp32 Adam's, and N close to its N."""
    gen = torch.Generator().manual_seed(1)
    shape = (64, 40)
    state = zero_state(shape, device)
    m32, v32 = torch.zeros(shape, device=device), torch.zeros(shape, device=device)
    for _ in range(30):
        R = gradient(shape, gen, device)
        N8 = lowrank.adam_lowrank_8bit_(*state, R, 0.9, 0.999, 1e-8)
        N32 = lowrank.adam_lowrank_(m32, v32, R, 0.9, 0.999, 1e-8)
    m8 = dequantize_exp_avg_reference(state[0].cpu(), state[1].cpu())
    v8 = dequantize_exp_avg_sq_reference(state[2].cpu(), state[3].cpu())
    m_err = ((m8 - m32.cpu()).abs().max() / m32.abs().max()).item()
    v_err = ((v8.sqrt() - v32.cpu().sqrt()).abs().max() / v32.sqrt().max()).item()
    n_err = ((N8 - N32).norm() / N32.norm()).item()
    print(f"8-bit vs fp32 after 30 steps: m {m_err:.2e}, sqrt(v) {v_err:.2e} (of the max), N {n_err:.2e} (rel norm)")
    assert m_err <= 2e-2 and v_err <= 2e-2 and n_err <= 5e-2


def test_maps_round_trip_and_resolution():
    """Decoding then encoding gives the codes back; encoding then decoding is within half a code step of x."""
    gen = torch.Generator().manual_seed(2)
    m = torch.randn(3 * STATE8_BLOCK + 5, generator=gen) * torch.rand(3 * STATE8_BLOCK + 5, generator=gen) ** 4
    v = m * m
    qm, am = quantize_exp_avg_reference(m)
    qv, av = quantize_exp_avg_sq_reference(v)
    assert torch.equal(quantize_exp_avg_reference(dequantize_exp_avg_reference(qm, am))[0], qm)
    assert torch.equal(quantize_exp_avg_sq_reference(dequantize_exp_avg_sq_reference(qv, av))[0], qv)
    # in the companded domain (√|m|/absmax, (v/absmax)^¼) every value is within half a step of its code
    blk = torch.arange(m.numel()) // STATE8_BLOCK
    xm = (m.abs() / am[blk]).sqrt() * 127
    assert ((xm - qm.abs().float()).abs() <= 0.5 + 1e-4).all()
    xv = (v / av[blk]).sqrt().sqrt() * 255
    assert ((xv - qv.float()).abs() <= 0.5 + 1e-4).all()
    # zero block: zero codes, zero absmax
    q0, a0 = quantize_exp_avg_sq_reference(torch.zeros(10))
    assert not q0.any() and not a0.any()


def test_optimizer_helpers_equal_reference_maps():
    """lowrank.optim._state8bit's float32 decode/encode (used to re-project 8-bit moments) equal the reference."""
    from lowrank.optim import _state8bit
    gen = torch.Generator().manual_seed(3)
    m = torch.randn(33, 17, generator=gen) * torch.rand(33, 17, generator=gen) ** 3
    v = m * m + torch.rand(33, 17, generator=gen) * 1e-3
    state = {}
    _state8bit.init_state(state, m)
    _state8bit.quantize_(state, m, v)
    qm, am = quantize_exp_avg_reference(m)
    qv, av = quantize_exp_avg_sq_reference(v)
    for got, want in zip((state["exp_avg"], state["exp_avg_absmax"], state["exp_avg_sq"], state["exp_avg_sq_absmax"]),
                         (qm, am, qv, av)):
        assert torch.equal(got, want)
    dm, dv = _state8bit.dequantize(state)
    assert torch.equal(dm, dequantize_exp_avg_reference(qm, am)) and torch.equal(dv, dequantize_exp_avg_sq_reference(qv, av))


@pytest.mark.parametrize("device", devices)
def test_8bit_noncontiguous_R_and_empty(device):
    gen = torch.Generator().manual_seed(4)
    R = gradient((40, 9), gen, device).T  # (9, 40), strided
    state, ref = zero_state((9, 40), device), zero_state((9, 40), "cpu")
    N = lowrank.adam_lowrank_8bit_(*state, R, 0.5, 0.75, 0.1)
    N_ref = adam_lowrank_8bit_reference(*ref, R.cpu().contiguous(), 0.5, 0.75, 0.1)
    torch.testing.assert_close(N.cpu(), N_ref, rtol=1e-6, atol=1e-7)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(state, ref))
    empty = zero_state((0, 5), device)
    assert lowrank.adam_lowrank_8bit_(*empty, torch.zeros(0, 5, device=device), 0.9, 0.99, 1e-8).shape == (0, 5)


def _bad_cases(device):
    f32 = dict(device=device, dtype=torch.float32)
    R = torch.randn(10, 30, **f32)
    s = zero_state((10, 30), device)
    return {
        "R_float64": (lambda: lowrank.adam_lowrank_8bit_(*s, R.double(), 0.9, 0.99, 1e-8), "R must be float32"),
        "m_float": (lambda: lowrank.adam_lowrank_8bit_(s[0].float(), *s[1:], R, 0.9, 0.99, 1e-8), "exp_avg must be int8"),
        "v_int8": (lambda: lowrank.adam_lowrank_8bit_(s[0], s[1], s[2].to(torch.int8), s[3], R, 0.9, 0.99, 1e-8),
                   "exp_avg_sq must be uint8"),
        "shape": (lambda: lowrank.adam_lowrank_8bit_(*s, R[:, :29], 0.9, 0.99, 1e-8),
                  "exp_avg, exp_avg_sq and R must have the same shape"),
        "absmax_length": (lambda: lowrank.adam_lowrank_8bit_(s[0], torch.zeros(3, **f32), *s[2:], R, 0.9, 0.99, 1e-8),
                          "exp_avg_absmax must be 1-D of length 2"),
        "absmax_dtype": (lambda: lowrank.adam_lowrank_8bit_(*s[:3], s[3].double(), R, 0.9, 0.99, 1e-8),
                         "exp_avg_sq_absmax must be float32"),
        "noncontiguous": (lambda: lowrank.adam_lowrank_8bit_(torch.zeros(30, 10, dtype=torch.int8, device=device).T,
                                                             *s[1:], R, 0.9, 0.99, 1e-8), "exp_avg must be contiguous"),
    }


@pytest.mark.parametrize("case", list(_bad_cases("cpu")))
@pytest.mark.parametrize("device", devices + ["meta"])
def test_8bit_bad_input_raises(case, device):
    fn, message = _bad_cases(device)[case]
    with pytest.raises(BAD_INPUT_ERRORS, match=f"lowrank.adam_lowrank_8bit_: {message}"):
        fn()


def test_8bit_rejects_aliased_absmax():
    s = zero_state((10, 30), "cpu")
    with pytest.raises(RuntimeError, match="exp_avg_sq_absmax must not share memory with exp_avg_absmax"):
        lowrank.adam_lowrank_8bit_(s[0], s[1], s[2], s[1], torch.randn(10, 30), 0.9, 0.99, 1e-8)


def test_8bit_rejects_overlapping_views():
    # R and an absmax vector carved from one buffer: not the same tensor, but the kernel would race on it
    s = zero_state((16, 16), "cpu")
    buf = torch.randn(300)
    with pytest.raises(RuntimeError, match="R must not share memory with exp_avg_absmax"):
        lowrank.adam_lowrank_8bit_(s[0], buf[1:2], s[2], s[3], buf[:256].view(16, 16), 0.9, 0.99, 1e-8)
    codes = torch.zeros(2 * 256, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="must not share memory"):
        lowrank.adam_lowrank_8bit_(codes[:256].view(16, 16), s[1], codes[100:356].view(torch.uint8).view(16, 16),
                                   s[3], torch.randn(16, 16), 0.9, 0.99, 1e-8)


@pytest.mark.parametrize("arg", range(5))
def test_8bit_refuses_an_argument_on_another_device(arg):
    # meta next to CPU tensors must raise, not return uninitialized memory (the fake's device check)
    args = [*zero_state((10, 30), "cpu"), torch.randn(10, 30)]
    args[arg] = args[arg].to("meta")
    with pytest.raises(RuntimeError, match="lowrank.adam_lowrank_8bit_: .* must be on R's device|"
                                           "lowrank.adam_lowrank_8bit_: R must be on"):
        lowrank.adam_lowrank_8bit_(*args, 0.9, 0.99, 1e-8)


@pytest.mark.parametrize("device", devices)
def test_8bit_opcheck(device):
    gen = torch.Generator().manual_seed(5)
    R = gradient((13, 50), gen, device)
    s = zero_state((13, 50), device)
    lowrank.adam_lowrank_8bit_(*s, R, 0.9, 0.99, 1e-8)  # nonzero codes
    torch.library.opcheck(torch.ops.lowrank.adam_lowrank_8bit_.default, (*s, R, 0.9, 0.99, 1e-8))
    schema = str(torch.ops.lowrank.adam_lowrank_8bit_.default._schema)
    assert all(f"Tensor({a}!)" in schema for a in "abcd")


def test_8bit_compiles_fullgraph():
    torch._dynamo.reset()

    def step(s0, s1, s2, s3, R):
        N = lowrank.adam_lowrank_8bit_(s0, s1, s2, s3, R, 0.9, 0.999, 1e-8)
        return N * 2

    gen = torch.Generator().manual_seed(6)
    R = gradient((20, 30), gen, "cpu")
    eager, compiled = zero_state((20, 30), "cpu"), zero_state((20, 30), "cpu")
    out_e = step(*eager, R)
    out_c = torch.compile(step, backend="aot_eager", fullgraph=True)(*compiled, R)
    torch.testing.assert_close(out_c, out_e)
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager)) and compiled[0].any()


def test_8bit_first_step_equals_fp32_first_step():
    """From the zero state the first N does not depend on how the (zero) moments were stored."""
    R = torch.randn(7, 45)
    N8 = lowrank.adam_lowrank_8bit_(*zero_state((7, 45), "cpu"), R, 0.9, 0.999, 1e-8)
    N32 = adam_lowrank_reference(torch.zeros(7, 45), torch.zeros(7, 45), R, 0.9, 0.999, 1e-8)
    torch.testing.assert_close(N8, N32, rtol=1e-6, atol=1e-7)


def test_8bit_registered_for_cpu_and_cuda():
    name = torch.ops.lowrank.adam_lowrank_8bit_.default.name()
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")  # the kernel, or the 'built without' stub
    assert "adam_lowrank_8bit_" in lowrank.ops.OP_NAMES and "adam_lowrank_8bit_" in lowrank.__all__
