"""MoE router aux loss with logical prefix-token accounting vs dense training (fp64, eager experts).

Dense reference: per micro-batch (the schedule's partition of rows), the rows with their full
prompts through the stock model, loss_fn + coef * transformers' load_balancing_loss_func.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from dense_reference import dense_grads, dense_moe_grads, make_batch, rel_err, shared_response_batch
from tiny_models import build

from verl_prefix.core import PrefixReuseConfig, forward_backward
from verl_prefix.core.plan import schedule_plan

COEF = 0.37
TOL = 1e-10
# at budget 14 the micro-batches are rows (0, 1, 2), (3, 4, 5), (6, 7), (8,): groups 0 (rows 0-4)
# and 1 (rows 5-7) each span two micro-batches, one micro-batch mixes them, row 8 is a dense row
GROUPS = [(5, 13, [3, 6, 2, 4, 5]), (3, 8, [2, 7, 3]), (1, 9, [4])]


def partition(batch, budget, min_node_saving=PrefixReuseConfig.min_node_saving):
    """The schedule's suffix micro-batches, as row lists (what the dense reference batches)."""
    config = PrefixReuseConfig(max_tokens_per_micro_batch=budget, min_node_saving=min_node_saving)
    plan = schedule_plan(batch.input_ids, batch.response_start, batch.group_ids, config)
    return [list(rows) for rows in plan.micro_batch_rows()]


def reuse_grads(model, batch, config):
    model.zero_grad(set_to_none=True)
    stats = forward_backward(model, batch.input_ids, batch.response_start, batch.group_ids, batch.loss_fn(), config)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads, stats


@pytest.mark.parametrize("mode", ["keep", "offload", "recompute"])
@pytest.mark.parametrize("budget", [14, None])
def test_aux_loss_and_every_gradient_match_dense(mode, budget):
    model = build("qwen3_moe", torch.float64)
    batch = make_batch(GROUPS, seed=11)
    micro_batches = partition(batch, budget)
    if budget is not None:
        assert micro_batches == [[0, 1, 2], [3, 4, 5], [6, 7], [8]]
    ref, ref_aux = dense_moe_grads(model, batch, micro_batches, COEF)

    config = PrefixReuseConfig(
        max_tokens_per_micro_batch=budget, prefix_activations=mode, router_aux_loss=True, router_aux_loss_coef=COEF
    )
    grads, stats = reuse_grads(model, batch, config)

    assert stats.groups == 2 and stats.micro_batches == len(micro_batches)
    aux_err = max(abs(a - b) / abs(b) for a, b in zip(stats.router_aux_losses, ref_aux, strict=True))
    assert aux_err <= 1e-13, (stats.router_aux_losses, ref_aux)
    assert stats.router_aux_loss == pytest.approx(sum(ref_aux), rel=1e-13)
    gates = [n for n in ref if n.endswith("mlp.gate.weight")]
    assert len(gates) == 2, "the router weights are compared"
    errs = {name: rel_err(grads[name], g) for name, g in ref.items()}
    for name, g in ref.items():
        assert g.abs().max() > 0, name
        assert errs[name] <= TOL, (name, errs[name])
    gate_err = max(errs[n] for n in gates)
    print(f"max aux rel err {aux_err:.2e}; max grad rel err {max(errs.values()):.2e} (gates {gate_err:.2e})")


@pytest.mark.parametrize("mode", ["keep", "recompute"])
def test_aux_loss_counts_every_span_of_a_tree_once_per_row(mode):
    """Nested spans (a system prompt over the groups, shared response stems, duplicate rows): each
    span's router statistics enter every micro-batch once per row of it that reads the span."""
    model = build("qwen3_moe", torch.float64)
    batch = shared_response_batch()
    micro_batches = partition(batch, 16, min_node_saving=0)
    ref, ref_aux = dense_moe_grads(model, batch, micro_batches, COEF)
    config = PrefixReuseConfig(
        max_tokens_per_micro_batch=16,
        prefix_activations=mode,
        min_node_saving=0,
        router_aux_loss=True,
        router_aux_loss_coef=COEF,
    )
    grads, stats = reuse_grads(model, batch, config)
    assert stats.groups == 6 and stats.micro_batches == len(micro_batches) > 1
    for a, b in zip(stats.router_aux_losses, ref_aux, strict=True):
        assert abs(a - b) <= 1e-13 * abs(b), (stats.router_aux_losses, ref_aux)
    for name, g in ref.items():
        assert rel_err(grads[name], g) <= TOL, name


def test_aux_loss_is_in_the_gradient():
    """Not vacuous: the router gradients with the aux loss differ from those without it, and the
    reference without it is plain dense training."""
    model = build("qwen3_moe", torch.float64)
    batch = make_batch(GROUPS, seed=11)
    on, _ = reuse_grads(model, batch, PrefixReuseConfig(max_tokens_per_micro_batch=14, router_aux_loss=True))
    off, _ = reuse_grads(model, batch, PrefixReuseConfig(max_tokens_per_micro_batch=14))
    plain, _ = dense_grads(model, batch)
    gate = "model.layers.0.mlp.gate.weight"
    assert rel_err(on[gate], off[gate]) > 1e-3
    assert rel_err(off[gate], plain[gate]) <= TOL


def test_off_requests_no_router_logits():
    model = build("qwen3_moe", torch.float64)
    batch = make_batch(GROUPS, seed=5)
    seen = []
    handle = model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs.get("output_router_logits")), with_kwargs=True
    )
    try:
        _, stats = reuse_grads(model, batch, PrefixReuseConfig(max_tokens_per_micro_batch=14))
    finally:
        handle.remove()
    assert seen and not any(seen)
    assert stats.router_aux_loss is None and stats.router_aux_losses is None


