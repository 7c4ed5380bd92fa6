"""Optimizers built on lowrank ops."""
from __future__ import annotations

from .galore import GaLoreAdamW, shared_dct_basis
from .per_layer import PerLayerStep, register_per_layer_step

__all__: list[str] = ["GaLoreAdamW", "PerLayerStep", "register_per_layer_step", "shared_dct_basis"]
