"""The `prefix_reuse` block of verl's actor and critic configs.

verl instantiates `actor_rollout_ref.actor` and `critic` into dataclasses through `_target_`, and
unknown keys fail there, so the switch lives in subclasses of verl's FSDP actor/critic configs.
Each subclass attaches its settings to its engine config (`<config>.engine.prefix_reuse`), which
travels with the engine config to the worker that builds the engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from verl.base_config import BaseConfig
from verl.workers.config import FSDPActorConfig, FSDPCriticConfig

from ..core import PrefixReuseConfig

STRATEGIES = ("fsdp2",)  # verl strategies the reuse engines are built and tested for


@dataclass
class PrefixReuseSettings(BaseConfig):
    """`prefix_reuse.*` keys.

    enable: run update, log-prob and value passes through the shared-prefix schedule.
    attention / prefix_activations / min_prefix_tokens / prefix_tree / min_node_saving: as in
        `verl_prefix.core.PrefixReuseConfig` (prefix_tree: share every span several rows hold,
        found from the tokens across uids: a system prompt common to all groups, shared turns and
        response stems; false = one prefix per uid).
    verify_every: every k-th update also computes the dense gradient of the same mini-batch (no
        optimizer step from it) and reports `prefix_reuse/verify_max_grad_rel_diff` and
        `prefix_reuse/verify_speedup`; 0 = never.
    router_aux_loss / router_aux_loss_coef: actor only (MoE). Add coef x transformers'
        `load_balancing_loss_func` per micro-batch, prefix tokens counted once per trajectory (as in
        `PrefixReuseConfig`); coef null = the model config's `router_aux_loss_coef`. Stock verl adds
        none; with this on, this engine adds it on the reuse path and on its dense path
        (enable=false, a fallback, verify_every) alike. The loss is per micro-batch and non-linear,
        so the two paths agree exactly when their micro-batches hold the same rows (e.g. a
        mini-batch that fits one micro-batch); verl's dense micro-batches are balanced by sequence
        length, the schedule's pack suffixes in order. Metric `prefix_reuse/router_aux_loss`.
    """

    enable: bool = False
    attention: str = "auto"
    prefix_activations: str = "keep"
    min_prefix_tokens: int = 1
    prefix_tree: bool = True
    min_node_saving: int = 256
    verify_every: int = 0
    router_aux_loss: bool = False
    router_aux_loss_coef: float | None = None

    def __post_init__(self) -> None:
        check_settings(self, "prefix_reuse")

    def core_config(self, max_tokens_per_micro_batch: int | None) -> PrefixReuseConfig:
        return PrefixReuseConfig(
            max_tokens_per_micro_batch=max_tokens_per_micro_batch,
            attention=self.attention,
            prefix_activations=self.prefix_activations,
            min_prefix_tokens=self.min_prefix_tokens,
            prefix_tree=self.prefix_tree,
            min_node_saving=self.min_node_saving,
            router_aux_loss=self.router_aux_loss,
            router_aux_loss_coef=self.router_aux_loss_coef,
        )


def check_settings(values: Mapping, path: str, strategy: str | None = None, strategy_key: str | None = None) -> None:
    """Raise ValueError naming `path.<key>` and the fix for a bad `prefix_reuse` block (keys as in
    PrefixReuseSettings). `strategy` is the verl strategy of a role the block applies to, found at
    `strategy_key` (default: beside the block). The core fields are checked by
    `PrefixReuseConfig.validate`, the one place they are checked."""
    known = PrefixReuseSettings.__dataclass_fields__
    unknown = sorted(set(values) - set(known) - {"_target_"})
    if unknown:
        raise ValueError(f"unknown {path} keys {unknown}; known: {sorted(known)}.")
    verify_every = values.get("verify_every", 0)
    if verify_every < 0:
        raise ValueError(f"{path}.verify_every={verify_every} must be >= 0 (0 disables it).")
    core = {k: values[k] for k in _CORE_FIELDS if k in values}
    PrefixReuseConfig(max_tokens_per_micro_batch=None, **core).validate(owner=path)
    if values.get("enable", False) and strategy is not None and strategy not in STRATEGIES:
        key = strategy_key or path.rsplit(".prefix_reuse", 1)[0] + ".strategy"
        raise ValueError(
            f"{path}.enable=true needs {key}=fsdp2 (got {strategy!r}; FSDP1 is not supported with "
            f"prefix reuse): set {key}=fsdp2, or {path}.enable=false."
        )


_CORE_FIELDS = (
    "attention",
    "prefix_activations",
    "min_prefix_tokens",
    "prefix_tree",
    "min_node_saving",
    "router_aux_loss",
    "router_aux_loss_coef",
)


def as_settings(value, path: str = "prefix_reuse") -> PrefixReuseSettings:
    """Accept a PrefixReuseSettings, a mapping of its keys, or None (errors name `path`)."""
    if isinstance(value, PrefixReuseSettings):
        return value
    if value is None:
        return PrefixReuseSettings()
    keys = {k: v for k, v in dict(value).items() if k != "_target_"}
    check_settings(keys, path)
    return PrefixReuseSettings(**keys)


def attach(engine_config, settings: PrefixReuseSettings) -> None:
    """Carry the settings on a (frozen) verl engine config; the reuse engine reads them there."""
    object.__setattr__(engine_config, "prefix_reuse", settings)


@dataclass
class PrefixReuseFSDPActorConfig(FSDPActorConfig):
    """verl's FSDPActorConfig plus `prefix_reuse` (also used for reference log-probs)."""

    prefix_reuse: PrefixReuseSettings = field(default_factory=PrefixReuseSettings)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "prefix_reuse", as_settings(self.prefix_reuse, "actor_rollout_ref.actor.prefix_reuse"))
        check_settings(self.prefix_reuse, "actor_rollout_ref.actor.prefix_reuse", self.strategy)
        attach(self.engine, self.prefix_reuse)


@dataclass
class PrefixReuseFSDPCriticConfig(FSDPCriticConfig):
    """verl's FSDPCriticConfig plus `prefix_reuse` (critic values and updates)."""

    prefix_reuse: PrefixReuseSettings = field(default_factory=PrefixReuseSettings)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "prefix_reuse", as_settings(self.prefix_reuse, "critic.prefix_reuse"))
        check_settings(self.prefix_reuse, "critic.prefix_reuse", self.strategy)
        attach(self.engine, self.prefix_reuse)
