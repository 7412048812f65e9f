"""Ulysses sequence parallelism with prefix reuse, against dense / stock on the same rows.

Core (fp64, plain models over gloo): every rank of a sequence-parallel group holds the same rows,
runs 1/size of each pass's tokens and verl's all-to-alls around attention; the group's mean
gradient (what FSDP's reduction makes of verl's size-scaled gather) must equal dense training's,
and the gathered log-probs, entropies and values dense's. Engine (fp32, FSDP2 over gloo): verl's
engine with `ulysses_sequence_parallel_size` 2 or 4 (dp 1 or 2) against the stock engine at sp=1
in one process on the same mini-batch, with no fallback. Every multi-process run is under a
timeout: a hang fails.
"""

from __future__ import annotations

import pytest
import torch
import verl_support as vs
from dense_reference import dense_entropies, dense_grads, dense_values, make_batch, rel_err, shared_response_batch
from tiny_models import build, build_value_model

from verl_prefix.core import PrefixReuseConfig, ScheduleRuntime, compute_log_probs, compute_values, forward_backward

FP64_TOL = 1e-10
# fp32: verl's engine at sp=1 and ours at sp>1 sum the same terms in other orders (packing, the
# all-to-all's head split, FSDP's reduce over 2-4 ranks); test_verl_engine's sp=1 bound
GRAD_TOL = 2e-5
OUTPUT_TOL = 2e-5

# group 0's prefix (39 tokens) is longer than one rank's slice of any pass; Phase A's 47 prefix
# tokens do not divide by 2 or 4 (the pad tail); group 2 shares nothing (runs as a plain row)
CORE_GROUPS = [(3, 40, [5, 3, 7]), (2, 9, [4, 2]), (1, 6, [3])]


def _core_case(case: dict, sp_group) -> dict:
    """One fp64 comparison on this rank; returns the errors (rank-local values, group-mean grads)."""
    from verl_prefix.backend.ulysses import sequence_parallel

    if case["readout"] == "values":
        model = build_value_model(case["kind"])
    else:
        model = build(case["kind"])
    if case.get("checkpointing") is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": case["checkpointing"]})
    config = PrefixReuseConfig(attention=case["attention"], max_tokens_per_micro_batch=24)
    if case.get("batch") == "shared_responses":  # tree rollouts and multi-turn rows, every node kept
        batch, config.min_node_saving = shared_response_batch(), 0
    else:
        batch = make_batch(CORE_GROUPS, seed=1)
    rows, starts, gids = batch.input_ids, batch.response_start, batch.group_ids
    runtime = ScheduleRuntime(sequence_parallel=sequence_parallel(sp_group))
    if case["readout"] == "values":
        values = compute_values(model, rows, starts, gids, config, runtime=runtime)
        with torch.no_grad():
            ref = dense_values(model, batch)
        return {"values": max(float((a - b).abs().max()) for a, b in zip(values, ref, strict=True))}
    ref_grads, ref_log_probs = dense_grads(model, batch)
    seen: dict[int, torch.Tensor] = {}
    stats = forward_backward(model, rows, starts, gids, batch.loss_fn(seen), config, runtime=runtime)
    grad_err = 0.0
    for name, p in model.named_parameters():
        g = p.grad.clone()
        torch.distributed.all_reduce(g, op=torch.distributed.ReduceOp.AVG, group=sp_group)
        grad_err = max(grad_err, rel_err(g, ref_grads[name]))
    log_probs, entropies = compute_log_probs(model, rows, starts, gids, config, True, runtime=runtime)
    ref_entropies = dense_entropies(model, batch)
    return {
        "grads": grad_err,
        "loss_fn_log_probs": max(float((seen[i] - ref_log_probs[i]).abs().max()) for i in range(len(rows))),
        "log_probs": max(float((a - b).abs().max()) for a, b in zip(log_probs, ref_log_probs, strict=True)),
        "entropies": max(float((a - b).abs().max()) for a, b in zip(entropies, ref_entropies, strict=True)),
        "groups": stats.groups,
    }


