"""`verl.plugins` entry point: loaded by every `import verl` (driver, task runner, workers).

Registers the `prefix_reuse` trainer and the reuse engines. Neither changes verl's behaviour
unless selected (`trainer.v1.trainer_mode=prefix_reuse`, `*.prefix_reuse.enable=true`). With
`VERL_PLATFORM=cpu` it also installs verl's CPU platform (`cpu.py`) in the process.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def load() -> None:
    from .cpu import install_cpu_platform, selected_by_environment

    if selected_by_environment():  # VERL_PLATFORM=cpu: every process of the run takes the CPU platform
        install_cpu_platform()
    try:
        from . import trainer  # noqa: F401  (registers the trainer)
        from .registry import install_engines

        install_engines()
    except ImportError as exc:  # verl without its V1 trainer extras (TransferQueue): engines still usable
        logger.info("verl-prefix: prefix_reuse trainer not registered (%s)", exc)


load()
