"""The three-phase shared-prefix schedule for Hugging Face causal LMs.

Phase A: each shared prefix runs forward once; every layer's post-RoPE K/V is stored (`PrefixKV`).
Phase B: suffixes (starting at the last prompt token) run as packed micro-batches whose attention
reads [prefix K/V ; own K/V]; each micro-batch's loss is backpropagated, adding parameter grads and
accumulating gK/gV in fp32. Phase C: one prefix backward per chunk, the accumulated gK/gV added where
the prefix forward produced its K/V. In real arithmetic the parameter gradients equal dense
training over every row.

Every model call carries its `AttentionContext` as a keyword argument, so gradient checkpointing
(which replays the call's arguments during backward) works in every phase. With a
`ScheduleRuntime.group`, every rank runs the same number of passes per phase (one-token padding
passes where it has fewer), so FSDP collectives stay matched across data-parallel ranks.
"""

from __future__ import annotations

import contextlib
import itertools
import time
import zlib
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
)

from .attention import ATTENTION_NAME, CONTEXT_KWARG, AttentionContext, Block, check_backend, register, resolve_backend
from .config import PrefixReuseConfig, ScheduleStats
from .flops import FlopModel
from .memory import phase_peak, saved_tensors_on_cpu
from .moe import PrefixRouterLogits, RouterSpec, load_balancing_loss, router_spec
from .plan import SchedulePlan, Segment, schedule_plan
from .prefix_kv import PrefixKV, PrefixRef, accumulation_dtype
from .runtime import ScheduleRuntime, SequenceParallel

LossFn = Callable[..., torch.Tensor]
Readout = Literal["log_probs", "values"]


def forward_backward(
    model: torch.nn.Module,
    input_ids: Sequence[torch.Tensor],
    response_start: Sequence[int],
    group_ids: Sequence[Hashable],
    loss_fn: LossFn,
    config: PrefixReuseConfig | None = None,
    *,
    row_temperature: Sequence[float] | None = None,
    loss_entropy: bool = False,
    readout: Readout = "log_probs",
    runtime: ScheduleRuntime | None = None,
) -> ScheduleStats:
    """Accumulate into `param.grad` the gradient of sum(loss_fn(...)) over all suffix micro-batches.

    Args:
        model: transformers causal LM (Llama, Qwen2, Qwen3, Qwen3-MoE, ...), in the mode the caller wants
            (gradient checkpointing, reentrant or not, is supported).
        input_ids: one 1-D unpadded LongTensor per trajectory (prompt + response).
        response_start: index of each row's first response token, 1 <= response_start[i] < len(row).
        group_ids: verl's uid per row. With `config.prefix_tree` (the default) what is shared is found
            from the tokens across ids (a prefix tree: system prompts, prompts, shared turns and
            response stems); with prefix_tree=False rows with equal ids share their longest common
            token prefix, cut before every member's last prompt token.
        loss_fn: called once per micro-batch as loss_fn(indices, log_probs); log_probs[k] is the 1-D
            tensor of log p(token t | tokens < t) over row indices[k]'s response tokens, logits divided
            by config.temperature. Returns a scalar that is backpropagated.
        config: PrefixReuseConfig (defaults when None).
        row_temperature: optional per-row temperature overriding config.temperature (verl's
            per-sample temperature).
        loss_entropy: call loss_fn(indices, log_probs, entropies) with per-token entropies that
            carry gradient (verl's entropy bonus).
        readout: "log_probs" (causal LM) or "values" (a token-classification value model with one
            label, e.g. verl's critic): loss_fn then gets per-response-token values, read at the
            same positions as log-probs (position t - 1 for response token t).
        runtime: the trainer's autocast, loss backward, gradient-sync context and data-parallel
            group (`ScheduleRuntime`); None = plain PyTorch in one process.

    Gradients are added to existing `.grad` (never zeroed here).
    """
    step = _start(model, input_ids, response_start, group_ids, config, runtime, readout, row_temperature, True)
    if not callable(loss_fn):
        raise ValueError("loss_fn must be callable as loss_fn(indices, log_probs) -> scalar tensor.")
    stats = _new_stats(model, step.plan, step.rows, step.response_start, step.config)
    stats.padding_passes = (
        step.chunks - len(step.plan.prefix_chunks) + step.micro_batches - len(step.plan.micro_batches)
    )
    if step.config.router_aux_loss:
        if readout != "log_probs":
            raise ValueError("PrefixReuseConfig.router_aux_loss is for causal LMs (readout='log_probs').")
        step.router, step.router_spec = PrefixRouterLogits(), router_spec(model, step.config.router_aux_loss_coef)
        stats.router_aux_losses = []
    with _prefix_attention(model):
        with _phase(stats, "A", step.device):
            _phase_a(step)
        with _phase(stats, "B", step.device):
            _phase_b(step, loss_fn, loss_entropy, stats)
        with _phase(stats, "C", step.device):
            _phase_c(step)
    if step.router is not None:
        stats.router_aux_loss = sum(stats.router_aux_losses)
    return stats


