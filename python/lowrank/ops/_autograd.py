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


@torch.library.custom_op("lowrank::inference_only_gradient", mutates_args=())
def _inference_only_gradient(like: torch.Tensor, message: str) -> torch.Tensor:
    """Raises ``message``: the gradient of an inference-only op, as a graph node that raises only when run."""
    raise RuntimeError(message)


@_inference_only_gradient.register_fake
def _inference_only_gradient_fake(like, message):
    return torch.empty_like(like)


def refuse_gradient(op: str, message: str) -> None:
    """Register an autograd kernel on an inference-only op whose backward raises ``message`` when it runs.

    The refusal is a node of the backward graph (the custom op above), not an exception at trace time:
    ``torch.compile`` traces the backward of any call with an input that requires grad (AOTAutograd), and a
    backward that raised while being traced would make every compiled model with trainable parameters around
    the op fail to compile, even for inference. Gradients of inputs that do not need one are None.
    """

    def meta(t):
        return (t.shape, t.dtype, t.device) if isinstance(t, torch.Tensor) and t.is_floating_point() else None

    def setup_context(ctx, inputs, output):
        # a list input (ifairy_linear_multi's scales) gets a list of gradients, one per element that needs one
        ctx.metas = [[meta(e) if e.requires_grad else None for e in t] if isinstance(t, (list, tuple)) else meta(t)
                     for t in inputs]

    def refusal(shape, dtype, device):
        return _inference_only_gradient(torch.empty(shape, dtype=dtype, device=device), message)

    def backward(ctx, *grads):
        out = []
        for i, m in enumerate(ctx.metas):
            if isinstance(m, list):
                out.append([None if e is None else refusal(*e) for e in m])
            elif m is None or not ctx.needs_input_grad[i]:
                out.append(None)
            else:
                out.append(refusal(*m))
        return tuple(out)

    torch.library.register_autograd(op, backward, setup_context=setup_context)
