"""How the schedule's model passes run inside a trainer: its wrappers, and the ranks kept in step.

The schedule owns which passes run; the trainer owns how each one runs. A trainer hands over its
autocast, its loss backward (a gradient scaler's `scale(loss).backward()`), its gradient-sync
context (FSDP: reduce only in the last backward of the step) and its data-parallel group. Ranks of
that group must issue the same sequence of forwards and backwards, because every FSDP pass runs
collectives: `agreed_pass_counts` gives every rank the largest per-phase count, and the schedule
pads its own plan with one-token passes up to it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch


def _no_sync_control(is_last_backward: bool) -> AbstractContextManager:
    return contextlib.nullcontext()


def _plain_backward(loss: torch.Tensor) -> None:
    loss.backward()


@dataclass
class ScheduleRuntime:
    """The trainer's side of each pass. Defaults: plain PyTorch in one process.

    Attributes:
        forward_context: entered around every model forward and the loss computed from it (e.g. the
            trainer's `torch.autocast`).
        backward: backpropagates one micro-batch loss (e.g. `lambda loss: scaler.scale(loss).backward()`).
            Phase C seeds come from those backwards, so they carry the same scale.
        grad_sync: `grad_sync(is_last_backward)` is entered around every training pass; FSDP trainers
            skip the gradient reduce-scatter unless `is_last_backward`.
        group: ranks that must run the same number of passes per phase (the data-parallel group);
            None = this process alone.
    """

    forward_context: Callable[[], AbstractContextManager] = contextlib.nullcontext
    backward: Callable[[torch.Tensor], None] = _plain_backward
    grad_sync: Callable[[bool], AbstractContextManager] = _no_sync_control
    group: torch.distributed.ProcessGroup | None = None

    def agreed_counts(self, counts: list[int], device: torch.device) -> list[int]:
        """Element-wise max of `counts` over `group` (unchanged without one)."""
        if self.group is None or not torch.distributed.is_initialized():
            return list(counts)
        if torch.distributed.get_world_size(self.group) == 1:
            return list(counts)
        agreed = torch.tensor(counts, dtype=torch.long, device=device)
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return [int(n) for n in agreed.tolist()]
