"""FSDP engines that run verl mini-batches through the shared-prefix schedule.

Engine = how to compute. These subclasses of verl's FSDP engines replace only
`forward_backward_batch`: the mini-batch goes through `verl_prefix.core` (each shared prefix once)
and every suffix micro-batch's loss is verl's own loss function (`ppo_loss`, `value_loss`) over
those rows, with verl's global token normalisation (`batch_num_tokens`, `dp_size`) assigned as the
stock engine assigns it — so the update equals stock verl's on the same mini-batch. With
`prefix_reuse.enable` false (or absent) they are the stock engines.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu
from verl.utils.device import get_device_name
from verl.utils.model import extract_multi_modal_inputs
from verl.utils.py_functional import append_to_dict
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead, FSDPEngineWithValueHead

from ..core import ScheduleRuntime, ScheduleStats, compute_log_probs, compute_values, forward_backward
from ..core.memory import lifetime_peak_bytes
from ..core.moe import RouterSpec, load_balancing_loss, router_spec
from .batch import full_length_nested, prompt_lengths, schedule_rows
from .config import PrefixReuseSettings
from .ulysses import sequence_parallel

logger = logging.getLogger(__name__)

METRIC_PREFIX = "prefix_reuse/"


def unsupported_reason(engine, data: TensorDict) -> str | None:
    """Why this mini-batch must run dense (None when the schedule supports it)."""
    if not data["input_ids"].is_nested:
        return "padded input_ids (pad_mode != no_padding)"
    if "multi_modal_inputs" in data.keys() and extract_multi_modal_inputs(tu.get(data, "multi_modal_inputs")):
        return "multi-modal inputs"
    prompts = prompt_lengths(data)
    if bool((data["input_ids"].offsets().diff().to(prompts.device) <= prompts).any()) or bool((prompts < 1).any()):
        return "rows with an empty prompt or response"
    if "position_ids" in data.keys() and not positions_are_arange(data["position_ids"]):
        return "position_ids that are not 0..len-1 per row (e.g. multi-dimensional RoPE)"
    for key in ("use_fused_kernels", "calculate_sum_pi_squared", "distillation_use_topk", "distillation_only"):
        if tu.get_non_tensor_data(data=data, key=key, default=False):
            return key
    return None


def positions_are_arange(position_ids: torch.Tensor) -> bool:
    """True when every row's position ids are 0, 1, ..., len - 1 (what the schedule assumes)."""
    if not position_ids.is_nested or position_ids.dim() != 2:
        return False
    offsets = position_ids.offsets()
    lengths = offsets.diff()
    expected = torch.arange(int(offsets[-1]), device=offsets.device) - torch.repeat_interleave(offsets[:-1], lengths)
    return bool(torch.equal(position_ids.values().to(expected.device), expected))


def stats_metrics(stats: ScheduleStats, lifetime: int | None = None) -> dict[str, float]:
    """Flat `prefix_reuse/*` metrics of one schedule call (`lifetime`: the process's peak bytes)."""
    out = {
        "groups": stats.groups,
        "rows": stats.rows,
        "dense_rows": stats.dense_rows,
        "micro_batches": stats.micro_batches,
        "prefix_chunks": stats.prefix_chunks,
        "padding_passes": stats.padding_passes,
        "prefix_tokens": stats.prefix_tokens,
        "suffix_tokens": stats.suffix_tokens,
        "dense_tokens": stats.dense_tokens,
        "flop_bound": stats.flop_bound,
        "fallbacks": 0,
    }
    for phase, seconds in stats.seconds.items():
        out[f"phase_{phase}_seconds"] = seconds
    for phase, peak in stats.peak_memory_bytes.items():
        if peak is not None:
            out[f"phase_{phase}_peak_memory_gb"] = peak / 2**30
    if lifetime is not None:
        # the schedule resets CUDA's peak per phase, so verl's perf/max_memory_allocated_gb no
        # longer spans the run; this one does ("max" in the name: verl aggregates it by max)
        out["max_memory_allocated_gb"] = lifetime / 2**30
    return {METRIC_PREFIX + k: float(v) for k, v in out.items()}


