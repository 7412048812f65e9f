"""Per-phase peak memory: CUDA allocator peak on GPU, peak resident set on Linux CPU."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


def _reset_cpu_peak() -> bool:
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


@contextlib.contextmanager
def phase_peak(device: torch.device, out: dict[str, int | None], phase: str) -> Iterator[None]:
    """Record the peak memory of the enclosed block into out[phase] (bytes, or None)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield
        torch.cuda.synchronize(device)
        out[phase] = int(torch.cuda.max_memory_allocated(device))
        return
    can_measure = _reset_cpu_peak()
    yield
    out[phase] = _cpu_peak_bytes() if can_measure else None
