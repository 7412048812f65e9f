"""Tiny random transformers causal LMs built from config (no download) for equivalence tests."""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from verl_prefix.random_models import model_config, random_model

VOCAB = 97

_DIMS = dict(
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,  # GQA
    intermediate_size=48,
    vocab_size=VOCAB,
    max_positions=256,
    attention_dropout=0.0,
)

# name -> (verl_prefix.random_models family, config overrides)
MODELS = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),  # q/k/v biases
    "qwen3": ("qwen3", {}),  # qk-norm, head_dim 8
    # tied input/output embeddings: one weight gets the lm_head's and the embedding's gradient
    "qwen3_tied": ("qwen3", {"tie_word_embeddings": True}),
    "qwen3_moe": ("qwen3_moe", {"num_experts": 4, "moe_intermediate_size": 16, "output_router_logits": False}),
}


def _config_of(kind: str):
    family, overrides = MODELS[kind]
    return lambda: model_config(family, **{**_DIMS, **overrides})


CONFIGS = {kind: _config_of(kind) for kind in MODELS}


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
    """Test-only: HF's RMSNorm and MoE router compute in fp32 even for fp64 models (transformers' own choice).

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
    config = CONFIGS[kind]()
    for key, value in overrides.items():
        setattr(config, key, value)
    model = random_model(config, dtype, seed=seed)
    # from_config leaves some weights at zero/one; spread them so every path carries gradient.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
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
