"""Typed wrappers, fake (meta) kernels and autograd registrations of every lowrank op, one module per family."""
from .monarch import (CPU_ONLY_OP_NAMES, monarch_matmul, monarch_matmul_backward, monarch_matmul_backward_saved,
                      monarch_matmul_forward_saving)
from .sltrain import sltrain_linear
from . import ifairy, projection
from .ifairy import *  # noqa: F401,F403
from .projection import *  # noqa: F401,F403

# Every op in torch.ops.lowrank, for registrations that apply to all of them.
OP_NAMES = (["monarch_matmul", "monarch_matmul_backward", "monarch_matmul_forward_saving", "monarch_matmul_backward_saved",
             "sltrain_linear", "sltrain_linear_backward"] + ifairy.OP_NAMES + projection.OP_NAMES)

__all__ = ["monarch_matmul", "monarch_matmul_backward", "monarch_matmul_forward_saving", "monarch_matmul_backward_saved",
           "sltrain_linear", "OP_NAMES", "CPU_ONLY_OP_NAMES"] + ifairy.__all__ + projection.__all__
