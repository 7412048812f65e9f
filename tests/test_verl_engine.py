"""verl-prefix's engines against verl's stock FSDP engines: same mini-batch, same update.

Real parts: verl 0.9.1 TrainingWorker, FSDPEngineWithLMHead / FSDPEngineWithValueHead, FSDP2 over
gloo, verl's ppo_loss / value_loss, verl's TensorDict layout. CPU-only stand-in: verl_support's
CPU platform (verl has none). fp32 (verl's dtype table has no fp64).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import verl_support as vs
from dense_reference import rel_err

vs.install_cpu_platform()
vs.init_process_group()

from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import FSDPActorConfig, FSDPCriticConfig  # noqa: E402
from verl.workers.utils.losses import ppo_loss, value_loss  # noqa: E402

from verl_prefix.backend.engine import (  # noqa: E402
    PrefixReuseFSDPEngineWithLMHead,
    PrefixReuseFSDPEngineWithValueHead,
)

GROUPS = [(20, [3, 7, 2, 5]), (14, [4, 1, 6]), (9, [2])]  # a group of 1 runs dense
GRAD_TOL = 2e-5  # fp32 (the fp64 equivalence lives in test_equivalence.py)


@pytest.fixture(scope="module")
def actor_dir(tmp_path_factory):
    return vs.save_tiny_qwen3(str(tmp_path_factory.mktemp("actor")))


@pytest.fixture(scope="module")
def critic_dir(tmp_path_factory):
    return vs.save_tiny_qwen3(str(tmp_path_factory.mktemp("critic")), seed=1, value_model=True)


@pytest.fixture
def sdpa_value_models(monkeypatch):
    import verl.utils.model as verl_model

    monkeypatch.setattr(verl_model, "load_valuehead_model", verl_model.load_valuehead_model)  # restored after
    vs.load_value_models_with_sdpa()


def actor_loss(entropy_coeff=0.0):
    config = FSDPActorConfig(
        strategy="fsdp2",
        rollout_n=4,
        ppo_mini_batch_size=2,
        ppo_micro_batch_size_per_gpu=2,
        entropy_coeff=entropy_coeff,
    )
    return partial(ppo_loss, config=config)


def engine_kwargs(use_dynamic_bsz):
    return dict(
        use_dynamic_bsz=use_dynamic_bsz,
        max_token_len_per_gpu=48,
        infer_max_token_len_per_gpu=48,
        micro_batch_size_per_gpu=2,
        infer_micro_batch_size_per_gpu=2,
    )


def grads_of(worker, data, loss_fn):
    """One forward_backward_batch (no optimizer step) -> full gradients and the returned output."""
    engine = worker.engine
    for key, val in dict(
        use_remove_padding=worker.model_config.use_remove_padding,
        use_dynamic_bsz=worker.engine_config.use_dynamic_bsz,
        max_token_len_per_gpu=worker.engine_config.max_token_len_per_gpu,
        micro_batch_size_per_gpu=worker.engine_config.micro_batch_size_per_gpu,
        use_fused_kernels=False,
    ).items():
        tu.assign_non_tensor(data, **{key: val})
    with engine.train_mode():
        engine.optimizer_zero_grad()
        output = engine.forward_backward_batch(data, loss_fn, forward_only=False)
        grads = {n: p.grad.full_tensor().clone() for n, p in engine.module.named_parameters()}
        engine.optimizer_zero_grad()
    return grads, output


def params_of(worker):
    return {n: p.full_tensor().detach().clone() for n, p in worker.engine.module.named_parameters()}


@pytest.mark.parametrize("use_dynamic_bsz", [True, False])
@pytest.mark.parametrize("use_remove_padding", [True, False])
def test_actor_update_matches_stock(actor_dir, use_remove_padding, use_dynamic_bsz):
    kwargs = dict(use_remove_padding=use_remove_padding, **engine_kwargs(use_dynamic_bsz))
    stock = vs.build_worker(actor_dir, reuse=False, **kwargs)
    reuse = vs.build_worker(actor_dir, reuse=True, **kwargs)
    assert type(stock.engine).__name__ == "FSDPEngineWithLMHead"
    assert isinstance(reuse.engine, PrefixReuseFSDPEngineWithLMHead)
    loss_fn = actor_loss(entropy_coeff=0.01)

    # gradients of one mini-batch, entropy bonus included
    ref_grads, ref_out = grads_of(stock, vs.make_batch(GROUPS, calculate_entropy=True), loss_fn)
    grads, out = grads_of(reuse, vs.make_batch(GROUPS, calculate_entropy=True), loss_fn)
    for name, ref in ref_grads.items():
        assert ref.abs().max() > 0, name
        assert rel_err(grads[name], ref) <= GRAD_TOL, (name, rel_err(grads[name], ref))
    assert sum(out["loss"]) == pytest.approx(sum(ref_out["loss"]), rel=1e-5, abs=1e-7)
    assert out["metrics"]["prefix_reuse/groups"] == [2.0]
    assert out["metrics"]["prefix_reuse/dense_rows"] == [1.0]

    # one optimizer step through the worker's own train_mini_batch
    before = params_of(stock)
    stock.set_loss_fn(loss_fn)
    reuse.set_loss_fn(loss_fn)
    stock_metrics = tu.get(stock.train_mini_batch(vs.make_batch(GROUPS, calculate_entropy=True)), "metrics")
    reuse_metrics = tu.get(reuse.train_mini_batch(vs.make_batch(GROUPS, calculate_entropy=True)), "metrics")
    after_stock, after_reuse = params_of(stock), params_of(reuse)
    for name in before:
        assert not torch.equal(after_stock[name], before[name]), name
        diff = (after_reuse[name] - after_stock[name]).abs()
        # AdamW's first update is lr * g / (|g| + eps): where |g| is within fp32 rounding of zero
        # its sign is rounding; where the gradient is clearly non-zero the update must agree.
        # (The gradients themselves were compared above, before any optimizer step.)
        clear = ref_grads[name].abs() > 1e-3 * ref_grads[name].abs().max()
        assert diff[clear].max() <= 1e-6, name
    assert reuse_metrics["actor/pg_loss"] == pytest.approx(stock_metrics["actor/pg_loss"], rel=1e-4, abs=1e-7)
    assert reuse_metrics["grad_norm"] == pytest.approx(stock_metrics["grad_norm"], rel=1e-5)
    # each group's whole prompt once: its last token's logit is read by every row with its own label
    assert reuse_metrics["prefix_reuse/prefix_tokens"] == [20.0 + 14.0]


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])  # 0: greedy rollouts (verl clamps to 1e-8)
def test_log_probs_match_stock(actor_dir, temperature):
    kwargs = engine_kwargs(True)
    stock = vs.build_worker(actor_dir, reuse=False, **kwargs)
    reuse = vs.build_worker(actor_dir, reuse=True, **kwargs)

    def infer(worker):
        data = vs.make_batch(GROUPS, calculate_entropy=True, temperature=temperature)
        tu.assign_non_tensor(data, compute_loss=False)
        out = worker.infer_batch(data)
        return tu.get(out, "log_probs"), tu.get(out, "entropy")

    (ref_lp, ref_ent), (lp, ent) = infer(stock), infer(reuse)
    responses = vs.make_batch(GROUPS)["responses"].offsets().diff().tolist()
    for i, n in enumerate(responses):
        # the worker returns full-length rows; compare the response part verl reads
        a, b = lp[i][-n - 1 : -1], ref_lp[i][-n - 1 : -1]
        assert rel_err(a, b) <= 1e-5, i
        assert rel_err(ent[i][-n - 1 : -1], ref_ent[i][-n - 1 : -1]) <= 1e-5, i


def test_critic_matches_stock(critic_dir, sdpa_value_models):
    kwargs = engine_kwargs(True)
    stock = vs.build_worker(critic_dir, reuse=False, model_type="value_model", **kwargs)
    reuse = vs.build_worker(critic_dir, reuse=True, model_type="value_model", **kwargs)
    assert isinstance(reuse.engine, PrefixReuseFSDPEngineWithValueHead)
    loss_fn = partial(
        value_loss, config=FSDPCriticConfig(strategy="fsdp2", ppo_micro_batch_size_per_gpu=2, rollout_n=4)
    )
    ref_grads, ref_out = grads_of(stock, vs.make_batch(GROUPS, critic=True), loss_fn)
    grads, out = grads_of(reuse, vs.make_batch(GROUPS, critic=True), loss_fn)
    for name, ref in ref_grads.items():
        assert rel_err(grads[name], ref) <= GRAD_TOL, name
    assert sum(out["loss"]) == pytest.approx(sum(ref_out["loss"]), rel=1e-5)

    def values(worker):
        data = vs.make_batch(GROUPS, critic=True)
        tu.assign_non_tensor(data, compute_loss=False)
        return tu.get(worker.infer_batch(data), "values")

    ref_v, v = values(stock), values(reuse)
    responses = vs.make_batch(GROUPS)["responses"].offsets().diff().tolist()
    for i, n in enumerate(responses):
        assert rel_err(v[i][-n - 1 : -1], ref_v[i][-n - 1 : -1]) <= 1e-5, i


def test_verify_every_reports_dense_comparison(actor_dir):
    reuse = vs.build_worker(actor_dir, reuse=True, prefix_reuse={"verify_every": 1}, **engine_kwargs(True))
    reuse.set_loss_fn(actor_loss())
    metrics = tu.get(reuse.train_mini_batch(vs.make_batch(GROUPS)), "metrics")
    assert metrics["prefix_reuse/verify_max_grad_rel_diff"][0] < GRAD_TOL
    assert metrics["prefix_reuse/verify_speedup"][0] > 0


def test_reuse_off_is_stock(actor_dir):
    """With the switch off the reuse engine class takes verl's own path (no prefix_reuse metrics)."""
    worker = vs.build_worker(actor_dir, reuse=False, **engine_kwargs(True))
    worker.engine.__class__ = PrefixReuseFSDPEngineWithLMHead  # same object, reuse class, switch off
    worker.set_loss_fn(actor_loss())
    metrics = tu.get(worker.train_mini_batch(vs.make_batch(GROUPS)), "metrics")
    assert not any(k.startswith("prefix_reuse/") for k in metrics)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("mode", ["keep", "offload", "recompute"])
