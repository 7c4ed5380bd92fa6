"""Regression tests of issue 14 across the Monarch, SLTrain, projection and iFairy families: arguments on different
devices (meta included) are refused by the fake and the real kernels, an in-place output aliasing an input is
refused, error messages read `lowrank.<op>: <argument> <problem> (<what was given>)` without C++ function names
or source paths, allocation failures name the op and the size."""
from __future__ import annotations

import re

import pytest
import torch

import lowrank
from conftest import HAS_CUDA, devices

OPS = torch.ops.lowrank
I64 = torch.int64


def _sltrain_args(device="cpu"):
    x = torch.randn(3, 6, device=device)
    A, B = torch.randn(2, 6, device=device), torch.randn(5, 2, device=device)
    values = torch.randn(4, device=device)
    indices = torch.tensor([0, 7, 13, 29], dtype=I64, device=device)
    return [x, A, B, values, indices]


# Every op with each tensor argument moved, in turn, to "meta" while the others stay on the CPU. Before issue 14
# the fakes of sltrain and the projection ops did not compare devices and the dispatcher (meta wins) returned
# uninitialized memory, or skipped an in-place update.
def _cases():
    G, P = torch.randn(8, 5), torch.linalg.qr(torch.randn(5, 3))[0].T.contiguous()  # right: P (3, 5)
    W, M = torch.randn(8, 5), torch.randn(8, 3)
    mom = [torch.rand(8, 3), torch.rand(8, 3), torch.randn(8, 3)]
    sl = _sltrain_args()
    g_out = torch.randn(3, 5)
    mon = [torch.randn(3, 8), torch.randn(2, 4, 4), torch.randn(2, 6, 4)]
    w = [torch.randn(6, 10), torch.randn(6, 10)]
    packed, scales = lowrank.ifairy_quantize(*w)
    xs = [torch.randn(2, 10), torch.randn(2, 10)]
    s8 = [torch.zeros(8, 3, dtype=torch.int8), torch.zeros(1), torch.zeros(8, 3, dtype=torch.uint8), torch.zeros(1),
          torch.randn(8, 3)]
    return {
        "sltrain_linear": (lambda *a: OPS.sltrain_linear(*a, 0.5, None, True), sl, ["x", "A", "B", "values", "indices"]),
        "sltrain_linear_backward": (lambda *a: OPS.sltrain_linear_backward(*a, 0.5, False, True, True, True),
                                    [g_out] + sl, ["grad_out", "x", "A", "B", "values", "indices"]),
        "galore_project": (lambda *a: OPS.galore_project(*a, False, True), [G, P], ["G", "P"]),
        "adam_lowrank_": (lambda *a: OPS.adam_lowrank_(*a, 0.9, 0.99, 1e-8), mom, ["exp_avg", "exp_avg_sq", "R"]),
        "galore_update_": (lambda *a: OPS.galore_update_(*a, False, 1.0, None, None), [W, M, P], ["W", "M", "P"]),
        "basis_scores": (lambda *a: OPS.basis_scores(*a, False), [G, lowrank.dct_basis(5)], ["G", "Q"]),
        "monarch_matmul": (lambda *a: OPS.monarch_matmul(*a), mon, ["x", "w1", "w2"]),
        "adam_lowrank_8bit_": (lambda *a: OPS.adam_lowrank_8bit_(*a, 0.9, 0.99, 1e-8), s8,
                               ["exp_avg", "exp_avg_absmax", "exp_avg_sq", "exp_avg_sq_absmax", "R"]),
        "ifairy_quantize": (lambda *a: OPS.ifairy_quantize(*a), w, ["w_real", "w_imag"]),
        "ifairy_dequantize": (lambda *a: OPS.ifairy_dequantize(*a, 10), [packed, scales], ["packed", "scales"]),
        "ifairy_linear": (lambda *a: OPS.ifairy_linear(*a, True, None), xs + [packed, scales],
                          ["x_real", "x_imag", "packed", "scales"]),
        "ifairy_linear_multi": (lambda *a: OPS.ifairy_linear_multi(a[0], a[1], [a[2], a[4]], [a[3], a[5]], True, None),
                                xs + [packed, scales] * 2,
                                ["x_real", "x_imag", "packed[0]", "scales[0]", "packed[1]", "scales[1]"]),
    }


