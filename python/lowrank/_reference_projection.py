"""Pure-torch references of the projection ops (re-exported by lowrank.reference)."""
from __future__ import annotations

__all__: list[str] = []
