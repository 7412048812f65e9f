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


@dataclass(frozen=True)
class SequenceParallel:
    """Ulysses sequence parallelism: `size` ranks hold the same rows; each runs 1/size of every packed
    pass's tokens, and around attention an all-to-all gives it the whole sequence for 1/size of the
    heads. The collectives come from the trainer (verl: `verl.utils.ulysses`), with autograd.

    Attributes:
        group: the sequence-parallel process group; `size` and `rank` are this process's in it.
        seq_to_heads: `seq_to_heads(x, seq_dim, head_dim)`: gather `seq_dim`, scatter `head_dim`
            ([.., T/size, .., H, ..] -> [.., T, .., H/size, ..]); backward is the inverse all-to-all.
        heads_to_seq: `heads_to_seq(x, seq_dim, head_dim)`: the inverse all-to-all.
        gather: `gather(x, dim)`: the ranks' equal-sized `x` concatenated along `dim`; backward
            returns this rank's slice of the gradient, scaled as the trainer's gradient reduction
            expects (verl multiplies by `size`: FSDP averages over the sequence-parallel ranks too).
    """

    group: torch.distributed.ProcessGroup
    size: int
    rank: int
    seq_to_heads: Callable[[torch.Tensor, int, int], torch.Tensor]
    heads_to_seq: Callable[[torch.Tensor, int, int], torch.Tensor]
    gather: Callable[[torch.Tensor, int], torch.Tensor]

    def same_on_all_ranks(self, signature: list[int], device: torch.device) -> bool:
        """Whether every rank of the group passed the same `signature` (fixed length)."""
        mine = torch.tensor(signature, dtype=torch.long, device=device)
        both = torch.cat([mine, -mine])
        torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return bool(torch.equal(both[: len(mine)], -both[len(mine) :]))


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
        sequence_parallel: the Ulysses group this rank shares its rows with (`SequenceParallel`);
            None = each rank runs whole sequences.
    """

    forward_context: Callable[[], AbstractContextManager] = contextlib.nullcontext
    backward: Callable[[torch.Tensor], None] = _plain_backward
    grad_sync: Callable[[bool], AbstractContextManager] = _no_sync_control
    group: torch.distributed.ProcessGroup | None = None
    sequence_parallel: SequenceParallel | None = None

    def agreed_counts(self, counts: list[int], device: torch.device) -> list[int]:
        """Element-wise max of `counts` over `group` (unchanged without one)."""
        if self.group is None or not torch.distributed.is_initialized():
            return list(counts)
        if torch.distributed.get_world_size(self.group) == 1:
            return list(counts)
        agreed = torch.tensor(counts, dtype=torch.long, device=device)
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return [int(n) for n in agreed.tolist()]
