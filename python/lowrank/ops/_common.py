"""Checks shared by the op families' fake kernels, worded as the C++ side's (csrc/common/checks.h):
``lowrank.<op>: <argument> <problem> (<what was given>)``, dtypes as ``float32``, shapes as tuples."""
from __future__ import annotations

import torch


FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def dtype_str(dtype: torch.dtype) -> str:
    """``float32``, not ``torch.float32``: what the C++ checks print."""
    return str(dtype).removeprefix("torch.")


def shape_str(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def check_dim(op: str, t: torch.Tensor, name: str, dim: int, layout: str) -> None:
    torch._check(t.dim() == dim, lambda: f"{op}: {name} must be {dim}-D {layout} (got a {t.dim()}-D tensor of shape "
                                         f"{shape_str(t)})")


def check_float(op: str, t: torch.Tensor, name: str) -> None:
    """float32 / float16 / bfloat16, or float64 (CPU only: a fake cannot tell, the CUDA kernel refuses it)."""
    torch._check(t.dtype in FLOATS, lambda: f"{op}: {name} must be float32, float16 or bfloat16, or float64 on CPU "
                                            f"(got {dtype_str(t.dtype)})")


def check_same_dtype(op: str, a: torch.Tensor, an: str, b: torch.Tensor, bn: str) -> None:
    torch._check(a.dtype == b.dtype, lambda: f"{op}: {bn} must have {an}'s dtype (got {an} {dtype_str(a.dtype)}, "
                                             f"{bn} {dtype_str(b.dtype)})")


def companion_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of a float dtype: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_companion(op: str, t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    """``t`` must have ``ref``'s companion dtype."""
    want = companion_dtype(ref.dtype)
    torch._check(t.dtype == want, lambda: f"{op}: {name} must be {dtype_str(want)}, float64 iff {ref_name} is "
                                          f"float64 (got {name} {dtype_str(t.dtype)}, {ref_name} "
                                          f"{dtype_str(ref.dtype)})")


def check_same_device(op: str, *named) -> None:
    """Every ``(name, tensor)`` pair on the first one's device (type and index; ``meta`` is a device of its own,
    so a meta argument next to real ones is refused instead of yielding uninitialized memory). None is skipped."""
    ref_name, ref = named[0]
    for name, t in named[1:]:
        if t is not None:
            torch._check(t.device == ref.device, lambda: f"{op}: {name} must be on {ref_name}'s device (got {ref_name} "
                                                          f"on {ref.device}, {name} on {t.device})")


def check_grad_out(op: str, grad_out: torch.Tensor, x: torch.Tensor, last: int) -> None:
    """grad_out of a backward op: x's dtype and device, shape (x's leading dims, last)."""
    check_same_dtype(op, x, "x", grad_out, "grad_out")
    check_same_device(op, ("x", x), ("grad_out", grad_out))
    want = (*x.shape[:-1], last)
    torch._check(tuple(grad_out.shape) == want, lambda: f"{op}: grad_out must have the output's shape {want} (x's "
                                                        f"leading dims, {last}) (got {shape_str(grad_out)})")
