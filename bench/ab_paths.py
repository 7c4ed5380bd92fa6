"""A/B timing of the CUDA code paths that environment switches select (one configuration per process).

    LOWRANK_CUBLAS=1 python bench/ab_paths.py --tag cublas

The switches are read once per process (LOWRANK_CUBLAS, LOWRANK_MONARCH_F1, LOWRANK_MONARCH_FUSED,
LOWRANK_PROJECTION_FP32_TC, LOWRANK_IFAIRY_GEMV_FUSED), so
bench/gpu_check.sh runs this script once per configuration and the table it prints lets the defaults be
chosen from measurements. Every timed call is first checked against the float64 reference; a mismatch is
printed as FAIL (and the exit code is 1). Monarch/SLTrain: bf16, 8192 tokens, the main rows' shapes; GaLore:
one GaLoreAdamW step (rank r, projector given, no refresh) of an fp32 or bf16 weight.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

import lowrank
from lowrank.bench.timing import time_ms
from lowrank.reference import monarch_matmul_reference, sltrain_linear_reference

MONARCH = [  # (tokens, n_in, n_out, nblocks) -> fly's square factor shapes
    (8192, 1024, 1024, 4), (8192, 1024, 1024, 32), (8192, 4096, 4096, 4), (8192, 4096, 4096, 64),
    (8192, 8192, 8192, 4), (8192, 8192, 8192, 64), (8192, 768, 3072, 4),
]
SLTRAIN = [(8192, 2048, 2048, 512, 0.03)]
IFAIRY = [(1, 2048, 2048), (4, 2048, 2048), (1, 8192, 8192), (16, 5460, 2048)]  # (tokens, out, in), W2A8 bf16
GALORE = [(4096, 4096, 128, torch.float32), (11008, 4096, 256, torch.float32), (4096, 4096, 128, torch.bfloat16)]


def monarch_factors(n_in, n_out, nb, device):
    from lowrank.nn import MonarchLinear
    m = MonarchLinear(n_in, n_out, nblocks=nb, bias=False, device=device, dtype=torch.bfloat16)
    return m.blkdiag1.detach(), m.blkdiag2.detach()


def rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def add_row(out: list, tag: str, env: dict, op: str, shape: str, nb: int, times: str, ms: float,
            both: float | None, err: float, tol: float) -> bool:
    """Append one row, print it, and return whether its check passed."""
    good = err < tol  # a NaN fails too
    out.append(dict(tag=tag, op=op, shape=shape, nb=nb, fwd_ms=ms, fwdbwd_ms=both, err=err,
                    check="PASS" if good else "FAIL", env=env))
    print(f"{tag:>14} {op:<7} {shape:>18} {f'nb={nb}' if nb else '':<6} {times}  err {err:.1e} "
          f"{'PASS' if good else 'FAIL'}", flush=True)
    return good


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tag", default="default")
    ap.add_argument("--json", default=None, help="append one JSON line per row here")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke run of this script)")
    args = ap.parse_args()
    dev = args.device
    monarch_shapes = [(64, 64, 64, 4), (33, 48, 96, 4)] if args.small else MONARCH
    sltrain_shapes = [(40, 64, 48, 8, 0.05)] if args.small else SLTRAIN
    ifairy_shapes = [(1, 40, 37), (4, 33, 130)] if args.small else IFAIRY
    galore_shapes = [(96, 64, 8, torch.float32)] if args.small else GALORE
    env = {k: v for k, v in os.environ.items() if k.startswith("LOWRANK_")}
    # a configuration times only the families its switches can change (the default run times all of them)
    touched = set()
    for key in env:
        if key.startswith("LOWRANK_MONARCH_"):
            touched.add("monarch")
        elif key == "LOWRANK_CUBLAS":
            touched |= {"monarch", "sltrain"}
        elif key.startswith("LOWRANK_PROJECTION_"):
            touched.add("galore")
        elif key.startswith("LOWRANK_IFAIRY_"):
            touched.add("ifairy")
    if any(k.startswith("LOWRANK_MONARCH_") for k in env):
        touched.discard("sltrain")
    families = touched or {"monarch", "sltrain", "ifairy", "galore"}
    ok = True
    out = []
    for T, n_in, n_out, nb in monarch_shapes if "monarch" in families else []:
        w1, w2 = monarch_factors(n_in, n_out, nb, dev)
        x = torch.randn(T, n_in, device=dev, dtype=torch.bfloat16)
        g = torch.randn(T, n_out, device=dev, dtype=torch.bfloat16)
        ref = monarch_matmul_reference(x[:64].double(), w1.double(), w2.double())
        err = rel(lowrank.monarch_matmul(x[:64], w1, w2), ref)
        xr, w1r, w2r = (t.clone().requires_grad_() for t in (x, w1, w2))
        fwd = time_ms(lambda: lowrank.monarch_matmul(x, w1, w2), dev)
        both = time_ms(lambda: lowrank.monarch_matmul(xr, w1r, w2r).backward(g), dev)
        ok &= add_row(out, args.tag, env, "monarch", f"{T}x{n_in}->{n_out}", nb,
                      f"fwd {fwd:8.4f} ms  fwd+bwd {both:8.4f} ms", fwd, both, err, 2e-2)
    for T, n_in, n_out, r, delta in sltrain_shapes if "sltrain" in families else []:
        from lowrank.nn import SLTrainLinear
        layer = SLTrainLinear(n_in, n_out, rank=r, density=delta, bias=False, device=dev, dtype=torch.bfloat16)
        A, v, idx, s = layer.A.detach(), layer.values.detach(), layer.indices, layer.scale
        B = torch.randn(n_out, r, device=dev, dtype=torch.bfloat16) * 0.02  # the module starts B at zero
        x = torch.randn(T, n_in, device=dev, dtype=torch.bfloat16)
        g = torch.randn(T, n_out, device=dev, dtype=torch.bfloat16)
        ref = sltrain_linear_reference(x[:64].double(), A.double(), B.double(), v.double(), idx, s)
        err = rel(lowrank.sltrain_linear(x[:64], A, B, v, idx, s), ref)
        Ar, Br, vr, xr = (t.clone().requires_grad_() for t in (A, B, v, x))
        fwd = time_ms(lambda: lowrank.sltrain_linear(x, A, B, v, idx, s, check=False), dev)
        both = time_ms(lambda: lowrank.sltrain_linear(xr, Ar, Br, vr, idx, s, check=False).backward(g), dev)
        ok &= add_row(out, args.tag, env, "sltrain", f"{T}x{n_in}->{n_out} r{r}", 0,
                      f"fwd {fwd:8.4f} ms  fwd+bwd {both:8.4f} ms", fwd, both, err, 2e-2)
    from lowrank.reference import ifairy_linear_reference
    for T, n_out, n_in in ifairy_shapes if "ifairy" in families else []:
        gen = torch.Generator().manual_seed(0)
        packed, scales = lowrank.ifairy_quantize(torch.randn(n_out, n_in, generator=gen),
                                                 torch.randn(n_out, n_in, generator=gen))
        packed, scales = packed.to(dev), scales.to(dev)
        xdt = torch.bfloat16 if dev.startswith("cuda") else torch.float32
        xr, xi = (torch.randn(T, n_in, generator=gen).to(dev, xdt) for _ in range(2))
        yr, yi = lowrank.ifairy_linear(xr, xi, packed, scales)
        rr, ri = ifairy_linear_reference(xr.cpu().double(), xi.cpu().double(), packed.cpu(), scales.cpu())
        err = max(rel(yr.cpu(), rr), rel(yi.cpu(), ri))
        ms = time_ms(lambda: lowrank.ifairy_linear(xr, xi, packed, scales), dev)
        ok &= add_row(out, args.tag, env, "ifairy", f"{T}x{n_in}->{n_out}", 0, f"W2A8 {ms * 1e3:8.2f} us", ms, None,
                      err, 1e-2)
    for m, n, r, dt in galore_shapes if "galore" in families else []:
        from lowrank.optim import GaLoreAdamW
        from lowrank.reference import projected_adamw_step_reference
        gen = torch.Generator().manual_seed(0)
        W0 = (torch.randn(m, n, generator=gen) * 0.02).to(dev, dt)
        G = (torch.randn(m, n, generator=gen) * 0.01).to(dev, dt)
        q, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))  # right side: m >= n
        P = q.T.contiguous()
        W = torch.nn.Parameter(W0.clone())
        W.grad = G.clone()
        group = {"params": [W], "rank": r, "update_proj_gap": 10**9, "scale": 0.25, "proj_type": "std"}
        opt = GaLoreAdamW([group], lr=1e-3)
        opt.state[W].update(step=1, P=P.float().to(dev))
        opt.step()
        W64 = W0.double().clone()
        state = {"step": 1, "P": P.to(dev)}
        projected_adamw_step_reference(W64, G.double(), state, lr=1e-3, rank=r, update_proj_gap=10**9, scale=0.25,
                                       fira=False)
        if dt == torch.float32:
            err = rel(W.detach() - W0, W64 - W0.double())
        else:
            err = rel(W.detach(), W64)
        ms = time_ms(opt.step, dev)
        ok &= add_row(out, args.tag, env, "galore", f"{m}x{n} r{r} {str(dt)[6:]}", 0, f"step {ms:8.4f} ms", ms, None,
                      err, 1e-4 if dt == torch.float32 else 2.0 ** -8)
    if args.json:
        with open(args.json, "a") as f:
            for row in out:
                f.write(json.dumps(row) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
