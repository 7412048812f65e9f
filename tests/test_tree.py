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


def test_nested_nodes_that_save_little_are_left_to_the_nodes_below():
    from verl_prefix.core.tree import without_small_nested_nodes

    template, resp = [7, 7, 7], [50, 51]
    prompts = [template + [10 + g] * 20 for g in range(3)]  # three groups' prompts open with 3 common tokens
    rows = [torch.tensor(prompts[g] + [resp[i], 60 + 2 * g + i]) for g in range(3) for i in range(2)]
    tree = build_prefix_tree(rows, [len(r) - 1 for r in rows])
    assert [(n.parent, n.start, n.end) for n in tree.nodes] == [(None, 0, 3)] + [(0, 3, 23)] * 3
    # without the template's node each group's node computes its 3 tokens: 3 x (3 - 1) more; each
    # group's node is then alone on its rows' paths and stays (one prefix per group, as without a tree)
    small = without_small_nested_nodes(tree, min_saving=7)
    assert [(n.parent, n.start, n.end, n.rows) for n in small.nodes] == [
        (None, 0, 23, (0, 1)),
        (None, 0, 23, (2, 3)),
        (None, 0, 23, (4, 5)),
    ]
    assert small.row_node == (0, 0, 1, 1, 2, 2)
    assert without_small_nested_nodes(tree, min_saving=6) == tree  # 3 x 2 = 6 saved: kept
    # a node below a kept one, read by its two rows (a 3-token stem): they compute it themselves
    rows = [torch.tensor(prompts[0] + [50, 51, 52, x]) for x in (1, 2)] + [torch.tensor(prompts[0] + [60, 61])]
    tree = build_prefix_tree(rows, [len(r) - 1 for r in rows])
    assert [(n.parent, n.start, n.end) for n in tree.nodes] == [(None, 0, 23), (0, 23, 26)]
    assert without_small_nested_nodes(tree, min_saving=4).nodes == tree.nodes[:1]
    assert without_small_nested_nodes(tree, min_saving=4).row_node == (0, 0, 0)
    assert without_small_nested_nodes(tree, min_saving=3) == tree


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
        max_tokens_per_micro_batch=20, prefix_activations=mode, attention=attention, min_node_saving=0
    )
    stats = _assert_equivalent(model, batch, config, FP64_TOL)
    # nodes: the system prompt (14 tokens, 7 rows); question a (6, under it: a1's and a2's rows) and
    # question b (5: its last token's logit is read by each of its rows with its own label); a1's and
    # a2's phrasings (3 and 4); the row alone shares nothing
    assert (stats.groups, stats.dense_rows, stats.prefix_tokens) == (5, 1, 14 + 6 + 5 + 3 + 4)


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
    config = PrefixReuseConfig(max_tokens_per_micro_batch=budget, attention="merged", min_node_saving=0)
    _assert_equivalent(build("llama"), batch, config, FP64_TOL)


@pytest.mark.parametrize("checkpointing", [None, True, False])
@pytest.mark.parametrize("mode", ["keep", "offload", "recompute"])
def test_shared_response_tokens_match_dense_fp64(mode, checkpointing):
    """Response tokens several rows hold run once; each row's loss reads their log-probs, so their
    gradient weights add exactly as in dense training."""
    from dense_reference import shared_response_batch
    from test_equivalence import FP64_TOL, _assert_equivalent
    from tiny_models import build

    from verl_prefix.core import PrefixReuseConfig

    model = build("llama")
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    config = PrefixReuseConfig(max_tokens_per_micro_batch=16, prefix_activations=mode, min_node_saving=0)
    stats = _assert_equivalent(model, shared_response_batch(), config, FP64_TOL)
    # "tree": prompt + first turn (14 tokens, 5 rows); the stem (4, rows 0-2); the twins' 3 tokens and
    # row 3's 3 tokens (2 each: a row's last token stays its own); "turn1"/"turn2": question + first
    # turn (12; read out from the first row's first response token on); "plain": the prompt (6)
    assert (stats.groups, stats.dense_rows) == (6, 0)
    assert stats.prefix_tokens == 14 + 4 + 2 + 2 + 12 + 6


@pytest.mark.parametrize("per_row", [True, False])
def test_shared_response_outputs_entropies_temperatures_and_values(per_row):
    """Log-probs and entropies at per-row temperatures (or one temperature: each shared position's
    normaliser computed once for all its readers), the entropy bonus's gradient, and a value model's
    values and gradients, each against dense, on rows sharing response tokens."""
    from dense_reference import dense_values, rel_err, shared_response_batch
    from test_equivalence import FP64_TOL
    from tiny_models import build, build_value_model

    from verl_prefix.core import PrefixReuseConfig, compute_log_probs, compute_values, forward_backward

    batch = shared_response_batch(seed=2)
    temps = [0.5, 0.9, 1.3, 2.0, 0.7, 1.1, 0.8, 1.0, 1.6] if per_row else [0.7] * 9
    row_temperature = temps if per_row else None
    config = PrefixReuseConfig(max_tokens_per_micro_batch=16, min_node_saving=0, temperature=temps[0])
    model = build("qwen3")
    lps, ents = compute_log_probs(
        model, batch.input_ids, batch.response_start, batch.group_ids, config, True, row_temperature=row_temperature
    )

    def dense_outputs(i):
        row, start = batch.input_ids[i], batch.response_start[i]
        logp = torch.log_softmax(model(input_ids=row[None]).logits[0, start - 1 : -1] / temps[i], -1)
        return logp.gather(-1, row[start:, None])[:, 0], -(logp.exp() * logp).sum(-1)

    coef = 0.3
    model.zero_grad(set_to_none=True)
    for i in range(len(batch.input_ids)):
        ref_lp, ref_ent = dense_outputs(i)
        assert rel_err(lps[i], ref_lp.detach()) <= FP64_TOL, f"log-probs of row {i}"
        assert rel_err(ents[i], ref_ent.detach()) <= FP64_TOL, f"entropies of row {i}"
        ((batch.weights[i] * ref_lp).sum() - coef * ref_ent.sum()).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    def loss_fn(indices, log_probs, entropies):
        return sum(
            (batch.weights[i] * lp).sum() - coef * ent.sum()
            for i, lp, ent in zip(indices, log_probs, entropies, strict=True)
        )

    ids, starts, uids = batch.input_ids, batch.response_start, batch.group_ids
    forward_backward(model, ids, starts, uids, loss_fn, config, row_temperature=row_temperature, loss_entropy=True)
    for n, p in model.named_parameters():
        assert rel_err(p.grad, ref[n]) <= FP64_TOL, n
    if not per_row:
        return

    critic = build_value_model("qwen3")
    ref_values = dense_values(critic, batch)
    sum((v * w).sum() for v, w in zip(ref_values, batch.weights, strict=True)).backward()
    ref = {n: p.grad.clone() for n, p in critic.named_parameters()}
    critic.zero_grad(set_to_none=True)

    def value_loss(indices, values):
        return sum((v * batch.weights[i]).sum() for i, v in zip(indices, values, strict=True))

    forward_backward(critic, ids, starts, uids, value_loss, config, readout="values")
    for n, p in critic.named_parameters():
        assert rel_err(p.grad, ref[n]) <= FP64_TOL, n
    for i, (v, r) in enumerate(zip(compute_values(critic, ids, starts, uids, config), ref_values, strict=True)):
        assert rel_err(v, r.detach()) <= FP64_TOL, f"values of row {i}"


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
