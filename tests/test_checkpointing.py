"""Gradient checkpointing (verl's default) against plain dense training, fp64.

Every prefix_activations mode x use_reentrant True/False x Llama/Qwen2/Qwen3/Qwen3-MoE: log-probs and
every parameter gradient equal dense training without checkpointing (the same math, recomputed).
"""

from __future__ import annotations

import pytest
import torch
from dense_reference import dense_grads, dense_moe_grads, make_batch, rel_err
from tiny_models import CONFIGS, build

from verl_prefix.core import PrefixReuseConfig, compute_log_probs, forward_backward

FP64_TOL = 1e-10
# two groups spanning several micro-batches and prefix chunks, a dense row, ragged responses
GROUPS = [(4, 14, [3, 5, 2, 4]), (3, 11, [2, 6, 1]), (1, 9, [3])]
BUDGET = 20


def _checkpointed(model: torch.nn.Module, use_reentrant: bool) -> torch.nn.Module:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert all(getattr(m, "gradient_checkpointing", True) for m in model.model.layers)
    return model


def _reuse_grads(model, batch, config):
    model.zero_grad(set_to_none=True)
    seen: dict[int, torch.Tensor] = {}
    forward_backward(model, batch.input_ids, batch.response_start, batch.group_ids, batch.loss_fn(seen), config)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads, [seen[i] for i in range(len(batch.input_ids))]


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("mode", ["keep", "offload", "recompute"])
@pytest.mark.parametrize("kind", CONFIGS)
def test_checkpointed_matches_dense(kind, mode, use_reentrant):
    batch = make_batch(GROUPS, seed=5)
    model = build(kind, torch.float64)
    ref_grads, ref_lps = dense_grads(model, batch)  # checkpointing off
    _checkpointed(model, use_reentrant)
    config = PrefixReuseConfig(max_tokens_per_micro_batch=BUDGET, prefix_activations=mode)
    grads, lps = _reuse_grads(model, batch, config)
    for i, (a, b) in enumerate(zip(lps, ref_lps, strict=True)):
        assert rel_err(a, b) <= FP64_TOL, f"log-probs of row {i}"
    for name, ref in ref_grads.items():
        assert ref.abs().max() > 0, name
        assert rel_err(grads[name], ref) <= FP64_TOL, f"grad {name}: {rel_err(grads[name], ref)}"
    # and the forward-only pass of the same (checkpointed, train-mode) model
    lps = compute_log_probs(model, batch.input_ids, batch.response_start, batch.group_ids)
    for a, b in zip(lps, ref_lps, strict=True):
        assert rel_err(a, b) <= FP64_TOL


def test_checkpointed_moe_router_aux_loss_matches_dense():
    """Router logits of the prefix leave checkpointed layers with a graph (non-reentrant)."""
    batch = make_batch(GROUPS, seed=6)
    model = build("qwen3_moe", torch.float64)
    config = PrefixReuseConfig(max_tokens_per_micro_batch=None, router_aux_loss=True, router_aux_loss_coef=0.1)
    ref_grads, ref_aux = dense_moe_grads(model, batch, [tuple(range(len(batch.input_ids)))], 0.1)
    _checkpointed(model, use_reentrant=False)
    model.zero_grad(set_to_none=True)
    stats = forward_backward(model, batch.input_ids, batch.response_start, batch.group_ids, batch.loss_fn(), config)
    assert stats.router_aux_losses == pytest.approx(ref_aux, rel=1e-12)
    for name, ref in ref_grads.items():
        assert rel_err(model.get_parameter(name).grad, ref) <= FP64_TOL, name


def test_router_aux_loss_refuses_reentrant_checkpointing():
    batch = make_batch(GROUPS, seed=6)
    model = _checkpointed(build("qwen3_moe", torch.float64), use_reentrant=True)
    config = PrefixReuseConfig(router_aux_loss=True, router_aux_loss_coef=0.1)
    with pytest.raises(ValueError, match="use_reentrant"):
        forward_backward(model, batch.input_ids, batch.response_start, batch.group_ids, batch.loss_fn(), config)


@pytest.mark.parametrize("checkpointing", [None, "non_reentrant", "reentrant"])
@pytest.mark.parametrize("mode", ["keep", "offload", "recompute"])
def test_attention_dropout_masks_are_replayed(mode, checkpointing):
    """With attention dropout, every activation mode and checkpointing setting draws and replays the
    same masks: Phase C's recompute restores Phase A's RNG state, and checkpoint recomputes restore
    theirs. Dense training draws its masks in another layout, so the reference is the schedule
    itself in `keep` mode without checkpointing, where forward and backward share one graph."""
    batch = make_batch(GROUPS, seed=8)
    model = build("qwen3", torch.float64, attention_dropout=0.3)
    config = PrefixReuseConfig(max_tokens_per_micro_batch=BUDGET)

    def grads(config, checkpointing):
        if checkpointing is not None:
            _checkpointed(model, use_reentrant=checkpointing == "reentrant")
        torch.manual_seed(123)
        try:
            return _reuse_grads(model, batch, config)[0]
        finally:
            model.gradient_checkpointing_disable()

    ref = grads(config, None)
    no_dropout, _ = dense_grads(build("qwen3", torch.float64), batch)
    assert max(rel_err(ref[n], g) for n, g in no_dropout.items()) > 1e-2  # dropout is really on
    config.prefix_activations = mode
    for name, g in grads(config, checkpointing).items():
        assert rel_err(g, ref[name]) <= FP64_TOL, name