def test_prefix_activation_modes_under_fsdp2(actor_dir, mode, checkpointing):
    """Every activation mode, with verl's gradient checkpointing (non-reentrant) on and off, on both
    engines: gradients before the optimizer step equal the stock engine's."""
    kwargs = dict(engine_kwargs(True), enable_gradient_checkpointing=checkpointing)
    stock = vs.build_worker(actor_dir, reuse=False, **kwargs)
    reuse = vs.build_worker(actor_dir, reuse=True, prefix_reuse={"prefix_activations": mode}, **kwargs)
    assert all(layer.gradient_checkpointing == checkpointing for layer in reuse.engine.module.model.layers)
    ref_grads, _ = grads_of(stock, vs.make_batch(GROUPS), actor_loss())
    grads, _ = grads_of(reuse, vs.make_batch(GROUPS), actor_loss())
    for name, ref in ref_grads.items():
        assert rel_err(grads[name], ref) <= GRAD_TOL, name


def test_two_ranks_fsdp2_over_gloo(actor_dir, tmp_path):
    """dp=2, two groups per rank (verl's global token normalisation spans both ranks). Gradients
    after FSDP2's reduce-scatter equal the stock engine's."""
    import json

    import torch.multiprocessing as mp

    groups_per_rank = {0: [(18, [2, 5, 3]), (20, [3, 7])], 1: [(14, [4, 1]), (9, [2, 6])]}
    mp.spawn(vs.two_rank_grads, args=(vs.free_port(), actor_dir, str(tmp_path), groups_per_rank), nprocs=2, join=True)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["groups_rank0"] == [2.0]
    assert result["max_rel_err"] <= GRAD_TOL


