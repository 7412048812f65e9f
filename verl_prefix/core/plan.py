"""Which tokens form each shared prefix, and how suffixes pack into micro-batches.

Pure bookkeeping over token rows; no model, no autograd.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from .config import PrefixReuseConfig
from .tree import build_prefix_tree, path_to, without_small_nested_nodes


@dataclass(frozen=True)
class PrefixGroup:
    """Rows that share `prefix_len` leading tokens. `prefix_len == 0` means one dense row.

    In a prefix tree a group is a node: it computes tokens [start, prefix_len) of its rows, below its
    `parent` group (whose prefix_len is `start`); one-level plans have start 0 and no parent.
    """

    rows: tuple[int, ...]
    prefix_len: int
    start: int = 0
    parent: int | None = None

    @property
    def span(self) -> int:
        """Tokens this group's Phase-A pass computes."""
        return self.prefix_len - self.start


@dataclass(frozen=True)
class Segment:
    """Consecutive rows of one group inside a packed micro-batch (they read the same prefix)."""

    group: int
    rows: tuple[int, ...]


@dataclass(frozen=True)
class SchedulePlan:
    """Groups, Phase-A prefix chunks (lists of group indices) and Phase-B micro-batches."""

    groups: tuple[PrefixGroup, ...]
    prefix_chunks: tuple[tuple[int, ...], ...]
    micro_batches: tuple[tuple[Segment, ...], ...]

    def prefix_refs(self) -> dict[int, tuple[int, int, int]]:
        """Group index -> (chunk, start, end) of its prefix tokens in the packed Phase-A chunk."""
        refs = {}
        for c, chunk in enumerate(self.prefix_chunks):
            offset = 0
            for g in chunk:
                refs[g] = (c, offset, offset + self.groups[g].span)
                offset += self.groups[g].span
        return refs

    def path(self, g: int | None) -> list[int]:
        """Groups from the top of the tree down to `g` (empty for None)."""
        return path_to(g, lambda k: self.groups[k].parent)

    def row_groups(self) -> dict[int, int]:
        """Row -> the group its suffix reads (its deepest node, or its own dense group)."""
        return {r: seg.group for mb in self.micro_batches for seg in mb for r in seg.rows}

    def readout_starts(self, response_start: Sequence[int]) -> dict[int, int]:
        """Group -> the first position of its span whose output a member row reads (the logit or value
        at position t - 1 belongs to response token t); groups whose outputs nobody reads are absent."""
        starts = {}
        for g, grp in enumerate(self.groups):
            if grp.prefix_len > 0:
                first = max(grp.start, min(response_start[r] for r in grp.rows) - 1)
                if first < grp.prefix_len:
                    starts[g] = first
        return starts

    def work(
        self, lengths: Sequence[int], response_start: Sequence[int]
    ) -> tuple[list[tuple[int, int]], list[tuple[int, int]], int]:
        """What the schedule computes, for the FLOP bound: every shared span once as (tokens read
        above, tokens), every row's suffix as (tokens read above, tokens), and the positions whose
        outputs the spans compute (`readout_starts`)."""
        shared = [g for g in self.groups if g.prefix_len > 0]
        spans = [(g.start, g.span) for g in shared]
        suffixes = [
            (self.groups[g].prefix_len, lengths[r] - self.groups[g].prefix_len) for r, g in self.row_groups().items()
        ]
        readouts = sum(self.groups[g].prefix_len - first for g, first in self.readout_starts(response_start).items())
        return spans, suffixes, readouts

    def micro_batch_rows(self) -> list[tuple[int, ...]]:
        """Rows of each Phase-B micro-batch, in order (the partition a per-micro-batch loss sees)."""
        return [tuple(r for seg in mb for r in seg.rows) for mb in self.micro_batches]


def common_prefix_len(rows: Sequence[torch.Tensor]) -> int:
    """Length of the longest common token prefix of 1-D tensors."""
    first = rows[0]
    lcp = len(first)
    for other in rows[1:]:
        n = min(lcp, len(other))
        mismatch = (first[:n] != other[:n]).nonzero()
        lcp = int(mismatch[0, 0]) if len(mismatch) else n
        if lcp == 0:
            break
    return lcp


def find_prefix_groups(
    input_ids: Sequence[torch.Tensor],
    response_start: Sequence[int],
    group_ids: Sequence[Hashable],
    min_prefix_tokens: int,
) -> list[PrefixGroup]:
    """Group rows by id and cut each group's shared prefix before every member's last prompt token.

    The last prompt token stays in the suffix because its logit predicts the first response token.
    Groups of one row, or whose shared prefix is shorter than `min_prefix_tokens`, become dense rows.
    Groups keep the order of their first row; rows keep their order inside a group.
    """
    members: dict[Hashable, list[int]] = {}
    for row, gid in enumerate(group_ids):
        members.setdefault(gid, []).append(row)
    groups: list[PrefixGroup] = []
    for rows in members.values():
        prefix_len = 0
        if len(rows) > 1:
            lcp = common_prefix_len([input_ids[r] for r in rows])
            prefix_len = min(lcp, min(response_start[r] for r in rows) - 1)
        if prefix_len >= max(1, min_prefix_tokens):
            groups.append(PrefixGroup(tuple(rows), prefix_len))
        else:
            groups.extend(PrefixGroup((r,), 0) for r in rows)
    return groups


