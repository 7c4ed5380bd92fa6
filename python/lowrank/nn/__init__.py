"""Modules built on lowrank ops."""
from .monarch import MonarchLinear
from .sltrain import SLTrainLinear, convert_to_sltrain

__all__ = ["MonarchLinear", "SLTrainLinear", "convert_to_sltrain"]
