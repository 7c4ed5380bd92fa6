"""Accuracy of GaLoreAdamW's 8-bit projected moments (``state_bits=8``) against fp32 moments over a short run.

    PYTHONPATH=python python bench/galore_8bit_accuracy.py [--device cpu] [--steps 200] [--out DIR]

Two deterministic problems, each trained from the same start with the same mini-batches, once per state
width: a linear least-squares fit (convex, so the two trajectories can be compared weight for weight) and a
small tanh MLP fitting a teacher (non-convex). Per configuration (basis, moments, Fira) and seed it records the
final loss of each run and ‖W₈ − W₃₂‖ / ‖W₃₂ − W₀‖ (the weight difference as a fraction of the distance
travelled). For scale, the same ratio is given for an fp32 run whose lr is 0.1 % higher: the sensitivity of
the trajectory itself. Writes galore_8bit_accuracy.{json,md} into --out (bench/results/cpu-devbox by default).
Accuracy only: no timing, so a loaded machine does not change the numbers.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

from lowrank.bench.report import metadata
from lowrank.optim import GaLoreAdamW

CONFIGS = [("svd", "keep", False), ("svd", "reproject", False), ("dct", "keep", False), ("svd", "keep", True)]
SEEDS = (0, 1, 2)
RANK, GAP, BATCH = 16, 50, 64


def linear_problem(seed: int, device: str):
    gen = torch.Generator().manual_seed(1000 + seed)
    W_true = torch.randn(96, 128, generator=gen) / 128 ** 0.5
    model = nn.Linear(128, 96, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.randn(96, 128, generator=gen) * 0.05)

    def batch(step):
        g = torch.Generator().manual_seed(seed * 100_000 + step)
        x = torch.randn(BATCH, 128, generator=g)
        return x.to(device), (x @ W_true.T + 0.01 * torch.randn(BATCH, 96, generator=g)).to(device)

    return model.to(device), [model.weight], [], batch, 1e-2


def mlp_problem(seed: int, device: str):
    gen = torch.Generator().manual_seed(2000 + seed)
    teacher = torch.randn(64, 32, generator=gen) / 8
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 32))

    def batch(step):
        g = torch.Generator().manual_seed(seed * 100_000 + step)
        x = torch.randn(BATCH, 64, generator=g)
        return x.to(device), torch.sin(x @ teacher).to(device)

    weights = [model[i].weight for i in (0, 2, 4)]
    biases = [model[i].bias for i in (0, 2, 4)]
    return model.to(device), weights, biases, batch, 3e-3


def train(problem, seed, device, steps, bits, basis, moments, fira, lr_scale=1.0):
    model, weights, others, batch, lr = problem(seed, device)
    w0 = torch.cat([w.detach().reshape(-1) for w in weights]).clone()
    groups = [{"params": weights, "rank": RANK, "update_proj_gap": GAP, "basis": basis, "moments": moments,
               "fira": fira, "state_bits": bits}]
    if others:
        groups.append({"params": others})
    opt = GaLoreAdamW(groups, lr=lr * lr_scale)
    losses = []
    for step in range(steps):
        x, y = batch(step)
        loss = nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = batch(10 ** 6)  # a held-out batch for the final loss
    with torch.no_grad():
        final = nn.functional.mse_loss(model(x), y).item()
    return final, losses, w0, torch.cat([w.detach().reshape(-1) for w in weights])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cpu-devbox"))
    args = ap.parse_args(argv)
    rows = []
    for pname, problem in (("linear 96x128", linear_problem), ("mlp 64-128-128-32", mlp_problem)):
        for basis, moments, fira in CONFIGS:
            per_seed = []
            for seed in SEEDS:
                kw = dict(basis=basis, moments=moments, fira=fira)
                l32, c32, w0, w32 = train(problem, seed, args.device, args.steps, 32, **kw)
                l8, c8, _, w8 = train(problem, seed, args.device, args.steps, 8, **kw)
                _, _, _, wlr = train(problem, seed, args.device, args.steps, 32, lr_scale=1.001, **kw)
                travelled = (w32 - w0).norm().item()
                per_seed.append({"seed": seed, "loss_fp32": l32, "loss_8bit": l8, "first_loss": c32[0],
                                 "w_diff_over_travelled": (w8 - w32).norm().item() / travelled,
                                 "lr_plus_0.1pct_w_diff_over_travelled": (wlr - w32).norm().item() / travelled})
            row = {"problem": pname, "basis": basis, "moments": moments, "fira": fira, "seeds": per_seed,
                   "loss_fp32_mean": statistics.fmean(s["loss_fp32"] for s in per_seed),
                   "loss_8bit_mean": statistics.fmean(s["loss_8bit"] for s in per_seed),
                   "max_rel_loss_diff": max(abs(s["loss_8bit"] - s["loss_fp32"]) / s["loss_fp32"] for s in per_seed),
                   "w_diff_mean": statistics.fmean(s["w_diff_over_travelled"] for s in per_seed),
                   "lr_sens_mean": statistics.fmean(s["lr_plus_0.1pct_w_diff_over_travelled"] for s in per_seed)}
            rows.append(row)
            print(f"{pname:18s} {basis:4s} {moments:9s} fira={fira!s:5s}  loss fp32 {row['loss_fp32_mean']:.5f}  "
                  f"8-bit {row['loss_8bit_mean']:.5f}  (max rel diff {row['max_rel_loss_diff']:.2%})  "
                  f"|W8-W32|/travelled {row['w_diff_mean']:.3f}  (lr+0.1%: {row['lr_sens_mean']:.3f})", flush=True)
    meta = metadata(args.device, {"steps": args.steps, "rank": RANK, "update_proj_gap": GAP, "batch": BATCH,
                                  "seeds": list(SEEDS),
                                  "note": "accuracy only (deterministic); the 2-core dev box was loaded by other "
                                          "builds during the run, which changes no number here"})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "galore_8bit_accuracy.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# GaLoreAdamW: 8-bit vs fp32 projected moments, {args.steps} steps", "",
             " ".join(f"{k}={v}" for k, v in meta.items() if k in ("device", "cpu", "torch", "commit", "utc")), "",
             f"Note: {meta['note']}. Projected-moment memory: 8 bytes per element fp32, 2.03 bytes 8-bit.", "",
             f"rank {RANK}, update_proj_gap {GAP}, batch {BATCH}, seeds {list(SEEDS)} (means over seeds); final "
             "loss on a held-out batch. |W8-W32|/travelled: weight difference of the 8-bit run from the fp32 run "
             "as a fraction of the fp32 run's distance from the start; 'lr+0.1%' is the same ratio for an fp32 "
             "run with a 0.1 % larger lr (the trajectory's own sensitivity).", "",
             "| problem | basis | moments | fira | loss fp32 | loss 8-bit | max rel loss diff | "
             "\\|W8-W32\\|/travelled | lr+0.1% |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['problem']} | {r['basis']} | {r['moments']} | {r['fira']} | {r['loss_fp32_mean']:.5f} | "
                     f"{r['loss_8bit_mean']:.5f} | {r['max_rel_loss_diff']:.2%} | {r['w_diff_mean']:.4f} | "
                     f"{r['lr_sens_mean']:.4f} |")
    (out / "galore_8bit_accuracy.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'galore_8bit_accuracy.json'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
