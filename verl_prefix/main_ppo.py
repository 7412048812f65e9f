"""`python -m verl_prefix.main_ppo ...`: verl's main_ppo on verl-prefix's config.

The config is verl's `ppo_trainer` plus `*.prefix_reuse` blocks and the `prefix_reuse` trainer;
every command-line override verl's main_ppo accepts is accepted here.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import hydra
from omegaconf import DictConfig

# hydra options that take a value (the value is not an override)
_HYDRA_VALUE_OPTIONS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn"}
_HYDRA_VALUE_OPTIONS |= {"--config-dir", "-cd", "--info", "-i", "--experimental-rerun"}


@hydra.main(config_path="configs", config_name="prefix_reuse_ppo", version_base=None)
def main(config: DictConfig) -> None:
    from verl.trainer import main_ppo as verl_main_ppo

    from .backend import plugin  # noqa: F401  (trainer and engines registered in this process too)
    from .backend.preflight import preflight

    preflight(config)  # bad settings fail here, before Ray starts
    verl_main_ppo.main.__wrapped__(config)


def check_printed_config(argv: Sequence[str]) -> None:
    """`--cfg job|hydra|all` prints the config without calling `main`: check its `prefix_reuse`
    blocks (values, FSDP2) first, so a printed config is one that would start. Raises ValueError."""
    if "--cfg" not in argv and "-c" not in argv:
        return
    from hydra import compose, initialize_config_module

    from .backend.preflight import check_blocks

    overrides, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _HYDRA_VALUE_OPTIONS:
            skip = True
        elif not arg.startswith("-"):
            overrides.append(arg)
    with initialize_config_module(config_module="verl_prefix.configs", version_base=None):
        check_blocks(compose(config_name="prefix_reuse_ppo", overrides=overrides))


if __name__ == "__main__":
    try:
        check_printed_config(sys.argv[1:])
    except ValueError as e:
        print(f"verl_prefix.main_ppo: error: {e}", file=sys.stderr)
        sys.exit(2)
    main()
