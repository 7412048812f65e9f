"""The three-phase shared-prefix schedule for Hugging Face causal LMs.

Phase A: each shared prefix runs forward once; every layer's post-RoPE K/V is captured and
detached into leaves (`prefix_kv`). Phase B: suffixes (starting at the last prompt token) run as
packed micro-batches whose attention reads [prefix K/V ; own K/V]; each micro-batch's loss is
backpropagated, adding parameter grads and grad_prefix_kv into the leaves. Phase C: one prefix
backward per chunk, seeded with the accumulated grad_prefix_kv. In real arithmetic the parameter
gradients equal dense training over every row.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
)

from .attention import (
    ATTENTION_NAME,
    AttentionContext,
    Block,
    PrefixKV,
    PrefixRef,
    active_context,
    check_backend,
    register,
)
from .config import PrefixReuseConfig, ScheduleStats
from .flops import FlopModel
from .memory import phase_peak, saved_tensors_on_cpu
from .moe import PrefixRouterLogits, RouterSpec, load_balancing_loss, router_spec
from .plan import SchedulePlan, Segment, make_plan

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
) -> ScheduleStats:
    """Accumulate into `param.grad` the gradient of sum(loss_fn(...)) over all suffix micro-batches.

    Args:
        model: transformers causal LM (Llama, Qwen2, Qwen3, Qwen3-MoE, ...), in the mode the caller wants.
        input_ids: one 1-D unpadded LongTensor per trajectory (prompt + response).
        response_start: index of each row's first response token, 1 <= response_start[i] < len(row).
        group_ids: rows with equal ids may share a prefix (verl's uid); the prefix actually shared is
            the longest common token prefix of the group, cut before every member's last prompt token.
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

    Gradients are added to existing `.grad` (never zeroed here).
    """
    config = config or PrefixReuseConfig()
    rows, device = _validate(model, input_ids, response_start, group_ids, config, needs_grad=True, readout=readout)
    _check_row_temperature(row_temperature, len(rows))
    if not callable(loss_fn):
        raise ValueError("loss_fn must be callable as loss_fn(indices, log_probs) -> scalar tensor.")
    plan = make_plan(rows, response_start, group_ids, config.max_tokens_per_micro_batch, config.min_prefix_tokens)
    stats = _new_stats(model, plan, rows, config)
    mode = config.prefix_activations
    prefix_kv = PrefixKV()
    rng_states: dict[int, tuple] = {}
    head_outputs: dict[int, torch.Tensor] = {}  # Phase-A head outputs, kept for hook-driven wrappers
    hooked = _backward_needs_output_hooks(model)
    router: PrefixRouterLogits | None = None
    spec: RouterSpec | None = None
    if config.router_aux_loss:
        if readout != "log_probs":
            raise ValueError("PrefixReuseConfig.router_aux_loss is for causal LMs (readout='log_probs').")
        spec, router = router_spec(model, config.router_aux_loss_coef), PrefixRouterLogits()
        stats.router_aux_losses = []

    prefix_forward = functools.partial(
        _prefix_forward, model, plan, rows=rows, prefix_kv=prefix_kv, config=config, readout=readout, router=router
    )

    with _prefix_attention(model):
        with _phase(stats, "A", device):
            for c in range(len(plan.prefix_chunks)):
                rng_states[c] = _rng_state(device)
                if mode == "recompute":
                    with torch.no_grad():
                        prefix_forward(c, keep_graph=False)
                elif mode == "offload":
                    with saved_tensors_on_cpu(pin_memory=device.type == "cuda"):
                        out = prefix_forward(c, keep_graph=True)
                else:
                    out = prefix_forward(c, keep_graph=True)
                if hooked and mode != "recompute":
                    head_outputs[c] = out

        with _phase(stats, "B", device):
            refs = _prefix_refs(plan)
            for segments in plan.micro_batches:
                suffix_router: list = []
                indices, log_probs, entropies = _suffix_forward(
                    model,
                    plan,
                    segments,
                    refs,
                    rows,
                    response_start,
                    prefix_kv,
                    config,
                    row_temperature,
                    loss_entropy,
                    readout,
                    router_out=suffix_router if router is not None else None,
                )
                loss = loss_fn(indices, log_probs, entropies) if loss_entropy else loss_fn(indices, log_probs)
                if router is not None:
                    # dense counts each prefix token once per row: weight a prefix by its rows here
                    shared = [
                        (router.of_prefix(refs[seg.group]), len(seg.rows)) for seg in segments if seg.group in refs
                    ]
                    aux = load_balancing_loss(suffix_router[0], shared, spec)
                    stats.router_aux_losses.append(aux.item())
                    loss = loss + spec.coef * aux
                if loss.requires_grad:
                    loss.backward()
            if router is not None:
                stats.router_aux_loss = sum(stats.router_aux_losses)

        with _phase(stats, "C", device):
            for c in range(len(plan.prefix_chunks)):
                if mode == "recompute":
                    with _restored_rng(device, rng_states[c]):
                        out = prefix_forward(c, keep_graph=True, make_leaves=False)
                    if hooked:
                        head_outputs[c] = out
                graph = prefix_kv.graph.pop(c)
                leaves = prefix_kv.leaves.pop(c)
                outputs, grads = [], []
                for graph_kv, leaf_kv in zip(graph, leaves, strict=True):
                    for out, leaf in zip(graph_kv, leaf_kv, strict=True):
                        if leaf.grad is not None and out.requires_grad:
                            outputs.append(out)
                            grads.append(leaf.grad)
                if router is not None:  # the prefix router logits' share of every micro-batch's aux loss
                    for graph_z, leaf_z in zip(router.graph.pop(c), router.leaves.pop(c), strict=True):
                        if leaf_z.grad is not None and graph_z.requires_grad:
                            outputs.append(graph_z)
                            grads.append(leaf_z.grad)
                if c in head_outputs:
                    # FSDP unshards a layer's parameters when gradient reaches that layer's *output*;
                    # the K/V seeds enter inside the layers, so also send zeros down from the head
                    # output: every layer output then sees gradient and FSDP's hooks fire in order.
                    head = head_outputs.pop(c)
                    outputs.append(head)
                    grads.append(torch.zeros_like(head))
                if outputs:
                    torch.autograd.backward(outputs, grads)
                del graph, leaves, outputs, grads
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
) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Response-token log-probs per row under no_grad, each shared prefix computed once.

    Returns a list (row order) of 1-D tensors of length len(row) - response_start[row]; with
    `return_entropy`, also the per-token entropies of the tempered distribution.
    """
    log_probs, entropies = _infer(
        model, input_ids, response_start, group_ids, config, "log_probs", return_entropy, row_temperature
    )
    return (log_probs, entropies) if return_entropy else log_probs


def compute_values(
    model: torch.nn.Module,
    input_ids: Sequence[torch.Tensor],
    response_start: Sequence[int],
    group_ids: Sequence[Hashable],
    config: PrefixReuseConfig | None = None,
) -> list[torch.Tensor]:
    """Per-response-token values of a one-label token-classification model (verl's critic), under
    no_grad with prefix reuse; value of response token t is read at position t - 1, as verl does."""
    values, _ = _infer(model, input_ids, response_start, group_ids, config, "values", False, None)
    return values


def _infer(model, input_ids, response_start, group_ids, config, readout, return_entropy, row_temperature):
    config = config or PrefixReuseConfig()
    rows, _ = _validate(model, input_ids, response_start, group_ids, config, needs_grad=False, readout=readout)
    _check_row_temperature(row_temperature, len(rows))
    plan = make_plan(rows, response_start, group_ids, config.max_tokens_per_micro_batch, config.min_prefix_tokens)
    outputs: list[torch.Tensor | None] = [None] * len(rows)
    entropies: list[torch.Tensor | None] = [None] * len(rows)
    prefix_kv = PrefixKV()
    with torch.no_grad(), _prefix_attention(model):
        for c in range(len(plan.prefix_chunks)):
            _prefix_forward(model, plan, c, rows, prefix_kv, config, readout, keep_graph=False)
        refs = _prefix_refs(plan)
        for segments in plan.micro_batches:
            indices, outs, ents = _suffix_forward(
                model,
                plan,
                segments,
                refs,
                rows,
                response_start,
                prefix_kv,
                config,
                row_temperature,
                return_entropy,
                readout,
            )
            for k, r in enumerate(indices):
                outputs[r] = outs[k]
                if return_entropy:
                    entropies[r] = ents[k]
    return outputs, entropies


# ---------------------------------------------------------------------------------------------
# Phases


def _prefix_forward(
    model: torch.nn.Module,
    plan: SchedulePlan,
    chunk: int,
    rows: Sequence[torch.Tensor],
    prefix_kv: PrefixKV,
    config: PrefixReuseConfig,
    readout: Readout,
    keep_graph: bool,
    make_leaves: bool = True,
    router: PrefixRouterLogits | None = None,
) -> torch.Tensor:
    """Run one Phase-A chunk (packed prefixes, block-causal) and capture every layer's K/V (and,
    with `router`, every MoE layer's router logits).

    Returns the model's (head) output tensor, whose graph Phase C may need (see `_hooked_backward`).
    """
    groups = [plan.groups[g] for g in plan.prefix_chunks[chunk]]
    blocks, offset = [], 0
    for grp in groups:
        blocks.append(Block(offset, offset + grp.prefix_len, (grp.prefix_len,), None))
        offset += grp.prefix_len
    ids = torch.cat([rows[grp.rows[0]][: grp.prefix_len] for grp in groups])
    positions = torch.cat([torch.arange(grp.prefix_len, device=ids.device) for grp in groups])
    ctx = AttentionContext(
        "capture",
        tuple(blocks),
        prefix_kv,
        config.attention,
        chunk=chunk,
        keep_graph=keep_graph,
        make_leaves=make_leaves,
    )
    # No head over prefix tokens: their outputs are never read (a value head is one column: kept).
    head = {"logits_to_keep": torch.empty(0, dtype=torch.long, device=ids.device)} if readout == "log_probs" else {}
    if router is not None:
        head["output_router_logits"] = True
    with active_context(ctx):
        output = model(input_ids=ids[None], position_ids=positions[None], use_cache=False, **head)
    if router is not None:
        router.capture(chunk, output.router_logits, keep_graph, make_leaves)
    captured = (prefix_kv.graph if keep_graph else prefix_kv.leaves).get(chunk, [])
    _check_hooked(model, len(captured))
    return output.logits


def _suffix_forward(
    model: torch.nn.Module,
    plan: SchedulePlan,
    segments: Sequence[Segment],
    refs: dict[int, PrefixRef],
    rows: Sequence[torch.Tensor],
    response_start: Sequence[int],
    prefix_kv: PrefixKV,
    config: PrefixReuseConfig,
    row_temperature: Sequence[float] | None,
    entropy: bool,
    readout: Readout = "log_probs",
    router_out: list | None = None,
) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor] | None]:
    """Run one Phase-B micro-batch; return its row indices, per-response-token log-probs or values
    (and entropies). With `router_out`, append the micro-batch's per-layer router logits to it."""
    blocks, ids, positions, keep, labels, indices, counts = [], [], [], [], [], [], []
    offset = 0
    device = rows[0].device
    for seg in segments:
        p = plan.groups[seg.group].prefix_len
        lengths = tuple(len(rows[r]) - p for r in seg.rows)
        blocks.append(Block(offset, offset + sum(lengths), lengths, refs.get(seg.group)))
        for r, n in zip(seg.rows, lengths, strict=True):
            ids.append(rows[r][p:])
            positions.append(torch.arange(p, len(rows[r]), device=device))
            # logit at position t predicts token t + 1: response tokens rs.. come from rs-1..len-2
            keep.append(torch.arange(offset + response_start[r] - 1 - p, offset + n - 1, device=device))
            labels.append(rows[r][response_start[r] :])
            indices.append(r)
            counts.append(len(rows[r]) - response_start[r])
            offset += n
    ctx = AttentionContext("suffix", tuple(blocks), prefix_kv, config.attention)
    keep_idx = torch.cat(keep)
    inputs = dict(input_ids=torch.cat(ids)[None], position_ids=torch.cat(positions)[None], use_cache=False)
    with active_context(ctx):
        if readout == "values":
            values = model(**inputs).logits[0, keep_idx].squeeze(-1)
            return indices, list(values.split(counts)), None
        if router_out is not None:
            output = model(**inputs, logits_to_keep=keep_idx, output_router_logits=True)
            router_out.append(output.router_logits)
            logits = output.logits[0]
        else:
            logits = model(**inputs, logits_to_keep=keep_idx).logits[0]
    temperature: float | torch.Tensor = config.temperature
    if row_temperature is not None:
        temperature = torch.cat(
            [
                torch.full((n,), float(row_temperature[r]), dtype=torch.float64, device=device)
                for r, n in zip(indices, counts, strict=True)
            ]
        )[:, None]
    log_probs, entropies = token_log_probs(logits, torch.cat(labels), temperature, entropy)
    return (
        indices,
        list(log_probs.split(counts)),
        list(entropies.split(counts)) if entropies is not None else None,
    )


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
# Helpers