def pack_in_order(items: Sequence[tuple[int, int]], budget: int | None) -> list[list[int]]:
    """Greedy in-order packing of (key, tokens) into bins of at most `budget` tokens (an item over
    the budget goes alone); None = one bin."""
    bins: list[list[int]] = []
    used = 0
    for key, tokens in items:
        if not bins or (budget is not None and used + tokens > budget):
            bins.append([])
            used = 0
        bins[-1].append(key)
        used += tokens
    return bins


def tree_groups(
    input_ids: Sequence[torch.Tensor],
    min_prefix_tokens: int,
    min_node_saving: int,
    max_tokens: int | None,
) -> tuple[list[PrefixGroup], dict[int, int]]:
    """The prefix tree of the rows as groups (nodes first, parents before children, then one dense
    group per row that shares nothing) and each row's suffix group. Nodes may hold response tokens
    (their outputs are read by every member row) and end before each member's last token, so every
    row keeps a suffix; nested nodes saving fewer than `min_node_saving` token computations are
    left to the nodes below them. A node longer than `max_tokens` becomes a chain of nodes of at
    most that many tokens (each reads the ones before it)."""
    tree = build_prefix_tree(input_ids, [len(r) - 1 for r in input_ids], min_prefix_tokens)
    tree = without_small_nested_nodes(tree, min_node_saving)
    groups: list[PrefixGroup] = []
    last: dict[int, int] = {}  # tree node -> its (last) group
    for k, node in enumerate(tree.nodes):  # parents first, so their groups exist
        parent = None if node.parent is None else last[node.parent]
        step = node.length if max_tokens is None else max_tokens
        for start in range(node.start, node.end, step):
            groups.append(PrefixGroup(node.rows, min(start + step, node.end), start, parent))
            parent = len(groups) - 1
        last[k] = parent
    row_group = {}
    for r, node in enumerate(tree.row_node):
        if node is None:
            groups.append(PrefixGroup((r,), 0))
        row_group[r] = len(groups) - 1 if node is None else last[node]
    return groups, row_group


def make_plan(
    input_ids: Sequence[torch.Tensor],
    response_start: Sequence[int],
    group_ids: Sequence[Hashable],
    max_tokens_per_micro_batch: int | None,
    min_prefix_tokens: int,
    tree: bool = False,
    min_node_saving: int = 0,
) -> SchedulePlan:
    """Build the schedule: each group's prefix runs once; its suffixes may span micro-batches.

    `tree`: the groups are the nodes of the rows' prefix tree, found from the tokens across group
    ids (`tree_groups`); Phase-A chunks then hold nodes of one depth, top level first."""
    lengths = [len(x) for x in input_ids]
    if tree:
        groups, row_group = tree_groups(input_ids, min_prefix_tokens, min_node_saving, max_tokens_per_micro_batch)
        suffix_rows = sorted(range(len(input_ids)), key=lambda r: (row_group[r], r))
    else:
        groups = find_prefix_groups(input_ids, response_start, group_ids, min_prefix_tokens)
        row_group = {r: g for g, grp in enumerate(groups) for r in grp.rows}
        suffix_rows = [r for grp in groups for r in grp.rows]

    suffix_items = []
    for r in suffix_rows:
        grp = groups[row_group[r]]
        suffix = lengths[r] - grp.prefix_len
        if max_tokens_per_micro_batch is not None and suffix > max_tokens_per_micro_batch:
            raise ValueError(
                f"row {r} has a suffix of {suffix} tokens (prefix {grp.prefix_len} of {lengths[r]}), "
                f"more than max_tokens_per_micro_batch={max_tokens_per_micro_batch}; raise "
                "max_tokens_per_micro_batch to at least the longest suffix."
            )
        suffix_items.append((r, suffix))
    micro_batches = []
    for rows in pack_in_order(suffix_items, max_tokens_per_micro_batch):
        segments: list[Segment] = []
        for r in rows:
            g = row_group[r]
            if segments and segments[-1].group == g:
                segments[-1] = Segment(g, segments[-1].rows + (r,))
            else:
                segments.append(Segment(g, (r,)))
        micro_batches.append(tuple(segments))

    depth = {}
    for g, grp in enumerate(groups):  # parents come first
        depth[g] = 0 if grp.parent is None else depth[grp.parent] + 1
    chunks: list[list[int]] = []
    for level in sorted({depth[g] for g, grp in enumerate(groups) if grp.prefix_len > 0}):
        nodes = [(g, grp.span) for g, grp in enumerate(groups) if grp.prefix_len > 0 and depth[g] == level]
        chunks += pack_in_order(nodes, max_tokens_per_micro_batch)
    return SchedulePlan(tuple(groups), tuple(tuple(c) for c in chunks), tuple(micro_batches))


def schedule_plan(
    input_ids: Sequence[torch.Tensor],
    response_start: Sequence[int],
    group_ids: Sequence[Hashable],
    config: PrefixReuseConfig,
) -> SchedulePlan:
    """The plan the schedule runs for `config` (its budget, minimum spans and tree settings)."""
    return make_plan(
        input_ids,
        response_start,
        group_ids,
        config.max_tokens_per_micro_batch,
        config.min_prefix_tokens,
        tree=config.prefix_tree,
        min_node_saving=config.min_node_saving,
    )
