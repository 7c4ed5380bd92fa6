"""Dtype rules shared by the op families' fake kernels (the C++ side: csrc/common/checks.h)."""
from __future__ import annotations

import torch


def companion_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of a float dtype: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_companion(op: str, t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    """``t`` must have ``ref``'s companion dtype."""
    want = companion_dtype(ref.dtype)
    torch._check(t.dtype == want, lambda: f"{op}: {name} must be {want} ({name} is float64 iff {ref_name} is "
                                          f"float64, float32 otherwise), got {t.dtype}")


def check_same_device(op: str, *named) -> None:
    """Every ``(name, tensor)`` pair on the first one's device (type and index; ``meta`` is a device of its own,
    so a meta argument next to real ones is refused instead of yielding uninitialized memory). None is skipped."""
    ref_name, ref = named[0]
    for name, t in named[1:]:
        if t is not None:
            torch._check(t.device == ref.device, lambda: f"{op}: {name} must be on {ref_name}'s device (got {ref_name} "
                                                          f"on {ref.device}, {name} on {t.device})")
