"""Checks of a composed `prefix_reuse_ppo` config before any Ray worker starts.

Errors name the setting and the fix; a legal but probably unintended combination is logged once
and returned as a warning line. Runs on the driver (no GPU needed).
"""

from __future__ import annotations

import importlib.util
import logging

from omegaconf import DictConfig, OmegaConf

from .config import as_settings, check_settings

logger = logging.getLogger(__name__)

ACTOR = "actor_rollout_ref.actor.prefix_reuse"
CRITIC = "critic.prefix_reuse"


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _settings(config: DictConfig, path: str) -> dict:
    block = OmegaConf.select(config, path, default=None)
    return dict(OmegaConf.to_container(block, resolve=True)) if block is not None else {}


def _uses_critic(config: DictConfig) -> bool:
    enable = OmegaConf.select(config, "critic.enable", default=None)
    if enable is not None:
        return bool(enable)
    return OmegaConf.select(config, "algorithm.adv_estimator", default="gae") == "gae"


def check_blocks(config: DictConfig) -> None:
    """The `prefix_reuse` blocks' values (as verl's config classes check them, enabled or not) and,
    where enabled, their roles' strategies. No environment checks."""
    for path in (ACTOR, CRITIC):
        settings = as_settings(_settings(config, path), path)
        # the reference policy runs on the actor's settings (verl_prefix.backend.workers)
        roles = ["actor_rollout_ref.actor", "actor_rollout_ref.ref"] if path == ACTOR else ["critic"]
        for role in roles:
            key = f"{role}.strategy"
            check_settings(settings, path, OmegaConf.select(config, key, default=None), key)


def preflight(config: DictConfig) -> list[str]:
    """Raise ValueError for settings that cannot run here; return (and log) warnings."""
    warnings: list[str] = []
    check_blocks(config)
    actor, critic = _settings(config, ACTOR), _settings(config, CRITIC)
    for path, block in ((ACTOR, actor), (CRITIC, critic)):
        wants_flash = block.get("enable", False) and block.get("attention", "sdpa") == "flash_attn"
        if wants_flash and not _installed("flash_attn"):
            raise ValueError(
                f"{path}.attention=flash_attn but flash-attn is not installed: "
                "pip install 'verl-prefix[gpu]', or set attention=flex (CUDA) or sdpa."
            )
    rollout = OmegaConf.select(config, "actor_rollout_ref.rollout.name", default=None)
    if rollout == "vllm" and not _installed("vllm"):
        raise ValueError(
            "actor_rollout_ref.rollout.name=vllm but vLLM is not installed: pip install 'verl-prefix[gpu]' "
            "(or verl's vllm extra; on a CPU machine scripts/install-cpu-demo.sh), or choose another rollout "
            "engine (e.g. rollout.name=sglang)."
        )
    if _uses_critic(config) and actor.get("enable", False) != critic.get("enable", False):
        on, off = (ACTOR, CRITIC) if actor.get("enable", False) else (CRITIC, ACTOR)
        warnings.append(
            f"{on}.enable=true but {off}.enable=false: that role runs dense (correct, but without the "
            f"speedup); set {off}.enable=true to reuse prefixes there too."
        )
    for line in warnings:
        logger.warning(line)
    return warnings
