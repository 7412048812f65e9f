"""Prefix K/V captured in Phase A, read in Phase B, and the gradient that flows between them.

Phase A stores each layer's post-RoPE K/V of a prefix chunk as detached tensors (compute dtype).
Phase B reads them through `_ReadPrefix`, whose backward adds gK/gV into fp32 accumulators (fp64
for fp64 models): summing many rows' contributions in bf16 would round at every addition.
Phase C's prefix forward passes its K/V through `_SeedGrad`, an identity whose backward adds the
accumulated gradient. Seeding inside the graph (instead of calling backward on captured K/V
tensors) works whether or not the layers are checkpointed, reentrant or not: a checkpoint
recompute replays the same call with the same `PrefixKV`, and only the graph that autograd
actually runs carries a `_SeedGrad` node.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PrefixRef:
    """Where a group's prefix K/V lives: Phase-A chunk and token range inside it."""

    chunk: int
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, the dtype itself for fp32/fp64."""
    return torch.promote_types(dtype, torch.float32)


class PrefixKV:
    """Per Phase-A chunk, per layer index: K/V [1, num_kv_heads, chunk_tokens, head_dim] (detached),
    and their gradient accumulators (same shape, `accumulation_dtype`, allocated on first use).

    A plain class, not a dataclass or mapping: it travels to the attention function as a model-call
    keyword argument, and FSDP's input casting rebuilds dataclasses and mappings it finds there.
    """

    def __init__(self) -> None:
        self.kv: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.grad: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._anchor: torch.Tensor | None = None

    def store(self, chunk: int, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Keep one layer's prefix K/V, once: a checkpoint recompute of the same layer is ignored."""
        layers = self.kv.setdefault(chunk, {})
        if layer not in layers:
            layers[layer] = (key.detach(), value.detach())

    def read(self, ref: PrefixRef, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix K/V of `ref` at `layer` (views, no copy); under grad mode their gradient is
        added to the chunk's accumulators."""
        k, v = self.view(ref, layer)
        if not torch.is_grad_enabled():
            return k, v
        if self._anchor is None:
            # makes `_ReadPrefix`'s outputs require grad, so autograd runs its backward; never updated
            self._anchor = torch.zeros((), device=k.device, requires_grad=True)
        return _ReadPrefix.apply(self._anchor, k, v, self, ref, layer)

    def view(self, ref: PrefixRef, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix K/V of `ref` at `layer`: views into the chunk's store, outside autograd."""
        k, v = self.kv[ref.chunk][layer]
        return k[:, :, ref.start : ref.end], v[:, :, ref.start : ref.end]

    def add_grad(self, ref: PrefixRef, layer: int, grad_k: torch.Tensor, grad_v: torch.Tensor) -> None:
        layers = self.grad.setdefault(ref.chunk, {})
        if layer not in layers:
            k, _ = self.kv[ref.chunk][layer]
            dtype = accumulation_dtype(k.dtype)
            layers[layer] = (torch.zeros(k.shape, dtype=dtype, device=k.device), torch.zeros_like(k, dtype=dtype))
        acc_k, acc_v = layers[layer]
        acc_k[:, :, ref.start : ref.end] += grad_k
        acc_v[:, :, ref.start : ref.end] += grad_v

    def seed(self, chunk: int, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Phase C: `key`/`value` of the prefix forward, wrapped so that backward adds the
        accumulated gradient. A no-op outside grad mode (Phase A under no_grad, a reentrant
        checkpoint's first forward)."""
        if not (torch.is_grad_enabled() and (key.requires_grad or value.requires_grad)):
            return key, value
        return _SeedGrad.apply(key, value, self, chunk, layer)

    def release(self, chunk: int) -> None:
        self.kv.pop(chunk, None)
        self.grad.pop(chunk, None)


class _ReadPrefix(torch.autograd.Function):
    """Identity on a prefix's K/V slice; backward adds gK/gV into the PrefixKV accumulators."""

    @staticmethod
    def forward(ctx, anchor, key, value, store: PrefixKV, ref: PrefixRef, layer: int):
        ctx.store, ctx.ref, ctx.layer = store, ref, layer
        return key.view_as(key), value.view_as(value)

    @staticmethod
    def backward(ctx, grad_k, grad_v):
        ctx.store.add_grad(ctx.ref, ctx.layer, grad_k, grad_v)
        return None, None, None, None, None, None


class _SeedGrad(torch.autograd.Function):
    """Identity on a Phase-C prefix K/V; backward adds what Phase B accumulated for them."""

    @staticmethod
    def forward(ctx, key, value, store: PrefixKV, chunk: int, layer: int):
        ctx.store, ctx.chunk, ctx.layer = store, chunk, layer
        return key.view_as(key), value.view_as(value)

    @staticmethod
    def backward(ctx, grad_k, grad_v):
        acc = ctx.store.grad.get(ctx.chunk, {}).get(ctx.layer)
        if acc is not None:  # add in the accumulator's precision, round once
            grad_k = (acc[0] + grad_k).to(grad_k.dtype)
            grad_v = (acc[1] + grad_v).to(grad_v.dtype)
        return grad_k, grad_v, None, None, None
