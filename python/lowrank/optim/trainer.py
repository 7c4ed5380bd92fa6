"""GaLoreAdamW with Hugging Face ``transformers.Trainer``, regular and per-layer, and param groups from
``optim_target_modules``-style name patterns. Needs no transformers import itself.

Regular (``per_layer=False``): ``Trainer(..., optimizers=galore_trainer_optimizers(model, args, targets))``. It is
an ordinary optimizer: Trainer clips gradients (``max_grad_norm``), builds and steps its LR scheduler on it, and
saves / restores its ``state_dict`` in checkpoints.

Per-layer (``per_layer=True``): each parameter steps inside backward (``register_per_layer_step``), and Trainer
gets a stand-in optimizer whose ``param_groups`` *are* the per-parameter optimizers' groups, so the LR scheduler
Trainer builds on it sets the LR every per-layer step uses; its ``state_dict`` holds all per-parameter optimizers
(checkpoint/resume); its ``step()`` flushes a short last accumulation cycle. ``args.gradient_accumulation_steps``
becomes per-layer accumulation (rank-r between micro-batches, see ``lowrank.optim.per_layer``). Gradient clipping
cannot be correct here (the global norm exists only once every layer has already stepped), so
``max_grad_norm > 0`` is refused instead of being silently skipped; multi-process Trainer runs (DDP made by
Trainer after the hooks) are refused too: use ``register_per_layer_step(ddp=...)`` in your own loop.
"""
from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

from .galore import GaLoreAdamW
from .per_layer import PerLayerStep, register_per_layer_step

__all__ = ["galore_param_groups", "galore_trainer_optimizers", "PerLayerTrainerOptimizer"]


def _matches(targets: str | Iterable[str], name: str) -> bool:
    """transformers' ``check_target_module_exists``: a string is a regex that must match the whole name; a list
    matches a name equal to, containing, or fully matching (as a regex) one of its entries."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    targets = list(targets)
    return name in targets or any(t in name for t in targets) or any(re.fullmatch(t, name) for t in targets)


def galore_param_groups(model: nn.Module, target_modules: str | Iterable[str], rank: int = 128,
                        update_proj_gap: int = 200, scale: float = 0.25, proj_type: str = "std",
                        **galore_options) -> list[dict]:
    """``[projected group, plain group]`` for ``GaLoreAdamW``: the weights of the ``nn.Linear`` modules whose
    name matches ``target_modules`` (as transformers' ``optim_target_modules``) are projected with the given
    options (``fira``, ``basis`` ... in ``galore_options``); every other trainable parameter, biases of the
    matched layers included, gets plain AdamW. Raises if nothing matches."""
    projected = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and _matches(target_modules, name) and module.weight.requires_grad:
            projected.append(module.weight)
    if not projected:
        raise ValueError(f"galore_param_groups: no nn.Linear module name matches {target_modules!r}")
    chosen = {id(p) for p in projected}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]
    group = {"params": projected, "rank": rank, "update_proj_gap": update_proj_gap, "scale": scale,
             "proj_type": proj_type, **galore_options}
    return [group, {"params": others}] if others else [group]


class PerLayerTrainerOptimizer(torch.optim.Optimizer):
    """What Trainer (or any training loop written for one optimizer) sees of per-layer stepping: shared
    ``param_groups`` (the LR scheduler drives the per-layer optimizers through them), ``state_dict`` of all of
    them, ``step()`` = ``flush()`` of a short last accumulation cycle, ``zero_grad()`` as usual."""

    def __init__(self, per_layer: PerLayerStep):
        if not per_layer.optimizers:
            raise ValueError("PerLayerTrainerOptimizer: per-layer stepping holds no optimizer")
        params = [p for opt in per_layer.optimizers for g in opt.param_groups for p in g["params"]]
        super().__init__(params, dict(per_layer.optimizers[0].defaults))
        self.per_layer = per_layer

    @property
    def param_groups(self) -> list[dict]:
        """The per-layer optimizers' own group dicts, read afresh each time (``load_state_dict`` replaces them):
        an LR a scheduler writes here is the LR the hooks step with."""
        if "per_layer" not in self.__dict__:  # inside torch's __init__
            return self.__dict__.setdefault("_init_groups", [])
        return [g for opt in self.per_layer.optimizers for g in opt.param_groups]

    @param_groups.setter
    def param_groups(self, value: list[dict]) -> None:
        if "per_layer" in self.__dict__:
            raise AttributeError("PerLayerTrainerOptimizer.param_groups are the per-layer optimizers' groups")
        self.__dict__["_init_groups"] = value

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.per_layer.flush()
        return loss

    def state_dict(self) -> dict:
        return self.per_layer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.per_layer.load_state_dict(state_dict)


def galore_trainer_optimizers(model: nn.Module, args, target_modules: str | Iterable[str], per_layer: bool = False,
                              **galore_options) -> tuple[torch.optim.Optimizer, None]:
    """``(optimizer, None)`` for ``Trainer(optimizers=...)`` (Trainer then builds its LR scheduler on it).
    ``args`` is the ``TrainingArguments``: learning_rate, adam_beta1/2, adam_epsilon and weight_decay become the
    AdamW hyper-parameters; ``target_modules``, rank, update_proj_gap, scale, proj_type, fira, basis go to
    ``galore_param_groups``. See the module docstring for what ``per_layer=True`` keeps correct and refuses."""
    groups = galore_param_groups(model, target_modules, **galore_options)
    hyper = {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon,
             "weight_decay": args.weight_decay}
    if not per_layer:
        return GaLoreAdamW(groups, **hyper), None
    if args.max_grad_norm is not None and args.max_grad_norm > 0:
        raise ValueError(
            f"galore_trainer_optimizers: per-layer steps run inside backward, before the global gradient norm "
            f"exists, so Trainer's clipping (max_grad_norm={args.max_grad_norm}) would silently do nothing; set "
            f"max_grad_norm=0 in TrainingArguments, or use per_layer=False to clip")
    if getattr(args, "world_size", 1) > 1:
        raise ValueError("galore_trainer_optimizers: per-layer stepping under a multi-process Trainer is not "
                         "supported (Trainer wraps the model in DDP after these hooks exist); write the loop with "
                         "register_per_layer_step(ddp=...) instead")
    handle = register_per_layer_step(groups, accumulation_steps=args.gradient_accumulation_steps, **hyper)
    return PerLayerTrainerOptimizer(handle), None