def _refusal_of_different_rows(rank: int, group) -> str:
    """A group whose ranks hold different rows: refused on every rank, before any all-to-all."""
    from verl_prefix.backend.ulysses import sequence_parallel

    batch = make_batch(CORE_GROUPS, seed=1 + rank)
    try:
        forward_backward(
            build("qwen3"),
            batch.input_ids,
            batch.response_start,
            batch.group_ids,
            batch.loss_fn(),
            runtime=ScheduleRuntime(sequence_parallel=sequence_parallel(group)),
        )
    except ValueError as exc:
        return str(exc)
    return ""


# ---------------------------------------------------------------------------------------------
# verl's engine at sp > 1 against the stock engine at sp = 1

# per data-parallel rank: dp rank 0 shares (a prefix longer than a rank's slice), dp rank 1 does not
ENGINE_GROUPS = {0: [(30, [3, 7, 2, 5]), (14, [4, 1, 6]), (9, [2])], 1: [(11, [4]), (7, [3])]}
ENGINE = dict(use_dynamic_bsz=True, enable_gradient_checkpointing=True)  # verl's recipes check-point
# tokens per rank and pass: verl's budget for one rank's slice (x sp for a whole pass); the stock
# engine at sp=1 needs the longest row (37) to fit
BUDGET = {"stock": 48, "ours": 24}


def _engine_batch(dp: int, critic: bool, budget: int):
    """The mini-batch of all `dp` data-parallel ranks (make_batch rows, rank after rank)."""
    from verl.utils import tensordict_utils as tu

    groups = [g for d in range(dp) for g in ENGINE_GROUPS[d]]
    data = vs.make_batch(groups, calculate_entropy=not critic, critic=critic)
    tu.assign_non_tensor(
        data, use_remove_padding=True, use_dynamic_bsz=True, max_token_len_per_gpu=budget, use_fused_kernels=False
    )
    return data


def _rows_of_dp_rank(dp_rank: int) -> list[int]:
    sizes = [sum(len(r) for _, r in ENGINE_GROUPS[d]) for d in range(dp_rank + 1)]
    return list(range(sum(sizes[:-1]), sum(sizes)))


def _engine_run(worker, data, critic: bool, out_keys: tuple[str, ...]):
    """Gradients of one forward_backward_batch, then the infer outputs (None off the collect rank)."""
    from verl.utils import tensordict_utils as tu

    loss_fn = vs.value_loss_fn() if critic else vs.ppo_loss_fn()
    engine = worker.engine
    with engine.train_mode():
        engine.optimizer_zero_grad()
        out = engine.forward_backward_batch(data.clone(), loss_fn, forward_only=False)
        grads = {n: p.grad.full_tensor().clone() for n, p in engine.module.named_parameters()}
    infer = data.clone()
    tu.assign_non_tensor(infer, compute_loss=False)
    result = worker.infer_batch(infer)
    outputs = None if result is None else {k: [x.clone() for x in tu.get(result, k).unbind()] for k in out_keys}
    metrics = {k: v for k, v in out["metrics"].items() if k.startswith("prefix_reuse/")}
    return grads, outputs, metrics


