"""MoE router aux loss with logical prefix-token accounting vs dense training (fp64, eager experts).

Dense reference: per micro-batch (the schedule's partition of rows), the rows with their full
prompts through the stock model, loss_fn + coef * transformers' load_balancing_loss_func.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from dense_reference import dense_grads, dense_moe_grads, make_batch, rel_err
from tiny_models import build

from verl_prefix.core import PrefixReuseConfig, forward_backward
from verl_prefix.core.plan import make_plan

COEF = 0.37
TOL = 1e-10
# group 0 (5 rows) spread over several micro-batches at budget 14, a group of one (a dense row),
# micro-batches that mix groups
GROUPS = [(5, 13, [3, 6, 2, 4, 5]), (1, 9, [4]), (3, 8, [2, 7, 3])]


def partition(batch, budget):
    """The schedule's suffix micro-batches, as row lists (what the dense reference batches)."""
    plan = make_plan(batch.input_ids, batch.response_start, batch.group_ids, budget, 1)
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
        spans = [sum(r in mb for mb in micro_batches for r in range(5)) for _ in [0]]
        assert len(micro_batches) >= 3 and spans == [5]
        assert len({mb_i for mb_i, mb in enumerate(micro_batches) for r in mb if r < 5}) >= 2  # group 0 is split
        assert any(min(mb) < 5 <= max(mb) for mb in micro_batches)  # a micro-batch mixes groups
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
    print(f"max aux rel err {aux_err:.2e}; max grad rel err {max(errs.values()):.2e} (gates {max(errs[n] for n in gates):.2e})")


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
    from verl.utils import tensordict_utils as tu
    from verl.workers.config import FSDPActorConfig
    from verl.workers.utils.losses import ppo_loss

    # one micro-batch per mini-batch on both paths: the per-micro-batch aux loss sees the same rows
    engine = dict(use_dynamic_bsz=True, max_token_len_per_gpu=256, infer_max_token_len_per_gpu=256)
    aux = {"router_aux_loss": True, "router_aux_loss_coef": 0.5}
    dense = vs.build_worker(
        vs.model_dir, reuse=True, prefix_reuse={"enable": False, **aux}, use_remove_padding=dense_remove_padding, **engine
    )
    reuse = vs.build_worker(vs.model_dir, reuse=True, prefix_reuse={"verify_every": 1, **aux}, **engine)
    loss_fn = partial(ppo_loss, config=FSDPActorConfig(strategy="fsdp2", rollout_n=4, ppo_mini_batch_size=2))
    before = {n: p.full_tensor().detach().clone() for n, p in dense.engine.module.named_parameters()}
    metrics = {}
    for name, worker in (("dense", dense), ("reuse", reuse)):
        worker.set_loss_fn(loss_fn)
        metrics[name] = tu.get(worker.train_mini_batch(vs.make_batch(VERL_GROUPS, seed=2)), "metrics")
    after = {
        name: {n: p.full_tensor().detach() for n, p in w.engine.module.named_parameters()}
        for name, w in (("dense", dense), ("reuse", reuse))
    }
    assert metrics["reuse"]["prefix_reuse/groups"] == [2.0] and "prefix_reuse/groups" not in metrics["dense"]
    dense_aux, reuse_aux = metrics["dense"]["prefix_reuse/router_aux_loss"], metrics["reuse"]["prefix_reuse/router_aux_loss"]
    assert dense_aux > 0.5 and reuse_aux == pytest.approx(dense_aux, rel=1e-6)
    assert metrics["reuse"]["loss"] == pytest.approx(metrics["dense"]["loss"], rel=1e-5)
    assert metrics["reuse"]["grad_norm"] == pytest.approx(metrics["dense"]["grad_norm"], rel=1e-5)
    assert metrics["reuse"]["prefix_reuse/verify_max_grad_rel_diff"][0] < 2e-5
    for n, p0 in before.items():
        assert not torch.equal(after["dense"][n], p0), n
        # AdamW's first step is ~lr * sign(g): compare where it moved, allowing fp32 rounding of tiny grads
        diff = (after["reuse"][n] - after["dense"][n]).abs()
        assert diff.max() <= 2e-3 and diff.median() <= 1e-7, (n, diff.max().item())
