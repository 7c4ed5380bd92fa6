"""Monarch rows: ``lowrank.monarch_matmul`` against dense ``F.linear`` (cuBLAS / MKL) and fly's bmm path.

Counting, per row of B tokens, w1 ``(k, q, p)`` and w2 ``(l, s, r)``:
  FLOPs  fwd = 2·B·(k·q·p + l·s·r);  fwd+bwd = 3 × fwd (dx, dw1 and dw2 each cost about one forward).
  bytes  fwd = |x| + |w1| + |w2| + |out|;  fwd+bwd = 2 × fwd (each tensor and its gradient moved once).
"ours" is ``lowrank.monarch_matmul`` with its default ``save_middle=None``: on a CPU, rows whose blocks
exceed 128 keep the middle activation for the backward (the memory fly's path keeps too), the others and
every CUDA row recompute it in the backward.
Every row is first checked against ``monarch_matmul_reference`` in float64 (output, and in fwd+bwd also
the three gradients): max |ours − ref| / max |ref|, against a tolerance per dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import lowrank
from lowrank.nn.monarch import monarch_factor_shapes as monarch_shapes
from lowrank.reference import monarch_matmul_bmm, monarch_matmul_reference, monarch_to_dense

from . import Rows
from .hardware import DTYPE_NAMES, roofline
from . import fwd_or_fwd_bwd, rel_err
from .timing import peak_memory_mb, time_ms_each

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


@dataclass(frozen=True)
class Case:
    lead: tuple  # leading (token) dims of x
    n_in: int
    n_out: int
    nblocks: int
    dtype: torch.dtype
    mode: str  # "fwd" or "fwd+bwd"


def cases(device: str, quick: bool) -> list[Case]:
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    # 8192 tokens on GPU; on a CPU fewer, and no n=8192, so a full CPU run stays within minutes.
    tokens = 8192 if cuda else (128 if quick else 256)
    gpt2_lead = (4, tokens // 4)  # GPT-2 MLP rows also exercise leading batch dims
    square = [(1024, 4), (1024, 32)] + ([] if quick else [(4096, 4), (4096, 64)])
    if cuda and not quick:
        square += [(8192, 4), (8192, 64)]
    shapes = [((tokens,), n, n, nb) for n, nb in square]
    shapes += [(gpt2_lead, 768, 3072, 4)] + ([] if quick else [(gpt2_lead, 3072, 768, 4)])
    return [Case(lead, i, o, nb, dtype, mode) for lead, i, o, nb in shapes for mode in ("fwd", "fwd+bwd")]


def _reference(x, w1, w2, grad) -> list[torch.Tensor]:
    """float64 output (and gradients of x, w1, w2 when ``grad`` is given) of the index-formula spec."""
    ref_in = [t.detach().double().requires_grad_(grad is not None) for t in (x, w1, w2)]
    ref = monarch_matmul_reference(*ref_in)
    return [ref.detach()] + ([] if grad is None else list(torch.autograd.grad(ref, ref_in, grad.double())))


def _max_err(fn, x, w1, w2, grad, refs) -> float:
    """Worst relative error of ``fn`` (and of its gradients when ``grad`` is given) against ``refs``."""
    out = fn(x, w1, w2)
    got = [out] + ([] if grad is None else list(torch.autograd.grad(out, (x, w1, w2), grad)))
    errs = [rel_err(g, r) for g, r in zip(got, refs)]
    return max(errs, key=lambda e: math.inf if math.isnan(e) else e)  # a NaN must win, and fail


def measure(case: Case, device: str) -> dict:
    w1_shape, w2_shape = monarch_shapes(case.n_in, case.n_out, case.nblocks)
    bwd = case.mode == "fwd+bwd"
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(shape, scale=1.0):
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * scale
        return t.to(case.dtype).requires_grad_(bwd)

    x = randn((*case.lead, case.n_in))
    w1, w2 = randn(w1_shape, w1_shape[2] ** -0.5), randn(w2_shape, w2_shape[2] ** -0.5)
    k, q, p = w1_shape
    l, s, r = w2_shape
    batch = math.prod(case.lead)
    grad = torch.randn((*case.lead, l * s), generator=gen, device=device).to(case.dtype) if bwd else None

    flops = 2 * batch * (k * q * p + l * s * r) * (3 if bwd else 1)
    nbytes = (x.numel() + w1.numel() + w2.numel() + batch * l * s) * x.element_size() * (2 if bwd else 1)
    row = {
        "op": "monarch_matmul",
        "shape": f"{'x'.join(map(str, case.lead))} x {case.n_in} -> {l * s}",
        "nblocks": case.nblocks, "dtype": DTYPE_NAMES[case.dtype], "mode": case.mode,
        "ours_ms": None, "dense_ms": None, "bmm_ms": None, "tflops": None, "gbps": None,
        "vs_dense": None, "vs_bmm": None, "roofline_pct": None, "bound": None,
        "ours_mb": None, "bmm_mb": None, "max_err": None, "bmm_err": None,
        "tol": TOLERANCE[case.dtype], "ok": False, "error": None, "flops": flops, "bytes": nbytes,
    }
    try:
        refs = _reference(x, w1, w2, grad)
        row["max_err"] = _max_err(lowrank.monarch_matmul, x, w1, w2, grad, refs)
        row["bmm_err"] = _max_err(monarch_matmul_bmm, x, w1, w2, grad, refs)
        row["ok"] = row["max_err"] <= row["tol"]
        del refs
        ins = (x, w1, w2)
        dense = monarch_to_dense(w1.detach(), w2.detach()).requires_grad_(bwd)
        fns = {"ours": fwd_or_fwd_bwd(lambda: lowrank.monarch_matmul(*ins), ins, grad),
               "bmm": fwd_or_fwd_bwd(lambda: monarch_matmul_bmm(*ins), ins, grad),
               "dense": fwd_or_fwd_bwd(lambda: F.linear(x, dense), (x, dense), grad)}
        ms = time_ms_each(fns, device)
        row["ours_ms"], row["bmm_ms"], row["dense_ms"] = ms["ours"], ms["bmm"], ms["dense"]
        row["ours_mb"], row["bmm_mb"] = peak_memory_mb(fns["ours"], device), peak_memory_mb(fns["bmm"], device)
        del dense, fns
    except Exception as e:  # noqa: BLE001 -- one broken row must not hide the others
        row["ok"], row["error"] = False, f"{type(e).__name__}: {e}".splitlines()[0][:200]
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    ms = row["ours_ms"]
    if ms:
        row["tflops"] = flops / (ms * 1e-3) / 1e12
        row["gbps"] = nbytes / (ms * 1e-3) / 1e9
        row["vs_dense"] = row["dense_ms"] / ms if row["dense_ms"] else None
        row["vs_bmm"] = row["bmm_ms"] / ms if row["bmm_ms"] else None
        row["roofline_pct"], row["bound"] = roofline(device, case.dtype, flops, nbytes, ms)
    return row


def rows(device: str, quick: bool) -> Rows:
    return Rows(cases(device, quick), lambda case: measure(case, device))