# three uids whose prompts all open with one 24-token system prompt (only the questions differ); the
# responses of a uid open with the same 3 tokens (a tree rollout)
SYSTEM_PROMPT_GROUPS = [(5, [5, 7, 4, 6]), (6, [4, 5, 6]), (7, [3])]


def _system_prompt_batch(calculate_entropy: bool = False):
    return vs.make_batch(
        SYSTEM_PROMPT_GROUPS, seed=7, calculate_entropy=calculate_entropy, system_len=24, response_stem=3
    )


@pytest.mark.parametrize("checkpointing", [False, True])
def test_prefix_tree_matches_stock(actor_dir, checkpointing):
    """The prefix tree, found from the tokens with no switch: the system prompt runs once for all
    three uids, each question and its responses' common start once per uid (their log-probs read by
    every row); the update and the log-probs equal the stock engine's."""
    kwargs = dict(engine_kwargs(True), enable_gradient_checkpointing=checkpointing)
    stock = vs.build_worker(actor_dir, reuse=False, **kwargs)
    # every node of this small batch kept (the default leaves spans saving < 256 tokens to the rows)
    reuse = vs.build_worker(actor_dir, reuse=True, prefix_reuse={"min_node_saving": 0}, **kwargs)
    loss_fn = actor_loss(entropy_coeff=0.01)
    ref_grads, ref_out = grads_of(stock, _system_prompt_batch(True), loss_fn)
    grads, out = grads_of(reuse, _system_prompt_batch(True), loss_fn)
    for name, ref in ref_grads.items():
        assert rel_err(grads[name], ref) <= GRAD_TOL, (name, rel_err(grads[name], ref))
    assert sum(out["loss"]) == pytest.approx(sum(ref_out["loss"]), rel=1e-5, abs=1e-7)
    # the system prompt (24 tokens, all 8 rows), then uid-0's and uid-1's questions with their
    # responses' 3-token start; uid-2's single row reads the system prompt only
    assert out["metrics"]["prefix_reuse/groups"] == [3.0]
    assert out["metrics"]["prefix_reuse/prefix_tokens"] == [24.0 + 5 + 3 + 6 + 3]

    def infer(worker):
        data = _system_prompt_batch(True)
        tu.assign_non_tensor(data, compute_loss=False)
        out = worker.infer_batch(data)
        return tu.get(out, "log_probs"), tu.get(out, "entropy")

    (ref_lp, ref_ent), (lp, ent) = infer(stock), infer(reuse)
    for i, n in enumerate(_system_prompt_batch()["responses"].offsets().diff().tolist()):
        assert rel_err(lp[i][-n - 1 : -1], ref_lp[i][-n - 1 : -1]) <= 1e-5, i
        assert rel_err(ent[i][-n - 1 : -1], ref_ent[i][-n - 1 : -1]) <= 1e-5, i
