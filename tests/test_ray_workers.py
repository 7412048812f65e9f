"""A local Ray cluster (2 CPU workers) driving verl-prefix's worker groups end to end:
update_actor, compute_log_prob, compute_ref_log_prob and a critic update, with the
prefix-reuse metrics arriving at the driver.

Real parts: Ray, verl's RayWorkerGroup / RayResourcePool / dispatch, verl-prefix's workers and
engines, FSDP2 over gloo across the two worker processes, the hydra config. CPU-only stand-ins
(see verl_cpu_platform.py): verl's CPU platform, SDPA for value models.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import pytest
import torch
import verl_support as vs

vs.install_cpu_platform()

import ray  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402
from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.config import omega_conf_to_dataclass  # noqa: E402
from verl.workers.config.engine import TrainingWorkerConfig  # noqa: E402
from verl.workers.utils.losses import value_loss  # noqa: E402

from verl_prefix.backend.workers import PrefixReuseActorRolloutRefWorker, PrefixReuseTrainingWorker  # noqa: E402

GROUPS = [(20, [3, 7, 2, 5]), (14, [4, 1, 6, 2])]
FP32 = "{param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}"


def critic_config(model_dir: str):
    overrides = [
        f"critic.model.path={model_dir}",
        f"critic.model.tokenizer_path={model_dir}",
        "critic.model.use_remove_padding=true",
        "critic.model.enable_gradient_checkpointing=false",
        "+critic.model.override_config.attn_implementation=sdpa",
        "critic.strategy=fsdp2",
        f"+critic.fsdp.mixed_precision={FP32}",
        "critic.fsdp.model_dtype=fp32",
        "critic.fsdp.use_torch_compile=false",
        "critic.ppo_mini_batch_size=2",
        "critic.rollout_n=4",
        "critic.use_dynamic_bsz=true",
        "critic.ppo_max_token_len_per_gpu=64",
        "critic.prefix_reuse.enable=true",
    ]
    with initialize_config_module(config_module="verl_prefix.configs", version_base=None):
        return compose(config_name="prefix_reuse_ppo", overrides=overrides).critic


def worker_config(model_dir: str):
    overrides = [
        f"actor_rollout_ref.model.path={model_dir}",
        "actor_rollout_ref.model.use_remove_padding=true",
        "actor_rollout_ref.model.enable_gradient_checkpointing=false",
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "actor_rollout_ref.rollout.n=4",
        "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=true",
        "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=64",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "actor_rollout_ref.actor.use_dynamic_bsz=true",
        "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=64",
        "actor_rollout_ref.actor.use_torch_compile=false",
        "actor_rollout_ref.actor.prefix_reuse.enable=true",
        "actor_rollout_ref.ref.log_prob_use_dynamic_bsz=true",
        "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=64",
    ]
    for role in ("actor", "ref"):
        overrides += [
            f"actor_rollout_ref.{role}.strategy=fsdp2",
            f"+actor_rollout_ref.{role}.fsdp_config.mixed_precision={FP32}",
            f"actor_rollout_ref.{role}.fsdp_config.model_dtype=fp32",
        ]
    with initialize_config_module(config_module="verl_prefix.configs", version_base=None):
        return compose(config_name="prefix_reuse_ppo", overrides=overrides).actor_rollout_ref


@pytest.fixture(scope="module")
def ray_cluster():
    tests_dir = str(Path(__file__).parent)
    env = {
        "PYTHONPATH": os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")]),
        "VERL_USE_EXTERNAL_MODULES": "verl_cpu_platform",
        "VERL_ENGINE_DEVICE": "cuda",
        "VERL_ENGINE_VENDOR": "nvidia",
        "RAY_AUTH_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
    }
    # Logical CPUs: actor, ref and critic groups each place 2 one-CPU workers on this 2-core box.
    ray.init(num_cpus=6, runtime_env={"env_vars": env}, include_dashboard=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


def worker_group(cls, **init_kwargs) -> RayWorkerGroup:
    # verl's default pool asks 10 CPUs per worker; one worker per CPU here.
    pool = RayResourcePool(process_on_nodes=[2], use_gpu=False, max_colocate_count=1)
    return RayWorkerGroup(pool, RayClassWithInitArgs(cls=ray.remote(cls), **init_kwargs))


def response_part(full, data):
    """Response log-probs from verl's full-length rows (value at t-1 predicts token t)."""
    lengths = data["responses"].offsets().diff().tolist()
    return [full[i][-n - 1 : -1] for i, n in enumerate(lengths)]


