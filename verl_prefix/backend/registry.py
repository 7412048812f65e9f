"""Make verl build the reuse-aware engines for FSDP language and value models.

Registered through verl's own `EngineRegistry` under (device "cuda", vendor nvidia/amd) keys, which
verl looks up before its device-only defaults. With `prefix_reuse.enable` off the engines are the
stock ones, so installing them changes nothing until the switch is set.
"""

from __future__ import annotations

VENDORS = ("nvidia", "amd")


def install_engines() -> None:
    """Idempotent: register the reuse engines for fsdp/fsdp2 unless a vendor engine already sits there."""
    from verl.workers.engine.base import EngineRegistry

    from .engine import PrefixReuseFSDPEngineWithLMHead, PrefixReuseFSDPEngineWithValueHead

    for model_type, engine_cls in (
        ("language_model", PrefixReuseFSDPEngineWithLMHead),
        ("value_model", PrefixReuseFSDPEngineWithValueHead),
    ):
        backends = EngineRegistry._engines.get(model_type, {})
        for backend in ("fsdp", "fsdp2"):
            taken = backends.get(backend, {})
            vendors = [v for v in VENDORS if ("cuda", v) not in taken]
            if vendors:
                EngineRegistry.register(model_type, backend, device="cuda", vendor=vendors)(engine_cls)
