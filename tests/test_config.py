"""The hydra config: verl's ppo_trainer plus the prefix_reuse switch, instantiated by verl's own path."""

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from verl.utils.config import omega_conf_to_dataclass

from verl_prefix.backend.config import PrefixReuseFSDPActorConfig, PrefixReuseFSDPCriticConfig, PrefixReuseSettings


def compose_config(overrides):
    with initialize_config_module(config_module="verl_prefix.configs", version_base=None):
        return compose(config_name="prefix_reuse_ppo", overrides=overrides)


def test_cli_prints_config_with_switch():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "verl_prefix.main_ppo",
            "--cfg",
            "job",
            "actor_rollout_ref.actor.prefix_reuse.enable=true",
            "actor_rollout_ref.actor.strategy=fsdp2",
            "actor_rollout_ref.ref.strategy=fsdp2",
            "critic.prefix_reuse.prefix_activations=offload",
            "actor_rollout_ref.rollout.n=8",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    cfg = OmegaConf.create(out)
    assert cfg.actor_rollout_ref.actor.prefix_reuse.enable is True
    assert cfg.critic.prefix_reuse.prefix_activations == "offload"
    assert cfg.trainer.v1.trainer_mode == "prefix_reuse"
    assert cfg.actor_rollout_ref.rollout.n == 8  # verl's own overrides still apply


@pytest.mark.parametrize(
    "overrides,named",
    [
        (["actor_rollout_ref.actor.prefix_reuse.attention=xformers"], "prefix_reuse.attention='xformers'"),
        (["actor_rollout_ref.actor.prefix_reuse.enable=true"], "needs actor_rollout_ref.actor.strategy=fsdp2"),
    ],
)
def test_cli_printing_the_config_checks_the_prefix_reuse_blocks(overrides, named):
    """`--cfg job` never calls main: the blocks are checked before hydra prints them."""
    proc = subprocess.run(
        [sys.executable, "-m", "verl_prefix.main_ppo", "--cfg", "job", *overrides], capture_output=True, text=True
    )
    assert proc.returncode == 2 and proc.stdout == ""
    last = proc.stderr.strip().splitlines()[-1]  # (verl's import warnings come before it)
    assert last.startswith("verl_prefix.main_ppo: error:") and named in last


def test_actor_and_critic_configs_instantiate_with_settings_on_engine(tmp_path):
    import verl_support

    model_dir = verl_support.save_tiny_qwen3(str(tmp_path), value_model=True)
    cfg = compose_config(
        [
            "actor_rollout_ref.actor.prefix_reuse.enable=true",
            "actor_rollout_ref.actor.prefix_reuse.attention=flex",
            "actor_rollout_ref.actor.strategy=fsdp2",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
            "actor_rollout_ref.actor.rollout_n=4",
            "critic.prefix_reuse.enable=true",
            "critic.strategy=fsdp2",
            "critic.ppo_micro_batch_size_per_gpu=2",
            f"critic.model.path={model_dir}",
            f"critic.model.tokenizer_path={model_dir}",
        ]
    )
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert isinstance(actor, PrefixReuseFSDPActorConfig)
    assert actor.prefix_reuse == PrefixReuseSettings(enable=True, attention="flex")
    assert actor.engine.prefix_reuse is actor.prefix_reuse  # what the engine reads
    critic = omega_conf_to_dataclass(cfg.critic)
    assert isinstance(critic, PrefixReuseFSDPCriticConfig)
    assert critic.engine.prefix_reuse.enable


def test_switch_off_by_default():
    cfg = compose_config(
        ["actor_rollout_ref.actor.rollout_n=2", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2"]
    )
    assert not omega_conf_to_dataclass(cfg.actor_rollout_ref.actor).prefix_reuse.enable


@pytest.mark.parametrize(
    "override,match",
    [
        ("actor_rollout_ref.actor.prefix_reuse.attention=xformers", "prefix_reuse.attention='xformers'"),
        ("actor_rollout_ref.actor.prefix_reuse.prefix_activations=disk", "prefix_reuse.prefix_activations='disk'"),
        ("actor_rollout_ref.actor.prefix_reuse.verify_every=-1", "verify_every=-1"),
        ("+actor_rollout_ref.actor.prefix_reuse.enabled=true", r"unknown actor_rollout_ref.actor.prefix_reuse keys"),
        (
            "actor_rollout_ref.actor.prefix_reuse.enable=true",
            r"needs actor_rollout_ref.actor.strategy=fsdp2 \(got 'fsdp'",
        ),
    ],
)
def test_bad_settings_name_the_field(override, match):
    cfg = compose_config(
        [override, "actor_rollout_ref.actor.rollout_n=2", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2"]
    )
    with pytest.raises(Exception, match=match):
        omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)


@pytest.mark.parametrize("recipe", ["recipes/grpo_qwen3_8b.sh", "recipes/ppo_llama3_8b.sh"])
@pytest.mark.parametrize("reuse", ["true", "false"])
def test_recipes_compose(recipe, reuse, tmp_path):
    """Every override in the recipes is a real verl/verl-prefix key (hydra rejects unknown ones)."""
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "REUSE": reuse, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(
        ["bash", str(root / recipe), "--cfg", "job"], capture_output=True, text=True, check=True, env=env, cwd=tmp_path
    ).stdout
    cfg = OmegaConf.create(out)
    assert cfg.actor_rollout_ref.actor.prefix_reuse.enable is (reuse == "true")
    assert cfg.actor_rollout_ref.rollout.name == "vllm"
