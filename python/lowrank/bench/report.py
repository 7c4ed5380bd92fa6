"""Turning benchmark rows into a printed table, JSON, markdown and a PNG of the speedups.

Every file carries the same metadata (GPU, driver, torch/CUDA, CPU, commit, time), so a result can be
traced to the machine and the code that produced it.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

# (row key, header, format); a column shows only if some row has a value for it.
COLUMNS = [
    ("op", "op", "{}"), ("shape", "shape", "{}"), ("nblocks", "nb", "{}"), ("rank", "r", "{}"),
    ("density", "delta", "{:g}"), ("dtype", "dtype", "{}"),
    ("mode", "mode", "{}"), ("ours_ms", "ours ms", "{:.4g}"), ("dense_ms", "dense ms", "{:.4g}"),
    ("bmm_ms", "bmm ms", "{:.4g}"), ("official_ms", "official ms", "{:.4g}"), ("tflops", "TFLOP/s", "{:.3g}"),
    ("gbps", "GB/s", "{:.4g}"), ("vs_dense", "vs dense", "{:.2f}x"), ("vs_bmm", "vs bmm", "{:.2f}x"),
    ("vs_official", "vs official", "{:.2f}x"), ("compiled_ms", "compiled ms", "{:.4g}"),
    ("vs_compiled", "vs compiled", "{:.2f}x"), ("vs_best", "vs best", "{:.2f}x"),
    ("randomized_ms", "svd_lowrank ms", "{:.4g}"), ("dct_basis_ms", "basis ms", "{:.4g}"),
    ("roofline_pct", "% roof", "{:.0f}"), ("floor3_pct", "% floor3", "{:.0f}"),
    ("bound", "bound", "{}"), ("ours_mb", "ours MiB", "{:.0f}"), ("dense_mb", "dense MiB", "{:.0f}"),
    ("bmm_mb", "bmm MiB", "{:.0f}"), ("official_mb", "official MiB", "{:.0f}"), ("compiled_mb", "compiled MiB", "{:.0f}"),
    ("max_err", "max err", "{:.1e}"), ("bmm_err", "bmm err", "{:.1e}"), ("official_err", "official err", "{:.1e}"),
    ("ok", "check", "{}"),
]
# speedup columns plotted, each a bar per row that has it
SPEEDUPS = [("vs_dense", "vs dense"), ("vs_bmm", "vs bmm"), ("vs_official", "vs official"), ("vs_compiled", "vs compiled")]


def _run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def metadata(device: str, extra: dict | None = None) -> dict:
    import lowrank

    cuda = device.startswith("cuda")
    smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    try:
        from importlib.metadata import version
        lowrank_version = getattr(lowrank, "__version__", None) or version("lowrank")
    except Exception:  # noqa: BLE001 -- running from a source tree without install metadata
        lowrank_version = "unknown"
    return {
        "device": device,
        "gpu": torch.cuda.get_device_name(torch.device(device)) if cuda else None,
        "driver": smi.splitlines()[0] if smi else None,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "commit": _run(["git", "rev-parse", "HEAD"]) or os.environ.get("LOWRANK_COMMIT") or "unknown",
        "lowrank": lowrank_version,
        "has_cuda_kernels": bool(getattr(lowrank, "has_cuda_kernels", lambda: False)()),
        "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **(extra or {}),
    }


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if key == "ok":
        return "PASS" if value else "FAIL"
    return "-" if value is None else fmt.format(value)


def _table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    cols = [(k, h, f) for k, h, f in COLUMNS if any(r.get(k) is not None for r in rows)]
    return [h for _, h, _ in cols], [[_cell(r, k, f) for k, _, f in cols] for r in rows]


def _by_family(rows: list[dict]) -> list[list[dict]]:
    """Rows grouped by family, in order of first appearance: one table each, with its own columns."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r.get("family", ""), []).append(r)
    return list(groups.values())


def format_table(rows: list[dict]) -> str:
    blocks = []
    for group in _by_family(rows):
        headers, cells = _table(group)
        widths = [max(len(x) for x in col) for col in zip(headers, *cells)]
        lines = ["  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [headers, *cells]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines += [f"error in {r['shape']} {r['mode']}: {r['error']}" for r in group if r.get("error")]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def format_markdown(meta: dict, notes: dict, rows: list[dict]) -> str:
    out = [f"# lowrank benchmark: {meta['device']}", ""]
    out += [f"- **{k}**: {'n/a' if v is None else v}" for k, v in meta.items()] + [""]
    for group in _by_family(rows):
        family = group[0].get("family", "")
        headers, cells = _table(group)
        doc = notes.get(family)
        out += [f"## {family}", ""] + ([" ".join(doc.split()), ""] if doc else [])
        out += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        out += ["| " + " | ".join(line) + " |" for line in cells]
        out += [f"\nerror in {r['shape']} {r['mode']}: `{r['error']}`" for r in group if r.get("error")]
        out.append("")
    return "\n".join(out) + "\n"


def plot_speedups(rows: list[dict], meta: dict, path: Path) -> str | None:
    """Bar chart of speedup vs each baseline; returns why it was skipped, or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "matplotlib is not installed: no PNG"
    speedups = [(k, name) for k, name in SPEEDUPS if any(r.get(k) for r in rows)]
    shown = [r for r in rows if any(r.get(k) for k, _ in speedups)]
    if not shown:
        return "no speedups to plot"
    labels = [" ".join([r["shape"]] + [f"{n}={r[k]:g}" for k, n in (("nblocks", "nb"), ("rank", "r"))
                                        if r.get(k) is not None] + [r["mode"]]) for r in shown]
    ys = range(len(shown))
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.4 * len(shown)))
    height = 0.8 / len(speedups)
    for i, (key, name) in enumerate(speedups):
        values = [r.get(key) or float("nan") for r in shown]
        offset = (i - (len(speedups) - 1) / 2) * height
        # bars grow from parity (1x): left for slower, right for faster
        ax.barh([y + offset for y in ys], [v - 1 for v in values], left=1, height=height, label=name)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")  # 0.1x and 10x are equally far from parity
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.set_yticks(list(ys), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speedup of ours (x, higher is better)")
    ax.set_title(f"lowrank on {meta.get('gpu') or meta.get('cpu')} ({meta['utc']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def write(out_dir: Path, device: str, meta: dict, notes: dict, rows: list[dict]) -> list[Path]:
    """Write bench_<device>.json / .md / .png; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"bench_{device.split(':')[0]}"
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    paths[0].write_text(json.dumps({"metadata": meta, "notes": notes, "rows": rows}, indent=1) + "\n")
    paths[1].write_text(format_markdown(meta, notes, rows))
    skipped = plot_speedups(rows, meta, stem.with_suffix(".png"))
    if skipped:
        print(f"note: {skipped}")
    else:
        paths.append(stem.with_suffix(".png"))
    return paths
