"""Imported by verl in Ray worker processes (VERL_USE_EXTERNAL_MODULES=verl_cpu_platform):
selects the CPU test platform before verl builds anything (see verl_support), and loads value
models with SDPA (verl 0.9.1 hard-codes flash_attention_2 for them; flash-attn has no CPU build)."""

import verl_support

verl_support.install_cpu_platform()
verl_support.load_value_models_with_sdpa()
