"""Group-aware dp balancing keeps GRPO groups whole and balances tokens."""

import random

import pytest

from verl_prefix.backend.balance import group_balanced_order, uid_of_key


def chunks(order, dp):
    n = len(order) // dp
    return [order[r * n : (r + 1) * n] for r in range(dp)]


@pytest.mark.parametrize("seed", range(5))
def test_whole_groups_equal_sizes_balanced_tokens(seed):
    rng = random.Random(seed)
    dp, group_size, n_groups = 4, 8, 12
    uids = [f"g{g}" for g in range(n_groups) for _ in range(group_size)]
    rng.shuffle(uids)  # verl hands samples over in any order
    lens = [rng.randint(100, 2000) for _ in uids]
    order = group_balanced_order(uids, lens, dp)
    assert sorted(order) == list(range(len(uids)))
    parts = chunks(order, dp)
    assert {len(p) for p in parts} == {len(uids) // dp}
    for part in parts:  # 12 groups of 8 over 4 ranks of 24: every group lands whole
        for uid in {uids[i] for i in part}:
            assert sum(uids[i] == uid for i in part) == group_size
    loads = [sum(lens[i] for i in p) for p in parts]
    assert max(loads) / min(loads) < 1.5


def test_uneven_groups_split_only_when_forced():
    uids = ["a"] * 6 + ["b"] * 2
    order = group_balanced_order(uids, [10] * 8, 2)
    parts = chunks(order, 2)
    assert [sorted({uids[i] for i in p}) for p in parts] in (
        [["a"], ["a", "b"]],
        [["a", "b"], ["a"]],
    )


def test_indivisible_batch():
    with pytest.raises(ValueError, match="dp_size=3"):
        group_balanced_order(["a"] * 4, [1] * 4, 3)


def test_uid_of_key():
    assert uid_of_key("3f2a-uuid_0_5") == "3f2a-uuid"
    assert uid_of_key("my_uid_with_underscores_1_0") == "my_uid_with_underscores"
