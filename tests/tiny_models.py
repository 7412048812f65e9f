"""Tiny random transformers causal LMs built from config (no download) for equivalence tests."""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

VOCAB = 97

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA
    max_position_embeddings=256,
    tie_word_embeddings=False,
    attention_dropout=0.0,
)

CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON),
    "qwen2": lambda: Qwen2Config(**_COMMON),  # q/k/v biases
    "qwen3": lambda: Qwen3Config(**_COMMON, head_dim=8),  # qk-norm
    # tied input/output embeddings: one weight gets the lm_head's and the embedding's gradient
    "qwen3_tied": lambda: Qwen3Config(**{**_COMMON, "tie_word_embeddings": True}, head_dim=8),
    "qwen3_moe": lambda: Qwen3MoeConfig(
        **{**_COMMON, "intermediate_size": 48},
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        decoder_sparse_step=1,
        output_router_logits=False,
    ),
}


def _rms_norm_same_dtype(self, hidden_states: torch.Tensor) -> torch.Tensor:
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _router_same_dtype(self, hidden_states: torch.Tensor):
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    router_probs = torch.softmax(router_logits, dim=-1)
    top_value, top_index = torch.topk(router_probs, self.top_k, dim=-1)
    if self.norm_topk_prob:
        top_value = top_value / top_value.sum(dim=-1, keepdim=True)
    return router_logits, top_value, top_index


def keep_input_dtype(model: torch.nn.Module) -> torch.nn.Module:
    """Test-only: HF's RMSNorm and MoE router compute in fp32 even for fp64 models (DESIGN.md §3).

    Rebind them to compute in the input dtype so fp64 comparisons can be tight. Both dense and
    reuse runs use the patched model, so the comparison stays like for like.
    """
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm"):
            module.forward = types.MethodType(_rms_norm_same_dtype, module)
        elif name.endswith("TopKRouter"):
            module.forward = types.MethodType(_router_same_dtype, module)
    return model


def build(kind: str, dtype: torch.dtype = torch.float64, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random `kind` causal LM in `dtype`, train mode, SDPA attention, eager experts;
    `overrides` replace config fields (e.g. attention_dropout)."""
    torch.manual_seed(seed)
    config = CONFIGS[kind]()
    for key, value in overrides.items():
        setattr(config, key, value)
    kwargs = {"attn_implementation": "sdpa"}
    if kind == "qwen3_moe":
        kwargs["experts_implementation"] = "eager"  # grouped_mm refuses fp64
    model = AutoModelForCausalLM.from_config(config, **kwargs).to(dtype)
    # from_config leaves some weights at zero/one; spread them so every path carries gradient.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.train()
    if dtype == torch.float64:
        keep_input_dtype(model)
    return model


def build_value_model(kind: str = "qwen3", dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.nn.Module:
    """A tiny random one-label token-classification model (verl's critic architecture)."""
    from transformers import AutoModelForTokenClassification

    torch.manual_seed(seed)
    config = CONFIGS[kind]()
    config.num_labels = 1
    config.classifier_dropout = 0.0  # train-mode dropout draws different random masks in dense and reuse
    model = AutoModelForTokenClassification.from_config(config, attn_implementation="sdpa").to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.train()
    if dtype == torch.float64:
        keep_input_dtype(model)
    return model
