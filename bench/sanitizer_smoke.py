"""Small, odd-shaped calls of every lowrank op on the device, checked against references.

monarch_matmul and sltrain_linear (forward + backward) are checked against float64 references; the
iFairy and projection ops against the CPU kernels (which the test suite checks against float64).

Meant to run under ``compute-sanitizer --tool memcheck``: the shapes are tiny (instrumented kernels
are slow) and deliberately not multiples of any tile, so out-of-bounds accesses at tile edges show up.
SLTrain runs with int32 and int64 indices, with and without bias, including an empty
and a full support. The reliability paths run too: the sort-based index check refusing a duplicate and an
out-of-range index, and Monarch's non-finite rows (a shape whose dense matrix has structural zeros).
Exits 1 on any mismatch. ``--device cpu`` runs the same checks without a GPU (a dry run). ``--quick`` (for
racecheck and synccheck, which are slower) keeps float32 and bfloat16 and the first shapes of each list:
every kernel still launches, tile edges included.
"""
from __future__ import annotations

import argparse
import sys

import torch

import lowrank
from lowrank.reference import monarch_matmul_reference, sltrain_linear_reference

# (x shape, w1 (k, q, p), w2 (l, s, r)) with k·p = n and l·r = k·q
SHAPES = [
    ((7, 20), (2, 6, 10), (4, 3, 3)),
    ((3, 5, 12), (4, 3, 3), (3, 5, 4)),
    ((1, 2, 3, 9), (3, 5, 3), (5, 7, 3)),
    ((33, 64), (4, 16, 16), (4, 16, 16)),
    ((129, 96), (3, 40, 32), (8, 24, 15)),
]
# SLTrain: (x shape, out, rank r, nnz, bias) -- x's last dim is in; nnz = out·in is the full support
SLTRAIN_SHAPES = [
    ((7, 20), 13, 3, 17, False),
    ((3, 5, 12), 33, 5, 100, True),
    ((1, 2, 3, 9), 17, 1, 0, True),  # empty support: a pure low-rank layer
    ((33, 64), 64, 16, 64 * 64, False),  # full support
    ((129, 96), 130, 24, 1234, True),
]
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.cpu().double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def check(x_shape, w1_shape, w2_shape, dtype, device) -> list[float]:
    """Relative errors of out, dx, dw1, dw2 against float64."""
    x = torch.randn(x_shape, device=device)
    w1 = torch.randn(w1_shape, device=device) * w1_shape[2] ** -0.5
    w2 = torch.randn(w2_shape, device=device) * w2_shape[2] ** -0.5
    ours_in = [t.to(dtype).requires_grad_() for t in (x, w1, w2)]
    # Same rounded inputs, on the CPU: only our kernels (and little else) run under the sanitizer.
    ref_in = [t.to(dtype).cpu().double().requires_grad_() for t in (x, w1, w2)]
    out = lowrank.monarch_matmul(*ours_in)
    ref = monarch_matmul_reference(*ref_in)
    grad = torch.randn(ref.shape, device=device).to(dtype)
    grads = torch.autograd.grad(out, ours_in, grad)
    ref_grads = torch.autograd.grad(ref, ref_in, grad.cpu().double())
    if device == "cuda":
        torch.cuda.synchronize()  # surface asynchronous kernel errors here, not later
    return [rel_err(out, ref)] + [rel_err(g, r) for g, r in zip(grads, ref_grads)]


def check_sltrain(x_shape, n_out, rank, nnz, with_bias, index_dtype, dtype, device) -> list[float]:
    """Relative errors of out, dx, dA, dB, dvalues (and dbias) against float64."""
    n_in = x_shape[-1]
    x = torch.randn(x_shape, device=device)
    A = torch.randn(rank, n_in, device=device) * n_in ** -0.5
    B = torch.randn(n_out, rank, device=device) * rank ** -0.5
    values = torch.randn(nnz, device=device) * n_in ** -0.5
    indices = torch.randperm(n_out * n_in, device=device)[:nnz].sort().values.to(index_dtype)
    floats = [x, A, B, values] + ([torch.randn(n_out, device=device)] if with_bias else [])
    ours_in = [t.to(dtype).requires_grad_() for t in floats]
    ref_in = [t.to(dtype).cpu().double().requires_grad_() for t in floats]
    scale = 0.7
    bias, ref_bias = (ours_in[4], ref_in[4]) if with_bias else (None, None)
    out = lowrank.sltrain_linear(*ours_in[:4], indices, scale, bias)
    ref = sltrain_linear_reference(*ref_in[:4], indices.cpu(), scale, ref_bias)
    grad = torch.randn(ref.shape, device=device).to(dtype)
    grads = torch.autograd.grad(out, ours_in, grad)
    ref_grads = torch.autograd.grad(ref, ref_in, grad.cpu().double())
    if device == "cuda":
        torch.cuda.synchronize()
    # an empty support has an empty dvalues: rel_err of nothing is 0 (max of an empty tensor would raise)
    return [rel_err(out, ref)] + [rel_err(g, r) if r.numel() else 0.0 for g, r in zip(grads, ref_grads)]


