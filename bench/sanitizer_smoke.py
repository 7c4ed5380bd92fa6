"""Small, odd-shaped forward + backward of monarch_matmul, checked against the float64 reference.

Meant to run under ``compute-sanitizer --tool memcheck``: the shapes are tiny (instrumented kernels
are slow) and deliberately not multiples of any tile, so out-of-bounds accesses at tile edges show up.
Exits 1 on any mismatch. ``--device cpu`` runs the same checks without a GPU (a dry run).
"""
from __future__ import annotations

import argparse
import sys

import torch

import lowrank
from lowrank.reference import monarch_matmul_reference

# (x shape, w1 (k, q, p), w2 (l, s, r)) with k·p = n and l·r = k·q
SHAPES = [
    ((7, 20), (2, 6, 10), (4, 3, 3)),
    ((3, 5, 12), (4, 3, 3), (3, 5, 4)),
    ((1, 2, 3, 9), (3, 5, 3), (5, 7, 3)),
    ((33, 64), (4, 16, 16), (4, 16, 16)),
    ((129, 96), (3, 40, 32), (8, 24, 15)),
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    device = parser.parse_args().device
    torch.manual_seed(0)
    failures = 0
    for dtype, tol in TOLERANCE.items():
        for x_shape, w1_shape, w2_shape in SHAPES:
            errs = check(x_shape, w1_shape, w2_shape, dtype, device)
            ok = all(e <= tol for e in errs)  # a NaN fails too
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {str(dtype)[6:]:9} x{x_shape} w1{w1_shape} w2{w2_shape} "
                  f"err out/dx/dw1/dw2 = {' '.join(f'{e:.1e}' for e in errs)} (tol {tol:.0e})")
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
