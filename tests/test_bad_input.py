"""The bad-input catalogue of docs/troubleshooting.md, at the core and config level.

Each entry either behaves exactly as dense training does, or fails with an error that names the
setting and the fix. (Engine-level entries — empty responses inside a verl mini-batch, checkpoint
save and resume — are in test_verl_engine.py.)
"""

from __future__ import annotations

import pytest
import torch
from dense_reference import VOCAB, Batch, dense_grads, make_batch, rel_err
from hydra import compose, initialize_config_module
from tiny_models import build

from verl_prefix.backend import preflight as preflight_module
from verl_prefix.backend.preflight import preflight
from verl_prefix.core import PrefixReuseConfig, forward_backward


def reuse_grads(model, batch: Batch, config: PrefixReuseConfig | None = None) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    forward_backward(model, batch.input_ids, batch.response_start, batch.group_ids, batch.loss_fn(), config)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.fixture(scope="module")
def model():
    return build("qwen3", torch.float64)


# -- inputs that must behave exactly as dense ---------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("mode", ["keep", "recompute"])
def test_non_finite_advantages_propagate_as_in_dense(model, bad, mode):
    batch = make_batch([(4, 12, [3, 2, 4, 1]), (2, 9, [2, 3])], seed=1)
    # the first response token of row 1 of group 0: its logit is the group's shared read-out
    batch.weights[1][0] = bad
    ref, _ = dense_grads(model, batch)
    got = reuse_grads(model, batch, PrefixReuseConfig(max_tokens_per_micro_batch=8, prefix_activations=mode))
    for name in ref:
        # every tensor dense poisons is poisoned, nowhere else; dense also marks the embeddings of row 1's
        # later tokens, reached only through masked attention weights (0 x NaN in the math backward)
        assert bool(ref[name].isnan().any()) == bool(got[name].isnan().any()), f"NaN in {name}"
        assert not (got[name].isnan() & ~ref[name].isnan()).any(), f"NaN where dense has none, {name}"
        assert torch.equal(ref[name].isinf(), got[name].isinf()), f"inf pattern of {name}"
        finite = ref[name].isfinite() & got[name].isfinite()
        if finite.any():
            assert rel_err(got[name][finite], ref[name][finite]) < 1e-10, name
    assert any(ref[n].isnan().any() for n in ref)  # the case is not vacuous


def test_pad_tokens_inside_rows_are_ordinary_tokens(model):
    pad = 0
    batch = make_batch([(3, 10, [4, 2, 5])], seed=2)
    for i, row in enumerate(batch.input_ids):
        row[2:4] = pad  # inside the shared prompt
        row[-1] = pad  # inside the response
        batch.input_ids[i] = row
    ref, _ = dense_grads(model, batch)
    got = reuse_grads(model, batch)
    assert max(rel_err(got[n], ref[n]) for n in ref) < 1e-10


def test_uid_group_with_different_prompts_shares_only_the_common_tokens(model):
    batch = make_batch([(4, 16, [3, 5, 2, 4])], seed=3, diverge_at={0: 5})
    ref, _ = dense_grads(model, batch)
    stats = forward_backward(model, batch.input_ids, batch.response_start, batch.group_ids, batch.loss_fn())
    got = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    assert max(rel_err(got[n], ref[n]) for n in ref) < 1e-10
    assert stats.prefix_tokens <= 5  # only the tokens all four prompts share


def test_prompt_longer_than_the_budget_runs_alone_in_its_chunk(model):
    batch = make_batch([(3, 40, [2, 3, 2]), (2, 6, [2, 2])], seed=4)
    ref, _ = dense_grads(model, batch)
    config = PrefixReuseConfig(max_tokens_per_micro_batch=16)  # < the 39-token prefix
    assert max(rel_err(a, ref[n]) for n, a in reuse_grads(model, batch, config).items()) < 1e-10