def _engine_case(rank: int, world: int, sp: int, model_dir: str, critic: bool) -> dict | None:
    """verl-prefix's engine at (dp = world / sp, sp); dp rank d trains its rows of the mini-batch.
    Returns its outputs on sp rank 0 (and the gradients and metrics on rank 0), else None."""
    from verl.utils import tensordict_utils as tu

    if critic:
        vs.load_value_models_with_sdpa()
    budget = BUDGET["ours"]
    kwargs = dict(
        ENGINE, ulysses_sequence_parallel_size=sp, max_token_len_per_gpu=budget, infer_max_token_len_per_gpu=budget
    )
    if critic:
        kwargs["model_type"] = "value_model"
    worker = vs.build_worker(model_dir, reuse=True, **kwargs)
    data = tu.index_select_tensor_dict(_engine_batch(world // sp, critic, budget), _rows_of_dp_rank(rank // sp))
    grads, outputs, metrics = _engine_run(worker, data, critic, ("values",) if critic else ("log_probs", "entropy"))
    if rank % sp:
        return None
    return {"outputs": outputs, "metrics": metrics, "grads": grads if rank == 0 else None}


def _ranks(rank: int, world: int, port: int, out_dir: str, plan: dict) -> None:
    """mp target, one process group of `world` ranks for everything at this size (process start-up
    dominates these runs): the fp64 core cases on a group of all ranks, the refusal of different
    rows, then each engine case. Rank r writes what it holds to out_dir/r.pt."""
    vs.install_cpu_platform()
    vs.init_process_group(rank, world, port)
    group = torch.distributed.group.WORLD
    core = []
    for case in plan["core"]:
        torch.manual_seed(0)
        core.append(_core_case(case, group))
    refusal = _refusal_of_different_rows(rank, group)
    engine = {
        name: _engine_case(rank, world, sp, model_dir, critic)
        for name, (sp, model_dir, critic) in plan["engine"].items()
    }
    torch.save({"core": core, "refusal": refusal, "engine": engine}, f"{out_dir}/{rank}.pt")
    torch.distributed.destroy_process_group()


CORE_CASES = {
    2: [
        dict(kind="qwen3", attention="merged", readout="log_probs"),  # GQA: 2 KV heads, one per rank
        dict(kind="qwen3", attention="sdpa", readout="log_probs", checkpointing=True),
        dict(kind="llama", attention="merged", readout="log_probs", checkpointing=False),
        dict(kind="qwen3_tied", attention="merged", readout="log_probs"),
        dict(kind="qwen3_moe", attention="merged", readout="log_probs"),
        dict(kind="qwen3", attention="merged", readout="values"),
        # shared response tokens: the nodes' read-outs gathered over the ranks' slices
        dict(kind="llama", attention="merged", readout="log_probs", checkpointing=False, batch="shared_responses"),
        dict(kind="qwen3", attention="merged", readout="values", batch="shared_responses"),
    ],
    # 4 ranks and 2 KV heads: each KV head is repeated (as verl does) so that every rank gets one
    4: [
        dict(kind="qwen3", attention="merged", readout="log_probs", checkpointing=False),
        dict(kind="qwen3", attention="sdpa", readout="log_probs", batch="shared_responses"),
    ],
}
# engine cases per world size: name -> (sp, critic); dp = world / sp
ENGINE_CASES = {
    2: {"actor-sp2": (2, False), "critic-sp2": (2, True)},
    4: {"actor-sp4-gqa": (4, False), "actor-sp2-dp2": (2, False)},
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[bool, str]:
    """critic -> saved tiny Qwen3 (a value model for the critic)."""
    return {
        critic: vs.save_tiny_qwen3(str(tmp_path_factory.mktemp("model")), seed=int(critic), value_model=critic)
        for critic in (False, True)
    }


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def group_run(request, model_dirs, tmp_path_factory):
    """(world, every rank's results) of one spawned run at this world size."""
    world, out = request.param, tmp_path_factory.mktemp(f"world{request.param}")
    engine = {name: (sp, model_dirs[critic], critic) for name, (sp, critic) in ENGINE_CASES[world].items()}
    plan = {"core": CORE_CASES[world], "engine": engine}
    vs.spawn_ranks(_ranks, (world, vs.free_port(), str(out), plan), world, timeout=360)
    return world, [torch.load(out / f"{r}.pt") for r in range(world)]


def test_core_matches_dense_fp64(group_run):
    world, ranks = group_run
    for case, errs in zip(CORE_CASES[world], ranks[0]["core"], strict=True):
        if case["readout"] == "values":
            assert errs["values"] <= FP64_TOL, (case, errs)
            continue
        assert errs["groups"] == (6 if case.get("batch") == "shared_responses" else 2), case
        for key in ("grads", "loss_fn_log_probs", "log_probs", "entropies"):
            assert errs[key] <= FP64_TOL, (case, key, errs)
    refusals = [r["refusal"] for r in ranks]
    assert all("different rows" in r for r in refusals), refusals


@pytest.fixture(scope="module")
def stock_platform():
    vs.install_cpu_platform()
    vs.init_process_group()


def _response_parts(outputs: list[torch.Tensor], data) -> list[torch.Tensor]:
    """The response part of full-length per-token outputs (position t holds token t + 1's)."""
    n_resp = data["responses"].offsets().diff().tolist()
    return [x[len(x) - n - 1 : len(x) - 1] for x, n in zip(outputs, n_resp, strict=True)]


def test_engine_matches_stock_at_sp1(group_run, model_dirs, stock_platform):
    world, ranks = group_run
    for name, (sp, critic) in ENGINE_CASES[world].items():
        dp = world // sp
        if critic:
            vs.load_value_models_with_sdpa()
        budget = BUDGET["stock"]
        kwargs = dict(ENGINE, max_token_len_per_gpu=budget, infer_max_token_len_per_gpu=budget)
        if critic:
            kwargs["model_type"] = "value_model"
        stock = vs.build_worker(model_dirs[critic], reuse=False, **kwargs)
        data = _engine_batch(dp, critic, budget)
        keys = ("values",) if critic else ("log_probs", "entropy")
        ref_grads, ref_outputs, _ = _engine_run(stock, data, critic, keys)

        ours = [ranks[r]["engine"][name] for r in range(0, world, sp)]  # sp rank 0 of each dp rank
        for param, ref in ref_grads.items():
            assert ref.abs().max() > 0, (name, param)
            assert rel_err(ours[0]["grads"][param], ref) <= GRAD_TOL, (
                name,
                param,
                rel_err(ours[0]["grads"][param], ref),
            )
        for key in keys:
            got = _response_parts([x for out in ours for x in out["outputs"][key]], data)  # dp ranks in order
            want = _response_parts(ref_outputs[key], data)
            err = max(float((a - b).abs().max()) for a, b in zip(got, want, strict=True))
            assert err <= OUTPUT_TOL, (name, key, err)
        metrics = ours[0]["metrics"]
        assert metrics["prefix_reuse/fallbacks"] == [0.0], name
        assert metrics["prefix_reuse/groups"] == [2.0], name  # dp rank 0's two shared groups


def test_sp_size_that_does_not_split_the_heads_is_refused(stock_platform):
    from verl_prefix.core.runtime import SequenceParallel

    model = build("qwen3")  # 4 attention heads, 2 KV heads
    batch = make_batch(CORE_GROUPS, seed=1)
    sp = SequenceParallel(torch.distributed.group.WORLD, 3, 0, None, None, None)  # refused before any pass
    with pytest.raises(ValueError, match="ulysses_sequence_parallel_size=3 must divide num_attention_heads=4"):
        forward_backward(
            model,
            batch.input_ids,
            batch.response_start,
            batch.group_ids,
            batch.loss_fn(),
            runtime=ScheduleRuntime(sequence_parallel=sp),
        )


def test_stock_dense_path_under_sp_without_flash_attn_is_refused(model_dirs, stock_platform, monkeypatch):
    """verl's Ulysses patch wraps only flash-attn's attention: its dense path at sp=2 with SDPA gives
    wrong gradients (max|g - g_sp1| = 1.76 x max|g_sp1|, measured on CPU). Where the reuse engine
    would call it (a fallback, the in-loop check) it stops with the fix instead."""
    from verl.utils import tensordict_utils as tu

    worker = vs.build_worker(model_dirs[False], reuse=True, prefix_reuse={"verify_every": 1}, **ENGINE)
    monkeypatch.setattr(worker.engine, "ulysses_sequence_parallel_size", 2)  # the checks read only these
    data = _engine_batch(1, False, 48)
    with pytest.raises(ValueError, match="prefix_reuse.verify_every needs verl's dense path.*flash_attention_2"):
        worker.engine.forward_backward_batch(data, vs.ppo_loss_fn(), forward_only=False)
    tu.assign_non_tensor(data, use_fused_kernels=True)  # a reason to fall back
    with pytest.raises(ValueError, match="a mini-batch with use_fused_kernels needs verl's dense path"):
        worker.engine.forward_backward_batch(data, vs.ppo_loss_fn(), forward_only=True)
