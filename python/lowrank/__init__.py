"""lowrank: PyTorch custom ops (C++/CUDA) for structured, low-rank and low-bit layers.

Ops live under ``torch.ops.lowrank`` and are re-exported here with typed wrappers; modules under
``lowrank.nn``; the pure-torch specification of every op under ``lowrank.reference``.
"""
from __future__ import annotations

import torch

from . import _loader

_HAS_CUDA_KERNELS = _loader.load()

from . import ops  # noqa: E402  (registers fakes and autograd after the libraries are loaded)
from . import reference  # noqa: E402
from .ops import monarch_matmul, sltrain_linear  # noqa: E402
from .ops.ifairy import *  # noqa: E402,F401,F403
from .ops.projection import *  # noqa: E402,F401,F403

if not _HAS_CUDA_KERNELS:
    _loader.register_missing_cuda([n for n in ops.OP_NAMES if n not in ops.CPU_ONLY_OP_NAMES])

from . import nn  # noqa: E402
from . import optim  # noqa: E402

__version__ = "0.1.0"
__all__ = ["monarch_matmul", "sltrain_linear", "has_cuda_kernels", "nn", "ops", "optim", "reference"]
__all__ += ops.ifairy.__all__ + ops.projection.__all__


def has_cuda_kernels() -> bool:
    """True when the CUDA library was built and loaded (it still needs a GPU to run)."""
    return _HAS_CUDA_KERNELS
