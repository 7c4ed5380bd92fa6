"""iFairy rows: ``lowrank.ifairy_linear`` (2-bit {±1, ±i} weights, W2A8: int8 activations per token) against the
same complex layer as one dense real GEMM, timed in the same run.

Baselines (weights are the dequantized iFairy weights, so every form computes the same layer):
  "dense"    = the real 2x2 block form ``[[Wr, Wi], [Wi, −Wr]]`` ``(2·out, 2·in)`` applied to ``[x_re, x_im]``;
  "official" = ``[Wr; Wi]`` stacked ``(2·out, in)`` applied to the real and imaginary tokens stacked (the SGLang
               port's way), whose four products a real layer then combines.
Each is one ``F.linear`` (cuBLAS bf16 on CUDA, float32 torch on CPU) on inputs already in its layout: the
concatenation and the final combination are not timed, so the baselines are lower bounds of their layers.
On CUDA the L2 cache is flushed before every rep. Ours takes separate real and imaginary parts (bf16 on CUDA,
float32 on CPU) and returns them, quantizing the activations inside.

Columns: GB/s is the effective bandwidth of the packed weights alone (``out·ceil(in/4)`` bytes per call);
% roof counts ``8·T·out·in`` FLOPs (the real-equivalent GEMM) and the packed weights plus activations in and
out; ``vs_best`` (JSON) is the speedup over the faster baseline. The check compares our output with
``ifairy_linear_reference`` (float64, same W2A8 quantization): max |ours − ref| / max |ref|. The "1.3B block"
row runs one 1.3B block's seven linears (q, k, v, o 2048x2048; gate, up 5460x2048; down 2048x5460) at one
token; its shape names the tokens/s of the 24 layers' linears (attention, norms and the LM head not counted).
The "1.3B block, fused" row runs the same block as a decode step would with ``ifairy_linear_multi``: q/k/v in
one call and gate/up in one call (each group on one shared input), o and down alone: 4 calls instead of 7.
A CPU run leaves out 2048 tokens and 8192x8192 (the float32 baselines take seconds per call there).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import lowrank
from lowrank.reference import (ifairy_block_weight, ifairy_linear_reference, ifairy_stacked_weight)

from . import Rows
from .hardware import DTYPE_NAMES, roofline
from .timing import time_ms_each

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
SHAPES = [(1536, 1536), (4096, 1536), (1536, 4096), (2048, 2048), (5460, 2048), (2048, 5460), (8192, 8192)]
TOKENS = [1, 4, 16, 128, 2048]
BLOCK_1P3B = [(2048, 2048)] * 4 + [(5460, 2048)] * 2 + [(2048, 5460)]  # q, k, v, o, gate, up, down
BLOCK_1P3B_GROUPS = ((0, 1, 2), (3,), (4, 5), (6,))  # linears sharing one input: q/k/v, o, gate/up, down
BLOCK_FUSED = "1.3B block, fused"
LAYERS_1P3B = 24


@dataclass(frozen=True)
class Case:
    tokens: int
    shapes: tuple  # ((out, in), ...): one layer, or a block's linears run one after the other
    dtype: torch.dtype
    label: str = ""


def cases(device: str, quick: bool) -> list[Case]:
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    if quick:
        picks = [(1, (2048, 2048)), (16, (2048, 2048))] + ([(2048, (2048, 2048))] if cuda else [])
    else:
        shapes = SHAPES if cuda else SHAPES[:-1]
        tokens = TOKENS if cuda else [t for t in TOKENS if t <= 128]
        picks = [(t, s) for s in shapes for t in tokens]
        if not cuda:
            picks.append((1, SHAPES[-1]))  # 8192x8192 decode only
    out = [Case(t, (s,), dtype) for t, s in picks]
    if not quick:
        out.append(Case(1, tuple(BLOCK_1P3B), dtype, "1.3B block"))
        out.append(Case(1, tuple(BLOCK_1P3B), dtype, BLOCK_FUSED))
    return out


class _Layer:
    """One layer's packed weights and the two baseline weights, built from random latent weights."""

    def __init__(self, out: int, fin: int, dtype, device, gen):
        w_real = torch.randn(out, fin, generator=gen, device=device)
        w_imag = torch.randn(out, fin, generator=gen, device=device)
        self.packed, self.scales = lowrank.ifairy_quantize(w_real, w_imag)
        del w_real, w_imag
        wr, wi = lowrank.ifairy_dequantize(self.packed, self.scales, fin)
        self.stacked = ifairy_stacked_weight(wr, wi).to(dtype)
        self.block = ifairy_block_weight(wr, wi).to(dtype)
        self.out, self.fin = out, fin


def _rel_err(got, ref) -> float:
    err = max((g.double() - r).abs().max().item() for g, r in zip(got, ref))
    scale = max(r.abs().max().item() for r in ref)
    return err / max(scale, 1e-30)


