"""The one timing helper every benchmark uses, so all numbers in a table are measured the same way.

GPU: CUDA events around each rep, with the L2 cache overwritten before every rep so that no rep reads
its inputs from the previous one's cache; median of the reps. CPU: torch.utils.benchmark's
blocked_autorange median, on all the threads torch uses (its default is one thread); a call
slower than max_call_s is timed once, to keep a CPU run within minutes. Rows that compare candidates
(Monarch, SLTrain, iFairy, the GaLore / Fira steps) time them with time_ms_each, which on a CPU interleaves
them in rounds.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.utils.benchmark

_FLUSH_BYTES = 256 * 2**20  # larger than any Hopper L2 (50-60 MB)
_flush_buffers: dict = {}


def _flush_l2(device: torch.device) -> None:
    buf = _flush_buffers.get(device)
    if buf is None:
        buf = _flush_buffers[device] = torch.empty(_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    buf.zero_()


def time_ms(fn: Callable[[], object], device: str, *, warmup_ms: float = 25.0, rep_ms: float = 100.0,
            min_run_time: float = 0.2, max_call_s: float = 1.0) -> float:
    """Median milliseconds of one call of ``fn`` on ``device`` ('cuda...' or 'cpu')."""
    if not device.startswith("cuda"):
        start = time.perf_counter()
        fn()  # warm-up, and a guard: a call slower than max_call_s is reported from this one run
        once = time.perf_counter() - start
        if once > max_call_s:
            return once * 1e3
        timer = torch.utils.benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3
    dev = torch.device(device)
    # Warm up (module load, handles, autotuning) and estimate one call, to size the rep count.
    fn()
    torch.cuda.synchronize(dev)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        _flush_l2(dev)
        fn()
    end.record()
    torch.cuda.synchronize(dev)
    est = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(int(warmup_ms / est)):
        fn()
    reps = min(max(int(rep_ms / est), 10), 1000)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        _flush_l2(dev)  # outside the timed region: only fn's own work is measured
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize(dev)
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def time_ms_each(fns: dict[str, Callable[[], object]], device: str, *, min_run_time: float = 0.2,
                 max_call_s: float = 1.0, block_s: float = 0.02, min_rounds: int = 11) -> dict[str, float]:
    """Median milliseconds of one call of each candidate, measured so that they can be compared.

    GPU: ``time_ms`` of each (events and L2 flushes make each figure stable on its own). CPU: the candidates
    run interleaved, in rounds (a ``torch.utils.benchmark`` ``timeit`` block of about ``block_s`` seconds of
    calls of each, the order reversed every other round), for at least ``min_rounds`` rounds and
    ``min_run_time`` seconds per candidate; each figure is the median over its blocks. A shared or virtual CPU's speed drifts by tens of percent over seconds, which
    timing the candidates one after the other turns into a bias of the ratio. A candidate slower than
    ``max_call_s`` is reported from its warm-up call.
    """
    if device.startswith("cuda"):
        return {name: time_ms(fn, device) for name, fn in fns.items()}
    once: dict[str, float] = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        once[name] = time.perf_counter() - start
    timed = [name for name in fns if once[name] <= max_call_s]
    calls = {name: max(1, int(block_s / max(once[name], 1e-6))) for name in timed}
    timers = {name: torch.utils.benchmark.Timer(stmt="fn()", globals={"fn": fns[name]},
                                                num_threads=torch.get_num_threads()) for name in timed}
    blocks: dict[str, list[float]] = {name: [] for name in timed}
    start, rounds = time.perf_counter(), 0
    while timed and (rounds < min_rounds or time.perf_counter() - start < min_run_time * len(timed)):
        for name in timed if rounds % 2 == 0 else timed[::-1]:
            blocks[name].append(timers[name].timeit(calls[name]).mean)
        rounds += 1
    return {name: (statistics.median(blocks[name]) if name in blocks else once[name]) * 1e3 for name in fns}


def peak_memory_mb(fn: Callable[[], object], device: str) -> float | None:
    """Extra device memory (MiB) one call of ``fn`` holds at its peak; None on CPU (not tracked)."""
    if not device.startswith("cuda"):
        return None
    dev = torch.device(device)
    torch.cuda.synchronize(dev)
    before = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    result = fn()
    torch.cuda.synchronize(dev)
    del result
    return (torch.cuda.max_memory_allocated(dev) - before) / 2**20


def copy_bandwidth_gbps(device: str, nbytes: int = 2 * 2**30) -> float | None:
    """Measured device-to-device copy rate (bytes read + written), the practical memory ceiling."""
    if not device.startswith("cuda"):
        return None
    src = torch.empty(nbytes // 2, dtype=torch.int16, device=device).random_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9
