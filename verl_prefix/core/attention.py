"""The attention function the schedule registers with transformers' `AttentionInterface`.

A packed forward has batch size 1 and holds several *blocks*. A block is a run of rows of one
group: its queries attend to the group's prefix K/V (if any) and, causally, to their own row.
In Phase A (and Phase C's prefix forward) each block is one prefix: this module stores that
layer's post-RoPE K/V and wraps them so that Phase C's backward receives their accumulated
gradient. In Phase B each block reads its group's stored prefix K/V through `PrefixKV.read`, whose
backward accumulates gK/gV. All state arrives with the call (`AttentionContext`).
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from . import merged_attention
from .prefix_kv import PrefixKV, PrefixRef
from .runtime import SequenceParallel

ATTENTION_NAME = "verl_prefix"


@dataclass(frozen=True)
class Block:
    """Queries [q_start, q_end) of a packed forward: rows of lengths `row_lengths` that all read the
    stored K/V of `prefixes` (the shared spans above them, top first; empty = none) before their own."""

    q_start: int
    q_end: int
    row_lengths: tuple[int, ...]
    prefixes: tuple[PrefixRef, ...] = ()


class AttentionContext:
    """State the registered attention function reads during one packed forward.

    Passed to the model call as the keyword argument `CONTEXT_KWARG`; transformers hands model-call
    keyword arguments down to the attention function, and gradient checkpointing replays them, so
    a recompute during backward sees the same context. A plain class: FSDP's input casting rebuilds
    dataclasses and mappings it finds among forward arguments.

    mode "capture": blocks are prefixes of Phase-A chunk `chunk`; store K/V into `prefix_kv` when
    `store` (once per layer) and seed Phase C's gradient into them under grad mode.
    mode "suffix": blocks read their prefix K/V from `prefix_kv`.
    With `sp` (Ulysses), the layer's q/k/v hold this rank's slice of the tokens for every head; an
    all-to-all turns them into the whole sequence for this rank's heads, so blocks, stored prefix
    K/V and their gradients are in whole-sequence positions and local heads.
    """

    def __init__(
        self,
        mode: Literal["capture", "suffix"],
        blocks: tuple[Block, ...],
        prefix_kv: PrefixKV,
        backend: str,
        chunk: int = -1,
        store: bool = False,
        sp: SequenceParallel | None = None,
    ) -> None:
        self.mode, self.blocks, self.prefix_kv, self.backend = mode, blocks, prefix_kv, backend
        self.chunk, self.store, self.sp = chunk, store, sp
        self.cache: dict = {}  # per-forward layouts and masks, shared by the layers


CONTEXT_KWARG = "prefix_attention_context"


def _row_mask(prefix_len: int, n: int, device: torch.device) -> torch.Tensor:
    """Boolean [n, prefix_len + n]: the whole prefix, then causal inside the row (bottom-right)."""
    idx = torch.arange(n, device=device)
    own = idx[None, :] <= idx[:, None]
    return torch.cat([torch.ones(n, prefix_len, dtype=torch.bool, device=device), own], dim=1)


def _flash_takes_lower_right(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> bool:
    """Whether PyTorch's flash kernel runs this row: then its own bottom-right causal mask is the
    row mask, and no mask tensor (which rules flash out) is needed. CUDA only."""
    if not q.is_cuda:
        return False
    from torch.backends.cuda import SDPAParams, can_use_flash_attention

    return can_use_flash_attention(SDPAParams(q, k, v, None, dropout, False, q.shape[1] != k.shape[1]))


def _prefix_for_block(ctx: AttentionContext, block: Block, layer: int):
    """The block's prefix K/V, its spans concatenated (None, None without any)."""
    if not block.prefixes:
        return None, None
    kvs = [ctx.prefix_kv.read(ref, layer) for ref in block.prefixes]
    if len(kvs) == 1:
        return kvs[0]
    return torch.cat([k for k, _ in kvs], dim=2), torch.cat([v for _, v in kvs], dim=2)


