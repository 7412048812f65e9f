"""verl's Ulysses collectives as the schedule's `SequenceParallel` (verl.utils.ulysses)."""

from __future__ import annotations

import torch
from verl.utils.ulysses import gather_heads_scatter_seq, gather_outputs_and_unpad, gather_seq_scatter_heads

from ..core.runtime import SequenceParallel


def sequence_parallel(group: torch.distributed.ProcessGroup) -> SequenceParallel:
    """The schedule's view of a verl sequence-parallel group: verl's all-to-alls (autograd through
    both) and its output gather, whose backward scales by the group size as verl's engine does."""
    return SequenceParallel(
        group=group,
        size=torch.distributed.get_world_size(group),
        rank=torch.distributed.get_rank(group),
        seq_to_heads=lambda x, seq_dim, head_dim: gather_seq_scatter_heads(x, seq_dim, head_dim, group=group),
        heads_to_seq=lambda x, seq_dim, head_dim: gather_heads_scatter_seq(x, head_dim, seq_dim, group=group),
        gather=lambda x, dim: gather_outputs_and_unpad(x, gather_dim=dim, group=group),
    )
