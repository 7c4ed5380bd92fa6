"""Pure-torch references of every lowrank op: the executable spec used by tests and benchmarks.

One module per family (``lowrank.reference.monarch``, ``.sltrain``, ``.ifairy``, ``.projection``); every name
is re-exported here. Each reference is written from the maths, independently of the kernels, and computes in
whatever dtype it is given (tests pass float64 for ground truth).
"""
from __future__ import annotations

from . import ifairy, monarch, projection, sltrain
from .ifairy import *  # noqa: F401,F403
from .monarch import *  # noqa: F401,F403
from .projection import *  # noqa: F401,F403
from .sltrain import *  # noqa: F401,F403

__all__ = monarch.__all__ + sltrain.__all__ + ifairy.__all__ + projection.__all__
