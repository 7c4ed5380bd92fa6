"""Modules built on lowrank ops."""
from .monarch import MonarchLinear
from .sltrain import SLTrainLinear
from .convert import ConversionReport, convert_to_monarch, convert_to_sltrain
from .checkpoint import load_converted, save_converted

from .ifairy import *  # noqa: F401,F403
from . import ifairy as _ifairy

__all__ = ["MonarchLinear", "SLTrainLinear", "ConversionReport", "convert_to_monarch", "convert_to_sltrain",
           "save_converted", "load_converted"] + _ifairy.__all__
