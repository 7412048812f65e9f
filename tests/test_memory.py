"""Per-phase CUDA peaks and the lifetime peak they would hide.

Mocked: torch.cuda's allocator statistics (no GPU on CI machines). The fake keeps a current and a
peak counter with CUDA's reset semantics; everything else is the real `phase_peak`.
"""

from __future__ import annotations

import torch

from verl_prefix.core import memory


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
