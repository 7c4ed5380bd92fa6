"""Modules built on lowrank ops."""
from .monarch import MonarchLinear
from .sltrain import SLTrainLinear, convert_to_sltrain

from .ifairy import *  # noqa: F401,F403
from . import ifairy as _ifairy

__all__ = ["MonarchLinear", "SLTrainLinear", "convert_to_sltrain"] + _ifairy.__all__
