"""In-place conversion of a model's ``nn.Linear`` layers to Monarch or SLTrain layers, and the per-module
recipe (type + constructor arguments) that :mod:`lowrank.nn.checkpoint` saves and replays."""
from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Union

import torch
from torch import nn

from .monarch import MonarchLinear
from .sltrain import SLTrainLinear

Target = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]


@dataclass
class ConversionReport:
    """What a converter did. ``replaced``: module name -> recipe of its replacement (type and constructor
    arguments, as :func:`module_recipe`); ``skipped``: targeted linear -> why it stayed dense; parameter
    counts before and after (shared parameters counted once)."""

    model: nn.Module
    replaced: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0

    def __str__(self) -> str:
        kinds = sorted({r["type"] for r in self.replaced.values()}) or ["nothing"]
        ratio = self.params_after / self.params_before if self.params_before else 1.0
        text = (f"replaced {len(self.replaced)} linear layers by {'/'.join(kinds)}; parameters "
                f"{self.params_before:,} -> {self.params_after:,} ({ratio:.1%})")
        for name, why in self.skipped.items():
            text += f"\n  kept {name}: {why}"
        return text


def layer_seed(seed: int, name: str) -> int:
    """A layer's support seed from the model seed and its module name: the first 63 bits of
    SHA-256(``"<seed>:<name>"``), the same in every process and Python run (unlike ``hash()``)."""
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def module_recipe(module: nn.Module) -> dict | None:
    """Type and constructor arguments of a lowrank layer (None for any other module)."""
    if isinstance(module, SLTrainLinear):
        return {"type": "SLTrainLinear", "in_features": module.in_features, "out_features": module.out_features,
                "rank": module.rank, "density": module.density, "alpha": module.alpha,
                "bias": module.bias is not None, "seed": module.seed}
    if isinstance(module, MonarchLinear):
        return {"type": "MonarchLinear", "in_features": module.in_features, "out_features": module.out_features,
                "nblocks": module.nblocks, "bias": module.bias is not None, "save_middle": module.save_middle}
    return None


def build_from_recipe(recipe: dict, device=None, dtype=None) -> nn.Module:
    """A fresh layer from :func:`module_recipe`'s dict."""
    args = {k: v for k, v in recipe.items() if k != "type"}
    kinds = {"SLTrainLinear": SLTrainLinear, "MonarchLinear": MonarchLinear}
    if recipe.get("type") not in kinds:
        raise ValueError(f"lowrank recipe: unknown module type {recipe.get('type')!r}")
    return kinds[recipe["type"]](**args, device=device, dtype=dtype)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _chooser(target: Target) -> Callable[[str, nn.Module], bool]:
    if target is None:
        return lambda name, mod: True
    if callable(target):
        return target
    keys = [target] if isinstance(target, str) else list(target)
    return lambda name, mod: any(k in name for k in keys)


def _targets(model: nn.Module, target: Target, skip_tied: bool, report: ConversionReport) -> list[tuple]:
    """Targeted linears as (name, module); tied ones (a parameter reachable under another name, e.g. an
    lm_head sharing the embedding's weight) and MultiheadAttention's out_proj (whose weight MHA reads
    directly) are recorded in ``report.skipped`` instead."""
    owners: dict[int, list[str]] = defaultdict(list)
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)].append(pname)
    chosen = _chooser(target)
    mha_children = {f"{n}.{c}" if n else c for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
                    for c, _ in m.named_children()}
    picked = []
    for name, mod in model.named_modules(remove_duplicate=False):
        if not isinstance(mod, nn.Linear) or not chosen(name, mod):
            continue
        if not name:
            report.skipped[name] = "the model itself is a Linear: it cannot be replaced in place"
            continue
        if name in mha_children:
            report.skipped[name] = "nn.MultiheadAttention reads out_proj.weight directly"
            continue
        shared = [o for p in mod.parameters() for o in owners[id(p)] if not o.startswith(f"{name}.")]
        if skip_tied and shared:
            report.skipped[name] = f"weight shared with {', '.join(sorted(shared))} (skip_tied=False converts it)"
            continue
        picked.append((name, mod))
    return picked


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, layer)