def measure(case: Case, device: str) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    t, dtype = case.tokens, case.dtype
    packed_bytes = sum(o * math.ceil(i / 4) for o, i in case.shapes)
    flops = sum(8 * t * o * i for o, i in case.shapes)
    nbytes = packed_bytes + sum(2 * t * (o + i) * dtype.itemsize for o, i in case.shapes)
    if case.label:
        shape = f"{t} x {case.label} ({len(case.shapes)} linears)"
    else:
        shape = f"{t} x {case.shapes[0][1]} -> {case.shapes[0][0]}"
    row = {
        "op": "ifairy_linear", "shape": shape, "dtype": DTYPE_NAMES[dtype], "mode": "W2A8",
        "ours_ms": None, "dense_ms": None, "official_ms": None, "tflops": None, "gbps": None,
        "vs_dense": None, "vs_official": None, "vs_best": None, "roofline_pct": None, "bound": None,
        "max_err": None, "tol": TOLERANCE[dtype], "ok": False, "error": None, "flops": flops, "bytes": nbytes,
        "packed_bytes": packed_bytes, "tokens_per_s": None,
    }
    try:
        layers = [_Layer(o, i, dtype, device, gen) for o, i in case.shapes]
        xs = []
        groups = BLOCK_1P3B_GROUPS if case.label == BLOCK_FUSED else tuple((k,) for k in range(len(layers)))
        for group in groups:  # the linears of a group share their input
            x_real = torch.randn(t, layers[group[0]].fin, generator=gen, device=device).to(dtype)
            x_imag = torch.randn(t, layers[group[0]].fin, generator=gen, device=device).to(dtype)
            xs += [(x_real, x_imag, torch.stack([x_real, x_imag]), torch.cat([x_real, x_imag], -1))] * len(group)

        errs = []
        for layer, (x_real, x_imag, _, _) in zip(layers, xs):
            ours = lowrank.ifairy_linear(x_real, x_imag, layer.packed, layer.scales)
            ref = ifairy_linear_reference(x_real, x_imag, layer.packed, layer.scales, act_quant=True)
            errs.append(_rel_err(ours, ref))
            del ours, ref
        row["max_err"] = max(errs, key=lambda e: math.inf if math.isnan(e) else e)  # a NaN must win, and fail
        row["ok"] = row["max_err"] <= row["tol"]

        def run_ours():
            return [lowrank.ifairy_linear(x[0], x[1], layer.packed, layer.scales) for layer, x in zip(layers, xs)]

        if case.label == BLOCK_FUSED:
            def run_ours():  # noqa: F811 -- one call per group of linears sharing an input
                return [lowrank.ifairy_linear_multi(xs[g[0]][0], xs[g[0]][1], [layers[k].packed for k in g],
                                                    [layers[k].scales for k in g]) for g in groups]

            fused = [y for ys in run_ours() for y in ys]
            errs.append(max(_rel_err(y, ifairy_linear_reference(x[0], x[1], layer.packed, layer.scales))
                            for y, layer, x in zip(fused, layers, xs)))
            row["max_err"] = max(errs, key=lambda e: math.inf if math.isnan(e) else e)
            row["ok"] = row["max_err"] <= row["tol"]

        def run_block():
            return [F.linear(x[3], layer.block) for layer, x in zip(layers, xs)]

        def run_stacked():
            return [F.linear(x[2], layer.stacked) for layer, x in zip(layers, xs)]

        ms = time_ms_each({"ours": run_ours, "dense": run_block, "official": run_stacked}, device)
        row["ours_ms"], row["dense_ms"], row["official_ms"] = ms["ours"], ms["dense"], ms["official"]
    except Exception as e:  # noqa: BLE001 -- one broken row must not hide the others
        row["ok"], row["error"] = False, f"{type(e).__name__}: {e}".splitlines()[0][:200]
    finally:
        layers = xs = None
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    ms = row["ours_ms"]
    if ms:
        row["tflops"] = flops / (ms * 1e-3) / 1e12
        row["gbps"] = packed_bytes / (ms * 1e-3) / 1e9
        row["vs_dense"] = row["dense_ms"] / ms if row["dense_ms"] else None
        row["vs_official"] = row["official_ms"] / ms if row["official_ms"] else None
        baselines = [b for b in (row["dense_ms"], row["official_ms"]) if b]
        row["vs_best"] = min(baselines) / ms if baselines else None
        row["roofline_pct"], row["bound"] = roofline(device, dtype, flops, nbytes, ms)
        if case.label:
            row["tokens_per_s"] = t * 1e3 / (LAYERS_1P3B * ms)
            row["shape"] += f": {row['tokens_per_s']:.3g} tok/s over {LAYERS_1P3B} layers"
    return row


def rows(device: str, quick: bool) -> Rows:
    return Rows(cases(device, quick), lambda case: measure(case, device))
