"""Per-phase peak memory: CUDA allocator peak on GPU, peak resident set on Linux CPU."""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Callable, Iterator

import torch

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _reset_cpu_peak() -> bool:
    # Hand freed heap pages back first, so the reset peak starts from live memory, not from
    # what the allocator kept after an earlier phase.
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


def _cpu_peak_bytes() -> int | None:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# Per CUDA device: the process-lifetime peak that per-phase resets hide from
# torch.cuda.max_memory_allocated (which trainers such as verl report as the run's peak).
_LIFETIME_PEAK: dict[int, int] = {}


def lifetime_peak_bytes(device: torch.device) -> int | None:
    """CUDA peak allocated bytes since the process started, across this module's resets."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return max(_LIFETIME_PEAK.get(index, 0), int(torch.cuda.max_memory_allocated(device)))


@contextlib.contextmanager
def phase_peak(device: torch.device, out: dict[str, int | None], phase: str) -> Iterator[None]:
    """Record the peak memory of the enclosed block into out[phase] (bytes, or None).

    On CUDA this resets the allocator's peak; `lifetime_peak_bytes` keeps the lifetime one.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.synchronize(device)
        _LIFETIME_PEAK[index] = lifetime_peak_bytes(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield
        torch.cuda.synchronize(device)
        out[phase] = int(torch.cuda.max_memory_allocated(device))
        _LIFETIME_PEAK[index] = max(_LIFETIME_PEAK[index], out[phase])
        return
    can_measure = _reset_cpu_peak()
    yield
    out[phase] = _cpu_peak_bytes() if can_measure else None


def current_bytes(device: torch.device) -> int | None:
    """Memory in use now: CUDA allocated bytes, or the CPU resident set after trimming the heap."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.memory_allocated(device))
    if not _reset_cpu_peak():
        return None
    return _cpu_peak_bytes()