# -- inputs that must fail with the setting and the fix -----------------------------------------


def test_suffix_longer_than_the_budget_names_the_setting(model):
    batch = make_batch([(2, 6, [20, 3])], seed=5)
    with pytest.raises(ValueError, match="raise max_tokens_per_micro_batch to at least"):
        reuse_grads(model, batch, PrefixReuseConfig(max_tokens_per_micro_batch=8))


def test_zero_length_response_names_response_start(model):
    row = torch.randint(0, VOCAB, (8,))
    with pytest.raises(ValueError, match=r"response_start\[0\]=8 must be an int in \[1, 7\]"):
        forward_backward(model, [row], [8], ["u"], lambda i, lp: lp[0].sum())


# -- config preflight ----------------------------------------------------------------------------


REUSE_ACTOR = (
    "actor_rollout_ref.actor.prefix_reuse.enable=true",
    "actor_rollout_ref.actor.strategy=fsdp2",
    "actor_rollout_ref.ref.strategy=fsdp2",
)


def compose_config(*overrides: str):
    with initialize_config_module(config_module="verl_prefix.configs", version_base=None):
        return compose(config_name="prefix_reuse_ppo", overrides=list(overrides))


def test_vllm_missing_names_the_rollout_setting(monkeypatch):
    monkeypatch.setattr(preflight_module, "_installed", lambda m: m != "vllm")
    config = compose_config("actor_rollout_ref.rollout.name=vllm")
    with pytest.raises(ValueError, match="rollout.name=vllm but vLLM is not installed"):
        preflight(config)


def test_flash_attn_missing_names_the_attention_setting(monkeypatch):
    monkeypatch.setattr(preflight_module, "_installed", lambda m: m != "flash_attn")
    config = compose_config(
        "actor_rollout_ref.rollout.name=sglang",
        "actor_rollout_ref.actor.prefix_reuse.enable=true",
        "actor_rollout_ref.actor.strategy=fsdp2",
        "actor_rollout_ref.ref.strategy=fsdp2",
        "actor_rollout_ref.actor.prefix_reuse.attention=flash_attn",
    )
    with pytest.raises(ValueError, match=r"actor_rollout_ref.actor.prefix_reuse.attention=flash_attn but flash-attn"):
        preflight(config)


def test_reuse_on_for_the_actor_but_off_for_the_critic_warns(monkeypatch):
    monkeypatch.setattr(preflight_module, "_installed", lambda m: True)
    config = compose_config("algorithm.adv_estimator=gae", *REUSE_ACTOR)
    (line,) = preflight(config)
    assert "critic.prefix_reuse.enable=false" in line and "set critic.prefix_reuse.enable=true" in line
    # GRPO has no critic: nothing to warn about
    config = compose_config("algorithm.adv_estimator=grpo", *REUSE_ACTOR)
    assert preflight(config) == []
    both = compose_config(
        "algorithm.adv_estimator=gae", *REUSE_ACTOR, "critic.prefix_reuse.enable=true", "critic.strategy=fsdp2"
    )
    assert preflight(both) == []


@pytest.mark.parametrize("role", ["actor_rollout_ref.actor", "actor_rollout_ref.ref", "critic"])
def test_fsdp1_is_refused_with_the_fix(monkeypatch, role):
    """verl's default strategy is fsdp (FSDP1); the reuse engines are built and tested on FSDP2."""
    monkeypatch.setattr(preflight_module, "_installed", lambda m: True)
    overrides = [
        *REUSE_ACTOR,
        "algorithm.adv_estimator=gae",
        "critic.prefix_reuse.enable=true",
        "critic.strategy=fsdp2",
    ]
    config = compose_config(*overrides, f"{role}.strategy=fsdp")
    with pytest.raises(ValueError, match=rf"needs {role}.strategy=fsdp2 \(got 'fsdp'.*set {role}.strategy=fsdp2"):
        preflight(config)
