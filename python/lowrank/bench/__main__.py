"""python -m lowrank.bench [--device cpu|cuda|auto] [--quick] [--out DIR] [--only FAMILY ...]

Runs every family's rows on each device, prints the table, writes DIR/bench_<device>.{json,md,png}.
Exits 1 if any correctness check failed, so CI and gpu_check.sh can rely on the exit code.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

import torch

from . import FAMILIES, family_rows
from . import report
from .timing import copy_bandwidth_gbps


def _devices(choice: str) -> list[str]:
    import lowrank

    cuda_ready = torch.cuda.is_available() and lowrank.has_cuda_kernels()
    if choice == "cuda" and not cuda_ready:
        print("error: --device cuda needs a visible GPU and lowrank built with CUDA kernels (cuda available: "
              f"{torch.cuda.is_available()}, has_cuda_kernels: {lowrank.has_cuda_kernels()})", file=sys.stderr)
        sys.exit(2)  # not 1: that means a correctness check failed
    if choice == "auto":
        return (["cuda"] if cuda_ready else []) + ["cpu"]
    return [choice]


def _progress(iterable, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # plain lines instead of a bar
        total = len(iterable) if hasattr(iterable, "__len__") else "?"
        def plain():
            for i, item in enumerate(iterable, 1):
                print(f"{desc}: {i}/{total}", flush=True)
                yield item
        return plain()
    return tqdm(iterable, desc=desc, total=len(iterable) if hasattr(iterable, "__len__") else None,
                leave=False, file=sys.stderr)


def run_device(device: str, families: list[str], quick: bool, out_dir: Path) -> bool:
    # Load before we start is other processes' work: CPU timings need an idle machine.
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows, notes = [], {}
    for family in families:
        notes[family] = importlib.import_module(FAMILIES[family]).__doc__ or ""
        for row in _progress(family_rows(family, device, quick), f"{family} on {device}"):
            rows.append({"family": family, **row})
    extra = {"copy_GBps_measured": copy_bandwidth_gbps(device), "quick": quick, "loadavg_before": load_before}
    meta = report.metadata(device, extra)
    print(f"\n{device}: {meta.get('gpu') or meta['cpu']}, torch {meta['torch']}, commit {meta['commit']}")
    print(report.format_table(rows))
    cores = os.cpu_count() or 1
    if device == "cpu" and load_before is not None and load_before > 0.5 * cores:
        # other processes hold the cores torch's threads wait on: CPU times can be off by 10x or more
        print(f"warning: machine busy before the run (load {load_before:.1f} on {cores} cores): "
              "these CPU timings are unreliable")
    for path in report.write(out_dir, device, meta, notes, rows):
        print(f"wrote {path}")
    return all(r["ok"] for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowrank.bench", description=__doc__.splitlines()[2])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--quick", action="store_true", help="a small set of shapes (CI)")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    parser.add_argument("--only", nargs="+", choices=sorted(FAMILIES), default=sorted(FAMILIES))
    args = parser.parse_args(argv)
    ok = True
    for device in _devices(args.device):
        ok &= run_device(device, args.only, args.quick, args.out)
    if not ok:
        print("FAILED: some correctness check failed (see the check column)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
