"""`python -m verl_prefix.main_ppo ...`: verl's main_ppo on verl-prefix's config.

The config is verl's `ppo_trainer` plus `*.prefix_reuse` blocks and the `prefix_reuse` trainer;
every command-line override verl's main_ppo accepts is accepted here.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="configs", config_name="prefix_reuse_ppo", version_base=None)
def main(config: DictConfig) -> None:
    from verl.trainer import main_ppo as verl_main_ppo

    from .backend import plugin  # noqa: F401  (trainer and engines registered in this process too)
    from .backend.preflight import preflight

    preflight(config)  # bad settings fail here, before Ray starts
    verl_main_ppo.main.__wrapped__(config)


if __name__ == "__main__":
    main()
