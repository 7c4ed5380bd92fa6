"""Modules built on lowrank ops."""
from .monarch import MonarchLinear  # noqa: F401

__all__ = ["MonarchLinear"]
