"""Projection rows: one ``lowrank.optim.GaLoreAdamW`` step of a single (m, n) weight against galore-torch.

op ``galore_step`` (``fira=False``): ours = ``GaLoreAdamW.step()``; official = ``galore_torch.GaLoreAdamW.step()``
(eager); compiled_ms (JSON) = the same galore-torch ``step`` under ``torch.compile`` (default mode, dynamo reset
per row; ``compile_s`` is the time of its first two calls, the second recompiles for the dynamic step counter).
op ``fira_step``: ours with ``fira=True``; official = ``lowrank.reference.projected_adamw_step_reference(fira=True)``
in the row's precision (Fira's published step: explicit residual and dense back-projections, eager).
The SVD is excluded from every step: both optimizers get the same orthonormal P (QR of a random matrix) injected
at step 1 with ``update_proj_gap`` 10⁹, so no timed step refreshes. Weights and gradients share the row's dtype
(galore-torch then keeps P and moments in that dtype; ours keeps them fp32); W ~ 0.02·N(0, 1), G ~ 0.01·N(0, 1),
α = 0.25, lr 1e-3, wd 0.

% roof = 100 · floor / ours, the floor being the two-pass HBM traffic (read G twice, read W, write W:
(2·|G| + 2·|W|) bytes) over the *measured* copy bandwidth of the device (``bw_GBps`` in the JSON; on a CPU a
256 MiB copy). GaLore alone needs only one read of G (3 transfers): that stricter figure is ``floor3_pct``.
Peak MiB: extra device memory one step holds (n/a on CPU).

op ``refresh``: subspace refresh of a gradient, ours = ``lowrank.dct_select`` on the shared DCT basis (built once,
``dct_basis_ms`` in the JSON); official = ``torch.linalg.svd(G.float(), full_matrices=False)`` as galore-torch
calls it; ``randomized_ms`` = ``torch.svd_lowrank(q=r, niter=2)``.

Checks (``max err``): a step from the same W, G, P is compared with the float64 reference step
(max |ΔW_ours − ΔW_ref| / max |ΔW_ref| for fp32 weights; max |W_ours − W_ref| / max |W_ref| for bf16 weights,
which round once); ``official err`` is galore-torch's (or the reference's) own error measured the same way. A
refresh row checks that the selected rows carry the top-r score mass of the float64 scores.

op ``adam_8bit``: the moment update alone on an (m, r) projected state: ours = ``lowrank.adam_lowrank_8bit_``
(8-bit blockwise moments, one pass); official = ``lowrank.reference.adam_lowrank_8bit_reference`` (the same maths
in eager torch ops: bitsandbytes, whose 8-bit Adam galore-torch uses, is not a dependency); ``fp32_ms`` =
``lowrank.adam_lowrank_`` on fp32 moments. max err: N against the reference's (codes must match exactly).

CUDA grid: shapes 4096x4096, 11008x4096, 4096x11008; ranks 128, 256, 512 (Fira: 128); fp32 and bf16; refresh at
4096x11008. CPU runs use the 7B shapes divided by 4, rank 128, Fira on the square shape only, refresh at
1024x2752 (an SVD of 4096x11008 takes minutes on a few cores). Quick: one 512x384 r64 fp32 GaLore row.
The compiled baseline costs a compile per row (tens of seconds), so it is timed on the square rank-128 rows
only (4096x4096 on CUDA, 1024x1024 on a CPU); LOWRANK_BENCH_NO_COMPILE=1 skips it.
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

import lowrank
from lowrank.optim import GaLoreAdamW
from lowrank.reference import basis_scores_reference, projected_adamw_step_reference

from . import Rows
from .hardware import DTYPE_NAMES
from .timing import copy_bandwidth_gbps, peak_memory_mb, time_ms, time_ms_each

ALPHA, LR = 0.25, 1e-3
NO_REFRESH = 10 ** 9
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2.0 ** -8}
COMPILE = os.environ.get("LOWRANK_BENCH_NO_COMPILE", "") in ("", "0")  # set it to skip the compiled baseline


@dataclass(frozen=True)
class Case:
    op: str  # "galore_step", "fira_step" or "refresh"
    m: int
    n: int
    rank: int
    dtype: torch.dtype


def cases(device: str, quick: bool) -> list[Case]:
    if quick:
        return [Case("galore_step", 512, 384, 64, torch.float32)]
    dtypes = (torch.float32, torch.bfloat16)
    if device.startswith("cuda"):
        shapes, ranks, refresh = [(4096, 4096), (11008, 4096), (4096, 11008)], (128, 256, 512), (4096, 11008)
    else:
        shapes, ranks, refresh = [(1024, 1024), (2752, 1024), (1024, 2752)], (128,), (1024, 2752)
    out = [Case("galore_step", m, n, r, dt) for dt in dtypes for (m, n) in shapes for r in ranks]
    out += [Case("fira_step", m, n, 128, dt) for dt in dtypes for (m, n) in shapes[: None if device != "cpu" else 1]]
    out += [Case("refresh", *refresh, 128, dt) for dt in dtypes]
    out += [Case("adam_8bit", m, r, r, torch.float32) for m, r in
            (((11008, 512), (4096, 512)) if device.startswith("cuda") else ((2752, 128), (1024, 128)))]
    return out


# the rows that also time galore-torch under torch.compile (each costs a compile of tens of seconds)
SQUARE = {True: (4096, 4096), False: (1024, 1024)}

_bandwidth: dict[str, float | None] = {}


def bandwidth_gbps(device: str) -> float | None:
    """Measured copy bandwidth (bytes read + written per second), once per device and run."""
    if device not in _bandwidth:
        if device.startswith("cuda"):
            _bandwidth[device] = copy_bandwidth_gbps(device)
        else:
            src = torch.empty(64 * 2**20, dtype=torch.float32)
            src.fill_(1.0)
            dst = torch.empty_like(src)
            ms = time_ms(lambda: dst.copy_(src), device)
            _bandwidth[device] = 2 * src.numel() * 4 / (ms * 1e-3) / 1e9
    return _bandwidth[device]


def _time_slow_ms(fn, device: str, reps: int = 3) -> float:
    """Median of a few synchronized calls, for calls of a second or more (an SVD) that time_ms would repeat."""
    fn()
    times = []
    for _ in range(reps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def _inputs(case: Case, device: str):
    gen = torch.Generator(device="cpu").manual_seed(0)
    m, n, r = case.m, case.n, case.rank
    W = (torch.randn(m, n, generator=gen) * 0.02).to(device=device, dtype=case.dtype)  # LLaMA's init scale
    G = (torch.randn(m, n, generator=gen) * 1e-2).to(device=device, dtype=case.dtype)
    left = m < n
    q, _ = torch.linalg.qr(torch.randn(m if left else n, r, generator=gen))
    P = (q if left else q.T).contiguous().to(device)
    return W, G, P, left


def _group(W, case: Case, **extra) -> dict:
    return {"params": [W], "rank": case.rank, "update_proj_gap": NO_REFRESH, "scale": ALPHA, "proj_type": "std",
            **extra}


def _ours(W0, G, P, case, fira):
    W = nn.Parameter(W0.clone())
    W.grad = G.clone()
    opt = GaLoreAdamW([_group(W, case, fira=fira)], lr=LR)
    opt.state[W].update(step=1, P=P.clone())  # a built projector, as after the first (refreshing) step
    return W, opt


def _galore_torch(W0, G, P, case):
    import galore_torch
    from galore_torch.galore_projector import GaLoreProjector

    W = nn.Parameter(W0.clone())
    W.grad = G.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = galore_torch.GaLoreAdamW([_group(W, case)], lr=LR)
    proj = GaLoreProjector(case.rank, update_proj_gap=NO_REFRESH, scale=ALPHA, proj_type="std")
    proj.ortho_matrix = P.to(case.dtype)  # galore-torch keeps P in the weight's dtype
    opt.state[W].update(step=1, projector=proj)
    return W, opt


def _reference_step(W, G, P, case, fira, state=None):
    """One reference step on W in place; float64 when W, G and P are float64."""
    state = {"step": 1, "P": P} if state is None else state
    projected_adamw_step_reference(W, G, state, lr=LR, rank=case.rank, update_proj_gap=NO_REFRESH, scale=ALPHA,
                                   fira=fira)
    return state


def _err(W_after, W0, W_ref, W0_64, dtype) -> float:
    if dtype == torch.float32:
        d, d_ref = W_after.detach().double() - W0_64, W_ref - W0_64
    else:
        d, d_ref = W_after.detach().double(), W_ref
    return ((d - d_ref).abs().max() / d_ref.abs().max().clamp_min(1e-30)).item()


def _floor_ms(case: Case, device: str, transfers_G: int) -> tuple[float | None, float | None]:
    bw = bandwidth_gbps(device)
    size = case.m * case.n * torch.empty((), dtype=case.dtype).element_size()
    nbytes = (transfers_G + 2) * size
    return nbytes, (nbytes / (bw * 1e9) * 1e3 if bw else None)


def _compiled_baseline(W0, G, P, case, device, row):
    if not COMPILE:
        row["compile_note"] = "skipped (LOWRANK_BENCH_NO_COMPILE)"
        return
    if (case.m, case.n) != SQUARE[device.startswith("cuda")] or case.rank != 128:
        row["compile_note"] = "compiled baseline timed on the square rank-128 rows only (a compile per row)"
        return
    torch._dynamo.reset()
    W, opt = _galore_torch(W0, G, P, case)
    step = torch.compile(opt.step)
    start = time.perf_counter()
    try:
        step()
        step()  # the step counter changed: one recompile with it dynamic
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 -- report, keep the row
        row["compile_note"] = f"torch.compile failed: {type(e).__name__}: {e}".splitlines()[0][:160]
        return
    row["compile_s"] = time.perf_counter() - start
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    if graphs == 0:
        row["compile_note"] = "torch.compile captured no graph (ran eager)"
        return
    row["compiled_ms"] = time_ms(step, device)
    row["compiled_mb"] = peak_memory_mb(step, device)


def _measure_step(case: Case, device: str, row: dict) -> None:
    fira = case.op == "fira_step"
    W0, G, P, left = _inputs(case, device)
    W0_64, G64, P64 = W0.double(), G.double(), P.double()
    # correctness: one step from the same state, against the float64 reference
    W_ref = W0_64.clone()
    _reference_step(W_ref, G64, P64, case, fira)
    W, opt = _ours(W0, G, P, case, fira)
    opt.step()
    row["max_err"] = _err(W, W0, W_ref, W0_64, case.dtype)
    if fira:
        W_off = W0.float().clone()
        _reference_step(W_off, G.float(), P, case, True)
        row["official_err"] = _err(W_off.to(case.dtype), W0, W_ref, W0_64, case.dtype)
    else:
        Wg, optg = _galore_torch(W0, G, P, case)
        optg.step()
        row["official_err"] = _err(Wg, W0, W_ref, W0_64, case.dtype)
        del Wg, optg
    row["ok"] = row["max_err"] <= TOLERANCE[case.dtype]
    del W_ref, W0_64, G64, P64
    # timings (each optimizer keeps stepping on its own state; no step refreshes), interleaved on a CPU
    if fira:
        Wf = W0.clone()
        state = {"step": 1, "P": P}
        if case.dtype == torch.float32:
            def fn():
                _reference_step(Wf, G, P, case, True, state)
        else:  # the reference computes in fp32 on fp32 copies and rounds W once, as ours does
            def fn():
                w = Wf.float()
                _reference_step(w, G.float(), P, case, True, state)
                Wf.copy_(w)
    else:
        Wg, optg = _galore_torch(W0, G, P, case)
        fn = optg.step
    ms = time_ms_each({"ours": opt.step, "official": fn}, device)
    row["ours_ms"], row["official_ms"] = ms["ours"], ms["official"]
    row["ours_mb"], row["official_mb"] = peak_memory_mb(opt.step, device), peak_memory_mb(fn, device)
    del W, opt, fn
    if not fira:
        del Wg, optg
        _compiled_baseline(W0, G, P, case, device, row)
    nbytes, floor = _floor_ms(case, device, 2)
    row["bytes"], row["bw_GBps"] = nbytes, bandwidth_gbps(device)
    if floor:
        row["roofline_pct"] = 100 * floor / row["ours_ms"]
        row["floor3_pct"] = 100 * _floor_ms(case, device, 1)[1] / row["ours_ms"]
    row["vs_official"] = row["official_ms"] / row["ours_ms"]
    if row.get("compiled_ms"):
        row["vs_compiled"] = row["compiled_ms"] / row["ours_ms"]


def _measure_refresh(case: Case, device: str, row: dict) -> None:
    W0, G, P, left = _inputs(case, device)
    size = case.m if left else case.n
    start = time.perf_counter()
    Q = lowrank.dct_basis(size, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    row["dct_basis_ms"] = (time.perf_counter() - start) * 1e3
    idx = lowrank.dct_select(G, Q, case.rank, left)
    scores = basis_scores_reference(G.double(), Q.double(), left)
    best = scores.topk(case.rank).values.sum()
    row["max_err"] = max(((best - scores[idx.long()].sum()) / best).item(), 0.0)  # lost top-r score mass
    row["ok"] = row["max_err"] <= 1e-5 and idx.dtype == torch.int32 and bool((idx[1:] > idx[:-1]).all())
    slow = _time_slow_ms if device.startswith("cuda") else time_ms
    row["ours_ms"] = time_ms(lambda: lowrank.dct_select(G, Q, case.rank, left), device)
    row["ours_mb"] = peak_memory_mb(lambda: lowrank.dct_select(G, Q, case.rank, left), device)
    row["official_ms"] = slow(lambda: torch.linalg.svd(G.float(), full_matrices=False), device)
    row["official_mb"] = peak_memory_mb(lambda: torch.linalg.svd(G.float(), full_matrices=False), device)
    row["randomized_ms"] = slow(lambda: torch.svd_lowrank(G.float(), q=case.rank, niter=2), device)
    row["vs_official"] = row["official_ms"] / row["ours_ms"]


def _measure_adam_8bit(case: Case, device: str, row: dict) -> None:
    from lowrank.reference import STATE8_BLOCK, adam_lowrank_8bit_reference
    gen = torch.Generator().manual_seed(0)
    shape, blocks = (case.m, case.n), -(-case.m * case.n // STATE8_BLOCK)
    R = (torch.randn(shape, generator=gen) * 1e-2).to(device)

    def zero_state(dev):
        return [torch.zeros(shape, dtype=torch.int8, device=dev), torch.zeros(blocks, device=dev),
                torch.zeros(shape, dtype=torch.uint8, device=dev), torch.zeros(blocks, device=dev)]

    ours, ref = zero_state(device), zero_state("cpu")
    for _ in range(3):  # nonzero moments before the checked step
        N = lowrank.adam_lowrank_8bit_(*ours, R, 0.9, 0.999, 1e-8)
        N_ref = adam_lowrank_8bit_reference(*ref, R.cpu(), 0.9, 0.999, 1e-8)
    row["max_err"] = ((N.cpu() - N_ref).abs().max() / N_ref.abs().max()).item()
    row["ok"] = row["max_err"] <= 1e-6 and all(torch.equal(a.cpu(), b) for a, b in zip(ours, ref))
    official = zero_state(device)
    m32, v32 = torch.zeros(shape, device=device), torch.zeros(shape, device=device)
    ms = time_ms_each({"ours": lambda: lowrank.adam_lowrank_8bit_(*ours, R, 0.9, 0.999, 1e-8),
                       "official": lambda: adam_lowrank_8bit_reference(*official, R, 0.9, 0.999, 1e-8),
                       "fp32": lambda: lowrank.adam_lowrank_(m32, v32, R, 0.9, 0.999, 1e-8)}, device)
    row["ours_ms"], row["official_ms"], row["fp32_ms"] = ms["ours"], ms["official"], ms["fp32"]
    row["vs_official"] = row["official_ms"] / row["ours_ms"]
    row["state_bytes_per_element"] = 2 + 8 / STATE8_BLOCK  # vs 8 for fp32 moments


def measure(case: Case, device: str) -> dict:
    row = {
        "op": case.op, "shape": f"{case.m}x{case.n}", "rank": case.rank, "dtype": DTYPE_NAMES[case.dtype],
        "mode": ("svd vs dct" if case.op == "refresh" else "state" if case.op == "adam_8bit" else
                 ("left" if case.m < case.n else "right")),
        "ours_ms": None, "official_ms": None, "compiled_ms": None, "vs_official": None, "vs_compiled": None,
        "roofline_pct": None, "floor3_pct": None, "ours_mb": None, "official_mb": None, "compiled_mb": None,
        "max_err": None, "official_err": None, "tol": TOLERANCE.get(case.dtype), "ok": False, "error": None,
    }
    try:
        if case.op == "refresh":
            row["tol"] = 1e-5
            _measure_refresh(case, device, row)
        elif case.op == "adam_8bit":
            row["tol"] = 1e-6
            _measure_adam_8bit(case, device, row)
        else:
            _measure_step(case, device, row)
    except Exception as e:  # noqa: BLE001 -- one broken row must not hide the others
        row["ok"], row["error"] = False, f"{type(e).__name__}: {e}".splitlines()[0][:200]
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def rows(device: str, quick: bool) -> Rows:
    return Rows(cases(device, quick), lambda case: measure(case, device))