def _convert(model, target, skip_tied, make) -> ConversionReport:
    report = ConversionReport(model, params_before=count_parameters(model))
    for name, lin in _targets(model, target, skip_tied, report):
        layer = make(name, lin)
        _replace(model, name, layer)
        report.replaced[name] = module_recipe(layer)
    report.params_after = count_parameters(model)
    return report


def convert_to_sltrain(model: nn.Module, rank: int, density: float = 0.03, alpha: float = 32.0,
                       target: Target = None, seed: int | None = None, skip_tied: bool = True) -> ConversionReport:
    """Replace ``nn.Linear`` layers of ``model`` in place by freshly initialized :class:`SLTrainLinear` layers
    of the same sizes, bias, device and dtype (SLTrain pretrains from scratch).

    ``target``: None for every Linear, a substring or list of substrings of the module name (e.g.
    ``["q_proj", "mlp"]``), or a callable ``(name, module) -> bool``. ``seed``: None draws each support from
    the global RNG; an int gives layer ``name`` the seed :func:`layer_seed(seed, name) <layer_seed>`, so every
    rank of a distributed job builds the same supports with no communication. ``skip_tied`` (default True)
    leaves a linear whose weight is shared with another module (tied embeddings) dense, since replacing it
    would silently untie it. Returns a :class:`ConversionReport` (``str()`` of it is a summary)."""
    def make(name, lin):
        return SLTrainLinear(lin.in_features, lin.out_features, rank, density, alpha, bias=lin.bias is not None,
                             device=lin.weight.device, dtype=lin.weight.dtype,
                             seed=None if seed is None else layer_seed(seed, name))

    return _convert(model, target, skip_tied, make)


def convert_to_monarch(model: nn.Module, nblocks: int = 4, target: Target = None, from_dense: bool = True,
                       skip_tied: bool = True) -> ConversionReport:
    """Replace ``nn.Linear`` layers of ``model`` in place by :class:`MonarchLinear` layers with ``nblocks``
    blocks, same sizes, bias, device and dtype. ``from_dense=True`` starts each from the Frobenius-optimal
    projection of the linear's current weight (:meth:`MonarchLinear.from_dense`; bias copied), False from a
    fresh init (also what a linear on the meta device gets). ``target`` and ``skip_tied``: as
    :func:`convert_to_sltrain`. Returns a :class:`ConversionReport`."""
    def make(name, lin):
        if from_dense and not lin.weight.is_meta:
            return MonarchLinear.from_dense(lin, nblocks=nblocks)
        return MonarchLinear(lin.in_features, lin.out_features, nblocks, bias=lin.bias is not None,
                             device=lin.weight.device, dtype=lin.weight.dtype)

    return _convert(model, target, skip_tied, make)


def apply_recipe(model: nn.Module, modules: dict[str, dict]) -> nn.Module:
    """Replace each named module of ``model`` by an uninitialized layer built from its recipe (on the old
    module's device and dtype), ready for ``load_state_dict``. Each name must be an ``nn.Linear`` of the
    recipe's sizes (or a layer with that exact recipe already)."""
    for name, recipe in modules.items():
        try:
            old = model.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"lowrank recipe: the model has no module {name!r}; is it the same architecture?") from exc
        if module_recipe(old) == recipe:
            continue
        if not isinstance(old, nn.Linear) or (old.in_features, old.out_features) != (recipe["in_features"],
                                                                                   recipe["out_features"]):
            raise ValueError(f"lowrank recipe: {name!r} should be an nn.Linear({recipe['in_features']}, "
                             f"{recipe['out_features']}), found {old!r}")
        layer = build_from_recipe(recipe, device="meta", dtype=old.weight.dtype)
        _replace(model, name, layer.to_empty(device=old.weight.device))
    return model
