"""dp=2 ranks whose mini-batches share differently stay in step (FSDP2 over gloo, verl engines).

verl splits a batch across dp ranks by rows and length, not by sharing: one rank may hold groups
with long shared prompts while the other holds rows that share nothing, or a row the schedule must
run dense. Every FSDP pass issues collectives, so ranks must run the same passes; each case compares
gradients (before the optimizer step) and log-probs with the stock engine under a timeout: a hang,
or gloo's collective-mismatch abort, fails the test.
"""

from __future__ import annotations

import json

import pytest
import torch
import verl_support as vs

GRAD_TOL = 2e-5  # fp32, as tests/test_verl_engine.py
LOG_PROB_TOL = 1e-4  # fp32, absolute, log-probs of about -5

SHARING = [(40, [3, 5, 2, 4]), (38, [6, 1, 3, 2])]  # two groups of 4 rows, ~40-token prompts
NOTHING_SHARED = [(10 + g, [3 + g % 3]) for g in range(8)]  # 8 rows, one per uid


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return vs.save_tiny_qwen3(str(tmp_path_factory.mktemp("actor")))


def _run(model_dir, tmp_path, case):
    vs.spawn_two_ranks(vs.two_rank_compare, (vs.free_port(), model_dir, str(tmp_path), case), timeout=240)
    return json.loads((tmp_path / "result.json").read_text())


@pytest.mark.parametrize(
    "engine",
    [{}, {"enable_gradient_checkpointing": True, "prefix_reuse": {"prefix_activations": "recompute"}}],
    ids=["plain", "checkpointing+recompute"],
)
def test_one_rank_shares_the_other_shares_nothing(model_dir, tmp_path, engine):
    result = _run(model_dir, tmp_path, {"groups_per_rank": {0: SHARING, 1: NOTHING_SHARED}, "engine": engine})
    rank0, rank1 = result["metrics"]
    assert rank0["prefix_reuse/groups"] == [2.0] and rank1["prefix_reuse/groups"] == [0.0]
    assert rank1["prefix_reuse/dense_rows"] == [8.0]
    # both ranks ran the same number of passes: the difference was padded on the smaller side
    keys = ("prefix_chunks", "micro_batches", "padding_passes")
    totals = [sum(r[f"prefix_reuse/{k}"][0] for k in keys) for r in (rank0, rank1)]
    assert totals[0] == totals[1] and max(r["prefix_reuse/padding_passes"][0] for r in (rank0, rank1)) > 0
    assert rank0["prefix_reuse/fallbacks"] == rank1["prefix_reuse/fallbacks"] == [0.0]
    assert result["max_rel_err"] <= GRAD_TOL
    assert result["max_log_prob_diff"] <= LOG_PROB_TOL


def test_one_rank_shares_a_tree_with_responses_the_other_shares_nothing(model_dir, tmp_path):
    """Rank 0 holds a two-level tree (a 16-token system prompt over its two groups, then each group's
    question with its responses' 3-token common start, whose log-probs every row reads), rank 1 rows
    that share nothing; gradient checkpointing on."""
    case = {
        "groups_per_rank": {0: [(6, [5, 7, 4]), (8, [4, 6, 5])], 1: NOTHING_SHARED},
        "batch_per_rank": {0: {"system_len": 16, "response_stem": 3}},
        "engine": {"enable_gradient_checkpointing": True, "prefix_reuse": {"min_node_saving": 0}},
    }
    result = _run(model_dir, tmp_path, case)
    rank0, rank1 = result["metrics"]
    assert rank0["prefix_reuse/groups"] == [3.0] and rank1["prefix_reuse/groups"] == [0.0]
    assert rank0["prefix_reuse/prefix_tokens"] == [16.0 + 6 + 3 + 8 + 3]
    keys = ("prefix_chunks", "micro_batches", "padding_passes")
    totals = [sum(r[f"prefix_reuse/{k}"][0] for k in keys) for r in (rank0, rank1)]
    assert totals[0] == totals[1]
    assert rank0["prefix_reuse/fallbacks"] == rank1["prefix_reuse/fallbacks"] == [0.0]
    assert result["max_rel_err"] <= GRAD_TOL
    assert result["max_log_prob_diff"] <= LOG_PROB_TOL


def test_critic_one_rank_shares_the_other_shares_nothing(tmp_path):
    """The same for verl's critic: value-loss gradients and forward-only values."""
    critic_dir = vs.save_tiny_qwen3(str(tmp_path / "critic"), seed=1, value_model=True)
    case = {"groups_per_rank": {0: SHARING, 1: NOTHING_SHARED}, "critic": True}
    result = _run(critic_dir, tmp_path, case)
    assert result["metrics"][0]["prefix_reuse/groups"] == [2.0]
    assert result["max_rel_err"] <= GRAD_TOL
    assert result["max_log_prob_diff"] <= LOG_PROB_TOL  # here: values


def test_one_rank_must_run_dense(model_dir, tmp_path):
    """Rank 1's batch has an empty response: both ranks take the dense path together."""
    # (8 rows per rank: stock verl itself needs as many rows as the other rank has micro-batches)
    groups = {0: [(20, [3, 5, 2, 4]), (16, [6, 1, 3, 2])], 1: [(20, [3, 7, 0, 2]), (14, [4, 1, 5, 2])]}
    case = {"groups_per_rank": groups}
    result = _run(model_dir, tmp_path, case)
    for metrics in result["metrics"]:
        assert metrics["prefix_reuse/fallbacks"] == [1.0]
    assert result["max_rel_err"] <= GRAD_TOL
    assert result["max_log_prob_diff"] <= LOG_PROB_TOL


def _refused_on_one_rank(rank: int, port: int, out_dir: str) -> None:
    """mp target: rank 0's batch has a suffix over the token budget; rank 1's is fine."""
    from tiny_models import build

    from verl_prefix.core import PrefixReuseConfig, ScheduleRuntime, forward_backward

    vs.init_process_group(rank, 2, port)
    model = build("qwen3", torch.float32)
    n = 21 if rank == 0 else 3  # rank 0's rows: 22-token suffixes
    rows = [torch.cat([torch.arange(1, 9), torch.full((n,), t)]) for t in (50, 60)]
    config = PrefixReuseConfig(max_tokens_per_micro_batch=16)
    runtime = ScheduleRuntime(group=torch.distributed.group.WORLD)
    try:
        forward_backward(
            model, rows, [8, 8], [0, 0], lambda i, lps: sum(lp.sum() for lp in lps), config, runtime=runtime
        )
        message = "no error"
    except ValueError as exc:
        message = str(exc)
    with open(f"{out_dir}/rank{rank}.txt", "w") as f:
        f.write(message)
    torch.distributed.destroy_process_group()


def test_a_batch_refused_on_one_rank_fails_every_rank_without_a_hang(tmp_path):
    vs.spawn_two_ranks(_refused_on_one_rank, (vs.free_port(), str(tmp_path)), timeout=120)
    assert "raise max_tokens_per_micro_batch" in (tmp_path / "rank0.txt").read_text()
    assert "another data-parallel rank's batch was refused" in (tmp_path / "rank1.txt").read_text()
