"""The prefix tree found from tokens (`verl_prefix.core.tree`), against its definition row pair by row pair."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from verl_prefix.core.tree import build_prefix_tree


def _lcp(a: torch.Tensor, b: torch.Tensor) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def check_tree(rows: list[torch.Tensor], limit: list[int], min_node_tokens: int) -> None:
    tree = build_prefix_tree(rows, limit, min_node_tokens)
    for k, node in enumerate(tree.nodes):
        assert len(node.rows) >= 2, node
        assert node.length >= max(1, min_node_tokens), node
        if node.parent is None:
            assert node.start == 0, node
        else:
            parent = tree.nodes[node.parent]
            assert node.parent < k, "parents come first"
            assert parent.end == node.start and set(node.rows) <= set(parent.rows), (node, parent)
        first = rows[node.rows[0]]
        for r in node.rows:
            assert node.end <= limit[r], (node, r)
            assert torch.equal(rows[r][: node.end], first[: node.end]), (node, r)
    for r, node in enumerate(tree.row_node):
        held = [k for k, nd in enumerate(tree.nodes) if r in nd.rows]
        assert node == (max(held, key=lambda k: tree.nodes[k].end) if held else None)
        assert tree.path(node) == sorted(held)
    # optimal sharing: two rows share their whole common shareable prefix, but for a last edge shorter
    # than min_node_tokens (computed per child instead)
    for a, b in itertools.combinations(range(len(rows)), 2):
        common = set(tree.path(tree.row_node[a])) & set(tree.path(tree.row_node[b]))
        shared = max((tree.nodes[k].end for k in common), default=0)
        want = min(_lcp(rows[a], rows[b]), limit[a], limit[b])
        assert want - max(1, min_node_tokens) < shared <= want, (a, b, shared, want)


def test_system_prompt_shared_across_groups_and_their_questions():
    system, q1, q2 = torch.arange(10), torch.arange(100, 106), torch.arange(200, 204)
    prompts = [torch.cat([system, q]) for q in (q1, q1, q1, q2, q2)]
    rows = [torch.cat([p, torch.tensor([900 + i, 1, 2])]) for i, p in enumerate(prompts)]
    limit = [len(p) - 1 for p in prompts]  # nodes end before each row's last prompt token
    tree = build_prefix_tree(rows, limit)
    assert [(n.parent, n.start, n.end, n.rows) for n in tree.nodes] == [
        (None, 0, 10, (0, 1, 2, 3, 4)),
        (0, 10, 15, (0, 1, 2)),
        (0, 10, 13, (3, 4)),
    ]
    assert tree.row_node == (1, 1, 1, 2, 2)
    check_tree(rows, limit, 1)


def test_depth_three_and_a_row_that_shares_nothing():
    base = torch.arange(20)
    rows = [base.clone() for _ in range(5)] + [torch.arange(50, 60)]
    rows[2][12:] += 100  # rows 0, 1 go on together after 12; rows 3, 4 after 16
    rows[3][16:] += 200
    rows[4][16:] += 200
    rows[0][18:] += 300
    limit = [len(r) for r in rows]
    check_tree(rows, limit, 1)
    tree = build_prefix_tree(rows, limit)
    assert max(len(tree.path(k)) for k in range(len(tree.nodes))) >= 3
    assert tree.row_node[5] is None


def test_a_short_edge_is_computed_by_each_child():
    rows = [[1, 2, 3, 4, 5, 6, 9], [1, 2, 3, 4, 5, 7, 9], [1, 8, 8, 8, 8, 8, 9], [1, 2, 3, 4, 5, 6, 9]]
    rows = [torch.tensor(r) for r in rows]
    limit = [6] * 4
    tree = build_prefix_tree(rows, limit, min_node_tokens=2)
    # [1] (shared by all four) is one token: no node, rows 0, 1, 3 share [1 2 3 4 5] from position 0;
    # rows 0 and 3 go on together for one more token: computed in each row instead
    assert [(n.parent, n.start, n.end, n.rows) for n in tree.nodes] == [(None, 0, 5, (0, 1, 3))]
    assert tree.row_node == (0, 0, None, 0)
    check_tree(rows, limit, 2)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=12), min_size=1, max_size=10),
    st.data(),
    st.integers(1, 3),
)
def test_random_rows_satisfy_the_definition(token_rows, data, min_node_tokens):
    rows = [torch.tensor(r) for r in token_rows]
    limit = [data.draw(st.integers(0, len(r))) for r in token_rows]
    check_tree(rows, limit, min_node_tokens)


# ---------------------------------------------------------------------------------------------
# The tree schedule against dense training (fp64)


def _tree_batch(seed: int = 0):
    """Depth 3: a system prompt common to every row; two questions under it, the first asked in two
    phrasings that share their start; 2-3 rows per leaf with ragged responses; one row alone."""
    from dense_reference import VOCAB, Batch

    gen = torch.Generator().manual_seed(seed)

    def tokens(n):
        return torch.randint(0, VOCAB, (n,), generator=gen)

    system, question_a, question_b = tokens(14), tokens(6), tokens(5)
    prompts = {
        "a1": torch.cat([system, question_a, tokens(3)]),
        "a2": torch.cat([system, question_a, tokens(4)]),
        "b": torch.cat([system, question_b]),
    }
    rows, starts, uids, weights = [], [], [], []
    for uid, n_resp in [("a1", [3, 5]), ("a2", [2, 4, 1]), ("b", [6, 2]), ("alone", [4])]:
        prompt = prompts.get(uid, tokens(9))
        for n in n_resp:
            rows.append(torch.cat([prompt, tokens(n)]))
            starts.append(len(prompt))
            uids.append(uid)
            weights.append(torch.randn(n, generator=gen, dtype=torch.float64))
    return Batch(rows, starts, uids, weights)


@pytest.mark.parametrize("checkpointing", [None, True, False])
@pytest.mark.parametrize("attention", ["merged", "sdpa"])
@pytest.mark.parametrize("mode", ["keep", "offload", "recompute"])
def test_tree_schedule_matches_dense_fp64(mode, attention, checkpointing):
    from test_equivalence import FP64_TOL, _assert_equivalent
    from tiny_models import build

    from verl_prefix.core import PrefixReuseConfig

    model = build("qwen3")
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    batch = _tree_batch()
    config = PrefixReuseConfig(
        max_tokens_per_micro_batch=20, prefix_activations=mode, attention=attention, prefix_tree=True
    )
    stats = _assert_equivalent(model, batch, config, FP64_TOL)
    # nodes: the system prompt (14 tokens, 7 rows); question a (6, under it: a1's and a2's rows) and
    # question b (4: its last token stays with the rows); a1's and a2's phrasings (2 and 3); the row
    # alone shares nothing
    assert (stats.groups, stats.dense_rows, stats.prefix_tokens) == (5, 1, 14 + 6 + 4 + 2 + 3)


def test_a_node_longer_than_the_budget_is_a_chain_of_passes():
    from test_equivalence import FP64_TOL, _assert_equivalent
    from tiny_models import build

    from verl_prefix.core import PrefixReuseConfig
    from verl_prefix.core.plan import make_plan

    batch = _tree_batch(seed=3)
    budget = 13  # the row that shares nothing (13 tokens) runs whole in Phase B
    plan = make_plan(batch.input_ids, batch.response_start, batch.group_ids, budget, 1, tree=True)
    spans = [(g.start, g.prefix_len, g.parent) for g in plan.groups if g.prefix_len > 0]
    assert spans[:2] == [(0, 13, None), (13, 14, 0)]  # the 14-token system prompt: two passes, chained
    assert all(g.span <= budget for g in plan.groups if g.prefix_len > 0)
    config = PrefixReuseConfig(max_tokens_per_micro_batch=budget, attention="merged", prefix_tree=True)
    _assert_equivalent(build("llama"), batch, config, FP64_TOL)


def test_flop_bound_counts_each_span_once_with_what_it_reads():
    from verl_prefix.core.flops import FlopModel

    flops = FlopModel(per_token=10.0, per_token_lm_head=3.0, per_pair=1.0)

    def dense(*lengths):  # 3 forwards of rows with an lm_head at every position
        return 3 * sum(n * 13 + n * (n + 1) / 2 for n in lengths)

    # one level, recomputed: a 12-token prefix over suffixes of 3 and 5, a row of 7 sharing nothing
    prefix = 12 * 10 + 78
    rows = (3 * 13 + 3 * 12 + 6) + (5 * 13 + 5 * 12 + 15) + (7 * 13 + 28)
    want = dense(15, 17, 7) / (3 * (prefix + rows) + prefix)
    assert flops.tree_training_ratio([(0, 12)], [(12, 3), (12, 5), (0, 7)], recompute=True) == pytest.approx(want)
    assert flops.training_ratio([12, 0], [[3, 5], [7]], recompute=True) == pytest.approx(want)
    # a 10-token system span, a 4-token question span below it, two rows below that, one beside it
    spans, suffixes = [(0, 10), (10, 4)], [(14, 3), (14, 2), (10, 5)]
    node = (10 * 10 + 55) + (4 * 10 + 4 * 10 + 10)  # the question span reads the system's 10 tokens
    rows = sum(n * 13 + n * a + n * (n + 1) / 2 for a, n in suffixes)
    assert flops.tree_training_ratio(spans, suffixes) == pytest.approx(dense(17, 16, 15) / (3 * (node + rows)))
