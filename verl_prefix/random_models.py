"""Random-weight causal LMs built from config (no download), for benchmarks and demos."""

from __future__ import annotations

import json
from importlib import resources

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

FAMILIES = ("qwen3", "llama", "qwen2", "qwen3_moe")


def model_config(
    family: str = "qwen3",
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 768,
    vocab_size: int = 8192,
    max_positions: int = 32768,
    **overrides,
) -> PretrainedConfig:
    """A decoder config of the given family and dims (GQA when num_kv_heads < num_heads);
    `overrides` set any other config field (e.g. tie_word_embeddings, num_experts)."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )
    if family == "qwen3":
        config = Qwen3Config(**common, head_dim=hidden_size // num_heads)
    elif family == "llama":
        config = LlamaConfig(**common)
    elif family == "qwen2":
        config = Qwen2Config(**common)
    elif family == "qwen3_moe":
        config = Qwen3MoeConfig(
            **common,
            head_dim=hidden_size // num_heads,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=intermediate_size // 4,
            decoder_sparse_step=1,
        )
    else:
        raise ValueError(f"family={family!r} is unknown; use one of {FAMILIES}.")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def random_model(
    config: PretrainedConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0
) -> torch.nn.Module:
    """Random-init causal LM from `config` with SDPA attention, in train mode."""
    torch.manual_seed(seed)
    kwargs = {"attn_implementation": "sdpa"}
    if getattr(config, "num_experts", None):
        kwargs["experts_implementation"] = "eager"
    # Built on the target device in the target dtype: an 8B shape never materialises in fp32 on CPU.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    return model.to(device=device, dtype=dtype).train()


SHAPES = ("qwen3-8b", "llama3-8b", "qwen3-30b-a3b")


def shaped_config(name: str, num_layers: int | None = None, min_positions: int = 0) -> PretrainedConfig:
    """The decoder config of a real model shape shipped in `verl_prefix/model_shapes/` (no download).

    `num_layers` cuts the depth (per-layer cost is unchanged, so ratios hold at lower memory);
    `max_position_embeddings` is raised to at least `min_positions`.
    """
    if name not in SHAPES:
        raise ValueError(f"model={name!r} is unknown; use 'tiny' or one of {SHAPES}.")
    spec = json.loads(resources.files("verl_prefix.model_shapes").joinpath(f"{name}.json").read_text())
    if num_layers:
        spec["num_hidden_layers"] = num_layers
    spec["max_position_embeddings"] = max(spec["max_position_embeddings"], min_positions)
    return AutoConfig.for_model(**spec)
