"""projection ops: typed wrappers, fakes."""
from __future__ import annotations

__all__: list[str] = []
# names in torch.ops.lowrank of this family
OP_NAMES: list[str] = []