def _sdpa(ctx: AttentionContext, layer: int, q, k, v, scaling: float, dropout: float) -> torch.Tensor:
    """Reference path: one SDPA per row over keys [its prefix ; its own tokens].

    No score between two rows is ever formed (not even masked), so the work is the rows' own and a
    row's gradient never reaches another row's tokens: a NaN/inf in one row stays in that row and
    its prefix, exactly as in dense training. Returns [1, heads, tokens, head_dim].
    """
    masks = ctx.cache.setdefault("sdpa_row_masks", {})
    gqa = q.shape[1] != k.shape[1]
    lower_right: bool | None = None
    outs = []
    blocks, i = ctx.blocks, 0
    while i < len(blocks):
        block = blocks[i]
        kp, vp = _prefix_for_block(ctx, block, layer)
        if kp is None and len(block.row_lengths) == 1:
            # consecutive prefix-less rows of one length (rows that share nothing, Phase-A
            # prefixes): one batched causal call, as a dense batch would make
            j = i + 1
            while j < len(blocks) and blocks[j].row_lengths == block.row_lengths and not blocks[j].prefixes:
                j += 1
            if j - i > 1:
                outs.append(_batched_causal(q, k, v, block.q_start, j - i, block.row_lengths[0], scaling, dropout))
                i = j
                continue
        p = 0 if kp is None else kp.shape[2]
        qs = block.q_start
        for n in block.row_lengths:
            qr, kr, vr = q[:, :, qs : qs + n], k[:, :, qs : qs + n], v[:, :, qs : qs + n]
            mask = None
            if kp is not None:
                kr, vr = torch.cat([kp, kr], dim=2), torch.cat([vp, vr], dim=2)
                if lower_right is None:  # same dtype, heads and head_dim for every row of the call
                    lower_right = _flash_takes_lower_right(qr, kr, vr, dropout)
                if n > 1 and lower_right:
                    mask = causal_lower_right(n, p + n)  # dispatches to flash with is_causal (bottom-right)
                elif n > 1:  # a single query sees every key
                    if (p, n) not in masks:
                        masks[(p, n)] = _row_mask(p, n, q.device)
                    mask = masks[(p, n)]
            outs.append(
                F.scaled_dot_product_attention(
                    qr,
                    kr,
                    vr,
                    attn_mask=mask,
                    is_causal=kp is None and n > 1,  # no prefix: square causal (top-left = bottom-right)
                    dropout_p=dropout,
                    scale=scaling,
                    enable_gqa=gqa,
                )
            )
            qs += n
        i += 1
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]


