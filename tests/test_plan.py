"""Prefix detection and micro-batch packing."""

import pytest
import torch

from verl_prefix.core.plan import common_prefix_len, find_prefix_groups, make_plan


def t(*xs):
    return torch.tensor(xs)


def test_common_prefix_len():
    assert common_prefix_len([t(1, 2, 3, 4), t(1, 2, 3, 5), t(1, 2, 9)]) == 2
    assert common_prefix_len([t(1, 2, 3), t(1, 2, 3, 4)]) == 3
    assert common_prefix_len([t(7, 2), t(1, 2)]) == 0
    assert common_prefix_len([t(1, 2, 3)]) == 3


def test_prefix_cut_before_last_prompt_token():
    rows = [t(1, 2, 3, 4, 10, 11), t(1, 2, 3, 4, 12)]
    groups = find_prefix_groups(rows, [4, 4], ["a", "a"], min_prefix_tokens=1)
    assert [(g.rows, g.prefix_len) for g in groups] == [((0, 1), 3)]
    # responses identical past the prompt still keep the last prompt token in the suffix
    same = [t(1, 2, 3, 9, 9), t(1, 2, 3, 9, 9)]
    assert find_prefix_groups(same, [3, 3], [0, 0], 1)[0].prefix_len == 2


def test_unshared_groups_and_short_prefixes_run_dense():
    rows = [t(1, 2, 3, 4), t(5, 2, 3, 4), t(1, 2, 3, 4), t(1, 2, 3, 5), t(8, 8)]
    groups = find_prefix_groups(rows, [3, 3, 3, 3, 1], ["a", "a", "b", "b", "c"], min_prefix_tokens=3)
    # "a" shares nothing, "b" shares 2 < 3 tokens, "c" is a single row
    assert all(g.prefix_len == 0 and len(g.rows) == 1 for g in groups)
    assert sorted(r for g in groups for r in g.rows) == [0, 1, 2, 3, 4]


def test_group_spans_micro_batches_and_micro_batches_mix_groups():
    prompt = list(range(1, 11))
    rows = [torch.tensor(prompt + [20 + i] * n) for i, n in enumerate([3, 3, 3, 2, 2])]
    plan = make_plan(rows, [10] * 5, ["a", "a", "a", "b", "b"], max_tokens_per_micro_batch=9, min_prefix_tokens=1)
    # a and b share the same prompt but are different uids: two groups, each with prefix 9
    assert [g.prefix_len for g in plan.groups] == [9, 9]
    seen = [r for mb in plan.micro_batches for seg in mb for r in seg.rows]
    assert seen == [0, 1, 2, 3, 4]
    assert len(plan.micro_batches) == 3  # suffixes of 4, 4, 4, 3, 3 tokens under a budget of 9
    assert {seg.group for seg in plan.micro_batches[1]} == {0, 1}  # a micro-batch mixing groups
    assert plan.prefix_chunks == ((0,), (1,))  # 9 + 9 > 9: one prefix per Phase-A chunk
    assert plan.prefix_refs() == {0: (0, 0, 9), 1: (1, 0, 9)}


def test_suffix_longer_than_budget_is_an_error():
    rows = [torch.arange(20), torch.arange(20)]
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch"):
        make_plan(rows, [5, 5], [0, 0], max_tokens_per_micro_batch=8, min_prefix_tokens=1)
