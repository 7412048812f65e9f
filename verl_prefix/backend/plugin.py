"""`verl.plugins` entry point: loaded by every `import verl` (driver, task runner, workers).

Registers the `prefix_reuse` trainer and the reuse engines. Neither changes verl's behaviour
unless selected (`trainer.v1.trainer_mode=prefix_reuse`, `*.prefix_reuse.enable=true`).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def load() -> None:
    try:
        from . import trainer  # noqa: F401  (registers the trainer)
        from .registry import install_engines

        install_engines()
    except ImportError as exc:  # verl without its V1 trainer extras (TransferQueue): engines still usable
        logger.info("verl-prefix: prefix_reuse trainer not registered (%s)", exc)


load()