def cpu_vs_device(name, fn, args, device, tol) -> tuple[bool, str]:
    """Run fn on device and on the CPU (whose kernels the test suite checks against float64 references):
    the largest relative difference over all outputs, and whether it is within tol."""
    to = lambda a, dev: a.to(dev) if isinstance(a, torch.Tensor) else a  # noqa: E731
    got = fn(*[to(a, device) for a in args])
    want = fn(*[to(a, "cpu") for a in args])
    if device == "cuda":
        torch.cuda.synchronize()
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    errs = [rel_err(g.float(), w.double()) if w.numel() else 0.0 for g, w in zip(got, want)
            if isinstance(w, torch.Tensor)]
    worst = max(errs) if errs else 0.0
    return worst <= tol, f"{name} max rel diff vs CPU {worst:.1e} (tol {tol:.0e})"


def ifairy_and_projection_cases(device):
    """(name, fn, args, tol) of the iFairy and projection ops on small, tile-unfriendly shapes."""
    cases = []
    for out_f, in_f in ((7, 5), (33, 130), (65, 1537)):
        wr, wi = torch.randn(out_f, in_f), torch.randn(out_f, in_f)
        packed, scales = lowrank.ifairy_quantize(wr, wi)
        cases.append((f"ifairy_quantize {out_f}x{in_f}", lowrank.ifairy_quantize, (wr, wi), 1e-6))
        cases.append((f"ifairy_dequantize {out_f}x{in_f}", lambda p, s, n=in_f: lowrank.ifairy_dequantize(p, s, n),
                      (packed, scales), 1e-6))
        for tokens in (1, 3, 17, 70):
            xr, xi = torch.randn(tokens, in_f), torch.randn(tokens, in_f)
            for act_quant, dt, tol in ((True, torch.float32, 1e-5), (False, torch.float32, 1e-5),
                                       (False, torch.bfloat16, 2e-2)):
                cases.append((f"ifairy_linear {tokens}x{in_f}->{out_f} act_quant={act_quant} {str(dt)[6:]}",
                              lambda a, b, p, s, q=act_quant: lowrank.ifairy_linear(a, b, p, s, act_quant=q),
                              (xr.to(dt), xi.to(dt), packed, scales), tol))
    for m, n, r in ((37, 21, 5), (20, 45, 7), (130, 129, 16)):
        for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            G = torch.randn(m, n).to(dt)
            left = m < n
            basis = torch.linalg.qr(torch.randn(m if left else n, r)).Q  # orthonormal columns
            P = basis if left else basis.T.contiguous()  # left: (m, r); right: (r, n)
            cases.append((f"galore_project {m}x{n} r={r} {str(dt)[6:]}",
                          lambda g, p, lf=left: lowrank.galore_project(g, p, lf, True), (G, P), tol))
            W = torch.randn(m, n).to(dt)
            Mx = torch.randn(*((r, n) if left else (m, r)))
            rs = torch.rand(n if left else m)

            def update(w, mm, p, g, s, lf=left):
                w = w.clone()
                lowrank.galore_update_(w, mm, p, lf, 0.99, g, s)
                return w
            cases.append((f"galore_update_ {m}x{n} r={r} {str(dt)[6:]}", update, (W, Mx, P, G, rs), tol))
        R = torch.randn(m, r)

        def adam(m_, v_, r_):
            m_, v_ = m_.clone(), v_.clone()
            nrm = lowrank.adam_lowrank_(m_, v_, r_, 0.9, 0.999, 1e-6)
            return m_, v_, nrm
        cases.append((f"adam_lowrank_ {m}x{r}", adam, (torch.randn(m, r), torch.rand(m, r), R), 1e-5))
        Q = lowrank.dct_basis(min(m, n))
        cases.append((f"basis_scores {m}x{n}", lambda g, q, lf=(m < n): lowrank.basis_scores(g, q, lf),
                      (torch.randn(m, n), Q), 1e-4))
    cases.append(("dct_basis 97", lambda t: lowrank.dct_basis(97, device=t.device), (torch.empty(0),), 1e-5))
    return cases