def compute_log_probs(
    model: torch.nn.Module,
    input_ids: Sequence[torch.Tensor],
    response_start: Sequence[int],
    group_ids: Sequence[Hashable],
    config: PrefixReuseConfig | None = None,
    return_entropy: bool = False,
    *,
    row_temperature: Sequence[float] | None = None,
    runtime: ScheduleRuntime | None = None,
) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Response-token log-probs per row under no_grad, each shared prefix computed once.

    Returns a list (row order) of 1-D tensors of length len(row) - response_start[row]; with
    `return_entropy`, also the per-token entropies of the tempered distribution.
    """
    step = _start(model, input_ids, response_start, group_ids, config, runtime, "log_probs", row_temperature, False)
    log_probs, entropies = _infer(step, return_entropy)
    return (log_probs, entropies) if return_entropy else log_probs


def compute_values(
    model: torch.nn.Module,
    input_ids: Sequence[torch.Tensor],
    response_start: Sequence[int],
    group_ids: Sequence[Hashable],
    config: PrefixReuseConfig | None = None,
    *,
    runtime: ScheduleRuntime | None = None,
) -> list[torch.Tensor]:
    """Per-response-token values of a one-label token-classification model (verl's critic), under
    no_grad with prefix reuse; value of response token t is read at position t - 1, as verl does."""
    step = _start(model, input_ids, response_start, group_ids, config, runtime, "values", None, False)
    values, _ = _infer(step, False)
    return values


# ---------------------------------------------------------------------------------------------
# One schedule call's state


@dataclass
class _Step:
    """Everything one schedule call works on, passed explicitly to each phase."""

    model: torch.nn.Module
    plan: SchedulePlan
    rows: list[torch.Tensor]
    response_start: Sequence[int]
    row_temperature: Sequence[float] | None
    config: PrefixReuseConfig
    runtime: ScheduleRuntime
    readout: Readout
    device: torch.device
    chunks: int  # Phase-A/C passes: the plan's chunks, then one-token padding chunks
    micro_batches: int  # Phase-B passes: the plan's micro-batches, then one-token padding passes
    prefix_kv: PrefixKV = field(default_factory=PrefixKV)
    refs: dict[int, tuple[PrefixRef, ...]] = field(default_factory=dict)  # group -> its path's spans
    # group -> (chunk, row in the chunk's read-outs, first position read) for nodes whose outputs
    # rows read (response tokens shared by several rows)
    readouts: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    # Phase-A outputs per chunk: (head output, read-out rows or None), the roots of Phase C
    head_outputs: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    # per chunk: its read-out rows [K, vocab] (logits) or [K] (values), detached, at least fp32;
    # Phase B reads them, their `.grad` accumulates every row's share and seeds Phase C
    node_outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    rng_states: dict[int, tuple] = field(default_factory=dict)
    router: PrefixRouterLogits | None = None
    router_spec: RouterSpec | None = None

    @property
    def sp(self) -> SequenceParallel | None:
        return self.runtime.sequence_parallel

    def is_padding_chunk(self, c: int) -> bool:
        return c >= len(self.plan.prefix_chunks)

    def is_padding_micro_batch(self, m: int) -> bool:
        return m >= len(self.plan.micro_batches)


def _start(model, input_ids, response_start, group_ids, config, runtime, readout, row_temperature, needs_grad):
    config = config or PrefixReuseConfig()
    runtime = runtime or ScheduleRuntime()
    device = _model_device(model)
    config = replace(config, attention=resolve_backend(config.attention, device))  # "auto" -> this device's
    error: ValueError | None = None
    try:
        rows, device = _validate(model, input_ids, response_start, group_ids, config, needs_grad, readout)
        _check_row_temperature(row_temperature, len(rows))
        if runtime.sequence_parallel is not None:
            _check_sequence_parallel(model, runtime.sequence_parallel, config)
        plan = schedule_plan(rows, response_start, group_ids, config)
        counts = [len(plan.prefix_chunks), len(plan.micro_batches)]
    except ValueError as exc:  # every rank learns of it below: the others must not wait in a collective
        error, counts = exc, [0, 0]
    sp = runtime.sequence_parallel
    if sp is not None:  # the group's passes are one computation: different rows would mismatch every all-to-all
        signature = [error is not None, *_rows_signature(input_ids, response_start, group_ids)]
        if not sp.same_on_all_ranks(signature, device):
            error = error or ValueError(
                "the ranks of a sequence-parallel group hold different rows; every rank of the group must "
                "get the same mini-batch (verl dispatches by data-parallel rank)."
            )
    chunks, micro_batches, failed = runtime.agreed_counts([*counts, error is not None], device)
    if error is not None:
        raise error
    if failed:
        raise ValueError("another data-parallel rank's batch was refused by the schedule (its error says why).")
    spans = {g: PrefixRef(*ref) for g, ref in plan.prefix_refs().items()}
    refs = {g: tuple(spans[a] for a in plan.path(g)) for g in spans}  # each group's path, top first
    firsts, readouts, read_rows = plan.readout_starts(response_start), {}, {}
    for g in sorted(firsts, key=lambda g: (spans[g].chunk, spans[g].start)):  # chunk order, as packed
        c = spans[g].chunk
        readouts[g] = (c, read_rows.get(c, 0), firsts[g])
        read_rows[c] = read_rows.get(c, 0) + plan.groups[g].prefix_len - firsts[g]
    return _Step(
        model,
        plan,
        rows,
        response_start,
        row_temperature,
        config,
        runtime,
        readout,
        device,
        chunks,
        micro_batches,
        refs=refs,
        readouts=readouts,
    )


# ---------------------------------------------------------------------------------------------
# Phases


def _phase_a(step: _Step) -> None:
    """Each prefix chunk forward once; its K/V stored, its graph kept (or dropped for recompute)."""
    mode = step.config.prefix_activations
    for c in range(step.chunks):
        step.rng_states[c] = _rng_state(step.device)
        with step.runtime.forward_context():
            if mode == "recompute":
                with torch.no_grad():
                    outputs = _prefix_forward(step, c, store=True)
            elif mode == "offload":
                with saved_tensors_on_cpu(pin_memory=step.device.type == "cuda"):
                    outputs = step.head_outputs[c] = _prefix_forward(step, c, store=True)
            else:
                outputs = step.head_outputs[c] = _prefix_forward(step, c, store=True)
        _keep_readouts(step, c, outputs[1], grad=True)


def _phase_b(step: _Step, loss_fn: LossFn, loss_entropy: bool, stats: ScheduleStats) -> None:
    """Each suffix micro-batch forward, loss and backward; gK/gV accumulate in `step.prefix_kv`."""
    for m in range(step.micro_batches):
        last = step.chunks == 0 and m == step.micro_batches - 1
        with step.runtime.grad_sync(last):
            with step.runtime.forward_context():
                if step.is_padding_micro_batch(m):
                    loss = _padding_loss(step)
                else:
                    loss = _suffix_loss(step, step.plan.micro_batches[m], loss_fn, loss_entropy, stats)
            step.runtime.backward(loss)


def _phase_c(step: _Step) -> None:
    """Each prefix chunk backward once, seeded (inside the graph) with the accumulated gK/gV; last
    chunk first: in a tree a chunk's backward adds to the gK/gV of the (earlier) chunks above it."""
    for c in reversed(range(step.chunks)):
        with step.runtime.grad_sync(c == 0):
            if step.config.prefix_activations == "recompute":
                with _restored_rng(step.device, step.rng_states[c]), step.runtime.forward_context():
                    step.head_outputs[c] = _prefix_forward(step, c, store=False)
            head, kept = step.head_outputs.pop(c)
            # The K/V seeds enter inside the layers (`PrefixKV.seed`); the backward starts at the
            # head output with zeros, so every layer output sees gradient: FSDP's backward hooks
            # (unshard, reduce-scatter) fire in order, and checkpointed layers are recomputed.
            roots, grads = [head], [torch.zeros_like(head)]
            read = step.node_outputs.pop(c, None)
            if read is not None and read.grad is not None:  # what the rows' losses put on shared outputs
                roots.append(kept)
                grads.append(read.grad.to(kept.dtype))
            if step.router is not None:
                roots_z, grads_z = step.router.seeds(c)
                roots, grads = roots + roots_z, grads + grads_z
            torch.autograd.backward(roots, grads)
        step.prefix_kv.release(c)


def _infer(step: _Step, return_entropy: bool):
    """Forward-only: Phase A under no_grad, then each micro-batch's per-token outputs."""
    outputs: list[torch.Tensor | None] = [None] * len(step.rows)
    entropies: list[torch.Tensor | None] = [None] * len(step.rows)
    with torch.no_grad(), _prefix_attention(step.model), step.runtime.forward_context():
        for c in range(step.chunks):
            _keep_readouts(step, c, _prefix_forward(step, c, store=True)[1], grad=False)
        for m in range(step.micro_batches):
            if step.is_padding_micro_batch(m):
                _padding_loss(step)
                continue
            indices, outs, ents = _suffix_forward(step, step.plan.micro_batches[m], return_entropy)
            for k, r in enumerate(indices):
                outputs[r] = outs[k]
                if return_entropy:
                    entropies[r] = ents[k]
    return outputs, entropies


# ---------------------------------------------------------------------------------------------
# Passes


def _prefix_forward(step: _Step, chunk: int, store: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run one Phase-A chunk (packed prefixes, block-causal): store every layer's K/V when `store`
    (and every MoE layer's router logits), seed Phase C's gradient under grad mode.

    Returns the model's head output, the root of Phase C's backward, and the outputs rows read at
    the chunk's read-out positions in packed order ([K, vocab] logits or [K] values; None when
    none is read), whole under sequence parallelism. A padding chunk is one token.
    """
    groups = [] if step.is_padding_chunk(chunk) else list(step.plan.prefix_chunks[chunk])
    blocks, keep, offset = [], [], 0
    for g in groups:  # a node reads its ancestors' spans (stored by earlier chunks)
        grp = step.plan.groups[g]
        above = step.refs[grp.parent] if grp.parent is not None else ()
        blocks.append(Block(offset, offset + grp.span, (grp.span,), above))
        if g in step.readouts:
            keep.append(torch.arange(offset + step.readouts[g][2] - grp.start, offset + grp.span, device=step.device))
        offset += grp.span
    if groups:
        spans = [step.plan.groups[g] for g in groups]
        ids = torch.cat([step.rows[grp.rows[0]][grp.start : grp.prefix_len] for grp in spans])
        positions = torch.cat([torch.arange(grp.start, grp.prefix_len, device=step.device) for grp in spans])
    else:
        blocks = [Block(0, 1, (1,))]
        ids = positions = torch.zeros(1, dtype=torch.long, device=step.device)
    ctx = AttentionContext(
        "capture", tuple(blocks), step.prefix_kv, step.config.attention, chunk=chunk, store=store, sp=step.sp
    )
    keep_idx = torch.cat(keep) if keep else torch.empty(0, dtype=torch.long, device=step.device)
    ids, positions, first = _shard(step.sp, ids, positions)
    keep_local, _, kept_per_rank = _local_keep(step.sp, keep_idx, first, ids.shape[1])
    # The head runs over read-out positions only (a value head is one column: it runs everywhere).
    kwargs = {CONTEXT_KWARG: ctx}
    if step.readout == "log_probs":
        kwargs["logits_to_keep"] = keep_local
    if step.router is not None:
        kwargs["output_router_logits"] = True
    output = step.model(input_ids=ids, position_ids=positions, use_cache=False, **kwargs)
    if step.router is not None:
        step.router.capture(chunk, output.router_logits, store)
    if store:
        _check_hooked(step.model, len(step.prefix_kv.kv.get(chunk, {})))
    kept = None
    if keep:
        kept = output.logits.squeeze(0) if step.readout == "log_probs" else output.logits[0, keep_local, 0]
        if step.sp is not None:
            kept = _gather_kept(step.sp, kept, kept_per_rank)
    return output.logits, kept


def _keep_readouts(step: _Step, chunk: int, kept: torch.Tensor | None, grad: bool) -> None:
    """Keep a chunk's read-out outputs for Phase B as a leaf (at least fp32: many rows' gradients
    add up in it, as for the prefix K/V)."""
    if kept is not None:
        leaf = kept.detach().to(accumulation_dtype(kept.dtype))
        step.node_outputs[chunk] = leaf.requires_grad_() if grad else leaf


def _suffix_forward(
    step: _Step, segments: Sequence[Segment], entropy: bool, router_out: list | None = None
) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor] | None]:
    """Run one Phase-B micro-batch; return its row indices, per-response-token log-probs or values
    (and entropies) over each row's whole response: the part read from shared nodes above the row
    (`step.node_outputs`), then its own. With `router_out`, append the micro-batch's per-layer
    router logits to it."""
    blocks, ids, positions, keep, labels, indices, counts = [], [], [], [], [], [], []
    # read-outs of nodes above, per row: (chunk, first row, end row) of the chunk's read-outs
    shared: list[tuple[int, int, int]] = []
    shared_labels, shared_counts = [], []
    offset = 0
    rows, device = step.rows, step.device
    for seg in segments:
        p = step.plan.groups[seg.group].prefix_len
        above = [(a, step.readouts[a]) for a in step.plan.path(seg.group) if a in step.readouts]
        lengths = tuple(len(rows[r]) - p for r in seg.rows)
        blocks.append(Block(offset, offset + sum(lengths), lengths, step.refs.get(seg.group, ())))
        for r, n in zip(seg.rows, lengths, strict=True):
            start = step.response_start[r]
            own = max(start, p + 1)  # first response token whose logit this pass computes
            ids.append(rows[r][p:])
            positions.append(torch.arange(p, len(rows[r]), device=device))
            # logit at position t predicts token t + 1: response tokens own.. come from own-1..len-2
            keep.append(torch.arange(offset + own - 1 - p, offset + n - 1, device=device))
            labels.append(rows[r][own:])
            indices.append(r)
            counts.append(len(rows[r]) - own)
            read = 0
            for a, (chunk, row0, first) in above:
                lo, hi = max(first, start - 1), step.plan.groups[a].prefix_len
                if lo < hi:
                    shared.append((chunk, row0 + lo - first, row0 + hi - first))
                    shared_labels.append(rows[r][lo + 1 : hi + 1])
                    read += hi - lo
            shared_counts.append(read)
            offset += n
    ctx = AttentionContext("suffix", tuple(blocks), step.prefix_kv, step.config.attention, sp=step.sp)
    keep_idx, labels = torch.cat(keep), torch.cat(labels)
    input_ids, position_ids, first = _shard(step.sp, torch.cat(ids), torch.cat(positions))
    inputs = {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False, CONTEXT_KWARG: ctx}
    # under sequence parallelism this rank reads out the kept positions of its slice only
    keep_idx, local, kept_per_rank = _local_keep(step.sp, keep_idx, first, input_ids.shape[1])
    if step.readout == "values":
        values = step.model(**inputs).logits[0, keep_idx].squeeze(-1)
        if step.sp is not None:
            values = _gather_kept(step.sp, values, kept_per_rank)
        if shared:
            read = torch.cat([step.node_outputs[c][a:b] for c, a, b in shared]).to(values.dtype)
            return indices, _join(read, shared_counts, values, counts), None
        return indices, list(values.split(counts)), None
    if router_out is not None:
        output = step.model(**inputs, logits_to_keep=keep_idx, output_router_logits=True)
        router_out.append(output.router_logits)
    else:
        output = step.model(**inputs, logits_to_keep=keep_idx)
    logits = output.logits.squeeze(0)  # a view: indexing [0] would zero-fill a [1, N, V] gradient
    temperature = _temperatures(step, indices, counts)
    if isinstance(temperature, torch.Tensor):
        temperature = temperature[local]
    log_probs, entropies = token_log_probs(logits, labels[local], temperature, entropy)
    if step.sp is not None:
        log_probs = _gather_kept(step.sp, log_probs, kept_per_rank)
        if entropies is not None:
            entropies = _gather_kept(step.sp, entropies, kept_per_rank)
    if shared:  # every row reads the shared outputs above it with its own label and temperature
        shared_lp, shared_ent = _shared_log_probs(
            step, shared, torch.cat(shared_labels), indices, shared_counts, entropy
        )
        log_probs = _join(shared_lp, shared_counts, log_probs, counts)
        if entropies is not None:
            entropies = _join(shared_ent, shared_counts, entropies, counts)
        return indices, log_probs, entropies
    return (
        indices,
        list(log_probs.split(counts)),
        list(entropies.split(counts)) if entropies is not None else None,
    )


def _shared_log_probs(
    step: _Step,
    pieces: list[tuple[int, int, int]],
    labels: torch.Tensor,
    indices: list[int],
    counts: list[int],
    entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) of `labels` at the read-out rows `pieces` ((chunk, start, end) of
    `step.node_outputs`; rows `indices[k]` read `counts[k]` of them in turn). Under one temperature
    each read-out row's log-normaliser (and entropy) is computed once however many rows read it, so
    the work and memory are those of the distinct positions; the leaf's gradient sums every
    reader's. Rows at different temperatures: each row's share computed on its own."""
    temperatures = {step.config.temperature}
    if step.row_temperature is not None:  # verl hands every row its temperature, mostly one value
        temperatures = {float(step.row_temperature[r]) for r, n in zip(indices, counts, strict=True) if n}
    if len(temperatures) > 1:
        rows = torch.cat([step.node_outputs[c][a:b] for c, a, b in pieces])
        return token_log_probs(rows, labels, _temperatures(step, indices, counts), entropy)
    (temperature,) = temperatures
    chunks = sorted({c for c, _, _ in pieces})
    starts = list(itertools.accumulate([0] + [len(step.node_outputs[c]) for c in chunks]))
    base = dict(zip(chunks, starts, strict=False))  # the chunks' read-outs, numbered one after another
    positions = torch.cat([torch.arange(base[c] + a, base[c] + b, device=step.device) for c, a, b in pieces])
    distinct, reader = torch.unique(positions, return_inverse=True)  # sorted, so chunk by chunk
    per_chunk = torch.tensor_split(distinct, torch.searchsorted(distinct, distinct.new_tensor(starts[1:-1])).tolist())
    logits = torch.cat([step.node_outputs[c][rows - base[c]] for c, rows in zip(chunks, per_chunk, strict=True)])
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    log_probs = logits[reader, labels] - lse[reader]
    if not entropy:
        return log_probs, None
    ent = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return log_probs, ent[reader]


def _temperatures(step: _Step, indices: list[int], counts: list[int]) -> float | torch.Tensor:
    """The temperature of each of `counts[k]` tokens of row `indices[k]`: [N, 1] fp64 per-row
    temperatures, or the config's float."""
    if step.row_temperature is None:
        return step.config.temperature
    per_token = [
        torch.full((n,), float(step.row_temperature[r]), dtype=torch.float64, device=step.device)
        for r, n in zip(indices, counts, strict=True)
    ]
    return torch.cat(per_token)[:, None]


def _join(shared: torch.Tensor, shared_counts: list[int], own: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    """Per row: its `shared_counts[k]` read-outs from nodes above, then its `counts[k]` own."""
    return [
        torch.cat([a, b]) if len(a) else b for a, b in zip(shared.split(shared_counts), own.split(counts), strict=True)
    ]


def _suffix_loss(
    step: _Step, segments: Sequence[Segment], loss_fn: LossFn, loss_entropy: bool, stats: ScheduleStats
) -> torch.Tensor:
    """One Phase-B micro-batch's loss (plus coef x its router aux loss), always backward-able so
    that every rank runs the same backward passes."""
    router_out: list | None = [] if step.router is not None else None
    indices, outputs, entropies = _suffix_forward(step, segments, loss_entropy, router_out)
    loss = loss_fn(indices, outputs, entropies) if loss_entropy else loss_fn(indices, outputs)
    if step.router is not None:
        # dense counts each prefix token once per row: weight every span above a segment by its rows
        shared = [
            (step.router.of_prefix(ref), len(seg.rows)) for seg in segments for ref in step.refs.get(seg.group, ())
        ]
        aux = load_balancing_loss(router_out[0], shared, step.router_spec)
        stats.router_aux_losses.append(aux.item())
        loss = loss + step.router_spec.coef * aux
    if not loss.requires_grad:  # a loss independent of the model still takes part in the backward
        loss = loss + 0.0 * torch.cat(outputs).sum()
    return loss


def _padding_loss(step: _Step) -> torch.Tensor:
    """A one-token pass with zero loss: the same module calls (and FSDP collectives) as a real
    micro-batch, no effect on any gradient."""
    ctx = AttentionContext("suffix", (Block(0, 1, (1,)),), step.prefix_kv, step.config.attention, sp=step.sp)
    ids, positions, _ = _shard(step.sp, *[torch.zeros(1, dtype=torch.long, device=step.device)] * 2)
    out = step.model(input_ids=ids, position_ids=positions, use_cache=False, **{CONTEXT_KWARG: ctx}).logits
    return 0.0 * out.sum()


def token_log_probs(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float | torch.Tensor, entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(label) and optionally entropy per row of `logits` [N, V] / temperature (fp32 at least).

    `temperature` is a float or an [N, 1] tensor (one value per token).
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if isinstance(temperature, torch.Tensor):
        logits = logits / temperature.to(logits.dtype)
    elif temperature != 1.0:  # skip a full [N, V] copy in the common case
        logits = logits / temperature
    if not entropy:
        # fused log-softmax + gather: fewer passes over [N, V] than logsumexp's backward
        return -F.cross_entropy(logits, labels, reduction="none"), None
    lse = torch.logsumexp(logits, dim=-1)
    log_probs = logits.gather(-1, labels[:, None]).squeeze(-1) - lse
    ent = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return log_probs, ent


# ---------------------------------------------------------------------------------------------
# Sequence parallelism


def _shard(
    sp: SequenceParallel | None, ids: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A packed pass's model inputs on this rank: ids/positions [1, T] without sequence parallelism,
    else this rank's [1, T'/size] slice of them padded to T' (a multiple of size; pad ids 0,
    positions 0..pad-1, as verl pads), and the slice's first global position."""
    if sp is None:
        return ids[None], positions[None], 0
    pad = -len(ids) % sp.size
    if pad:
        ids = torch.cat([ids, ids.new_zeros(pad)])
        positions = torch.cat([positions, torch.arange(pad, device=positions.device)])
    width = len(ids) // sp.size
    start = sp.rank * width
    return ids[None, start : start + width], positions[None, start : start + width], start


def _local_keep(
    sp: SequenceParallel | None, keep_idx: torch.Tensor, first: int, width: int
) -> tuple[torch.Tensor, torch.Tensor | slice, list[int] | None]:
    """Read-out positions of a pass on this rank: without sequence parallelism all of them; else the
    ones in this rank's slice [first, first + width) as local indices, the mask that picked them
    from `keep_idx`, and every rank's count (for `_gather_kept`)."""
    if sp is None:
        return keep_idx, slice(None), None
    local = (keep_idx >= first) & (keep_idx < first + width)
    kept_per_rank = torch.bincount(keep_idx // width, minlength=sp.size).tolist()
    return keep_idx[local] - first, local, kept_per_rank


def _gather_kept(sp: SequenceParallel, local_values: torch.Tensor, kept_per_rank: list[int]) -> torch.Tensor:
    """All ranks' per-kept-token outputs in global order (dim 0): each rank computed the kept tokens
    of its slice (`kept_per_rank[r]` of them on rank r); padded to the largest count and gathered."""
    width = max(1, *kept_per_rank)  # a pass may read out nothing (rows whose outputs nodes hold): gather 1
    pad = local_values.new_zeros((width - len(local_values), *local_values.shape[1:]))
    gathered = sp.gather(torch.cat([local_values, pad]), 0)  # [size * width, ...]; backward: this rank's slice
    real = torch.arange(width)[None] < torch.tensor(kept_per_rank)[:, None]
    return gathered[real.flatten().to(gathered.device)]


def _rows_signature(input_ids, response_start, group_ids) -> list[int]:
    """Fixed-length fingerprint of a schedule call's rows, compared across a sequence-parallel group."""
    try:
        lengths = [int(len(r)) for r in input_ids]
        digest = zlib.crc32(repr((lengths, [int(s) for s in response_start], [str(g) for g in group_ids])).encode())
        tokens = int(torch.cat([r.reshape(-1).long() for r in input_ids]).sum()) if lengths else 0
        return [len(lengths), sum(lengths), digest, tokens % 2**62]
    except (TypeError, ValueError, RuntimeError):  # malformed rows: validation names the problem
        return [-1, 0, 0, 0]


def _check_sequence_parallel(model: torch.nn.Module, sp: SequenceParallel, config: PrefixReuseConfig) -> None:
    cfg = getattr(model.config, "text_config", None) or model.config
    heads, kv_heads = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    if heads % sp.size or (kv_heads % sp.size and sp.size % kv_heads):
        raise ValueError(
            f"ulysses_sequence_parallel_size={sp.size} must divide num_attention_heads={heads}, and divide "
            f"or be a multiple of num_key_value_heads={kv_heads}; choose another sequence-parallel size."
        )
    if config.router_aux_loss:
        raise ValueError("prefix_reuse.router_aux_loss=true needs ulysses_sequence_parallel_size=1.")


# ---------------------------------------------------------------------------------------------
# Helpers


@contextlib.contextmanager
def _prefix_attention(model: torch.nn.Module) -> Iterator[None]:
    """Route the model's attention through `prefix_attention` for the duration of the call."""
    register()
    previous = model.config._attn_implementation
    model.config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        model.config._attn_implementation = previous


@contextlib.contextmanager
def _phase(stats: ScheduleStats, name: str, device: torch.device) -> Iterator[None]:
    with phase_peak(device, stats.peak_memory_bytes, name):
        start = time.perf_counter()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stats.seconds[name] = time.perf_counter() - start


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _restored_rng(device: torch.device, state: tuple) -> Iterator[None]:
    """Replay Phase A's RNG stream (dropout) in the recomputed prefix forward; leave the caller's intact."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


def _new_stats(
    model: torch.nn.Module,
    plan: SchedulePlan,
    rows: Sequence[torch.Tensor],
    response_start: Sequence[int],
    config: PrefixReuseConfig,
) -> ScheduleStats:
    shared = [g for g in plan.groups if g.prefix_len > 0]
    spans, suffixes, readouts = plan.work([len(r) for r in rows], response_start)
    try:
        flops = FlopModel.from_config(model.config)
    except AttributeError:  # unknown config layout: count tokens only
        flops = FlopModel(per_token=1.0, per_token_lm_head=0.0, per_pair=0.0)
    return ScheduleStats(
        rows=len(rows),
        # tree nodes; a node longer than the token budget runs as a chain of groups (same rows): one
        groups=sum(g.parent is None or plan.groups[g.parent].rows != g.rows for g in shared),
        dense_rows=len(plan.groups) - len(shared),
        micro_batches=len(plan.micro_batches),
        prefix_chunks=len(plan.prefix_chunks),
        prefix_tokens=sum(n for _, n in spans),
        suffix_tokens=sum(n for _, n in suffixes),
        dense_tokens=sum(len(r) for r in rows),
        flop_bound=flops.tree_training_ratio(
            spans, suffixes, recompute=config.prefix_activations == "recompute", readouts=readouts
        ),
    )


def _model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _check_hooked(model: torch.nn.Module, layers_seen: int) -> None:
    expected = getattr(getattr(model.config, "text_config", None) or model.config, "num_hidden_layers", None)
    if layers_seen == 0 or (expected is not None and layers_seen != expected):
        raise ValueError(
            f"{type(model).__name__}: {layers_seen} attention layers went through transformers' "
            f"AttentionInterface (expected {expected}); this model's attention cannot be hooked by "
            "the shared-prefix schedule. Train it dense (prefix reuse off)."
        )


def _check_row_temperature(row_temperature: Sequence[float] | None, n: int) -> None:
    if row_temperature is None:
        return
    if len(row_temperature) != n or not all(float(t) > 0 for t in row_temperature):
        raise ValueError(f"row_temperature must hold {n} positive values, one per row of input_ids.")


def _validate(
    model: torch.nn.Module,
    input_ids: Sequence[torch.Tensor],
    response_start: Sequence[int],
    group_ids: Sequence[Hashable],
    config: PrefixReuseConfig,
    needs_grad: bool,
    readout: Readout = "log_probs",
) -> tuple[list[torch.Tensor], torch.device]:
    """Check arguments; return rows moved to the model's device and that device."""
    if not isinstance(config, PrefixReuseConfig):
        raise ValueError(f"config must be a PrefixReuseConfig or None, got {type(config).__name__}.")
    config.validate()
    cfg = getattr(model, "config", None)
    if readout not in ("log_probs", "values"):
        raise ValueError(f"readout={readout!r} is unknown; use 'log_probs' or 'values'.")
    names = (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if readout == "log_probs" else MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES
    )
    wanted = "causal LM (e.g. AutoModelForCausalLM)" if readout == "log_probs" else "token-classification value model"
    matches = any(cls.__name__ in names.values() for cls in type(model).__mro__)
    if cfg is None or not matches or getattr(cfg, "is_encoder_decoder", False) or not getattr(cfg, "is_causal", True):
        raise ValueError(f"model must be a decoder-only transformers {wanted}; got {type(model).__name__}.")
    if readout == "values" and getattr(cfg, "num_labels", 1) != 1:
        raise ValueError(f"a value model has num_labels=1; got num_labels={cfg.num_labels}.")
    n = len(input_ids)
    if n == 0:
        raise ValueError("input_ids is empty: pass at least one row.")
    if len(response_start) != n or len(group_ids) != n:
        raise ValueError(
            f"input_ids, response_start and group_ids must have one entry per row; got lengths "
            f"{n}, {len(response_start)}, {len(group_ids)}."
        )
    device = _model_device(model)
    rows = []
    for i, (row, start) in enumerate(zip(input_ids, response_start, strict=True)):
        if not isinstance(row, torch.Tensor) or row.dim() != 1 or row.dtype not in (torch.long, torch.int):
            raise ValueError(f"input_ids[{i}] must be a 1-D integer tensor (unpadded token ids).")
        if len(row) < 2:
            raise ValueError(
                f"input_ids[{i}] has {len(row)} tokens; a row needs at least one prompt and one response token."
            )
        if not isinstance(start, int) or isinstance(start, bool) or not 1 <= start < len(row):
            raise ValueError(
                f"response_start[{i}]={start!r} must be an int in [1, {len(row) - 1}] (the index of row {i}'s "
                "first response token; at least one prompt and one response token)."
            )
        rows.append(row.to(device=device, dtype=torch.long))
    check_backend(config.attention, device, needs_grad)
    return rows, device