CASES = _cases()
MIXED = [(op, i) for op, (_, args, _) in CASES.items() for i in range(len(args))]


@pytest.mark.parametrize("op,which", MIXED, ids=[f"{op}-{i}" for op, i in MIXED])
def test_meta_argument_among_cpu_ones_is_refused(op, which):
    call, args, names = CASES[op]
    args = [a.clone() for a in args]
    args[which] = args[which].to("meta")
    with pytest.raises(RuntimeError, match="must be on .*'s device \\(got .* on (meta|cpu), .* on (meta|cpu)\\)") as e:
        call(*args)
    msg = str(e.value)
    assert msg.startswith(f"lowrank.{op}") and f"{names[which]} on meta" in msg, msg


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and lowrank's CUDA kernels")
@pytest.mark.parametrize("op,which", MIXED, ids=[f"{op}-{i}" for op, i in MIXED])
def test_cpu_argument_among_cuda_ones_is_refused(op, which):
    call, args, names = CASES[op]
    args = [a.cuda() for a in args]
    args[which] = args[which].cpu()
    with pytest.raises(RuntimeError, match=f"lowrank.{op}: .* must be on .*'s device \\(got .*cuda:0.*cpu|cpu.*cuda:0"):
        call(*args)


def test_all_meta_still_traces():
    """All arguments on meta is the fake kernel's normal use (torch.compile): shapes come back, nothing raises."""
    for op, (call, args, _) in CASES.items():
        call(*[a.to("meta") for a in args])


# ------------------------------------------------------------------------------------------ aliasing
@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("alias", ["M_is_W_view", "P_is_W_view", "G_is_W", "scale_in_W"])
def test_galore_update_refuses_W_overlapping_an_input(alias, device):
    """W is written in the same pass that reads M, P, G and residual_scale: sharing memory is refused
    (storage overlap, not only identity: a view of W as M is refused too)."""
    W = torch.randn(6, 6, device=device)
    M, P = torch.randn(6, 3, device=device), torch.randn(3, 6, device=device)
    G, s = None, None
    if alias == "M_is_W_view":
        M = W[:, :3]
    elif alias == "P_is_W_view":
        P = W[3:]
    elif alias == "G_is_W":
        G, s = W, torch.ones(6, device=device)
    else:
        G, s = torch.randn(6, 6, device=device), W[0]
    before = W.clone()
    with pytest.raises(RuntimeError, match="lowrank.galore_update_: .* must not share memory with W"):
        lowrank.galore_update_(W, M, P, False, 1.0, G, s)
    assert torch.equal(W, before)