class PrefixReuseEngineMixin:
    """forward_backward_batch through the core schedule; mixed into verl's FSDP engines.

    `readout` names what the model head yields per token ("log_probs" or "values"), and
    `model_output_key` the key verl's loss function reads it from.
    """

    readout: str = "log_probs"
    model_output_key: str = "log_probs"

    @property
    def prefix_reuse(self) -> PrefixReuseSettings | None:
        settings = getattr(self.engine_config, "prefix_reuse", None)
        return settings if settings is not None and settings.enable else None

    def forward_backward_batch(self, data: TensorDict, loss_function: Callable, forward_only: bool = False):
        settings = self.prefix_reuse
        if settings is None:
            return self._dense(data, loss_function, forward_only)
        reason = self._agreed_reason(unsupported_reason(self, data))
        if reason is not None:
            self._warn_once(reason)
            self._check_stock_dense_under_sp(f"a mini-batch with {reason}")
            output = self._dense(data, loss_function, forward_only)
            output["metrics"][METRIC_PREFIX + "fallbacks"] = [1.0]
            return output
        if forward_only:
            return self._reuse_infer(data, loss_function, settings)
        return self._reuse_train(data, loss_function, settings)

    # -- helpers -------------------------------------------------------------------------------

    def _dense(self, data: TensorDict, loss_function: Callable, forward_only: bool):
        """verl's stock path, plus coef x the router aux loss per micro-batch when the settings ask for
        it (transformers' `load_balancing_loss_func` over the micro-batch's real tokens)."""
        settings = getattr(self.engine_config, "prefix_reuse", None)
        if forward_only or loss_function is None or settings is None or not settings.router_aux_loss:
            return super().forward_backward_batch(data, loss_function, forward_only)
        spec = self._router_spec(settings)
        if self.ulysses_sequence_parallel_size > 1:
            raise ValueError("prefix_reuse.router_aux_loss=true needs ulysses_sequence_parallel_size=1.")
        captured: list[torch.Tensor] = []
        recording = [False]

        def start(module, args, kwargs):  # a micro-batch forward begins (a checkpoint recompute does not)
            captured.clear()
            recording[0] = True

        def record(module, args, output):
            if recording[0]:
                captured.append(output[0])  # router logits [packed or padded tokens, num_experts]

        def with_aux(model_output, data, dp_group):
            recording[0] = False
            real = _real_tokens(data, captured[0].shape[0])  # drop verl's pad tokens (packed tail / right pad)
            aux = load_balancing_loss([z[real] for z in captured], [], spec)
            captured.clear()
            loss, metrics = loss_function(model_output=model_output, data=data, dp_group=dp_group)
            metrics = dict(metrics)
            metrics[METRIC_PREFIX + "router_aux_loss"] = aux.item()
            return loss + spec.coef * aux, metrics

        routers = [m for m in self.module.modules() if type(m).__name__.endswith("TopKRouter")]
        if not routers:
            raise ValueError(f"prefix_reuse.router_aux_loss=true but {type(self.module).__name__} has no MoE router.")
        handles = [self.module.register_forward_pre_hook(start, with_kwargs=True)]
        handles += [r.register_forward_hook(record) for r in routers]
        try:
            return super().forward_backward_batch(data, with_aux, forward_only)
        finally:
            for h in handles:
                h.remove()

    def _router_spec(self, settings: PrefixReuseSettings) -> RouterSpec:
        if self.readout != "log_probs":
            raise ValueError("prefix_reuse.router_aux_loss=true is for the actor (causal LM); set it false here.")
        return router_spec(self.module, settings.router_aux_loss_coef)

    def _agreed_reason(self, reason: str | None) -> str | None:
        """Dense fallback is one decision for the whole dp group: the dense and the reuse path issue
        different FSDP passes, so one rank falling back alone would leave the others waiting."""
        if torch.distributed.get_world_size(self.get_data_parallel_group()) == 1:
            return reason
        flag = torch.tensor([reason is not None], dtype=torch.long, device=self._device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.get_data_parallel_group())
        if reason is None and bool(flag.item()):
            return "a mini-batch on another data-parallel rank that needs the dense path"
        return reason

    def _runtime(self) -> ScheduleRuntime:
        """The stock engine's numerics and communication around every schedule pass: its autocast
        (`mixed_precision.param_dtype`), its fp16 loss scaler, its gradient-sync context (one
        reduce-scatter per mini-batch), its dp group (passes kept in step across ranks) and its
        Ulysses group (each pass's tokens split over it)."""
        autocast_dtype = getattr(self, "_autocast_dtype", torch.bfloat16)
        device_name = get_device_name()

        def forward_context():
            if autocast_dtype == torch.float32:  # as stock: no autocast region at all in fp32
                return nullcontext()
            return torch.autocast(device_type=device_name, dtype=autocast_dtype)

        scaler = getattr(self, "scaler", None)

        def backward(loss: torch.Tensor) -> None:
            (scaler.scale(loss) if scaler is not None else loss).backward()

        return ScheduleRuntime(
            forward_context=forward_context,
            backward=backward,
            grad_sync=lambda last: self._gradient_sync_context(is_last_micro_batch=last),
            group=self.get_data_parallel_group(),
            sequence_parallel=sequence_parallel(self.ulysses_parallel_group)
            if self.ulysses_sequence_parallel_size > 1
            else None,
        )

    def _warn_once(self, reason: str) -> None:
        warned = self.__dict__.setdefault("_prefix_reuse_warned", set())
        if reason not in warned:
            warned.add(reason)
            logger.warning("prefix reuse does not support %s yet; running these batches dense.", reason)

    def _device(self) -> torch.device:
        return next(self.module.parameters()).device

    def _assign_normalisation(self, data: TensorDict) -> None:
        """batch_num_tokens / dp_size exactly as the stock forward_backward_batch assigns them."""
        tu.assign_non_tensor(data, sp_size=self.ulysses_sequence_parallel_size)
        batch_num_tokens = data["loss_mask"].sum().to(self._device())
        torch.distributed.all_reduce(
            batch_num_tokens, op=torch.distributed.ReduceOp.SUM, group=self.get_data_parallel_group()
        )
        tu.assign_non_tensor(data, batch_num_tokens=batch_num_tokens.item())
        tu.assign_non_tensor(data, dp_size=self.get_data_parallel_size())

    def _budget(self, data: TensorDict, forward_only: bool) -> int | None:
        """Suffix tokens per micro-batch: verl's dynamic-bsz token budget, else unbounded (the
        schedule then packs all suffixes of the mini-batch into one micro-batch)."""
        if tu.get_non_tensor_data(data=data, key="use_dynamic_bsz", default=True):
            budget = tu.get_non_tensor_data(data=data, key="max_token_len_per_gpu", default=None)
            return int(budget) * self.ulysses_sequence_parallel_size if budget else None
        per_gpu = tu.get_non_tensor_data(data=data, key="micro_batch_size_per_gpu", default=None)
        if per_gpu:
            # Same number of rows per micro-batch as verl, expressed as a token budget.
            lengths = data["input_ids"].offsets().diff()
            return int(lengths.sort(descending=True).values[: int(per_gpu)].sum())
        return None

    def _loss(self, indices, per_token, entropies, rows, starts, data, loss_function, losses, metrics):
        """verl's loss over the micro-batch made of `indices` (rows in mini-batch order)."""
        micro_batch = tu.index_select_tensor_dict(data, indices)
        mb_rows, mb_starts = [rows[i] for i in indices], [starts[i] for i in indices]
        model_output = {self.model_output_key: full_length_nested(per_token, mb_rows, mb_starts)}
        if entropies is not None:
            model_output["entropy"] = full_length_nested(entropies, mb_rows, mb_starts)
        loss, step_metrics = loss_function(
            model_output=model_output, data=micro_batch, dp_group=self.get_data_parallel_group()
        )
        losses.append(loss.detach().item())
        append_to_dict(metrics, step_metrics)
        return loss

    def _reuse_train(self, data: TensorDict, loss_function: Callable, settings: PrefixReuseSettings):
        if settings.verify_every:
            self._check_stock_dense_under_sp("prefix_reuse.verify_every")
        self._assign_normalisation(data)
        batch = schedule_rows(data)
        device = self._device()
        rows = [r.to(device) for r in batch.input_ids]
        data_on_device = data.to(device)
        calculate_entropy = self.readout == "log_probs" and bool(
            tu.get_non_tensor_data(data=data, key="calculate_entropy", default=False)
        )
        losses: list[float] = []
        metrics: dict[str, list] = {}

        def loss_fn(indices, per_token, entropies=None):
            return self._loss(
                indices,
                per_token,
                entropies,
                rows,
                batch.response_start,
                data_on_device,
                loss_function,
                losses,
                metrics,
            )

        kwargs = dict(readout=self.readout)
        if self.readout == "log_probs":
            kwargs.update(row_temperature=batch.row_temperature, loss_entropy=calculate_entropy)
        start = time.perf_counter()
        stats = forward_backward(
            self.module,
            rows,
            batch.response_start,
            batch.group_ids,
            loss_fn,
            settings.core_config(self._budget(data, forward_only=False)),
            runtime=self._runtime(),
            **kwargs,
        )
        reuse_seconds = time.perf_counter() - start
        for key, value in stats_metrics(stats, lifetime_peak_bytes(self._device())).items():
            metrics[key] = [value]
        if stats.router_aux_losses is not None:
            # per micro-batch, as the dense path reports it: its loss includes coef x aux, and the
            # metric is the (unscaled) aux loss of each micro-batch
            coef = self._router_spec(settings).coef
            losses[:] = [loss + coef * aux for loss, aux in zip(losses, stats.router_aux_losses, strict=True)]
            metrics[METRIC_PREFIX + "router_aux_loss"] = list(stats.router_aux_losses)
        calls = self.__dict__.get("_prefix_reuse_updates", 0) + 1
        self.__dict__["_prefix_reuse_updates"] = calls
        if settings.verify_every and calls % settings.verify_every == 0:
            metrics.update(self._verify_against_dense(data, loss_function, reuse_seconds))
        return {"model_output": {}, "loss": losses, "metrics": metrics}

    def _reuse_infer(self, data: TensorDict, loss_function: Callable | None, settings: PrefixReuseSettings):
        batch = schedule_rows(data)
        device = self._device()
        rows = [r.to(device) for r in batch.input_ids]
        calculate_entropy = self.readout == "log_probs" and bool(
            tu.get_non_tensor_data(data=data, key="calculate_entropy", default=False)
        )
        config = settings.core_config(self._budget(data, forward_only=True))
        runtime = self._runtime()
        entropies = None
        if self.readout == "values":
            per_token = compute_values(
                self.module, rows, batch.response_start, batch.group_ids, config, runtime=runtime
            )
        elif calculate_entropy:
            per_token, entropies = compute_log_probs(
                self.module,
                rows,
                batch.response_start,
                batch.group_ids,
                config,
                True,
                row_temperature=batch.row_temperature,
                runtime=runtime,
            )
        else:
            per_token = compute_log_probs(
                self.module,
                rows,
                batch.response_start,
                batch.group_ids,
                config,
                row_temperature=batch.row_temperature,
                runtime=runtime,
            )
        model_output = {self.model_output_key: full_length_nested(per_token, rows, batch.response_start)}
        if calculate_entropy:
            model_output["entropy"] = full_length_nested(entropies, rows, batch.response_start)
        losses: list[float] = []
        metrics: dict[str, list] = {}
        if loss_function is not None:  # metrics only (no backward), computed as stock does: under its autocast
            self._assign_normalisation(data)
            with runtime.forward_context():
                self._loss(
                    list(range(len(rows))),
                    per_token,
                    entropies,
                    rows,
                    batch.response_start,
                    data.to(device),
                    loss_function,
                    losses,
                    metrics,
                )
        return {"model_output": model_output, "loss": losses, "metrics": metrics}

    def _check_stock_dense_under_sp(self, what: str) -> None:
        """verl's Ulysses patch wraps flash-attn's attention only: with any other attention its dense
        path under sp > 1 attends within each rank's slice of the tokens (wrong, silently)."""
        attention = getattr(self.module.config, "_attn_implementation", None)
        if self.ulysses_sequence_parallel_size > 1 and attention != "flash_attention_2":
            raise ValueError(
                f"{what} needs verl's dense path, which under ulysses_sequence_parallel_size="
                f"{self.ulysses_sequence_parallel_size} is correct only with attn_implementation=flash_attention_2 "
                f"(this model: {attention}); set override_config.attn_implementation=flash_attention_2, or "
                "ulysses_sequence_parallel_size=1."
            )

    def _verify_against_dense(self, data: TensorDict, loss_function: Callable, reuse_seconds: float) -> dict:
        """Dense gradient of the same mini-batch beside the reuse one; grads are left as reuse made them."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        reuse_grads = [p.grad.detach().clone() for p in params]
        for p in params:
            p.grad = None
        start = time.perf_counter()
        self._dense(data, loss_function, False)
        dense_seconds = time.perf_counter() - start
        diff = torch.zeros((), dtype=torch.float64, device=self._device())
        scale = torch.zeros_like(diff)
        for p, g in zip(params, reuse_grads, strict=True):
            dense = _local(p.grad) if p.grad is not None else torch.zeros_like(_local(g))
            diff = torch.maximum(diff, (_local(g) - dense).abs().max().double())
            scale = torch.maximum(scale, dense.abs().max().double())
            p.grad = g
        stacked = torch.stack([diff, scale])
        torch.distributed.all_reduce(stacked, op=torch.distributed.ReduceOp.MAX, group=self.get_data_parallel_group())
        rel = (stacked[0] / stacked[1].clamp_min(1e-30)).item()
        return {
            METRIC_PREFIX + "verify_max_grad_rel_diff": [rel],
            METRIC_PREFIX + "verify_speedup": [dense_seconds / max(reuse_seconds, 1e-9)],
        }


def _real_tokens(micro_batch: TensorDict, width: int) -> torch.Tensor:
    """Bool [width]: which of the model's flattened token positions hold a real token, in verl's
    layout: packed (remove padding) = the rows back to back, then any pad; else [rows, max_len],
    right-padded."""
    lengths = micro_batch["input_ids"].offsets().diff()
    if tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True):
        return torch.arange(width, device=lengths.device) < int(lengths.sum())
    longest = int(lengths.max())
    assert width == len(lengths) * longest, (width, lengths)
    return (torch.arange(longest, device=lengths.device)[None] < lengths[:, None]).flatten()


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 grads), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class PrefixReuseFSDPEngineWithLMHead(PrefixReuseEngineMixin, FSDPEngineWithLMHead):
    """Actor / reference engine: response log-probs (and entropies) through the schedule."""


class PrefixReuseFSDPEngineWithValueHead(PrefixReuseEngineMixin, FSDPEngineWithValueHead):
    """Critic engine: per-token values through the schedule."""

    readout = "values"
    model_output_key = "values"
