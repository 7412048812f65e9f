"""MoE router load-balancing aux loss with logical prefix-token accounting (docs/design.md, "MoE router aux loss").

Dense training computes, per micro-batch, transformers' `load_balancing_loss_func` over every
(layer, token) of its rows: E * sum_{k,e} F[k, e] * P[e], with F[k, e] the fraction of tokens whose
k-th routing choice is expert e and P[e] the mean router probability of e. A shared prefix appears
once per row in the dense micro-batch, so here its router logits (computed once in Phase A) enter
each suffix micro-batch's statistics weighted by the number of that micro-batch's rows sharing it.
They are grad-accumulating leaves, like the prefix K/V: each micro-batch's aux-loss backward adds
into them (only P carries gradient; F is a count), and Phase C seeds the prefix graph with the sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .prefix_kv import PrefixRef, accumulation_dtype


@dataclass
class PrefixRouterLogits:
    """Per Phase-A chunk, per MoE layer: router logits [chunk_tokens, num_experts] as graph tensors
    (roots of Phase C) and as detached leaves in at least fp32 (read in Phase B; their `.grad`
    accumulates every micro-batch's share in that precision)."""

    graph: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    leaves: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def capture(self, chunk: int, router_logits: Sequence[torch.Tensor] | None, store: bool) -> None:
        """Record a prefix forward's router logits: leaves when `store`, graph tensors under grad mode."""
        _require(router_logits)
        if store:
            self.leaves[chunk] = [z.detach().to(accumulation_dtype(z.dtype)).requires_grad_() for z in router_logits]
        if torch.is_grad_enabled():
            if not all(z.requires_grad for z in router_logits):
                raise ValueError(
                    "PrefixReuseConfig.router_aux_loss=True cannot run under reentrant gradient checkpointing "
                    "(the router logits leave the checkpointed layers without a graph); enable checkpointing "
                    "with gradient_checkpointing_kwargs={'use_reentrant': False} or disable it."
                )
            self.graph[chunk] = list(router_logits)

    def of_prefix(self, ref: PrefixRef) -> list[torch.Tensor]:
        """One prefix's leaves per layer, each [ref.length, num_experts] (views: grads land in the leaf)."""
        return [z[ref.start : ref.end] for z in self.leaves[ref.chunk]]

    def seeds(self, chunk: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Phase C: the chunk's graph router logits and the gradient accumulated for them (then released)."""
        roots, grads = [], []
        for graph_z, leaf_z in zip(self.graph.pop(chunk), self.leaves.pop(chunk), strict=True):
            if leaf_z.grad is not None:
                roots.append(graph_z)
                grads.append(leaf_z.grad.to(graph_z.dtype))
        return roots, grads


@dataclass(frozen=True)
class RouterSpec:
    num_experts: int
    top_k: int
    coef: float


def router_spec(model: torch.nn.Module, coef: float | None) -> RouterSpec:
    """Experts, top-k and aux-loss coefficient (`coef`, else the model config's) of an MoE model."""
    cfg = getattr(model.config, "text_config", None) or model.config
    experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    top_k = getattr(cfg, "num_experts_per_tok", None)
    if not experts or not top_k:
        raise ValueError(
            f"PrefixReuseConfig.router_aux_loss=True needs an MoE model with a router; {type(model).__name__} "
            "has none. Set router_aux_loss=False."
        )
    coef = getattr(cfg, "router_aux_loss_coef", None) if coef is None else coef
    if coef is None:
        raise ValueError(f"{type(model).__name__}'s config has no router_aux_loss_coef; set router_aux_loss_coef.")
    return RouterSpec(int(experts), int(top_k), float(coef))


def load_balancing_loss(
    own_logits: Sequence[torch.Tensor],
    prefix_logits: Sequence[tuple[Sequence[torch.Tensor], int]],
    spec: RouterSpec,
) -> torch.Tensor:
    """transformers' `load_balancing_loss_func` of a micro-batch whose rows are [prefix ; own tokens].

    own_logits: per MoE layer [tokens, E], every token counted once (graph-connected).
    prefix_logits: (per MoE layer [prefix_tokens, E], count) for each prefix the micro-batch reads;
        each of its tokens counts `count` times (the number of the micro-batch's rows sharing it).
    Returns a 0-d tensor. As in transformers, fractions are float32 and probabilities keep the
    logits dtype (accumulated in at least float32).
    """
    _require(own_logits)
    device, dtype = own_logits[0].device, accumulation_dtype(own_logits[0].dtype)
    choices = torch.zeros(spec.top_k, spec.num_experts, dtype=torch.float32, device=device)
    probs = torch.zeros(spec.num_experts, dtype=dtype, device=device)
    tokens = 0
    parts = [(z, 1) for z in own_logits] + [(z, count) for layers, count in prefix_logits for z in layers]
    for logits, count in parts:
        weights = F.softmax(logits, dim=-1)
        _, selected = torch.topk(weights, spec.top_k, dim=-1)  # [tokens, top_k], no gradient
        choices = choices + count * F.one_hot(selected, spec.num_experts).sum(0).float()
        probs = probs + count * weights.sum(0, dtype=dtype)
        tokens += count * logits.shape[0]
    return (choices / tokens * (probs / tokens)[None]).sum() * spec.num_experts


def _require(router_logits: Sequence[torch.Tensor] | None) -> None:
    if not router_logits:
        raise ValueError(
            "PrefixReuseConfig.router_aux_loss=True but the model returned no router logits "
            "(output_router_logits unsupported). Set router_aux_loss=False."
        )