def _prefix_refs(plan: SchedulePlan) -> dict[int, PrefixRef]:
    return {g: PrefixRef(*ref) for g, ref in plan.prefix_refs().items()}


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
    model: torch.nn.Module, plan: SchedulePlan, rows: Sequence[torch.Tensor], config: PrefixReuseConfig
) -> ScheduleStats:
    shared = [g for g in plan.groups if g.prefix_len > 0]
    prefix_lens = [g.prefix_len for g in plan.groups]
    suffix_lens = [[len(rows[r]) - g.prefix_len for r in g.rows] for g in plan.groups]
    try:
        flops = FlopModel.from_config(model.config)
    except AttributeError:  # unknown config layout: count tokens only
        flops = FlopModel(per_token=1.0, per_token_lm_head=0.0, per_pair=0.0)
    return ScheduleStats(
        rows=len(rows),
        groups=len(shared),
        dense_rows=len(plan.groups) - len(shared),
        micro_batches=len(plan.micro_batches),
        prefix_tokens=sum(g.prefix_len for g in shared),
        suffix_tokens=sum(sum(s) for s in suffix_lens),
        dense_tokens=sum(len(r) for r in rows),
        flop_bound=flops.training_ratio(prefix_lens, suffix_lens, recompute=config.prefix_activations == "recompute"),
    )


def _backward_needs_output_hooks(model: torch.nn.Module) -> bool:
    """True when parameters are materialised by hooks on module outputs (FSDP1 / FSDP2)."""
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
    except ImportError:  # torch built without distributed
        return False
    return any(isinstance(m, (FSDPModule, FSDP1)) for m in model.modules())


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
    device = next(model.parameters()).device
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