def _batched_causal(q, k, v, start: int, rows: int, n: int, scaling: float, dropout: float) -> torch.Tensor:
    """`rows` equal-length rows without a prefix, packed from `start`: one batched causal SDPA
    (the layout a dense batch has). Returns [1, heads, rows * n, head_dim]."""

    def batched(x: torch.Tensor) -> torch.Tensor:  # [1, h, rows * n, d] -> [rows, h, n, d]
        return x[0, :, start : start + rows * n].unflatten(1, (rows, n)).transpose(0, 1)

    out = F.scaled_dot_product_attention(
        batched(q),
        batched(k),
        batched(v),
        is_causal=True,
        dropout_p=dropout,
        scale=scaling,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.transpose(0, 1).flatten(1, 2)[None]


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # dynamic=None: after a second shape the kernel is recompiled with symbolic sizes and then
    # reused. Every micro-batch has its own length, and a static compile per shape would hit
    # dynamo's recompile limit and fall back to unfused flex (full score matrix in memory).
    return torch.compile(flex_attention, dynamic=None)


def _flex_layout(ctx: AttentionContext, device: torch.device):
    """Packed key layout [distinct prefixes of the blocks ; queries] and its BlockMask (cached)."""
    if "flex" in ctx.cache:
        return ctx.cache["flex"]
    from torch.nn.attention.flex_attention import create_block_mask

    refs: list[PrefixRef] = []
    for b in ctx.blocks:
        refs.extend(ref for ref in b.prefixes if ref not in refs)
    n_prefix = sum(r.length for r in refs)
    n_q = ctx.blocks[-1].q_end
    # reads[block, ref]: whether the block's queries read that prefix span (last column: own keys)
    reads = torch.zeros(len(ctx.blocks), len(refs) + 1, dtype=torch.bool)
    kv_ref = torch.full((n_prefix + n_q,), len(refs), dtype=torch.long)  # prefix keys: their span
    q_block = torch.zeros(n_q, dtype=torch.long)
    row_id = torch.full((n_prefix + n_q,), -1, dtype=torch.long)  # own keys and queries: their row
    offset, row = 0, 0
    for i, ref in enumerate(refs):
        kv_ref[offset : offset + ref.length] = i
        offset += ref.length
    for i, b in enumerate(ctx.blocks):
        q_block[b.q_start : b.q_end] = i
        for ref in b.prefixes:
            reads[i, refs.index(ref)] = True
        pos = b.q_start
        for n in b.row_lengths:
            row_id[n_prefix + pos : n_prefix + pos + n] = row
            pos, row = pos + n, row + 1
    q_row = row_id[n_prefix:].to(device)
    kv_row, kv_ref, q_block, reads = row_id.to(device), kv_ref.to(device), q_block.to(device), reads.to(device)

    def mask_mod(b, h, q_idx, kv_idx):
        reads_prefix = reads[q_block[q_idx], kv_ref[kv_idx]]
        own = (kv_row[kv_idx] == q_row[q_idx]) & (kv_idx - n_prefix <= q_idx)
        return reads_prefix | own

    block_mask = create_block_mask(mask_mod, None, None, n_q, n_prefix + n_q, device=device)
    ctx.cache["flex"] = (refs, block_mask)
    return ctx.cache["flex"]


def _flex(ctx: AttentionContext, layer: int, q, k, v, scaling: float, dropout: float) -> torch.Tensor:
    """FlexAttention over [each distinct prefix once ; packed queries]."""
    if dropout:
        raise ValueError("attention='flex' does not support attention dropout; use attention='sdpa'.")
    refs, block_mask = _flex_layout(ctx, q.device)
    if refs:
        kvs = [ctx.prefix_kv.read(r, layer) for r in refs]
        k = torch.cat([kp for kp, _ in kvs] + [k], dim=2)
        v = torch.cat([vp for _, vp in kvs] + [v], dim=2)
    gqa = q.shape[1] != k.shape[1]
    if q.is_cuda:
        return _compiled_flex()(q, k, v, block_mask=block_mask, scale=scaling, enable_gqa=gqa)
    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():  # uncompiled CPU flex is the exact math reference; its warning is noise
        warnings.simplefilter("ignore", UserWarning)
        return flex_attention(q, k, v, block_mask=block_mask, scale=scaling, enable_gqa=gqa)


def _merged(ctx: AttentionContext, layer: int, q, k, v, scaling: float, dropout: float) -> torch.Tensor:
    """LSE-merged kernels (`merged_attention`); layers with attention dropout take the reference."""
    if dropout:
        return _sdpa(ctx, layer, q, k, v, scaling, dropout)
    return merged_attention.merged_attention(q, k, v, ctx.blocks, ctx.prefix_kv, layer, scaling)


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend "auto" stands for on `device`: the fastest exact one there."""
    if backend != "auto":
        return backend
    return "merged" if merged_attention.available(device) else "sdpa"


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def check_backend(backend: str, device: torch.device, needs_grad: bool) -> None:
    """Raise ValueError naming the setting and the fix if `backend` cannot run here."""
    if backend == "merged" and not merged_attention.available(device):
        raise ValueError(
            f"PrefixReuseConfig.attention='merged' has no kernels on {device.type} yet; "
            "use attention='auto' (picks the fastest exact backend per device) or 'sdpa'."
        )
    if backend == "flash_attn":
        if not flash_attn_available():
            raise ValueError(
                "PrefixReuseConfig.attention='flash_attn' but flash-attn is not installed; "
                "pip install 'verl-prefix[gpu]' or use attention='sdpa' or 'flex'."
            )
        if device.type != "cuda":
            raise ValueError("PrefixReuseConfig.attention='flash_attn' needs a CUDA model; use attention='sdpa'.")
    if backend == "flex" and needs_grad and device.type == "cpu":
        raise ValueError(
            "PrefixReuseConfig.attention='flex' cannot train on CPU (FlexAttention has no CPU backward); "
            "use attention='sdpa' on CPU (flex still serves compute_log_probs there)."
        )


def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as exc:  # checked up front by the schedule; kept for direct callers
        raise ValueError(
            "attention='flash_attn' needs the flash-attn package: pip install 'verl-prefix[gpu]' "
            "or use attention='sdpa'."
        ) from exc
    return flash_attn_varlen_func


def _flash_attn(ctx: AttentionContext, layer: int, q, k, v, scaling: float, dropout: float) -> torch.Tensor:
    """flash-attn varlen: per row, keys = [its prefix (copied) ; its own tokens], causal bottom-right."""
    q_rows, k_rows, v_rows, q_lens, k_lens = [], [], [], [], []
    for block in ctx.blocks:
        kp, vp = _prefix_for_block(ctx, block, layer)
        pos = block.q_start
        for n in block.row_lengths:
            q_rows.append(q[0, :, pos : pos + n])
            kr, vr = k[0, :, pos : pos + n], v[0, :, pos : pos + n]
            if kp is not None:
                kr, vr = torch.cat([kp[0], kr], dim=1), torch.cat([vp[0], vr], dim=1)
            k_rows.append(kr)
            v_rows.append(vr)
            q_lens.append(n)
            k_lens.append(kr.shape[1])
            pos += n

    def cu(lens: list[int]) -> torch.Tensor:
        return F.pad(torch.tensor(lens, device=q.device).cumsum(0), (1, 0)).to(torch.int32)

    out = _flash_varlen()(
        torch.cat(q_rows, dim=1).transpose(0, 1),
        torch.cat(k_rows, dim=1).transpose(0, 1),
        torch.cat(v_rows, dim=1).transpose(0, 1),
        cu(q_lens),
        cu(k_lens),
        max(q_lens),
        max(k_lens),
        dropout_p=dropout,
        softmax_scale=scaling,
        causal=True,
    )  # [tokens, heads, head_dim]
    return out.transpose(0, 1).unsqueeze(0)


_BACKENDS = {"sdpa": _sdpa, "merged": _merged, "flex": _flex, "flash_attn": _flash_attn}


def prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function. query [1, H, T, D], key/value [1, Hkv, T, D].

    Returns ([1, T, H, D], None) like transformers' sdpa_attention_forward.
    """
    ctx = kwargs.get(CONTEXT_KWARG)
    if not isinstance(ctx, AttentionContext):
        raise RuntimeError(
            f"attn_implementation={ATTENTION_NAME!r} only runs inside verl_prefix.core schedule calls "
            f"(the model call must carry {CONTEXT_KWARG}=AttentionContext)."
        )
    if sliding_window is not None or softcap is not None or s_aux is not None:
        raise ValueError(
            f"{type(module).__name__} uses sliding-window, soft-capped or sink attention, which the "
            "shared-prefix schedule does not support; disable it in the model config or train dense."
        )
    if query.shape[0] != 1:
        raise RuntimeError("the shared-prefix schedule runs packed forwards with batch size 1.")
    layer = module.layer_idx
    if ctx.sp is not None:
        query, key, value = _whole_sequence(ctx.sp, query, key, value, ctx.blocks[-1].q_end)
    if ctx.mode == "capture":
        if ctx.store:
            ctx.prefix_kv.store(ctx.chunk, layer, key, value)
        key, value = ctx.prefix_kv.seed(ctx.chunk, layer, key, value)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    backend = ctx.backend
    if backend == "flex" and all(not b.prefixes for b in ctx.blocks):
        # nothing to read from a prefix: plain (batched) causal attention, SDPA's flash kernel
        backend = "sdpa"
    out = _BACKENDS[backend](ctx, layer, query, key, value, scaling, dropout)
    if ctx.sp is not None:
        out = _own_slice(ctx.sp, out)
    return out.transpose(1, 2).contiguous(), None


def _whole_sequence(sp: SequenceParallel, q, k, v, tokens: int):
    """[1, heads, T'/size, D] slices -> [1, heads/size, tokens, D]: all-to-all over the group, then
    the pad tail (T' - tokens, no block reads it) cut off. KV heads fewer than `size` are repeated
    first (as verl does) so that every rank gets one."""
    repeats = max(sp.size // k.shape[1], 1)
    if repeats > 1:
        k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
    q, k, v = (sp.seq_to_heads(x, 2, 1)[:, :, :tokens] for x in (q, k, v))
    return q, k, v


def _own_slice(sp: SequenceParallel, out: torch.Tensor) -> torch.Tensor:
    """[1, heads/size, tokens, D] -> [1, heads, T'/size, D]: zeros for the pad tail, all-to-all back."""
    pad = -out.shape[2] % sp.size
    if pad:
        out = torch.cat([out, out.new_zeros(*out.shape[:2], pad, out.shape[3])], dim=2)
    return sp.heads_to_seq(out, 2, 1)


def register() -> None:
    """Register `prefix_attention` under ATTENTION_NAME (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, prefix_attention)
