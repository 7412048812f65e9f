"""Faults at the verl engine level: a mini-batch the schedule cannot take runs dense (logged and
counted), and checkpoint save/resume with reuse on gives the same run as with reuse off.

Real parts: verl 0.9.1 TrainingWorker and FSDP engines, FSDP2 over gloo, verl's checkpoint
manager, ppo_loss. CPU-only stand-in: verl_support's CPU platform (verl has none).
"""

from __future__ import annotations

import logging

import pytest
import torch
import verl_support as vs
from dense_reference import rel_err
from test_verl_engine import actor_loss, engine_kwargs, grads_of, params_of

vs.install_cpu_platform()
vs.init_process_group()

from verl.utils import tensordict_utils as tu  # noqa: E402

GROUPS = [(20, [3, 7, 2, 5]), (14, [4, 1, 6])]


def batch_with_an_empty_response():
    """GROUPS plus one row of group 0 whose response has no tokens."""
    (p0, r0), group1 = GROUPS
    return vs.make_batch([(p0, [*r0, 0]), group1])


def test_empty_response_runs_dense_and_is_counted(tmp_path, caplog):
    model_dir = vs.save_tiny_qwen3(str(tmp_path / "actor"))
    stock = vs.build_worker(model_dir, reuse=False, **engine_kwargs(True))
    reuse = vs.build_worker(model_dir, reuse=True, **engine_kwargs(True))
    loss_fn = actor_loss()
    ref_grads, _ = grads_of(stock, batch_with_an_empty_response(), loss_fn)
    with caplog.at_level(logging.WARNING):
        grads, out = grads_of(reuse, batch_with_an_empty_response(), loss_fn)
        grads_of(reuse, batch_with_an_empty_response(), loss_fn)
    assert out["metrics"]["prefix_reuse/fallbacks"] == [1.0]
    warnings = [r.getMessage() for r in caplog.records if "empty prompt or response" in r.getMessage()]
    assert len(warnings) == 1  # once per engine, not per batch
    for name, ref in ref_grads.items():
        assert torch.equal(grads[name], ref), name  # the stock path itself: bit-identical


def test_checkpoint_save_and_resume_matches_reuse_off(tmp_path):
    """Two steps with a save/load between them, reuse on vs off: same parameters at the end."""
    model_dir = vs.save_tiny_qwen3(str(tmp_path / "actor"))
    loss_fn = actor_loss()
    ckpt = str(tmp_path / "ckpt")
    first = vs.build_worker(model_dir, reuse=True, **engine_kwargs(True))
    first.set_loss_fn(loss_fn)
    first.train_mini_batch(vs.make_batch(GROUPS, seed=1))
    saved = params_of(first)
    first.save_checkpoint(ckpt, global_step=1)

    # the reuse run's checkpoint resumes into the reuse engine and into the stock engine
    resumed = {reuse: vs.build_worker(model_dir, reuse=reuse, **engine_kwargs(True)) for reuse in (False, True)}
    for reuse, worker in resumed.items():
        worker.load_checkpoint(ckpt)
        for name, value in params_of(worker).items():
            assert torch.equal(value, saved[name]), f"reuse={reuse}: {name} not restored"
    # the next mini-batch: gradients before the optimizer step, then the step itself
    ref_grads, _ = grads_of(resumed[False], vs.make_batch(GROUPS, seed=2), loss_fn)
    grads, out = grads_of(resumed[True], vs.make_batch(GROUPS, seed=2), loss_fn)
    assert out["metrics"]["prefix_reuse/groups"] == [2.0]  # the resumed engine still reuses
    for name, ref in ref_grads.items():
        assert rel_err(grads[name], ref) <= 2e-5, name
    metrics = {}
    for reuse, worker in resumed.items():
        worker.set_loss_fn(loss_fn)
        metrics[reuse] = tu.get(worker.train_mini_batch(vs.make_batch(GROUPS, seed=2)), "metrics")
    # the restored optimizer state steps both engines alike: same grad norm, same update wherever
    # the gradient is clearly non-zero (elsewhere Adam's g / (|g| + eps) takes rounding's sign)
    assert metrics[True]["grad_norm"] == pytest.approx(metrics[False]["grad_norm"], rel=1e-5)
    after = {reuse: params_of(worker) for reuse, worker in resumed.items()}
    for name, ref in ref_grads.items():
        clear = ref.abs() > 1e-3 * ref.abs().max()
        assert (after[True][name] - after[False][name]).abs()[clear].max() <= 1e-6, name


def test_unsupported_settings_name_their_reason(tmp_path):
    """The dense-fallback triggers that cannot run end to end here (verl builds padded input_ids only
    with pad_mode != no_padding, which its own engine refuses; position ids other than 0..len-1 per
    row come from multi-dimensional RoPE or custom datasets): the check on the real engine and real
    batch names each one, and a clean batch passes."""
    from verl_prefix.backend.engine import unsupported_reason

    reuse = vs.build_worker(vs.save_tiny_qwen3(str(tmp_path / "actor")), reuse=True, **engine_kwargs(True))
    data = vs.rows_tensordict(*_clean_rows(), {})
    assert unsupported_reason(reuse.engine, data) is None
    padded = data.clone()
    padded["input_ids"] = data["input_ids"].to_padded_tensor(0)
    assert unsupported_reason(reuse.engine, padded) == "padded input_ids (pad_mode != no_padding)"
    shifted = data.clone()
    shifted["position_ids"] = vs.nested([torch.arange(len(r)) + 3 for r in data["input_ids"].unbind()])
    assert unsupported_reason(reuse.engine, shifted).startswith("position_ids that are not 0..len-1")
    tu.assign_non_tensor(data, use_fused_kernels=True)
    assert unsupported_reason(reuse.engine, data) == "use_fused_kernels"


def _clean_rows():
    gen = torch.Generator().manual_seed(1)
    prompts, responses, uids = [], [], []
    for g, (prompt_len, lengths) in enumerate(GROUPS):
        prompt = torch.randint(0, vs.VOCAB - 3, (prompt_len,), generator=gen)
        for n in lengths:
            prompts.append(prompt)
            responses.append(torch.randint(0, vs.VOCAB - 3, (n,), generator=gen))
            uids.append(f"uid-{g}")
    return prompts, responses, uids
