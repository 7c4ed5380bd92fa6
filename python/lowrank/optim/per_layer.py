"""Per-layer stepping: each parameter steps as soon as its gradient is ready, so only one gradient is alive at a
time (GaLore's ``torchrun_main.py`` recipe), with gradient accumulation and a DDP mode that steps on averaged
gradients.

Modes:
  * plain: a post-accumulate-grad hook per parameter runs its optimizer's ``step()`` and frees the gradient.
  * ``accumulation_steps=k``: the first k−1 backwards fold the gradient into the optimizer's rank-r accumulator
    (``GaLoreAdamW.accumulate_grad``) and free it; the k-th steps. On subspace-refresh steps, for Fira, and for
    parameters outside projected groups the full gradient is kept across the micro-batches instead (what is kept
    when is in ``lowrank.optim.galore``'s docstring). ``flush()`` steps whatever is pending (a short last cycle).
  * DDP (``ddp=model``): a DDP communication hook all-reduces each bucket (as DDP's default hook does) and, once
    the average has arrived, steps the bucket's parameters on it and zeroes their part of the bucket. Gradients
    are then views into DDP's buckets (``gradient_as_bucket_view=True`` is required: otherwise DDP copies every
    averaged gradient into a new ``.grad`` after backward, the full-gradient copy per-layer stepping avoids), so
    no memory beyond DDP's own buckets holds gradients. Results equal regular DDP + ``GaLoreAdamW``.
  * data parallel without DDP (``process_group=group``): each gradient hook divides p's gradient by the group
    size and starts its all-reduce; when it completes, p steps and its gradient is freed; the end of backward
    waits for all of them. Only the gradients in flight exist at any time (DDP's buckets, a full gradient, do
    not), so memory stays per-layer; the parameters are broadcast from the group's first process at
    registration, and buffers are not synchronized (DDP would broadcast them every forward).
FSDP (DTensor parameters) is refused: FSDP2 reduce-scatters inside its own backward hooks with no per-parameter
hook after the reduction, and ``GaLoreAdamW.step()`` on sharded parameters already keeps only gradient shards.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from ._sharding import is_dtensor
from .galore import GaLoreAdamW

__all__ = ["PerLayerStep", "register_per_layer_step"]


class PerLayerStep:
    """The per-parameter optimizers and their hooks. ``step()`` and ``zero_grad()`` are not needed: every
    ``backward()`` (every ``accumulation_steps``-th one) is a full optimizer step of every parameter it reaches."""

    def __init__(self, accumulation_steps: int = 1):
        self.optimizers: list[torch.optim.Optimizer] = []
        self.accumulation_steps = accumulation_steps
        self._params: list[torch.Tensor] = []
        self._pending: list[int] = []  # micro-batches folded in since the last step, per parameter
        self._handles: list = []
        self._active = True

    def _add(self, p: torch.Tensor, opt: torch.optim.Optimizer) -> int:
        self.optimizers.append(opt)
        self._params.append(p)
        self._pending.append(0)
        return len(self._params) - 1

    def _on_gradient(self, i: int) -> None:
        """p's gradient (this process's or the average) is complete for one backward."""
        p, opt = self._params[i], self.optimizers[i]
        self._pending[i] += 1
        if self._pending[i] < self.accumulation_steps:
            if isinstance(opt, GaLoreAdamW):
                opt.accumulate_grad(p)  # else (or when it declines) autograd keeps accumulating p.grad
            return
        self._pending[i] = 0
        opt.step()
        p.grad = None

    def flush(self) -> None:
        """Step every parameter with micro-batches pending (a last accumulation cycle shorter than
        ``accumulation_steps``, as at the end of an epoch)."""
        for i, (p, opt) in enumerate(zip(self._params, self.optimizers)):
            if self._pending[i]:
                self._pending[i] = 0
                opt.step()
                p.grad = None

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict["optimizers"]
        if len(saved) != len(self.optimizers):
            raise ValueError(f"PerLayerStep: state_dict holds {len(saved)} optimizers, this one has "
                             f"{len(self.optimizers)}")
        for opt, sd in zip(self.optimizers, saved):
            opt.load_state_dict(sd)

    def remove(self) -> None:
        """Detach the hooks (the parameters go back to ordinary gradient accumulation). In DDP mode the
        communication hook cannot be unregistered; it goes back to plain averaging."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._active = False


def _ddp_hook(steps: PerLayerStep, index: dict, group, world: int):
    def hook(_state, bucket):
        buffer = bucket.buffer().div_(world)
        fut = dist.all_reduce(buffer, group=group, async_op=True).get_future()

        def step_bucket(_fut):
            if steps._active:
                for p, g in zip(bucket.parameters(), bucket.gradients()):
                    i = index.get(id(p))
                    if i is None:  # a parameter stepped by someone else keeps its averaged gradient
                        continue
                    p.grad = g  # the average, a view into the bucket
                    steps._on_gradient(i)
                    g.zero_()  # what DDP leaves in .grad, and where the next backward accumulates
            return buffer

        return fut.then(step_bucket)

    return hook


