"""LSE-merged prefix attention: each block's queries attend to its prefix and to their own rows in
two kernel calls whose outputs are merged by log-sum-exp, with a backward of kernel calls only.

For one block (rows of one group, packed queries q[s:e]) and one layer:
    out_p, lse_p = attn(q[s:e], prefix K/V)            one non-causal call, prefix read in place
    out_r, lse_r = attn(q_r, k_r, v_r, causal)          per row over its own tokens
    lse = logaddexp(lse_p, lse_own);  out = out_p·e^(lse_p−lse) + out_own·e^(lse_own−lse)
Backward runs each part's kernel backward with the MERGED out and lse: the kernel recomputes
P = exp(S − lse) over its own keys, which is exactly that part's slice of the full softmax, and
D = rowsum(dO ∘ O) of the full output, so the two dQ add up to the dense dQ and no gradient
through lse is needed. The prefix dK/dV of the block go straight into the fp32 accumulators of
`PrefixKV`; the own dQ/dK/dV are written into one buffer each (no per-row zero-filled gradients,
no [prefix ; own] copies, no masks).

Kernels: PyTorch's CPU flash attention (`aten._scaled_dot_product_flash_attention_for_cpu` and its
backward: fp64/fp32/bf16/fp16, GQA native, logsumexp returned). No dropout: the schedule uses the
masked reference path (`attention="sdpa"`) for layers with attention dropout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .prefix_kv import PrefixKV

if TYPE_CHECKING:
    from .attention import Block

_aten = torch.ops.aten


def available(device: torch.device) -> bool:
    """Whether the merged kernels exist for tensors on `device`."""
    return device.type == "cpu"


def _forward(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [1, H, n, D], k/v [1, Hkv, m, D] -> out [1, H, n, D] (q's dtype), lse [1, H, n]."""
    return _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)


def _backward(grad_out, q, k, v, out, lse, causal: bool, scale: float):
    return _aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, q, k, v, out, lse, 0.0, causal, scale=scale
    )


def _rows(block: Block) -> list[tuple[int, int]]:
    """(start, end) of each row of `block` in the packed sequence."""
    spans, pos = [], block.q_start
    for n in block.row_lengths:
        spans.append((pos, pos + n))
        pos += n
    return spans


class _MergedAttention(torch.autograd.Function):
    """out [1, H, T, D] of a packed forward; see the module docstring."""

    @staticmethod
    def forward(ctx, q, k, v, blocks, prefix_kv: PrefixKV, layer: int, scale: float):
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = None
        for block in blocks:
            for s, e in _rows(block):
                o_r, l_r = _forward(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], True, scale)
                if lse is None:
                    lse = torch.empty(q.shape[:3], dtype=l_r.dtype, device=q.device)
                out[:, :, s:e] = o_r
                lse[:, :, s:e] = l_r
            for ref in block.prefixes:
                s, e = block.q_start, block.q_end
                kp, vp = prefix_kv.view(ref, layer)
                o_p, l_p = _forward(q[:, :, s:e], kp, vp, False, scale)
                l_own = lse[:, :, s:e]
                merged = torch.logaddexp(l_p, l_own)
                w_p, w_own = torch.exp(l_p - merged)[..., None], torch.exp(l_own - merged)[..., None]
                # merge in fp32 for half types (each part was already rounded by its kernel)
                acc = torch.promote_types(q.dtype, lse.dtype)
                out[:, :, s:e] = (o_p.to(acc) * w_p + out[:, :, s:e].to(acc) * w_own).to(q.dtype)
                lse[:, :, s:e] = merged
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.blocks, ctx.prefix_kv, ctx.layer, ctx.scale = blocks, prefix_kv, layer, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for block in ctx.blocks:
            for s, e in _rows(block):
                dq, dk, dv = _backward(
                    grad_out[:, :, s:e], q[:, :, s:e], k[:, :, s:e], v[:, :, s:e],
                    out[:, :, s:e], lse[:, :, s:e], True, ctx.scale,
                )  # fmt: skip
                grad_q[:, :, s:e], grad_k[:, :, s:e], grad_v[:, :, s:e] = dq, dk, dv
            for ref in block.prefixes:
                s, e = block.q_start, block.q_end
                kp, vp = ctx.prefix_kv.view(ref, ctx.layer)
                dq, dk, dv = _backward(
                    grad_out[:, :, s:e], q[:, :, s:e], kp, vp, out[:, :, s:e], lse[:, :, s:e], False, ctx.scale
                )
                grad_q[:, :, s:e] += dq
                ctx.prefix_kv.add_grad(ref, ctx.layer, dk, dv)
        return grad_q, grad_k, grad_v, None, None, None, None


def merged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    blocks: Sequence[Block],
    prefix_kv: PrefixKV,
    layer: int,
    scale: float,
) -> torch.Tensor:
    """Attention of packed q [1, H, T, D] over own k/v [1, Hkv, T, D] (causal per row) and each
    block's prefix K/V in `prefix_kv` (blocks with a prefix). Returns [1, H, T, D]."""
    return _MergedAttention.apply(q, k, v, tuple(blocks), prefix_kv, layer, scale)
