"""Time the schedule's planning (prefix tree + micro-batches, no model) at verl batch sizes.

Each group: a 2048-token system prompt common to all groups, a 512-token question, then responses
whose first 128-token turn the group's rows share, a second 128-token turn shared by half of them,
and 256 tokens of their own. Usage: python scripts/tree_planning_time.py
"""

from __future__ import annotations

import time

import torch

from verl_prefix.core import PrefixReuseConfig
from verl_prefix.core.plan import schedule_plan


def batch(groups: int, group_size: int, vocab: int = 150_000, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    system = torch.randint(0, vocab, (2048,), generator=gen)
    rows, starts, uids = [], [], []
    for g in range(groups):
        prompt = torch.cat([system, torch.randint(0, vocab, (512,), generator=gen)])
        first, second = torch.randint(0, vocab, (2, 128), generator=gen)
        for i in range(group_size):
            own_second = second if i < group_size // 2 else torch.randint(0, vocab, (128,), generator=gen)
            response = torch.cat([first, own_second, torch.randint(0, vocab, (256,), generator=gen)])
            rows.append(torch.cat([prompt, response]))
            starts.append(len(prompt))
            uids.append(g)
    return rows, starts, uids


def main() -> None:
    for groups, group_size in [(128, 8), (256, 16), (512, 8)]:
        rows, starts, uids = batch(groups, group_size)
        for tree in (False, True):
            config = PrefixReuseConfig(max_tokens_per_micro_batch=16384, prefix_tree=tree)
            start = time.perf_counter()
            plan = schedule_plan(rows, starts, uids, config)
            seconds = time.perf_counter() - start
            nodes = sum(g.prefix_len > 0 for g in plan.groups)
            print(
                f"{len(rows)} rows x {len(rows[0])} tokens, prefix_tree={tree}: {seconds * 1e3:.0f} ms, "
                f"{nodes} shared spans, {len(plan.micro_batches)} micro-batches"
            )


if __name__ == "__main__":
    main()