def test_actor_ref_and_critic_through_ray(ray_cluster, tmp_path):
    actor_dir = vs.save_tiny_qwen3(str(tmp_path / "actor"))
    cfg = worker_config(actor_dir)

    actor = worker_group(PrefixReuseActorRolloutRefWorker, config=cfg, role="actor")
    actor.init_model()
    ref = worker_group(PrefixReuseActorRolloutRefWorker, config=cfg, role="ref")
    ref.init_model()

    def log_prob_batch():
        data = vs.make_batch(GROUPS, calculate_entropy=True)
        tu.assign_non_tensor(data, compute_loss=False)
        return data

    data = log_prob_batch()
    old = response_part(tu.get(actor.compute_log_prob(data), "log_probs"), data)
    ref_lp = response_part(tu.get(ref.compute_ref_log_prob(log_prob_batch()), "log_probs"), data)
    # same initial weights: the actor's old log-probs equal the reference's, and a local dense pass
    from transformers import AutoModelForCausalLM

    dense_model = AutoModelForCausalLM.from_pretrained(actor_dir, attn_implementation="sdpa")
    with torch.no_grad():
        for i, row in enumerate(data["input_ids"].unbind()):
            n = len(old[i])
            logits = dense_model(input_ids=row[None]).logits[0, -n - 1 : -1]
            dense = torch.log_softmax(logits, -1).gather(-1, row[-n:, None])[:, 0]
            torch.testing.assert_close(old[i], dense, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ref_lp[i], dense, rtol=1e-5, atol=1e-5)

    metrics = tu.get(actor.update_actor(vs.make_batch(GROUPS)), "metrics")
    assert metrics["prefix_reuse/groups"] == [1.0, 1.0]  # one whole group on each of the 2 ranks
    assert metrics["prefix_reuse/prefix_tokens"] == [20.0, 14.0]  # each group's whole prompt
    assert metrics["prefix_reuse/fallbacks"] == [0.0, 0.0]
    assert len(metrics["actor/pg_loss"]) >= 1
    for name in ("groups", "dense_tokens", "flop_bound", "phase_A_seconds", "phase_C_peak_memory_gb"):
        assert "prefix_reuse/" + name in metrics

    # The critic as verl's V1 trainer builds it: hydra config -> critic dataclass -> TrainingWorker.
    critic_dir = vs.save_tiny_qwen3(str(tmp_path / "critic"), seed=1, value_model=True)
    critic_cfg = omega_conf_to_dataclass(critic_config(critic_dir))
    assert critic_cfg.engine.prefix_reuse.enable
    critic_cfg.engine.infer_max_token_len_per_gpu = critic_cfg.ppo_infer_max_token_len_per_gpu
    critic_cfg.engine.max_token_len_per_gpu = critic_cfg.ppo_infer_max_token_len_per_gpu
    worker_cfg = TrainingWorkerConfig(
        model_type="value_model",
        model_config=critic_cfg.model,
        engine_config=critic_cfg.engine,
        optimizer_config=critic_cfg.optim,
        checkpoint_config=critic_cfg.checkpoint,
    )
    critic = worker_group(PrefixReuseTrainingWorker, config=worker_cfg)
    critic.reset()
    critic.set_loss_fn(partial(value_loss, config=critic_cfg))
    data = vs.make_batch(GROUPS, critic=True)
    tu.assign_non_tensor(data, compute_loss=False)
    values = response_part(tu.get(critic.infer_batch(data).get(), "values"), data)  # non-blocking: a future
    assert [len(v) for v in values] == data["responses"].offsets().diff().tolist()
    metrics = tu.get(critic.train_mini_batch(vs.make_batch(GROUPS, critic=True)).get(), "metrics")
    assert metrics["prefix_reuse/groups"] == [1.0, 1.0]
    assert "critic/vf_loss" in metrics
