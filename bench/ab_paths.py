"""A/B timing of the CUDA code paths that environment switches select (one configuration per process).

    LOWRANK_CUBLAS=1 python bench/ab_paths.py --tag cublas

The switches are read once per process (LOWRANK_CUBLAS, LOWRANK_MONARCH_F1, LOWRANK_MONARCH_FUSED), so
bench/gpu_check.sh runs this script once per configuration and the table it prints lets the defaults be
chosen from measurements. Every timed call is first checked against the float64 reference; a mismatch is
printed as FAIL (and the exit code is 1). bf16, 8192 tokens, same shapes as the main Monarch/SLTrain rows.
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


def monarch_factors(n_in, n_out, nb, device):
    from lowrank.nn import MonarchLinear
    m = MonarchLinear(n_in, n_out, nblocks=nb, bias=False, device=device, dtype=torch.bfloat16)
    return m.blkdiag1.detach(), m.blkdiag2.detach()


def rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


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
    env = {k: v for k, v in os.environ.items() if k.startswith("LOWRANK_")}
    ok = True
    out = []
    for T, n_in, n_out, nb in monarch_shapes:
        w1, w2 = monarch_factors(n_in, n_out, nb, dev)
        x = torch.randn(T, n_in, device=dev, dtype=torch.bfloat16)
        g = torch.randn(T, n_out, device=dev, dtype=torch.bfloat16)
        ref = monarch_matmul_reference(x[:64].double(), w1.double(), w2.double())
        err = rel(lowrank.monarch_matmul(x[:64], w1, w2), ref)
        xr, w1r, w2r = (t.clone().requires_grad_() for t in (x, w1, w2))
        fwd = time_ms(lambda: lowrank.monarch_matmul(x, w1, w2), dev)
        both = time_ms(lambda: lowrank.monarch_matmul(xr, w1r, w2r).backward(g), dev)
        good = err < 2e-2
        ok &= good
        row = dict(tag=args.tag, op="monarch", shape=f"{T}x{n_in}->{n_out}", nb=nb, fwd_ms=fwd, fwdbwd_ms=both,
                   err=err, check="PASS" if good else "FAIL", env=env)
        out.append(row)
        print(f"{args.tag:>14} monarch {row['shape']:>18} nb={nb:<3} fwd {fwd:8.4f} ms  fwd+bwd {both:8.4f} ms  "
              f"err {err:.1e} {row['check']}", flush=True)
    for T, n_in, n_out, r, delta in sltrain_shapes:
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
        good = err < 2e-2
        ok &= good
        row = dict(tag=args.tag, op="sltrain", shape=f"{T}x{n_in}->{n_out} r{r}", nb=0, fwd_ms=fwd, fwdbwd_ms=both,
                   err=err, check="PASS" if good else "FAIL", env=env)
        out.append(row)
        print(f"{args.tag:>14} sltrain {row['shape']:>18}        fwd {fwd:8.4f} ms  fwd+bwd {both:8.4f} ms  "
              f"err {err:.1e} {row['check']}", flush=True)
    if args.json:
        with open(args.json, "a") as f:
            for row in out:
                f.write(json.dumps(row) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
