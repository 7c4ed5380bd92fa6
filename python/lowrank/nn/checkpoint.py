"""Save and reload converted models: weights in safetensors, the conversion recipe in JSON.

A converted model's ``state_dict`` alone cannot be loaded into the model it came from: that model has
``nn.Linear`` layers where the checkpoint has Monarch factors or SLTrain's A, B, values and support. The
recipe says which modules became what, with which constructor arguments, so :func:`load_converted` can
rebuild the converted architecture from a freshly built, unconverted model and then load the weights.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from .convert import apply_recipe, module_recipe

WEIGHTS_FILE = "model.safetensors"
RECIPE_FILE = "lowrank_recipe.json"
_FORMAT = "lowrank-converted"
_VERSION = 1


def save_converted(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model``'s weights and buffers (``path/model.safetensors``; tied parameters stored once) and
    its conversion recipe (``path/lowrank_recipe.json``: every Monarch / SLTrain module's name, type and
    constructor arguments, SLTrain's seed included) into the directory ``path`` (created if needed)."""
    os.makedirs(path, exist_ok=True)
    modules = {name: r for name, mod in model.named_modules() if (r := module_recipe(mod)) is not None}
    recipe = {"format": _FORMAT, "version": _VERSION, "model_class": type(model).__qualname__, "modules": modules}
    save_model(model, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(path, RECIPE_FILE), "w") as f:
        json.dump(recipe, f, indent=1)


def load_recipe(path: str | os.PathLike) -> dict:
    with open(os.path.join(path, RECIPE_FILE)) as f:
        recipe = json.load(f)
    if recipe.get("format") != _FORMAT or recipe.get("version") != _VERSION:
        raise ValueError(f"lowrank.nn.load_converted: {path} holds no {_FORMAT} v{_VERSION} recipe")
    return recipe


def load_converted(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Apply the recipe saved by :func:`save_converted` to ``model`` (a freshly built, unconverted model of
    the same architecture, e.g. ``AutoModelForCausalLM.from_config(config)``) and load the weights into it.
    Every parameter and buffer is loaded (``strict=True`` raises on a missing or unexpected key), SLTrain
    supports are validated. Returns ``model``, changed in place."""
    recipe = load_recipe(path)
    apply_recipe(model, recipe["modules"])
    device = next((t.device for t in model.state_dict().values()), torch.device("cpu"))
    load_model(model, os.path.join(path, WEIGHTS_FILE), strict=strict, device=str(device))
    return model
