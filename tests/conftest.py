"""Shared test setup: the device list, the `cuda` marker and fixed seeds.

`devices` is cpu, plus cuda when a GPU and lowrank's CUDA kernels are both present. Set
LOWRANK_TEST_DEVICE=cpu (or cuda) to run one device only. Every test parametrized with a cuda device is
marked `cuda` automatically, so `pytest -m cuda` runs exactly the CUDA tests and `-m "not cuda"` the rest.
"""
from __future__ import annotations

import os
import random

import pytest
import torch

import lowrank


def _devices() -> list[str]:
    found = ["cpu"]
    if torch.cuda.is_available() and lowrank.has_cuda_kernels():
        found.append("cuda")
    wanted = os.environ.get("LOWRANK_TEST_DEVICE")
    if wanted:
        found = [d for d in found if d == wanted]
    return found


devices = _devices()
HAS_CUDA = "cuda" in devices


def _uses_cuda(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return False
    return any(str(v).startswith("cuda") for v in callspec.params.values() if isinstance(v, (str, torch.device)))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _uses_cuda(item):
            item.add_marker(pytest.mark.cuda)


def noncontiguous_like(t: torch.Tensor, kind: str) -> torch.Tensor:
    """A non-contiguous view holding t's values."""
    if kind == "transposed":
        view = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif kind == "sliced":
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype, device=t.device)
        big[..., 1::2] = t
        view = big[..., 1::2]
    elif kind == "leading_sliced":
        big = torch.zeros(2 * t.shape[0], *t.shape[1:], dtype=t.dtype, device=t.device)
        big[::2] = t
        view = big[::2]
    else:
        raise ValueError(kind)
    assert not view.is_contiguous() and torch.equal(view, t)
    return view


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, whatever ran before it."""
    random.seed(0)
    torch.manual_seed(0)
    yield
