"""Autograd helpers shared by the op families."""
from __future__ import annotations

import torch


def refuse_double_backward(backward_op: str, public_name: str) -> None:
    """Register an autograd kernel on a backward op that raises: without it autograd would treat the op as
    constant and second-order gradients would be silently zero."""

    def _refuse(ctx, *grads):
        raise NotImplementedError(
            f"{public_name}: double backward (differentiating a gradient taken with create_graph=True) "
            "is not supported"
        )

    torch.library.register_autograd(backward_op, _refuse, setup_context=lambda ctx, inputs, output: None)
