"""Per-phase CUDA peaks and the lifetime peak they would hide.

Mocked: torch.cuda's allocator statistics (no GPU on CI machines). The fake keeps a current and a
peak counter with CUDA's reset semantics; everything else is the real `phase_peak`. The
stride-keeping copy used by `prefix_activations=offload` runs for real, CPU to CPU.
"""

from __future__ import annotations

import pytest
import torch

from verl_prefix.core import memory
from verl_prefix.core.memory import copy_keeping_strides, derived_from_parameter


class FakeAllocator:
    def __init__(self) -> None:
        self.current = self.peak = 0

    def alloc(self, n: int) -> None:
        self.current += n
        self.peak = max(self.peak, self.current)

    def free(self, n: int) -> None:
        self.current -= n

    def reset(self, device=None) -> None:
        self.peak = self.current


def test_phase_peaks_reset_and_lifetime_peak_survives(monkeypatch):
    fake = FakeAllocator()
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", fake.reset)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: fake.peak)
    monkeypatch.setattr(memory, "_LIFETIME_PEAK", {})
    cuda = torch.device("cuda", 0)

    fake.alloc(100)  # model load: the lifetime peak before any phase
    fake.free(60)
    peaks: dict[str, int | None] = {}
    with memory.phase_peak(cuda, peaks, "A"):
        fake.alloc(30)
    with memory.phase_peak(cuda, peaks, "B"):
        fake.alloc(50)
        fake.free(50)
    with memory.phase_peak(cuda, peaks, "C"):
        fake.free(30)
    assert peaks == {"A": 70, "B": 120, "C": 70}
    assert fake.peak == 70  # what max_memory_allocated now reports: Phase C only
    assert memory.lifetime_peak_bytes(cuda) == 120
    fake.alloc(200)  # after the schedule (an optimizer step, say)
    assert memory.lifetime_peak_bytes(cuda) == 240  # 40 live + 200
    assert memory.lifetime_peak_bytes(torch.device("cpu")) is None


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(2, 5, 3, 4).transpose(1, 2),  # [B, L, H, D] read as [B, H, L, D]
        lambda: torch.randn(6, 10)[1:5, 2:9],  # slice with a storage offset
        lambda: torch.randn(4, 1, 3).expand(4, 5, 3),  # overlapping: comes back contiguous
        lambda: torch.randn(0, 3),
        lambda: torch.randn(7),
    ],
)
def test_copy_keeping_strides(make) -> None:
    t = make()
    out = copy_keeping_strides(t, "cpu")
    assert t.numel() == 0 or out.data_ptr() != t.data_ptr()
    torch.testing.assert_close(out, t, rtol=0, atol=0)
    overlapping = any(st == 0 for sz, st in zip(t.size(), t.stride(), strict=True) if sz > 1)
    assert out.stride() == (out.contiguous().stride() if overlapping else t.stride())


@pytest.mark.parametrize("autocast", [False, True])
def test_offload_leaves_parameters_where_they_are(autocast):
    """`prefix_activations=offload` copies saved activations to the host, never weights: Linear saves
    `weight.t()` (under autocast a bf16 cast of it); MoE experts save a slice of a stacked weight."""
    linear = torch.nn.Linear(8, 8)
    experts = torch.nn.Parameter(torch.randn(4, 8, 8))
    x = torch.randn(3, 8, requires_grad=True) * 2  # an activation (not a leaf)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = linear(x)
            z = y @ experts[1]
    flagged = [derived_from_parameter(t) for t in saved]
    weights = [t for t, f in zip(saved, flagged, strict=True) if f]
    activations = [t for t, f in zip(saved, flagged, strict=True) if not f]
    assert len(weights) == 2 and len(activations) == 2, [t.shape for t in saved]
    assert all(t.shape == (8, 8) for t in weights)
    assert any(t.shape == (3, 8) and t.dtype == y.dtype for t in activations)  # y, saved for the second matmul
    assert z.requires_grad
