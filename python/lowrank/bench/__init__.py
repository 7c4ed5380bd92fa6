"""Benchmarks of the lowrank ops: ``python -m lowrank.bench``.

Each op family is one module with ``rows(device, quick)``, returning an iterable of row dicts (a
``Rows`` when the count is known ahead, so the progress bar can show it). Adding a family is one
module plus one line in ``FAMILIES``.
"""
from __future__ import annotations

import importlib
from typing import Callable, Iterable, Iterator, Sequence

import torch

# family name -> module holding its ``rows(device, quick)``
FAMILIES = {
    "monarch": "lowrank.bench.monarch",
    "sltrain": "lowrank.bench.sltrain",
    "ifairy": "lowrank.bench.ifairy",
    "ifairy_model": "lowrank.bench.ifairy_model",
    "projection": "lowrank.bench.projection",
}


def rel_err(got, ref) -> float:
    """max |got − ref| / max |ref| (ref in float64), the error every row reports."""
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def fwd_or_fwd_bwd(make_out: Callable[[], object], inputs, grad) -> Callable[[], object]:
    """The timed call of a row: ``make_out`` (a forward), or forward + backward when ``grad`` is given."""
    if grad is None:
        return make_out

    def fn():
        return torch.autograd.grad(make_out(), inputs, grad)
    return fn


def family_rows(name: str, device: str, quick: bool) -> Iterable[dict]:
    return importlib.import_module(FAMILIES[name]).rows(device, quick)


class Rows:
    """Cases measured lazily, one row each, with a length known before any is measured."""

    def __init__(self, cases: Sequence, measure: Callable[[object], dict]):
        self.cases, self.measure = list(cases), measure

    def __len__(self) -> int:
        return len(self.cases)

    def __iter__(self) -> Iterator[dict]:
        return (self.measure(case) for case in self.cases)
