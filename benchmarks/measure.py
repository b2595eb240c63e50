"""What the suite measures and how: interleaved step times, bytes kept for backward, peak memory of one step, merge."""

from __future__ import annotations

import ctypes
import gc
import re
import statistics
import time
from collections.abc import Callable, Mapping

import torch

from .implementations import Built


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object], device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def training_step(
    item: Built, x: torch.Tensor, grad_out: torch.Tensor
) -> tuple[Callable[[], None], Callable[[], None]]:
    """(reset, step): reset clears the gradients outside the timed region; step is forward + backward."""

    def reset() -> None:
        x.grad = None
        for tensor in item.trainable:
            tensor.grad = None

    def step() -> None:
        item.module(x).backward(grad_out)

    return reset, step


def interleaved(
    runs: Mapping[str, tuple[Callable[[], None], Callable[[], None]]], warmup: int, reps: int, device: str
) -> dict[str, list[float]]:
    """Seconds per call of each ``(reset, run)``: every round runs each implementation once, in a rotating order, so
    the machine's drifts hit all of them alike; the first ``warmup`` rounds are dropped."""
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + reps):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            reset, run = runs[name]
            reset()
            seconds = _timed(run, device)
            if round_index >= warmup:
                times[name].append(seconds)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of the per-round ratio (both measured back to back in the same round)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def saved_for_backward(item: Built, x: torch.Tensor) -> dict[str, int]:
    """Bytes autograd keeps between one forward and its backward, each storage counted once.

    ``total``: every distinct storage (parameters and the layer input included, once each, as the base layer keeps
    its input and weight too). ``beyond_input_and_params``: what the graph adds on top of tensors that training
    holds anyway.
    """
    held_anyway = {t.untyped_storage().data_ptr() for t in [*item.all_tensors, x]}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    x.grad = None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = item.module(x)
    del out
    return {
        "total": sum(storages.values()),
        "beyond_input_and_params": sum(n for ptr, n in storages.items() if ptr not in held_anyway),
        "tensors": len(storages),
    }


def merge_seconds(item: Built, reps: int, device: str) -> list[float]:
    """Seconds of ``merge`` (the undo runs outside the timed region)."""
    times = []
    for _ in range(reps):
        times.append(_timed(item.merge, device))
        item.restore()
    return times


# ------------------------------------------------------------------------------------------------- peak memory
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _mallopt(mmap_threshold: int, trim_threshold: int) -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )


def return_freed_memory_to_the_os() -> bool:
    """Make glibc map every large block afresh and unmap it when freed, so the resident set tracks live tensors
    (for the peak-memory phase; allocations get slower, so timings run after ``keep_freed_memory``).

    Blocks freed earlier into glibc's heaps are released too (``malloc_trim``): malloc reuses free heap chunks before
    it maps new memory, so a step could otherwise run in already-resident pages and show no peak at all.
    """
    if not _mallopt(64 * 1024, 64 * 1024):
        return False
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return True


def keep_freed_memory() -> bool:
    """Let glibc reuse freed blocks up to 32 MiB from its heap, the state its adaptive defaults settle into after a
    few steps of any training loop (for the timing phase)."""
    return _mallopt(32 * 1024 * 1024, 256 * 1024 * 1024)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"{field}:\s+(\d+)", status.read()).group(1))


def peak_step_bytes(reset: Callable[[], None], step: Callable[[], None], device: str) -> int | None:
    """Peak memory of one training step above what the process held just before it: resident-set high-water mark
    on CPU (reset through /proc/self/clear_refs), allocator peak on CUDA; ``None`` where neither can be read."""
    reset()
    step()  # first-call caches (oneDNN primitives, autograd buffers) are not the step's own memory
    reset()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        before = _status_kib("VmRSS")
    except OSError:
        return None
    step()
    return (_status_kib("VmHWM") - before) * 1024
