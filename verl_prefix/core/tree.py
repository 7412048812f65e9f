"""The prefix tree of a mini-batch, found from the tokens: which spans of tokens several rows share.

A node is a span [start, end) of tokens that every row in `rows` holds at the same positions, below
its parent's span (parent.end == start). A row's path is the chain of nodes from the root to its
deepest node; the row's own part (its suffix) starts where that node ends. Every row's nodes end
within its first `limit[r]` tokens (the schedule passes all but the last, so every row keeps a part
of its own).

Built from the rows sorted by their tokens and the longest common prefixes of neighbours (the LCP of a
sorted run is the minimum of its neighbours' LCPs), not pairwise: O(rows log rows) comparisons plus
one scan per tree level. Pure bookkeeping, no model.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TreeNode:
    """Tokens [start, end) shared by `rows`; `parent` is a node index (None at the top)."""

    parent: int | None
    start: int
    end: int
    rows: tuple[int, ...]

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class PrefixTree:
    """Nodes, parents before children; `row_node[r]` = row r's deepest node (None: shares nothing)."""

    nodes: tuple[TreeNode, ...]
    row_node: tuple[int | None, ...]

    def path(self, node: int | None) -> list[int]:
        """Node indices from the top down to `node` (empty for None)."""
        return path_to(node, lambda k: self.nodes[k].parent)


def path_to(node: int | None, parent_of: Callable[[int], int | None]) -> list[int]:
    """Indices from the top of a tree down to `node` (empty for None), following `parent_of`."""
    out = []
    while node is not None:
        out.append(node)
        node = parent_of(node)
    return out[::-1]


def build_prefix_tree(input_ids: Sequence[torch.Tensor], limit: Sequence[int], min_node_tokens: int = 1) -> PrefixTree:
    """The prefix tree of `input_ids` (1-D token tensors) whose nodes stay within each member row's
    first `limit[r]` tokens. An edge shorter than `min_node_tokens` gets no node of its own: its
    tokens are computed in each child (or each row) instead, so no pass is ever tiny."""
    n = len(input_ids)
    # each row's shareable tokens, sorted: rows that can share are neighbours, and the common
    # shareable prefix of a sorted run is the minimum of its neighbours' (the order of strings)
    lengths = [max(0, min(int(m), len(r))) for r, m in zip(input_ids, limit, strict=True)]
    # one host copy; big-endian bytes of non-negative ids sort as the token sequences do (memcmp)
    flat = torch.cat([r[:k] for r, k in zip(input_ids, lengths, strict=True)]).cpu().numpy().astype(">i8")
    ends = np.cumsum(lengths)
    shareable = [flat[e - k : e] for e, k in zip(ends.tolist(), lengths, strict=True)]
    keys = [r.tobytes() for r in shareable]
    order = sorted(range(n), key=keys.__getitem__)
    # shared[i]: tokens rows order[i - 1] and order[i] can share
    shared = [0] * n
    for i in range(1, n):
        a, b = shareable[order[i - 1]], shareable[order[i]]
        k = min(len(a), len(b))
        mismatch = np.flatnonzero(a[:k] != b[:k])
        shared[i] = int(mismatch[0]) if len(mismatch) else k
    nodes: list[TreeNode] = []
    row_node: list[int | None] = [None] * n
    # (lo, hi, start, depth, parent): rows order[lo:hi] share `depth` tokens; `parent` (their deepest
    # node) ends at `start` <= depth (below `start` an edge too short for a node of its own)
    stack: list[tuple[int, int, int, int, int | None]] = [(0, n, 0, 0, None)]
    while stack:
        lo, hi, start, depth, parent = stack.pop()
        i = lo
        while i < hi:
            j = i + 1
            while j < hi and shared[j] > depth:
                j += 1
            if j - i < 2:  # a row alone below `depth`: its deepest node is `parent`
                row_node[order[i]] = parent
            else:
                end = min(shared[i + 1 : j])
                if end - start >= max(1, min_node_tokens):
                    nodes.append(TreeNode(parent, start, end, tuple(sorted(order[i:j]))))
                    stack.append((i, j, end, end, len(nodes) - 1))
                else:
                    stack.append((i, j, start, end, parent))
            i = j
    return _topological(nodes, row_node)


def _topological(nodes: list[TreeNode], row_node: list[int | None]) -> PrefixTree:
    """Renumber nodes so that parents come first, then by their first row (a stable, readable order)."""
    children: dict[int | None, list[int]] = {}
    for k, node in enumerate(nodes):
        children.setdefault(node.parent, []).append(k)
    new_index: dict[int, int] = {}
    ordered: list[TreeNode] = []
    frontier = sorted(children.get(None, []), key=lambda k: nodes[k].rows[0])
    while frontier:
        level = []
        for k in frontier:
            node = nodes[k]
            parent = None if node.parent is None else new_index[node.parent]
            new_index[k] = len(ordered)
            ordered.append(TreeNode(parent, node.start, node.end, node.rows))
            level.extend(children.get(k, []))
        frontier = sorted(level, key=lambda k: (nodes[k].start, nodes[k].rows[0]))
    return PrefixTree(tuple(ordered), tuple(None if k is None else new_index[k] for k in row_node))


def without_small_nested_nodes(tree: PrefixTree, min_saving: int) -> PrefixTree:
    """`tree` without the nested nodes (ones with a parent or a child) whose pass saves fewer than
    `min_saving` token computations: without the node its span would run once in each of its
    readers (child nodes and rows whose deepest node it is), so it saves span x (readers - 1).
    A nested node costs one more model pass per phase. The least saving goes first; its children
    take over its span (and its parent), its rows read its parent; savings above only grow. A node
    with neither parent nor child (a group's one prefix) stays."""
    nodes = tree.nodes
    parent = [node.parent for node in nodes]
    start = [node.start for node in nodes]
    children: list[set[int]] = [set() for _ in nodes]
    rows_here = [0] * len(nodes)  # rows whose deepest node it is
    for k, p in enumerate(parent):
        if p is not None:
            children[p].add(k)
    for k in tree.row_node:
        if k is not None:
            rows_here[k] += 1

    def saving(k: int) -> int:
        return (nodes[k].end - start[k]) * (len(children[k]) + rows_here[k] - 1)

    removed: dict[int, int | None] = {}  # node -> the node its rows read instead (maybe removed too)
    heap = [(saving(k), k) for k in range(len(nodes))]
    heapq.heapify(heap)
    while heap and heap[0][0] < min_saving:
        key, k = heapq.heappop(heap)
        if key != saving(k):  # it gained span or readers since: queue it anew
            heapq.heappush(heap, (saving(k), k))
            continue
        if parent[k] is None and not children[k]:  # alone on its rows' paths; stays so
            continue
        p = parent[k]
        for c in children[k]:
            parent[c], start[c] = p, start[k]
        if p is not None:
            children[p].discard(k)
            children[p] |= children[k]
            rows_here[p] += rows_here[k]
        removed[k] = p

    def kept(k: int | None) -> int | None:
        while k is not None and k in removed:
            k = removed[k]
        return k

    index: dict[int, int] = {}
    out: list[TreeNode] = []
    for k, node in enumerate(nodes):  # ancestors come first, so their new indices exist
        if k not in removed:
            index[k] = len(out)
            out.append(TreeNode(None if parent[k] is None else index[parent[k]], start[k], node.end, node.rows))
    row_node = tuple(None if kept(k) is None else index[kept(k)] for k in tree.row_node)
    return PrefixTree(tuple(out), row_node)