def reliability_cases(device) -> int:
    """The error and non-finite paths on the device; returns the number of failures."""
    failures = 0
    x, A, B = torch.randn(5, 9, device=device), torch.randn(2, 9, device=device), torch.randn(7, 2, device=device)
    for bad, want in (([3, 40, 3], "unique"), ([3, 63, 1], "lie in")):
        idx = torch.tensor(bad, device=device)
        try:
            lowrank.sltrain_linear(x, A, B, torch.randn(3, device=device), idx, 1.0)
            ok, what = False, "no error"
        except RuntimeError as e:
            ok, what = want in str(e), str(e).splitlines()[0][:160]
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} sltrain index check {bad}: {what}")
    w1, w2 = torch.randn(3, 4, 5, device=device), torch.randn(6, 2, 2, device=device)  # r < k: structural zeros
    for dtype in (torch.float32, torch.bfloat16):
        xm = torch.randn(37, 15, device=device, dtype=dtype)
        xm[3, 2], xm[20, 14] = float("inf"), float("nan")
        out = lowrank.monarch_matmul(xm, w1.to(dtype), w2.to(dtype))
        bad_rows = ~torch.isfinite(xm).all(-1)
        ok = bool((~torch.isfinite(out[bad_rows])).all() and torch.isfinite(out[~bad_rows]).all())
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} monarch non-finite rows {str(dtype)[6:]}")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="float32 + bfloat16, fewer shapes")
    args = parser.parse_args()
    device = args.device
    torch.manual_seed(0)
    failures = reliability_cases(device)
    dtypes = {t: v for t, v in TOLERANCE.items() if not args.quick or t != torch.float16}
    shapes, sl_shapes = (SHAPES[:3] + SHAPES[4:], SLTRAIN_SHAPES[:2] + SLTRAIN_SHAPES[4:]) if args.quick \
        else (SHAPES, SLTRAIN_SHAPES)
    for dtype, tol in dtypes.items():
        for x_shape, w1_shape, w2_shape in shapes:
            errs = check(x_shape, w1_shape, w2_shape, dtype, device)
            ok = all(e <= tol for e in errs)  # a NaN fails too
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {str(dtype)[6:]:9} x{x_shape} w1{w1_shape} w2{w2_shape} "
                  f"err out/dx/dw1/dw2 = {' '.join(f'{e:.1e}' for e in errs)} (tol {tol:.0e})")
    for dtype, tol in dtypes.items():
        for x_shape, n_out, rank, nnz, with_bias in sl_shapes:
            for index_dtype in (torch.int32, torch.int64):
                what = (f"{str(dtype)[6:]:9} sltrain x{x_shape} -> {n_out} r={rank} nnz={nnz} "
                        f"{str(index_dtype)[6:]}{' +bias' if with_bias else ''}")
                try:
                    errs = check_sltrain(x_shape, n_out, rank, nnz, with_bias, index_dtype, dtype, device)
                except Exception as e:  # noqa: BLE001 -- report it and go on with the other cases
                    failures += 1
                    print(f"FAIL {what}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
                    continue
                ok = all(e <= tol for e in errs)
                failures += not ok
                print(f"{'ok  ' if ok else 'FAIL'} {what} err out/dx/dA/dB/dvalues{'/dbias' if with_bias else ''} "
                      f"= {' '.join(f'{e:.1e}' for e in errs)} (tol {tol:.0e})")
    cases = ifairy_and_projection_cases(device)
    for name, fn, fn_args, tol in cases[::3] if args.quick else cases:
        try:
            ok, what = cpu_vs_device(name, fn, fn_args, device, tol)
        except Exception as e:  # noqa: BLE001
            ok, what = False, f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {what}")
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
