"""uid-group-aware dp balancing: whole groups per rank, tokens balanced.

verl's `_balance_batch` partitions samples one by one across dp ranks, which scatters a GRPO
group over ranks and forces each rank to recompute the shared prefix. Here the unit of
partitioning is the group; groups are placed by greedy longest-processing-time on token counts,
then each rank's list is topped up to the equal size verl's contiguous dispatch requires.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Sequence


def group_balanced_order(uids: Sequence[Hashable], seq_lens: Sequence[int], dp_size: int) -> list[int]:
    """A permutation of sample indices whose `dp_size` equal contiguous chunks keep groups whole
    where the equal-size constraint allows, with balanced token totals.

    When a group cannot fit the space left on the chosen rank (equal sizes force it), it is split
    across ranks; each rank still reuses the prefix of whatever part it receives.
    """
    n = len(uids)
    if n % dp_size:
        raise ValueError(f"batch of {n} samples does not divide into dp_size={dp_size} equal parts.")
    per_rank = n // dp_size
    groups: dict[Hashable, list[int]] = {}
    for i, uid in enumerate(uids):
        groups.setdefault(uid, []).append(i)
    # Largest groups (by tokens) first: classic LPT.
    ordered = sorted(groups.values(), key=lambda idx: -sum(seq_lens[i] for i in idx))
    ranks: list[list[int]] = [[] for _ in range(dp_size)]
    load = [(0, r) for r in range(dp_size)]  # (tokens, rank) min-heap
    heapq.heapify(load)
    for members in ordered:
        pending = list(members)
        while pending:
            tokens, r = heapq.heappop(load)
            space = per_rank - len(ranks[r])
            if space == 0:
                continue  # full rank leaves the heap for good
            take, pending = pending[:space], pending[space:]
            ranks[r].extend(take)
            heapq.heappush(load, (tokens + sum(seq_lens[i] for i in take), r))
    return [i for rank in ranks for i in rank]


def uid_of_key(key: str) -> str:
    """verl's V1 agent loop stores samples under keys "{uid}_{session_id}_{index}"."""
    return key.rsplit("_", 2)[0]
