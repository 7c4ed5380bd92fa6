"""Loads the compiled libraries: the CPU one (every schema + CPU kernels) always, the CUDA one when this
torch has CUDA. When the CUDA kernels are missing, each op gets a CUDA kernel that raises a clear error
instead of the dispatcher's generic one."""
from __future__ import annotations

import glob
import os

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_cuda_error: str | None = None


def _find(stem: str) -> str | None:
    hits = sorted(glob.glob(os.path.join(_HERE, f"{stem}*.so")) + glob.glob(os.path.join(_HERE, f"{stem}*.pyd")))
    return hits[0] if hits else None


def load() -> bool:
    """Load the libraries; returns whether the CUDA kernels are available."""
    global _cuda_error
    cpu = _find("_lowrank_cpu")
    if cpu is None:
        raise ImportError(
            f"lowrank: compiled library _lowrank_cpu not found in {_HERE}; build the package with "
            "`pip install --no-build-isolation .`"
        )
    torch.ops.load_library(cpu)
    cuda = _find("_lowrank_cuda")
    if cuda is None:
        _cuda_error = "lowrank was built without CUDA kernels (no nvcc at build time, or LOWRANK_CUDA=OFF)"
        return False
    if not torch.cuda.is_available() and torch.version.cuda is None:
        _cuda_error = "this torch build has no CUDA support"
        return False
    try:
        torch.ops.load_library(cuda)
    except OSError as exc:  # e.g. a CUDA runtime mismatch: keep the CPU ops usable
        _cuda_error = f"loading {os.path.basename(cuda)} failed: {exc}"
        return False
    return True


def register_cuda_stub(op_names: list[str], why: str) -> None:
    """Give each op a CUDA kernel that raises ``lowrank.<op>: got a CUDA tensor, but <why>``."""
    for name in op_names:
        def _stub(*args, _name=name, **kwargs):
            raise RuntimeError(f"lowrank.{_name}: got a CUDA tensor, but {why}")

        torch.library.impl(f"lowrank::{name}", "CUDA")(_stub)


def register_missing_cuda(op_names: list[str]) -> None:
    """Give each op a CUDA kernel that explains why the real one is absent."""
    register_cuda_stub(op_names, _cuda_error)


def cuda_error() -> str | None:
    return _cuda_error