def test_coefficient_defaults_to_the_model_config():
    model = build("qwen3_moe", torch.float64)
    batch = make_batch(GROUPS, seed=3)
    ref, _ = dense_moe_grads(model, batch, partition(batch, None), model.config.router_aux_loss_coef)
    grads, _ = reuse_grads(model, batch, PrefixReuseConfig(max_tokens_per_micro_batch=None, router_aux_loss=True))
    for name, g in ref.items():
        assert rel_err(grads[name], g) <= TOL, name


def test_dense_model_with_aux_loss_names_the_setting():
    model = build("qwen3", torch.float64)
    batch = make_batch([(2, 6, [2, 3])])
    with pytest.raises(ValueError, match="router_aux_loss=True needs an MoE model"):
        reuse_grads(model, batch, PrefixReuseConfig(router_aux_loss=True))


# ---------------------------------------------------------------------------------------------
# verl engine: reuse path vs this engine's dense path, both adding the aux loss (fp32, FSDP2 on CPU)

VERL_GROUPS = [(20, [3, 7, 2, 5]), (14, [4, 1, 6]), (9, [2])]


@pytest.fixture(scope="module")
def vs(tmp_path_factory):
    import verl_support

    verl_support.install_cpu_platform()
    verl_support.init_process_group()
    verl_support.model_dir = verl_support.save_tiny_qwen3(str(tmp_path_factory.mktemp("moe")), moe=True)
    return verl_support


@pytest.mark.parametrize("dense_remove_padding", [True, False])
def test_verl_engine_reuse_matches_its_dense_path(vs, dense_remove_padding):
    from test_verl_engine import grads_of, params_of  # after the fixture set up verl's CPU platform
    from verl.utils import tensordict_utils as tu
    from verl.workers.config import FSDPActorConfig
    from verl.workers.utils.losses import ppo_loss

    # one micro-batch per mini-batch on both paths, so each path's aux loss sees the same rows
    engine = dict(use_dynamic_bsz=True, max_token_len_per_gpu=256, infer_max_token_len_per_gpu=256)
    aux = {"router_aux_loss": True, "router_aux_loss_coef": 0.5}
    dense = vs.build_worker(
        vs.model_dir,
        reuse=True,
        prefix_reuse={"enable": False, **aux},
        use_remove_padding=dense_remove_padding,
        **engine,
    )
    reuse = vs.build_worker(vs.model_dir, reuse=True, prefix_reuse={"verify_every": 1, **aux}, **engine)
    loss_fn = partial(
        ppo_loss, config=FSDPActorConfig(strategy="fsdp2", rollout_n=4, ppo_mini_batch_size=2, use_dynamic_bsz=True)
    )

    # gradients: every parameter, the routers' included
    ref, ref_out = grads_of(dense, vs.make_batch(VERL_GROUPS, seed=2), loss_fn)
    grads, out = grads_of(reuse, vs.make_batch(VERL_GROUPS, seed=2), loss_fn)
    assert out["metrics"]["prefix_reuse/micro_batches"] == [1.0]
    if dense_remove_padding:  # stock verl adds no aux loss: its router gradients differ
        stock, _ = grads_of(
            vs.build_worker(vs.model_dir, reuse=False, **engine), vs.make_batch(VERL_GROUPS, seed=2), loss_fn
        )
        assert all(rel_err(ref[n], stock[n]) > 1e-2 for n in ref if n.endswith("mlp.gate.weight"))
    errs = {n: rel_err(grads[n], g) for n, g in ref.items()}
    assert max(errs.values()) <= 2e-5, max(errs.items(), key=lambda kv: kv[1])
    aux_dense, aux_reuse = (
        ref_out["metrics"]["prefix_reuse/router_aux_loss"],
        out["metrics"]["prefix_reuse/router_aux_loss"],
    )
    assert len(aux_dense) == len(aux_reuse) == 1 and aux_dense[0] > 0.5
    assert aux_reuse[0] == pytest.approx(aux_dense[0], rel=1e-6)
    assert sum(out["loss"]) == pytest.approx(sum(ref_out["loss"]), rel=1e-5)  # coef x aux included on both
    print(f"verl engine: max grad rel err {max(errs.values()):.2e}, aux {aux_reuse[0]:.6f} vs {aux_dense[0]:.6f}")

    # one optimizer step through the worker's own train_mini_batch
    before = params_of(dense)
    metrics = {}
    for name, worker in (("dense", dense), ("reuse", reuse)):
        worker.set_loss_fn(loss_fn)
        metrics[name] = tu.get(worker.train_mini_batch(vs.make_batch(VERL_GROUPS, seed=2)), "metrics")
    after = {
        name: {n: p.full_tensor().detach() for n, p in w.engine.module.named_parameters()}
        for name, w in (("dense", dense), ("reuse", reuse))
    }
    assert metrics["reuse"]["prefix_reuse/groups"] == [2.0] and "prefix_reuse/groups" not in metrics["dense"]
    assert metrics["reuse"]["prefix_reuse/verify_max_grad_rel_diff"][0] <= 2e-5  # verify runs the dense path too
    assert metrics["reuse"]["grad_norm"] == pytest.approx(metrics["dense"]["grad_norm"], rel=1e-5)
    for n, p0 in before.items():
        assert not torch.equal(after["dense"][n], p0), n
        diff = (after["reuse"][n] - after["dense"][n]).abs()
        # AdamW's first update is lr * g / (|g| + eps): where |g| is within fp32 rounding of zero its
        # sign is rounding; where the gradient is clearly non-zero it must agree (gradients: above)
        clear = ref[n].abs() > 1e-3 * ref[n].abs().max()
        assert diff[clear].max() <= 1e-6, n
