"""Per-phase peak memory: CUDA allocator peak on GPU, peak resident set on Linux CPU."""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
from collections.abc import Callable, Iterator

import torch

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"
# CPU: trim the heap at each phase start, so each phase's peak counts its own pages (see
# `exact_cpu_phase_peaks`). Off by default: the trim makes the next phase fault its pages in afresh.
_TRIM_AT_PHASE_START = contextvars.ContextVar("trim_at_phase_start", default=False)


@contextlib.contextmanager
def exact_cpu_phase_peaks() -> Iterator[None]:
    """Within this block, CPU phase peaks start from live memory (the heap trimmed at each phase
    start) instead of from what the allocator kept. For untimed measuring runs: it costs time."""
    token = _TRIM_AT_PHASE_START.set(True)
    try:
        yield
    finally:
        _TRIM_AT_PHASE_START.reset(token)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _reset_cpu_peak(trim_heap: bool = False) -> bool:
    # With `trim_heap`, hand freed heap pages back first, so the reset peak starts from live memory,
    # not from what the allocator kept after an earlier phase. Not in timed runs: trimming between
    # phases makes the next phase fault its pages in afresh (~120 ms of a 0.6 s CPU step).
    trim = _malloc_trim() if trim_heap else None
    if trim is not None:
        trim(0)
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


def _proc_kib_as_bytes(path: str, key: str) -> int | None:
    """A "<key> <n> kB" line of a /proc file, in bytes (None off Linux or when absent)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cpu_peak_bytes() -> int | None:
    return _proc_kib_as_bytes(_STATUS, "VmHWM:")


def available_bytes(device: torch.device) -> int | None:
    """Free memory of `device`: CUDA's free bytes, or the host's MemAvailable on CPU (Linux)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return _proc_kib_as_bytes("/proc/meminfo", "MemAvailable:")


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
    can_measure = _reset_cpu_peak(trim_heap=_TRIM_AT_PHASE_START.get())
    yield
    out[phase] = _cpu_peak_bytes() if can_measure else None


def current_bytes(device: torch.device) -> int | None:
    """Memory in use now: CUDA allocated bytes, or the CPU resident set after trimming the heap."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.memory_allocated(device))
    if not _reset_cpu_peak(trim_heap=True):
        return None
    return _cpu_peak_bytes()


def _non_overlapping(t: torch.Tensor) -> bool:
    """True when no two indices of `t` address the same element (views and slices included)."""
    dims = sorted((st, sz) for sz, st in zip(t.size(), t.stride(), strict=True) if sz > 1)
    reach = 1  # elements spanned by the dims seen so far, in units of the next dim's stride
    for stride, size in dims:
        if stride < reach:
            return False
        reach = stride * size
    return True


def copy_keeping_strides(
    t: torch.Tensor, device: torch.device | str, pin_memory: bool = False, non_blocking: bool = False
) -> torch.Tensor:
    """Copy of `t` on `device` with the same sizes and strides (storage offset dropped).

    Non-overlapping layouts (transposes, slices) keep their strides, at the cost of the slack between
    a slice's elements; overlapping ones (expanded dims) come back contiguous.
    """
    if t.numel() and _non_overlapping(t):
        span = 1 + sum((sz - 1) * st for sz, st in zip(t.size(), t.stride(), strict=True))
        storage = torch.empty(span, dtype=t.dtype, device=device, pin_memory=pin_memory)
        out = storage.as_strided(t.size(), t.stride())
    else:
        out = torch.empty(t.size(), dtype=t.dtype, device=device, pin_memory=pin_memory)
    out.copy_(t, non_blocking=non_blocking)
    return out


# views and casts that keep "this is a weight": Linear saves weight.t(), autocast a cast copy, MoE
# experts a slice of a stacked parameter
_VIEW_OR_CAST_NODES = frozenset(
    {
        "AliasBackward0",
        "ExpandBackward0",
        "PermuteBackward0",
        "SelectBackward0",
        "SliceBackward0",
        "TBackward0",
        "ToCopyBackward0",
        "TransposeBackward0",
        "UnsafeViewBackward0",
        "ViewBackward0",
    }
)


def derived_from_parameter(t: torch.Tensor) -> bool:
    """True for a leaf that requires grad (a parameter; under FSDP the unsharded one) and for views
    or dtype casts of one (Linear saves `weight.t()`, autocast saves a cast copy). Such tensors are
    the model's weights, not activations: copying them to the host would move parameters."""
    if t.is_leaf:
        return t.requires_grad
    node = t.grad_fn
    while node is not None and type(node).__name__ in _VIEW_OR_CAST_NODES:
        node = node.next_functions[0][0] if node.next_functions else None
    return node is not None and type(node).__name__ == "AccumulateGrad"


@contextlib.contextmanager
def saved_tensors_on_cpu(pin_memory: bool) -> Iterator[None]:
    """Like torch.autograd.graph.save_on_cpu, but a saved tensor comes back with its strides,
    parameters stay where they are, and on CUDA the copies run on a side stream.

    Compiled backward kernels (FlexAttention's, any torch.compile'd region) assert the strides of
    their saved inputs; save_on_cpu returns contiguous copies, which they reject. The device-to-host
    copy of an activation goes to pinned memory on a side stream, so compute does not wait for it;
    the activation's memory is held for that stream until the copy is done (`record_stream`), and
    the copy is waited for before it is read back.
    """
    stream = torch.cuda.Stream() if pin_memory and torch.cuda.is_available() else None

    def pack(t: torch.Tensor):
        if t.device.type == "cpu" or derived_from_parameter(t):
            return None, t, None
        if stream is None:
            return t.device, copy_keeping_strides(t, "cpu", pin_memory=pin_memory), None
        stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(stream):
            cpu = copy_keeping_strides(t, "cpu", pin_memory=True, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        t.record_stream(stream)
        return t.device, cpu, done

    def unpack(packed) -> torch.Tensor:
        device, saved, done = packed
        if device is None:
            return saved
        if done is not None:
            done.synchronize()
        return copy_keeping_strides(saved, device, non_blocking=saved.is_pinned())

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
