"""Running verl 0.9.1 on a machine without an accelerator: the stand-ins it needs, in one place.

Each is applied only when this process runs on the CPU platform (`install_cpu_platform()`, or
`VERL_PLATFORM=cpu`, which the `verl.plugins` entry point honours in every process that imports
verl: the driver, the Ray task runner and every worker).

- `CPUPlatform`: verl has no CPU platform and falls back to CUDA. This one reports device "cpu",
  the gloo backend, zero memory statistics, no IPC weight transfer, and names the Ray resource its
  workers are scheduled on (`VERL_PREFIX_CPU_RAY_RESOURCE`, default "CPU"; verl's vLLM replica
  reads its accelerator id from Ray under that name, so the rollout needs "GPU" with fake GPUs).
- verl's worker process group is "cpu:gloo,<device>:<backend>", which names "cpu" twice on this
  platform: plain gloo is what it means.
- FSDP2's `CPUOffloadPolicy` (verl's forward-only engines) pins memory, which needs an
  accelerator: the same policy, unpinned.
- verl's FSDP engine module reads the device name once, at import (before a platform is chosen),
  and builds the Ulysses (dp, sp) device mesh on it: "cpu" there.
- verl's Ulysses all-to-all uses `torch.distributed.all_to_all` (a list of tensors), which gloo
  lacks before torch 2.13 (the CPU demo's torch is 2.11): the same exchange through
  `all_to_all_single`, which gloo has.
- `VERL_ENGINE_DEVICE=cuda`: verl registers its FSDP engines for "cuda"/"npu" only; the engine
  lookup key is all this changes (the engine then runs on whatever device the platform reports).
- verl 0.9.1 loads value models (the critic) with `attn_implementation="flash_attention_2"`
  hard-coded, and flash-attn has no CPU build: the same class is loaded with SDPA.
"""

from __future__ import annotations

import functools
import os
import types
from contextlib import contextmanager
from typing import Any

import torch

PLATFORM_NAME = "cpu"


def _cpu_device_module() -> types.SimpleNamespace:
    zero = lambda *a, **k: 0  # noqa: E731
    none = lambda *a, **k: None  # noqa: E731
    return types.SimpleNamespace(
        is_available=lambda: True,
        current_device=lambda: "cpu",
        device_count=lambda: 1,
        set_device=none,
        synchronize=none,
        manual_seed=torch.manual_seed,
        manual_seed_all=torch.manual_seed,
        empty_cache=none,
        memory_allocated=zero,
        memory_reserved=zero,
        max_memory_allocated=zero,
        max_memory_reserved=zero,
        reset_peak_memory_stats=none,
        mem_get_info=lambda *a, **k: (0, 0),
        get_rng_state=torch.get_rng_state,
        set_rng_state=torch.set_rng_state,
        is_initialized=lambda: True,
        get_device_name=lambda *a, **k: "cpu",
        memory_stats=lambda *a, **k: {},
        nvtx=types.SimpleNamespace(range_push=none, range_pop=none),
    )


@functools.cache
def platform_class() -> type:
    """verl's platform interface for this CPU, registered with verl under `PLATFORM_NAME`."""
    from verl.plugin.platform.platform_base import PlatformBase
    from verl.plugin.platform.platform_manager import PlatformRegistry

    class CPUPlatform(PlatformBase):
        device_name = "cpu"
        vendor_name = "nvidia"  # engine lookup key only (see the module docstring)
        device_module = _cpu_device_module()

        def is_available(self) -> bool:
            return True

        def is_platform_available(self, use_smi_check: bool = False) -> bool:
            return os.environ.get("VERL_PLATFORM", "").strip().lower() == PLATFORM_NAME

        def current_device(self):
            return "cpu"

        def device_count(self) -> int:
            return 1

        def set_device(self, device_index) -> None:
            pass

        def synchronize(self, device_index=None) -> None:
            pass

        def manual_seed(self, seed: int) -> None:
            torch.manual_seed(seed)

        def manual_seed_all(self, seed: int) -> None:
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings: str) -> None:
            pass

        def empty_cache(self) -> None:
            pass

        def get_device_capability(self, device_index: int = 0):
            return None, None

        def communication_backend_name(self) -> str:
            return "gloo"

        def visible_devices_envvar(self) -> str:
            return "CUDA_VISIBLE_DEVICES"

        @contextmanager
        def nvtx_range(self, msg: str):
            yield

        def profiler_start(self) -> None:
            pass

        def profiler_stop(self) -> None:
            pass

        def ray_resource_name(self) -> str:
            return os.environ.get("VERL_PREFIX_CPU_RAY_RESOURCE", "CPU")

        def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
            return {"num_gpus": num_gpus} if self.ray_resource_name() == "GPU" else {}

        def ray_noset_envvars(self) -> list[str]:
            return []

        def is_ipc_supported(self) -> bool:
            return False

        def rollout_env_vars(self) -> dict[str, str]:
            return {}

        def get_collective_module(self):
            return None

        def cudart(self):
            return None

    PlatformRegistry.register(PLATFORM_NAME)(CPUPlatform)
    return CPUPlatform