@pytest.mark.parametrize("device", devices)
def test_galore_update_accepts_disjoint_views_of_one_buffer(device):
    """Two views of one buffer that do not overlap are fine (the check is on byte ranges)."""
    buf = torch.randn(6 * 6 + 6 * 3, device=device)
    W, M = buf[:36].view(6, 6), buf[36:].view(6, 3)
    P = torch.randn(3, 6, device=device)
    want = W.double() - M.double() @ P.double()
    lowrank.galore_update_(W, M, P, False, 1.0)
    torch.testing.assert_close(W.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", devices)
def test_adam_lowrank_refuses_overlapping_views(device):
    buf = torch.rand(2, 8, 3, device=device)
    with pytest.raises(RuntimeError, match="must not share memory"):
        lowrank.adam_lowrank_(buf[0], buf[0][:, :3], buf[1], 0.9, 0.99, 1e-8)


# ------------------------------------------------------------------------------------------ messages
_PATH_OR_FUNC = re.compile(r"(\.h:\d|\.cpp:\d|\.cu:\d|\.cuh:\d|check_[a-z_]+, |/csrc/|API call failed)")

BAD_CALLS = {
    "monarch dtype": lambda: OPS.monarch_matmul(torch.randn(2, 4).int(), torch.randn(2, 2, 2), torch.randn(2, 2, 2)),
    "monarch shape": lambda: OPS.monarch_matmul(torch.randn(2, 5), torch.randn(2, 2, 2), torch.randn(2, 2, 2)),
    "sltrain dims": lambda: OPS.sltrain_linear(torch.randn(2, 4), torch.randn(2, 4, 1), torch.randn(3, 2),
                                               torch.randn(0), torch.zeros(0, dtype=I64), 1.0, None, True),
    "sltrain index": lambda: OPS.sltrain_linear(*_sltrain_args()[:4], torch.tensor([0, 7, 13, 30], dtype=I64),
                                                1.0, None, True),
    "project rank": lambda: OPS.galore_project(torch.randn(4, 5), torch.randn(6, 5), False, False),
    "scores dtype": lambda: OPS.basis_scores(torch.randn(4, 5), torch.randn(5, 5).double(), False),
    "dct shape": lambda: OPS.dct_basis_(torch.empty(3, 4)),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_messages_name_the_op_and_no_source_path(name):
    with pytest.raises(RuntimeError) as e:
        BAD_CALLS[name]()
    msg = str(e.value)
    assert msg.startswith("lowrank."), msg
    assert not _PATH_OR_FUNC.search(msg), msg


def test_message_format_argument_problem_given():
    with pytest.raises(RuntimeError) as e:
        BAD_CALLS["monarch dtype"]()
    assert str(e.value) == "lowrank.monarch_matmul: x must be float32, float16 or bfloat16, or float64 on CPU (got int32)"


def test_expanded_input_too_large_to_copy_names_op_argument_and_size():
    """A zero-stride (expanded) x that the kernel would copy to full size (2^40 elements): the error names
    the op, the argument, the byte count and the strides instead of a bare allocator error."""
    x = torch.zeros(1, 1).expand(2 ** 24, 2 ** 16)
    A, B = torch.randn(2, 2 ** 16), torch.randn(3, 2)
    with pytest.raises(RuntimeError) as e:
        OPS.sltrain_linear(x, A, B, torch.randn(0), torch.zeros(0, dtype=I64), 1.0, None, True)
    msg = str(e.value)
    assert msg.startswith("lowrank.sltrain_linear: x could not be made contiguous"), msg
    assert str(2 ** 40 * 4) in msg and "strides (0, 0)" in msg and not _PATH_OR_FUNC.search(msg), msg


def test_allocation_failure_names_op_and_size(monkeypatch):
    """A scratch larger than memory (the materialized W of a 2^26 x 2^20 layer, 2^48 bytes): the op's name and
    the byte count, not a bare allocator error."""
    monkeypatch.setenv("LOWRANK_SLTRAIN_CPU_PATH", "materialize")
    x, A, B = torch.zeros(1, 2 ** 20), torch.zeros(1, 2 ** 20), torch.zeros(2 ** 26, 1)
    with pytest.raises(RuntimeError) as e:
        OPS.sltrain_linear(x, A, B, torch.zeros(0), torch.zeros(0, dtype=I64), 1.0, None, False)
    msg = str(e.value)
    assert msg.startswith("lowrank.sltrain_linear: could not allocate"), msg
    assert str(2 ** 48) in msg and not _PATH_OR_FUNC.search(msg), msg


# ------------------------------------------------------------------------------------------ index check cost
@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_index_check_reports_first_repeat_and_out_of_range(device, dtype):
    args = _sltrain_args(device)
    idx = torch.tensor([5, 9, 2, 9, 5, 1], dtype=dtype, device=device)  # position 3 repeats 9 (4 repeats 5)
    vals = torch.randn(6, device=device)
    with pytest.raises(RuntimeError, match=r"lowrank.sltrain_linear: indices must be unique \(got indices\[3\] = 9"):
        OPS.sltrain_linear(*args[:3], vals, idx, 1.0, None, True)
    idx = torch.tensor([5, 30, 2, -1], dtype=dtype, device=device)  # out·in = 30
    with pytest.raises(RuntimeError, match=r"indices must lie in \[0, out·in\) = \[0, 30\) \(got indices\[1\] = 30\)"):
        OPS.sltrain_linear(*args[:3], vals[:4], idx, 1.0, None, True)


@pytest.mark.parametrize("device", devices)
def test_index_check_memory_does_not_grow_with_out_times_in(device):
    """A 2^40 x 2^20 layer (out·in = 2^60): a bitmap of out·in bits could never be allocated; the sort-based
    check needs O(nnz) and reports the duplicate. B is expanded (never materialized: the check runs first)."""
    x, A = torch.zeros(1, 2 ** 20, device=device), torch.zeros(1, 2 ** 20, device=device)
    B = torch.zeros(1, 1, device=device).expand(2 ** 40, 1)
    idx = torch.tensor([2 ** 59, 3, 2 ** 59 + 7, 3], dtype=I64, device=device)
    with pytest.raises(RuntimeError, match=r"indices must be unique \(got indices\[3\] = 3"):
        OPS.sltrain_linear(x, A, B, torch.zeros(4, device=device), idx, 1.0, None, True)
    idx[3] = 4  # valid now: the check passes, and B's full-size copy is what fails, with a clear message
    with pytest.raises(RuntimeError, match="lowrank.sltrain_linear: B could not be made contiguous"):
        OPS.sltrain_linear(x, A, B, torch.zeros(4, device=device), idx, 1.0, None, True)


# ------------------------------------------------------------------------------------------ basis_scores precision
@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("left", [False, True])
def test_basis_scores_float32_sum_over_many_rows_stays_exact(device, left):
    """2^24 equal rows (an expanded G: no memory): the per-tile partials (~87k on the CPU) summed in fp32 drift
    by ~7e-4; summed in fp64 the float32 score is the exactly rounded rows·|g|."""
    rows = 2 ** 24
    g = torch.full((1, 1), 0.1, device=device)
    G = g.expand(1, rows) if left else g.expand(rows, 1)
    Q = torch.ones(1, 1, device=device)
    got = lowrank.basis_scores(G, Q, left).item()
    truth = rows * float(g.item())
    print(f"basis_scores over {rows} rows: rel err {abs(got - truth) / truth:.2e}")
    assert abs(got - truth) <= 1e-6 * truth


# ------------------------------------------------------------------------------------------ optimizer state
def test_galore_state_dict_loaded_into_groups_in_another_order_fails_at_load():
    """torch pairs saved and current parameters by position: with the groups swapped, each parameter would get
    the other's moments. The mismatch is refused by load_state_dict itself, naming shapes, not at the next step."""
    from lowrank.optim import GaLoreAdamW
    a, b = torch.nn.Parameter(torch.randn(12, 8)), torch.nn.Parameter(torch.randn(5))
    opt = GaLoreAdamW([{"params": [a], "rank": 4}, {"params": [b]}], lr=1e-2)
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    opt.step()
    sd = opt.state_dict()
    swapped = GaLoreAdamW([{"params": [b]}, {"params": [a], "rank": 4}], lr=1e-2)
    with pytest.raises(ValueError, match="load_state_dict: group 0's parameter of shape \\(5,\\) would get"):
        swapped.load_state_dict(sd)
    same = GaLoreAdamW([{"params": [a], "rank": 4}, {"params": [b]}], lr=1e-2)
    same.load_state_dict(sd)  # the right order still loads
    same.step()


# ------------------------------------------------------------------------------------------ past 2^31 elements
def test_strided_g_with_offsets_past_2_to_32_indexes_in_64_bits(tmp_path):
    """galore_project and basis_scores read G through its strides without a copy: a G whose row stride is
    2^32 + 3 elements (a view of a sparse 32 GiB file: a few KiB on disk, nothing in memory) must read the
    right elements; 32-bit offset arithmetic would wrap to the wrong ones. The other ops copy their inputs
    (torch's copy indexes in 64 bits) and index their own buffers in int64 (csrc/*/*_cpu.cpp, common/cpu_gemm.h)."""
    stride = 2 ** 32 + 3
    storage = torch.from_file(str(tmp_path / "sparse.bin"), shared=True, size=2 * stride + 16, dtype=torch.float32)
    vals = torch.randn(3, 5)
    G = storage.as_strided((3, 5), (stride, 1))
    G.copy_(vals)
    P = torch.linalg.qr(torch.randn(5, 2))[0].T.contiguous()
    R, sq = lowrank.galore_project(G, P, False, True)
    torch.testing.assert_close(R, vals @ P.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sq, (vals * vals).sum(1), rtol=1e-5, atol=1e-5)
    Q = lowrank.dct_basis(5)
    torch.testing.assert_close(lowrank.basis_scores(G, Q, False), (vals @ Q.T).abs().sum(0), rtol=1e-5, atol=1e-5)
    GT = storage.as_strided((5, 3), (1, stride))  # left: columns 2^32 elements apart
    torch.testing.assert_close(lowrank.basis_scores(GT, Q, True), (Q @ vals.T).abs().sum(1), rtol=1e-5, atol=1e-5)
    PL = torch.linalg.qr(torch.randn(5, 2))[0].contiguous()  # left: P (m, r) = (5, 2)
    torch.testing.assert_close(lowrank.galore_project(GT, PL, True, False)[0], PL.T @ vals.T, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and lowrank's CUDA kernels")
def test_cuda_refuses_rows_past_2_to_31_before_copying():
    """The CUDA GEMMs take dimensions below 2^31: an expanded (no memory) input with 2^31 rows is refused
    with the op's name and the sizes, before any copy is attempted."""
    x = torch.zeros(1, 8, device="cuda").expand(2 ** 31, 8)
    with pytest.raises(RuntimeError, match=r"lowrank.monarch_matmul: x's rows .* below 2\^31 on CUDA \(got rows=2147483648"):
        OPS.monarch_matmul(x, torch.randn(2, 4, 4, device="cuda"), torch.randn(2, 6, 4, device="cuda"))
    A, B = torch.randn(2, 8, device="cuda"), torch.randn(5, 2, device="cuda")
    with pytest.raises(RuntimeError, match=r"lowrank.sltrain_linear: x's rows, in, out and r must stay below 2\^31"):
        OPS.sltrain_linear(x, A, B, torch.randn(0, device="cuda"), torch.zeros(0, dtype=I64, device="cuda"), 1.0,
                           None, True)
    G = torch.zeros(1, 8, device="cuda").expand(2 ** 31, 8)
    with pytest.raises(RuntimeError, match=r"lowrank.galore_project: .*(below 2\^31|at most 65535)"):
        OPS.galore_project(G, torch.randn(2, 8, device="cuda"), False, False)


def _backward_bad_cases():
    x, w1, w2 = torch.randn(2, 8), torch.randn(2, 4, 4), torch.randn(2, 4, 4)
    _, mid = OPS.monarch_matmul_forward_saving(x, w1, w2)
    g = torch.randn(2, 8)
    sl = _sltrain_args()
    g_sl = torch.randn(3, 5)
    mon = lambda *a: OPS.monarch_matmul_backward(*a, True, True)  # noqa: E731
    saved = lambda *a: OPS.monarch_matmul_backward_saved(*a, True, True)  # noqa: E731
    slb = lambda *a: OPS.sltrain_linear_backward(*a, 0.5, False, True, True, True)  # noqa: E731
    return {
        "monarch_grad_out_shape": (mon, [g[:, :3], x, w1, w2]),
        "monarch_grad_out_dtype": (mon, [g.double(), x, w1, w2]),
        "saved_mid_shape": (saved, [g, x, w1, w2, mid[:, :5]]),
        "saved_mid_dtype": (saved, [g, x, w1, w2, mid.double()]),
        "sltrain_grad_out_shape": (slb, [g_sl[:, :4]] + sl),
        "sltrain_grad_out_dtype": (slb, [g_sl.half()] + sl),
    }


@pytest.mark.parametrize("case", list(_backward_bad_cases()))
def test_backward_fakes_word_errors_as_the_kernels(case):
    """The backward ops' fakes (what torch.compile traces) raise the CPU kernel's message, word for word."""
    call, args = _backward_bad_cases()[case]
    with pytest.raises(RuntimeError) as real:
        call(*args)
    with pytest.raises(RuntimeError) as fake:
        call(*[a.to("meta") for a in args])
    assert str(real.value).startswith("lowrank.") and str(fake.value) == str(real.value)
