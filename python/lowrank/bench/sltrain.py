"""SLTrain rows: ``lowrank.sltrain_linear`` against dense ``F.linear`` (cuBLAS / MKL) and the official SLTrain path.

The layer is ``y = x·(scale·B·A + S)ᵀ`` with A ``(r, in)``, B ``(out, r)`` and a sparse S of ``nnz = δ·out·in``
entries (support drawn like SLTrain's module: ``randperm(out·in)[:nnz]``, sorted; int32 for ours, int64 for
the official path). "official" is ``sltrain_linear_official``: SLTrain's own autograd function (materialize W
with a scatter-add, ``F.linear``, rebuild W in backward; what SLTrain users run today); "dense" is ``F.linear(x, W)`` on an already
materialized W of the same shape (its gradients are dx and dW). Timed calls pass ``check=False``: index
validation is a debug path. Peak MiB is the extra device memory one call of the row's mode holds
(max_memory_allocated delta, reset before; n/a on CPU).

Counting, per row of T tokens (r the rank):
  FLOPs  fwd = 2·T·out·in + 2·out·in·r (the matmul, plus materializing B·A);  fwd+bwd = 3 × fwd (dx, and
         dW = dyᵀx whose projections dA = Bᵀ·dW and dB = dW·Aᵀ each cost about one more forward). A kernel
         that never materializes W does less work than this count, so its TFLOP/s can exceed the datasheet.
  bytes  fwd = |x| + |A| + |B| + |values| + |indices| + |out|;  fwd+bwd = 2 × fwd.
Every row is first checked against ``sltrain_linear_reference`` in float64 (output, and in fwd+bwd also the
gradients of x, A, B and values): max |ours − ref| / max |ref|, against a tolerance per dtype. On a CPU
the LLaMA-7B shape is left out (one fwd+bwd call takes well over 5 s there).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import lowrank
from lowrank.reference import sltrain_linear_official, sltrain_linear_reference, sltrain_weight

from . import Rows
from .hardware import DTYPE_NAMES, roofline
from . import fwd_or_fwd_bwd, rel_err
from .timing import peak_memory_mb, time_ms_each

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
SCALE = 0.25  # SLTrain's alpha / r-style multiplier of B·A; any value other than 1 exercises it


@dataclass(frozen=True)
class Case:
    lead: tuple  # leading (token) dims of x
    n_in: int
    n_out: int
    rank: int
    density: float  # δ = nnz / (out·in)
    dtype: torch.dtype
    mode: str  # "fwd" or "fwd+bwd"


def cases(device: str, quick: bool) -> list[Case]:
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    tokens = 8192 if cuda else (128 if quick else 256)
    mlp_lead = (4, tokens // 4)  # MLP rows also exercise leading batch dims
    shapes = [((tokens,), 2048, 2048, 512, 0.03)]  # LLaMA-1B attention projection
    if not quick:
        shapes.append((mlp_lead, 2048, 5461, 512, 0.03))  # LLaMA-1B MLP up/gate
        if cuda:  # on a CPU one fwd+bwd call of this shape takes well over 5 s
            shapes.append((mlp_lead, 4096, 11008, 1024, 0.05))  # LLaMA-7B MLP up/gate
    return [Case(lead, i, o, r, d, dtype, mode) for lead, i, o, r, d in shapes for mode in ("fwd", "fwd+bwd")]


def _reference(x, A, B, values, indices, grad) -> list[torch.Tensor]:
    """float64 output (and gradients of x, A, B, values when ``grad`` is given) of the official path."""
    ref_in = [t.detach().double().requires_grad_(grad is not None) for t in (x, A, B, values)]
    ref = sltrain_linear_reference(*ref_in[:3], ref_in[3], indices, SCALE)
    return [ref.detach()] + ([] if grad is None else list(torch.autograd.grad(ref, ref_in, grad.double())))


def _max_err(fn, x, A, B, values, indices, grad, refs) -> float:
    """Worst relative error of ``fn`` (and of its gradients when ``grad`` is given) against ``refs``."""
    out = fn(x, A, B, values, indices)
    got = [out] + ([] if grad is None else list(torch.autograd.grad(out, (x, A, B, values), grad)))
    errs = [rel_err(g, r) for g, r in zip(got, refs)]
    return max(errs, key=lambda e: math.inf if math.isnan(e) else e)  # a NaN must win, and fail


def _ours(x, A, B, values, indices, check=True):
    return lowrank.sltrain_linear(x, A, B, values, indices, SCALE, None, check=check)


def _official(x, A, B, values, indices):
    return sltrain_linear_official(x, A, B, values, indices, SCALE)


def measure(case: Case, device: str) -> dict:
    bwd = case.mode == "fwd+bwd"
    gen = torch.Generator(device=device).manual_seed(0)
    n_in, n_out, r = case.n_in, case.n_out, case.rank

    def randn(shape, scale=1.0):
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * scale
        return t.to(case.dtype).requires_grad_(bwd)

    nnz = int(case.density * n_out * n_in)
    x = randn((*case.lead, n_in))
    A, B = randn((r, n_in), n_in ** -0.5), randn((n_out, r), r ** -0.5)
    values = randn((nnz,), n_in ** -0.5)  # entries of S about as large as those of scale·B·A
    idx64 = torch.randperm(n_out * n_in, generator=gen, device=device)[:nnz].sort().values
    idx32 = idx64.to(torch.int32)
    batch = math.prod(case.lead)
    grad = torch.randn((*case.lead, n_out), generator=gen, device=device).to(case.dtype) if bwd else None

    flops = (2 * batch * n_out * n_in + 2 * n_out * n_in * r) * (3 if bwd else 1)
    nbytes = ((x.numel() + A.numel() + B.numel() + nnz + batch * n_out) * x.element_size()
              + nnz * idx32.element_size()) * (2 if bwd else 1)
    row = {
        "op": "sltrain_linear",
        "shape": f"{'x'.join(map(str, case.lead))} x {n_in} -> {n_out}",
        "rank": r, "density": case.density, "dtype": DTYPE_NAMES[case.dtype], "mode": case.mode,
        "ours_ms": None, "dense_ms": None, "official_ms": None, "tflops": None, "gbps": None,
        "vs_dense": None, "vs_official": None, "roofline_pct": None, "bound": None,
        "ours_mb": None, "dense_mb": None, "official_mb": None, "max_err": None, "official_err": None,
        "tol": TOLERANCE[case.dtype], "ok": False, "error": None, "flops": flops, "bytes": nbytes,
    }
    try:
        refs = _reference(x, A, B, values, idx64, grad)
        row["max_err"] = _max_err(_ours, x, A, B, values, idx32, grad, refs)  # validation on: not timed
        row["official_err"] = _max_err(_official, x, A, B, values, idx64, grad, refs)
        row["ok"] = row["max_err"] <= row["tol"]
        del refs
        ins = (x, A, B, values)
        dense = sltrain_weight(A.detach(), B.detach(), values.detach(), idx64, SCALE).requires_grad_(bwd)
        fns = {"ours": fwd_or_fwd_bwd(lambda: _ours(*ins, idx32, check=False), ins, grad),
               "official": fwd_or_fwd_bwd(lambda: _official(*ins, idx64), ins, grad),
               "dense": fwd_or_fwd_bwd(lambda: F.linear(x, dense), (x, dense), grad)}
        ms = time_ms_each(fns, device)
        row["ours_ms"], row["official_ms"], row["dense_ms"] = ms["ours"], ms["official"], ms["dense"]
        for name in fns:
            row[f"{name}_mb"] = peak_memory_mb(fns[name], device)
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
        row["vs_official"] = row["official_ms"] / ms if row["official_ms"] else None
        row["roofline_pct"], row["bound"] = roofline(device, case.dtype, flops, nbytes, ms)
    return row


def rows(device: str, quick: bool) -> Rows:
    return Rows(cases(device, quick), lambda case: measure(case, device))