@functools.cache
def install_cpu_platform():
    """Select the CPU platform in this process and apply verl's CPU stand-ins (idempotent).
    Returns the platform."""
    from verl.plugin.platform.platform_manager import set_platform

    os.environ.setdefault("VERL_ENGINE_DEVICE", "cuda")
    os.environ.setdefault("VERL_ENGINE_VENDOR", "nvidia")
    platform = platform_class()()
    set_platform(platform)
    _patch_verl_for_cpu()
    return platform


def _patch_verl_for_cpu() -> None:
    import verl.utils.distributed as verl_distributed
    import verl.workers.engine.fsdp.transformer_impl as fsdp_impl
    import verl.workers.engine_workers as engine_workers
    from torch.distributed.fsdp import CPUOffloadPolicy

    # "cpu:gloo,cpu:gloo" names the CPU twice: plain gloo
    engine_workers.initialize_global_process_group_ray = functools.partial(
        verl_distributed.initialize_global_process_group_ray, backend="gloo"
    )
    # read at import time, before the platform was set; used for the Ulysses device mesh
    fsdp_impl.device_name = PLATFORM_NAME
    import verl.utils.ulysses as ulysses

    # gloo has all_to_all_single in every torch, all_to_all (lists) only from 2.13
    ulysses.all_to_all_tensor = functools.partial(_all_to_all_tensor, ulysses.all_to_all_tensor)
    # pinning needs an accelerator: the same offload policy, unpinned
    fsdp_impl.CPUOffloadPolicy = lambda pin_memory=True: CPUOffloadPolicy(pin_memory=False)
    load_value_models_with_sdpa()


def _all_to_all_tensor(verl_all_to_all, local_input, scatter_dim, gather_dim, group=None, async_op=False):
    """verl's `all_to_all_tensor` (split `scatter_dim` into world-size equal parts, exchange, concatenate
    the received parts along `gather_dim`) through one `all_to_all_single` on a stacked buffer."""
    import verl.utils.ulysses as ulysses

    if async_op:
        return verl_all_to_all(local_input, scatter_dim, gather_dim, group, async_op)
    group = ulysses.get_ulysses_sequence_parallel_group() if group is None else group
    world = torch.distributed.get_world_size(group)
    send = torch.stack([t.contiguous() for t in torch.tensor_split(local_input, world, scatter_dim)])
    received = torch.empty_like(send)
    torch.distributed.all_to_all_single(received, send, group=group)
    return torch.cat(received.unbind(0), dim=gather_dim).contiguous()


def load_value_models_with_sdpa() -> None:
    """verl 0.9.1 loads value models with flash_attention_2 hard-coded; flash-attn has no CPU build:
    load the same class with SDPA instead (the only change)."""
    import verl.utils.model as verl_model
    from transformers import AutoModelForTokenClassification

    def load_valuehead_model(local_path, torch_dtype, model_config, trust_remote_code):
        return AutoModelForTokenClassification.from_pretrained(
            local_path,
            torch_dtype=torch_dtype,
            config=model_config,
            attn_implementation="sdpa",
            trust_remote_code=trust_remote_code,
        )

    verl_model.load_valuehead_model = load_valuehead_model


def selected_by_environment() -> bool:
    """True when this process was asked to run verl on the CPU platform (`VERL_PLATFORM=cpu`)."""
    return os.environ.get("VERL_PLATFORM", "").strip().lower() == PLATFORM_NAME