def _data_parallel_hook(steps: PerLayerStep, i: int, group, world: int, in_flight: list):
    def hook(param):
        if not steps._active:
            return
        grad = param.grad.div_(world)
        fut = dist.all_reduce(grad, group=group, async_op=True).get_future()
        in_flight.append(fut.then(lambda _fut: steps._on_gradient(i)))
        if len(in_flight) == 1:  # the first of this backward: its end waits for every step

            def wait_all():
                pending = list(in_flight)
                in_flight.clear()
                for f in pending:
                    f.wait()

            torch.autograd.Variable._execution_engine.queue_callback(wait_all)

    return hook


def register_per_layer_step(params, make_optimizer: Callable[[list], torch.optim.Optimizer] | None = None, *,
                            ddp: nn.parallel.DistributedDataParallel | None = None, process_group=None,
                            accumulation_steps: int = 1, allow_local_gradients: bool = False,
                            **defaults) -> PerLayerStep:
    """Per-layer mode: for every trainable parameter build ``make_optimizer([{**group_options, "params": [p]}])``
    (default ``GaLoreAdamW(groups, **defaults)``) and step it as soon as p's gradient is complete.

    ``params`` is an ``nn.Module`` (all parameters that require grad, one plain group), a
    ``DistributedDataParallel`` model (its module's parameters, DDP mode), an iterable of parameters, or a list
    of galore-torch-style group dicts (their options go to each parameter's optimizer). ``ddp``: the DDP model
    that wraps these parameters (DDP mode, see the module docstring); ``process_group``: data parallel over this
    group without DDP (``dist.group.WORLD`` for all processes). Under ``torch.distributed`` with more than one
    process and neither, this raises, because each process would step on its own un-averaged gradient
    (``allow_local_gradients=True`` if that is meant). ``accumulation_steps``: backwards per optimizer step (the
    loss scaled by 1/k as usual); not with DDP. Returns a ``PerLayerStep`` (``state_dict``, ``flush``, ``remove``).
    """
    if make_optimizer is None:
        def make_optimizer(groups):
            return GaLoreAdamW(groups, **defaults)
    elif defaults:
        raise TypeError("register_per_layer_step: pass optimizer options either in make_optimizer or as keywords")
    if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
        raise ValueError(f"register_per_layer_step: accumulation_steps must be a positive int, "
                         f"got {accumulation_steps!r}")
    if isinstance(params, nn.parallel.DistributedDataParallel):
        ddp, params = params, params.module
    if isinstance(params, nn.Module):
        params = [p for p in params.parameters() if p.requires_grad]
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    members = [[g["params"]] if torch.is_tensor(g["params"]) else list(g["params"]) for g in groups]
    if any(is_dtensor(p) for ps in members for p in ps):
        raise NotImplementedError(
            "register_per_layer_step: DTensor (FSDP2 fully_shard) parameters are not supported: FSDP reduce-"
            "scatters gradients inside its own backward hooks and offers no hook after the reduction; use "
            "GaLoreAdamW.step() after backward, which already holds only gradient shards")
    if ddp is not None and process_group is not None:
        raise ValueError("register_per_layer_step: pass ddp= or process_group=, not both")
    if process_group is not None and accumulation_steps != 1:
        raise NotImplementedError("register_per_layer_step: accumulation_steps > 1 is not supported with "
                                  "process_group")
    if ddp is not None:
        if accumulation_steps != 1:
            raise NotImplementedError("register_per_layer_step: accumulation_steps > 1 is not supported with DDP")
        if ddp.find_unused_parameters:
            raise NotImplementedError(
                "register_per_layer_step: DDP with find_unused_parameters=True is not supported: a parameter "
                "unused on every process would be stepped on a zero gradient, which regular DDP training skips")
        if not ddp.gradient_as_bucket_view:
            raise ValueError(
                "register_per_layer_step: build DistributedDataParallel with gradient_as_bucket_view=True; "
                "otherwise DDP copies every averaged gradient into a new .grad after backward, the full-size "
                "gradient memory that per-layer stepping exists to avoid")
    elif (process_group is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
          and not allow_local_gradients):
        raise RuntimeError(
            f"register_per_layer_step: torch.distributed runs {dist.get_world_size()} processes, and without "
            "ddp= each would step on its own un-averaged gradient, so the replicas drift apart; pass "
            "ddp=<the DistributedDataParallel model> or process_group=<group> (or allow_local_gradients=True "
            "if that is meant)")
    result = PerLayerStep(accumulation_steps)
    index: dict[int, int] = {}
    in_flight: list = []
    world = dist.get_world_size(process_group) if process_group is not None else 1
    for group, ps in zip(groups, members):
        options = {k: v for k, v in group.items() if k != "params"}
        for p in ps:
            if not p.requires_grad:  # a frozen parameter gets no gradient, hence no hook and no optimizer
                continue
            i = result._add(p, make_optimizer([{**options, "params": [p]}]))
            index[id(p)] = i
            if process_group is not None:
                dist.broadcast(p.detach(), group=process_group, group_src=0)
                result._handles.append(p.register_post_accumulate_grad_hook(
                    _data_parallel_hook(result, i, process_group, world, in_flight)))
            elif ddp is None:
                result._handles.append(p.register_post_accumulate_grad_hook(
                    lambda _param, i=i: result._on_gradient(i) if result._active else None))
    if ddp is not None:
        group = ddp.process_group
        ddp.register_comm_hook(None, _ddp_hook(result, index, group, dist.get_world_size(group)))
    return result
