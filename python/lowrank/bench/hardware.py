"""Datasheet ceilings of the GPUs we report on, for the '% of roofline' column.

Dense (no sparsity) rates; fp32 is the plain (non-tensor-core) rate, since torch does not use TF32 by
default. Datasheet numbers are upper bounds: measured copy bandwidth is also written into each report.
"""
from __future__ import annotations

import torch

# (substring of torch.cuda.get_device_name, HBM GB/s, {dtype: TFLOP/s}); the first match wins.
_GPUS = [
    ("H200", 4800, {"bf16": 989, "fp16": 989, "fp32": 67}),
    ("H100 NVL", 3900, {"bf16": 835, "fp16": 835, "fp32": 60}),
    ("H100 PCIe", 2000, {"bf16": 756, "fp16": 756, "fp32": 51}),
    ("H100", 3350, {"bf16": 989, "fp16": 989, "fp32": 67}),  # SXM, named "H100 80GB HBM3"
    ("A100", 2039, {"bf16": 312, "fp16": 312, "fp32": 19.5}),
]

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def peaks(device: str) -> tuple[float, dict] | None:
    """(HBM GB/s, {dtype name: TFLOP/s}) for a known GPU, else None (CPU or an unknown card)."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    for key, gbps, tflops in _GPUS:
        if key in name:
            return gbps, tflops
    return None


def roofline(device: str, dtype: torch.dtype, flops: float, nbytes: float, ms: float | None):
    """(% of the roofline time reached, 'mem' or 'math' = which ceiling bounds it), or (None, None)."""
    p = peaks(device)
    if p is None or ms is None or DTYPE_NAMES.get(dtype) not in p[1]:
        return None, None
    mem_ms = nbytes / (p[0] * 1e9) * 1e3
    math_ms = flops / (p[1][DTYPE_NAMES[dtype]] * 1e12) * 1e3
    return 100 * max(mem_ms, math_ms) / ms, ("mem" if mem_ms >= math_ms else "math")
