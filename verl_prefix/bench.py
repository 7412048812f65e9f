"""One benchmark point: dense vs shared-prefix training step on synthetic GRPO groups.

Dense baseline: rows of equal length batched as [rows, P + S] through the model's stock SDPA
(causal fast path, no padding), full logits as verl computes them, micro-batches of at most
`max_tokens_per_micro_batch` tokens. Reuse: `forward_backward` with the same budget and loss.
Reported: median times, speedup, FLOP bound, efficiency, gradient agreement, peak memory per
phase and, on request, the capacity frontier (most trajectories one step holds within a memory
budget, dense vs reuse).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TypeVar

import torch

from .bench_engine import EngineBenchResult, check_engine_bench, run_engine_bench
from .bench_sp import SequenceParallelBenchResult, check_sp_bench, run_sp_bench
from .core import PrefixReuseConfig, compute_log_probs, forward_backward
from .core.attention import check_backend
from .core.config import ATTENTION_BACKENDS, PREFIX_ACTIVATION_MODES
from .core.flops import FlopModel
from .core.memory import available_bytes, current_bytes, exact_cpu_phase_peaks, phase_peak
from .core.plan import schedule_plan
from .dense import LOGITS, dense_forward_backward
from .random_models import FAMILIES, SHAPES, model_config, random_model, shaped_config

T = TypeVar("T")
MODELS = ("tiny", *SHAPES)
DTYPES = ("float32", "float64", "bfloat16", "float16")
NOISY_SPREAD = 1.25
TINY_LAYERS = 4


def opt(default, help: str, choices: tuple | None = None):
    """A config field with its command-line help (and choices), read by `verl-prefix`'s parser."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class BenchConfig:
    model: str = opt("tiny", "tiny (the dims below) or a shipped real shape with random weights", MODELS)
    family: str = opt("qwen3", "tiny only: model family", FAMILIES)
    hidden_size: int = opt(256, "tiny only: hidden size")
    num_layers: int = opt(0, "decoder layers; 0 = the model's own depth (tiny: 4). Fewer keep ratios, cut memory")
    vocab_size: int = opt(8192, "tiny only: vocabulary size")
    system_len: int = opt(0, "tokens of a system prompt that every group's prompt starts with (0: none)")
    prefix_len: int = opt(512, "shared prompt tokens per group after it (the prompt is system + prefix_len + 1)")
    suffix_len: int = opt(64, "tokens per row after the prefix (last prompt token + response)")
    group_size: int = opt(8, "rows per group (GRPO's G)")
    groups: int = opt(2, "groups in the batch")
    max_tokens_per_micro_batch: int = opt(4096, "token budget of a micro-batch (dense and suffix), >= --suffix-len")
    dense_logits: str = opt("all", "dense baseline's lm_head: at all positions (as verl) or response only", LOGITS)
    attention: str = opt("auto", "the schedule's attention backend", ATTENTION_BACKENDS)
    prefix_activations: str = opt("keep", "dormant prefix activations during Phase B", PREFIX_ACTIVATION_MODES)
    turns: int = opt(
        1,
        "agent trees: each response has this many turns; turn k < turns is shared by the group's rows in "
        "2**(k-1) branches (the samples split in two at each turn), the last is each row's own suffix",
    )
    turn_len: int = opt(64, "tokens of each shared turn (with --turns > 1)")
    prefix_tree: bool = opt(
        True, "the schedule's prefix_tree: spans shared across groups and response turns once; false: one per group"
    )
    forward_only: bool = opt(False, "time log-prob passes (no_grad) instead of training steps")
    engine: bool = opt(
        False,
        "also time verl's stock FSDP engine against verl-prefix's engine on the same mini-batch "
        "(FSDP2, remove-padding, dynamic batch size, the same token budget; needs verl)",
    )
    sequence_parallel: int = opt(
        1,
        "also time reuse vs dense at this Ulysses sequence-parallel size: that many processes share "
        "each pass's tokens (verl's collectives; gloo on CPU, one GPU per rank on CUDA)",
    )
    dtype: str = opt("float32", "model dtype", DTYPES)
    device: str = opt("cpu", "cpu or cuda")
    repeats: int = opt(3, "timed steps per side after one warm-up")
    seed: int = opt(0, "random seed of weights and batch")
    capacity: bool = opt(False, "also search the most trajectories one step holds, dense vs reuse")
    memory_budget_gb: float = opt(0.0, "capacity budget above idle memory; 0 = dense's need for one group")
    max_capacity_rows: int = opt(256, "the capacity search stops here")

    @property
    def row_len(self) -> int:
        """Tokens of every row: system prompt, prefix, last prompt token, shared turns and its own part."""
        return self.system_len + self.prefix_len + (self.turns - 1) * self.turn_len + self.suffix_len

    def schedule_config(self, max_tokens_per_micro_batch: int | None) -> PrefixReuseConfig:
        """The schedule's settings of this point."""
        return PrefixReuseConfig(
            max_tokens_per_micro_batch=max_tokens_per_micro_batch,
            attention=self.attention,  # type: ignore[arg-type]
            prefix_activations=self.prefix_activations,  # type: ignore[arg-type]
            prefix_tree=self.prefix_tree,
        )

    def check(self) -> None:
        """Raise ValueError naming the flag and the fix before any point runs."""
        if self.dense_logits not in ("all", "response"):
            raise ValueError(f"--dense-logits={self.dense_logits!r}: use 'all' (as verl computes) or 'response'.")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype={self.dtype!r}: use one of {', '.join(DTYPES)}.")
        if self.system_len < 0:
            raise ValueError(f"--system-len={self.system_len} must be >= 0.")
        positive = (
            "prefix_len",
            "suffix_len",
            "group_size",
            "groups",
            "repeats",
            "turns",
            "max_tokens_per_micro_batch",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 1.")
        if self.model != "tiny" and self.model not in SHAPES:
            raise ValueError(f"--model={self.model!r}: use 'tiny' or one of {sorted(SHAPES)}.")
        if self.model == "tiny" and self.family not in FAMILIES:
            raise ValueError(f"--family={self.family!r}: use one of {', '.join(FAMILIES)}.")
        if self.turns > 1 and self.turn_len < 1:
            raise ValueError(f"--turn-len={self.turn_len} must be >= 1 with --turns={self.turns}.")
        if self.max_tokens_per_micro_batch < self.suffix_len:
            raise ValueError(
                f"--max-tokens-per-micro-batch={self.max_tokens_per_micro_batch} is below --suffix-len="
                f"{self.suffix_len}: a suffix runs whole in one micro-batch; raise it to at least {self.suffix_len}."
            )
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(
                f"--device={self.device} but this torch ({torch.__version__}) sees no CUDA device; use --device=cpu "
                "or install the torch build for your CUDA."
            )
        self._check_memory()
        if self.engine:
            check_engine_bench(self)
        check_sp_bench(self)
        try:  # the schedule's own checks, with its messages
            self.schedule_config(self.max_tokens_per_micro_batch).validate()
            check_backend(self.attention, torch.device(self.device), needs_grad=True)
        except ValueError as e:
            point = (
                f"--attention={self.attention} --prefix-activations={self.prefix_activations} --device={self.device}"
            )
            raise ValueError(f"{point}: {e}") from None

    def _check_memory(self) -> None:
        """Refuse a model whose weights and gradients alone exceed the device's free memory."""
        if self.model == "tiny":
            return
        from transformers import AutoModelForCausalLM

        config = shaped_config(self.model, self.num_layers or None)
        with torch.device("meta"):
            params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        need = 2 * params * getattr(torch, self.dtype).itemsize  # weights + gradients, no activations
        free = available_bytes(torch.device(self.device))
        if free is not None and need > free:
            layers = self.num_layers or config.num_hidden_layers
            raise ValueError(
                f"--model={self.model} --num-layers={layers} --dtype={self.dtype}: "
                f"weights and gradients alone need {need / 2**30:.1f} GiB, {self.device} has {free / 2**30:.1f} GiB "
                "free; lower --num-layers (ratios hold per layer) or use a GPU."
            )


@dataclass
class Capacity:
    """Most trajectories (and their logical tokens) one training step holds within `budget_bytes`.

    Each side runs all its rows in one micro-batch (reuse: one prefix chunk, one suffix batch);
    memory is the step's peak above the idle model. `capped` marks a search that hit the row limit.
    """

    budget_bytes: int
    dense_rows: int
    reuse_rows: int
    dense_tokens: int
    reuse_tokens: int
    ratio: float  # reuse_tokens / dense_tokens
    capped: bool


@dataclass
class BenchResult:
    config: BenchConfig
    dense_seconds: float  # median over repeats
    reuse_seconds: float
    speedup: float
    flop_bound: float
    efficiency: float  # speedup / flop_bound
    max_grad_rel_diff: float  # max over parameters of max|g_reuse - g_dense| / max|g_dense| (forward-only: log-probs)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    phase_peak_memory_bytes: dict[str, int | None] = field(default_factory=dict)
    dense_peak_memory_bytes: int | None = None
    idle_memory_bytes: int | None = None  # before a step: weights (and nothing else) resident
    phase_B_memory_saving: float | None = None  # 1 - (B peak - idle) / (dense peak - idle)
    capacity: Capacity | None = None
    engine: EngineBenchResult | None = None  # --engine: stock verl engine vs verl-prefix's engine
    sequence_parallel: SequenceParallelBenchResult | None = None  # --sequence-parallel N > 1
    dense_times: list[float] = field(default_factory=list)  # every timed repeat, seconds
    reuse_times: list[float] = field(default_factory=list)

    @property
    def noisy(self) -> bool:
        engine = [self.engine.stock_times, self.engine.reuse_times] if self.engine else []
        sp = [self.sequence_parallel.dense_times, self.sequence_parallel.reuse_times] if self.sequence_parallel else []
        return any(is_noisy(t) for t in [self.dense_times, self.reuse_times, *engine, *sp])

    def as_dict(self) -> dict:
        return {**asdict(self), "noisy": self.noisy}


def build_model(cfg: BenchConfig, min_positions: int = 0) -> torch.nn.Module:
    """Random-weight model of `cfg.model` on `cfg.device` in `cfg.dtype` (no download)."""
    if cfg.model == "tiny":
        config = model_config(
            cfg.family,
            cfg.hidden_size,
            cfg.num_layers or TINY_LAYERS,
            vocab_size=cfg.vocab_size,
            max_positions=max(32768, min_positions),
        )
    else:
        config = shaped_config(cfg.model, cfg.num_layers or None, min_positions)
    return random_model(config, getattr(torch, cfg.dtype), cfg.device, cfg.seed)


def synthetic_groups(
    cfg: BenchConfig, vocab_size: int, groups: int | None = None
) -> tuple[list[torch.Tensor], list[int], list[str], list[torch.Tensor]]:
    """GRPO-shaped batch: `groups` prompts of system_len + prefix_len + 1 tokens (the system prompt the
    same in all), `group_size` responses each. With `turns` > 1 a response is an agent trajectory:
    turn k < turns (`turn_len` tokens) is shared by the group's rows in 2**(k-1) branches, then each
    row's own suffix_len - 1 tokens."""
    gen = torch.Generator().manual_seed(cfg.seed)
    system = torch.randint(0, vocab_size, (cfg.system_len,), generator=gen)
    own = cfg.suffix_len - 1
    rows, starts, uids, advantages = [], [], [], []
    for g in range(cfg.groups if groups is None else groups):
        prompt = torch.cat([system, torch.randint(0, vocab_size, (cfg.prefix_len + 1,), generator=gen)])
        branches = [min(2**k, cfg.group_size) for k in range(cfg.turns - 1)]
        turns = [torch.randint(0, vocab_size, (n, cfg.turn_len), generator=gen) for n in branches]
        for i in range(cfg.group_size):
            shared = [turn[i * n // cfg.group_size] for turn, n in zip(turns, branches, strict=True)]
            response = torch.cat([*shared, torch.randint(0, vocab_size, (own,), generator=gen)])
            rows.append(torch.cat([prompt, response]))
            starts.append(len(prompt))
            uids.append(f"uid-{g}")
            advantages.append(torch.randn(len(response), generator=gen))
    return rows, starts, uids, advantages


def policy_loss(advantages: list[torch.Tensor], total_tokens: int):
    """Token-mean policy-gradient surrogate: -sum(A * logp) / total response tokens."""

    def loss_fn(indices: list[int], log_probs: list[torch.Tensor]) -> torch.Tensor:
        terms = [(advantages[i].to(lp) * lp).sum() for i, lp in zip(indices, log_probs, strict=True)]
        return -torch.stack(terms).sum() / total_tokens

    return loss_fn


def timed(fn: Callable[[], T], device: torch.device) -> tuple[float, T]:
    """(wall seconds of fn(), its result); CUDA work is synchronised on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def batch_flop_bound(cfg: BenchConfig, model_config, dense_lm_head_all: bool) -> float:
    """The FLOP bound of the bench's batch under the schedule's plan of it: training, or forward-only
    with `cfg.forward_only`. `dense_lm_head_all=False`: the dense side's lm_head at response positions."""
    rows, starts, uids, _ = synthetic_groups(cfg, model_config.vocab_size)
    plan = schedule_plan(rows, starts, uids, cfg.schedule_config(cfg.max_tokens_per_micro_batch))
    spans, suffixes, readouts = plan.work([len(r) for r in rows], starts)
    flops = FlopModel.from_config(model_config)
    if cfg.forward_only:
        return flops.tree_forward_ratio(spans, suffixes, readouts)
    return flops.tree_training_ratio(
        spans,
        suffixes,
        recompute=cfg.prefix_activations == "recompute",
        dense_lm_head_all=dense_lm_head_all,
        readouts=readouts,
        dense_lm_head_tokens=sum(len(r) - s for r, s in zip(rows, starts, strict=True)),
    )


def max_rel_diff(ours: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> float:
    """max over tensors of max|ours - ref| / max|ref| (the figure every bench side reports)."""
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(ours, ref, strict=True))


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    out = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out


def run_bench(cfg: BenchConfig, progress=None, model: torch.nn.Module | None = None) -> BenchResult:
    """Measure one point; `model` (built by `build_model`) may be shared across points of a sweep."""
    device = torch.device(cfg.device)
    model = model if model is not None else build_model(cfg, cfg.row_len)
    vocab = model.config.vocab_size
    rows, starts, uids, advantages = synthetic_groups(cfg, vocab)
    rows = [r.to(device) for r in rows]
    advantages = [a.to(device) for a in advantages]
    loss_fn = policy_loss(advantages, sum(len(a) for a in advantages))
    config = cfg.schedule_config(cfg.max_tokens_per_micro_batch)
    dense_peak: dict[str, int | None] = {}
    stats_holder = {}

    outputs: dict[str, list[torch.Tensor]] = {}

    def run_dense() -> None:
        with phase_peak(device, dense_peak, "dense"), torch.set_grad_enabled(not cfg.forward_only):
            outputs["dense"], _, _ = dense_forward_backward(
                model,
                rows,
                starts,
                None if cfg.forward_only else loss_fn,
                cfg.max_tokens_per_micro_batch,
                logits=cfg.dense_logits,
            )

    def run_reuse() -> None:
        if cfg.forward_only:  # no per-phase statistics: compute_log_probs returns log-probs only
            outputs["reuse"] = compute_log_probs(model, rows, starts, uids, config)
        else:
            stats_holder["stats"] = forward_backward(model, rows, starts, uids, loss_fn, config)

    # Warm-up (also the gradient or log-prob comparison and the memory figures, measured with
    # per-phase heap trims that would perturb timing), then alternate timed repeats.
    model.zero_grad(set_to_none=True)
    with exact_cpu_phase_peaks():
        run_dense()
        dense_out = outputs["dense"] if cfg.forward_only else _grads(model)
        run_reuse()
        reuse_out = outputs["reuse"] if cfg.forward_only else _grads(model)
    dense_max = dense_peak.get("dense")
    phase_memory = dict(stats_holder["stats"].peak_memory_bytes) if "stats" in stats_holder else {}
    if cfg.forward_only:
        dense_out, reuse_out = [torch.cat(dense_out)], [torch.cat(reuse_out)]
    diff = max_rel_diff(reuse_out, dense_out)
    del dense_out, reuse_out
    idle = current_bytes(device)
    dense_times, reuse_times = [], []
    for r in range(cfg.repeats):
        dense_times.append(timed(run_dense, device)[0])
        model.zero_grad(set_to_none=True)
        reuse_times.append(timed(run_reuse, device)[0])
        model.zero_grad(set_to_none=True)
        if progress:
            progress(r + 1, cfg.repeats)
    stats = stats_holder.get("stats")
    dense_s, reuse_s = statistics.median(dense_times), statistics.median(reuse_times)
    speedup = dense_s / reuse_s
    # The bound of this batch against this dense baseline (its lm_head positions).
    bound = batch_flop_bound(cfg, model.config, dense_lm_head_all=cfg.dense_logits == "all")
    saving = None
    phase_b = phase_memory.get("B")
    if idle is not None and phase_b is not None and dense_max is not None and dense_max > idle:
        saving = 1.0 - (phase_b - idle) / (dense_max - idle)
    return BenchResult(
        config=cfg,
        dense_seconds=dense_s,
        reuse_seconds=reuse_s,
        dense_times=dense_times,
        reuse_times=reuse_times,
        speedup=speedup,
        flop_bound=bound,
        efficiency=speedup / bound,
        max_grad_rel_diff=diff,
        phase_seconds=dict(stats.seconds) if stats else {},
        phase_peak_memory_bytes=phase_memory,
        dense_peak_memory_bytes=dense_max,
        idle_memory_bytes=idle,
        phase_B_memory_saving=saving,
        capacity=measure_capacity(cfg, model) if cfg.capacity else None,
        engine=run_engine_bench(cfg, model) if cfg.engine else None,
        sequence_parallel=run_sp_bench(cfg) if cfg.sequence_parallel > 1 else None,
    )


def step_memory(cfg: BenchConfig, model: torch.nn.Module, n_rows: int, reuse: bool) -> int | None:
    """Peak bytes above idle of one training step over `n_rows` trajectories in one micro-batch."""
    device = torch.device(cfg.device)
    rows, starts, uids, advantages = synthetic_groups(cfg, model.config.vocab_size, math.ceil(n_rows / cfg.group_size))
    rows, starts, uids = [r.to(device) for r in rows[:n_rows]], starts[:n_rows], uids[:n_rows]
    loss_fn = policy_loss([a.to(device) for a in advantages[:n_rows]], sum(len(a) for a in advantages[:n_rows]))
    model.zero_grad(set_to_none=True)
    idle = current_bytes(device)
    peak: dict[str, int | None] = {}
    try:
        with phase_peak(device, peak, "step"):
            inner = _one_step(cfg, model, rows, starts, uids, loss_fn, reuse)
    except torch.OutOfMemoryError:  # does not fit: larger than any budget
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return 2**62
    model.zero_grad(set_to_none=True)
    if idle is None or peak["step"] is None:
        return None
    # the schedule's own per-phase readings reset the peak counter: the step's peak is the largest
    return max([peak["step"], *(v for v in inner.values() if v is not None)]) - idle


def _one_step(cfg: BenchConfig, model, rows, starts, uids, loss_fn, reuse: bool) -> dict[str, int | None]:
    """One training step over all rows in one micro-batch (reuse: one prefix chunk, one suffix
    batch); returns the schedule's per-phase peaks (none for dense)."""
    if reuse:
        config = cfg.schedule_config(None)
        return dict(forward_backward(model, rows, starts, uids, loss_fn, config).peak_memory_bytes)
    dense_forward_backward(model, rows, starts, loss_fn, None, logits=cfg.dense_logits)
    return {}


def _most_rows(fits: Callable[[int], bool], limit: int) -> tuple[int, bool]:
    """Largest n in [1, limit] with fits(n), assuming fits is monotone; (0, False) if none fits."""
    lo, hi = 0, 1
    while fits(hi):
        lo = hi
        if hi == limit:
            return limit, True
        hi = min(2 * hi, limit)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, False


def measure_capacity(cfg: BenchConfig, model: torch.nn.Module) -> Capacity | None:
    """Capacity frontier at `cfg.memory_budget_gb` (default: dense's need for one group of G rows)."""
    budget = int(cfg.memory_budget_gb * 2**30)
    if budget <= 0:
        budget = step_memory(cfg, model, cfg.group_size, reuse=False)
        if budget is None:
            return None
    dense_rows, dense_capped = _most_rows(
        lambda n: (step_memory(cfg, model, n, reuse=False) or 0) <= budget, cfg.max_capacity_rows
    )
    reuse_rows, reuse_capped = _most_rows(
        lambda n: (step_memory(cfg, model, n, reuse=True) or 0) <= budget, cfg.max_capacity_rows
    )
    row_tokens = cfg.row_len
    return Capacity(
        budget_bytes=budget,
        dense_rows=dense_rows,
        reuse_rows=reuse_rows,
        dense_tokens=dense_rows * row_tokens,
        reuse_tokens=reuse_rows * row_tokens,
        ratio=reuse_rows / dense_rows if dense_rows else float("inf"),
        capped=dense_capped or reuse_capped,
    )


def _mib(v: int | None) -> str:
    return f"{v / 2**20:.0f} MiB" if v is not None else "n/a"


def is_noisy(times: list[float]) -> bool:
    """The slowest repeat took over NOISY_SPREAD x the fastest: the machine was not quiet."""
    return bool(times) and max(times) > NOISY_SPREAD * min(times)


def _spread(times: list[float]) -> str:
    """min-max of the repeats in ms, flagged when the spread marks a noisy machine."""
    if not times:
        return "no repeats"
    flag = " NOISY" if is_noisy(times) else ""
    return f"min {min(times) * 1e3:.1f} max {max(times) * 1e3:.1f}{flag}"


def format_result(res: BenchResult) -> str:
    """A point in full (the single-point screen output)."""
    c = res.config
    model = (
        f"tiny {c.family} hidden={c.hidden_size} layers={c.num_layers or TINY_LAYERS} vocab={c.vocab_size}"
        if c.model == "tiny"
        else f"{c.model} (random weights){f', {c.num_layers} layers' if c.num_layers else ''}"
    )
    mem = {k: _mib(v) for k, v in res.phase_peak_memory_bytes.items()}
    sec = {k: f"{v * 1e3:.1f}" for k, v in res.phase_seconds.items()}
    what = "log-prob pass" if c.forward_only else "step"
    lines = [
        f"model      {model}, {c.dtype} on {c.device}",
        f"batch      {c.groups} groups x G={c.group_size}, system {c.system_len}, prefix P={c.prefix_len}, "
        f"{f'{c.turns - 1} shared turns of {c.turn_len}, ' if c.turns > 1 else ''}suffix S={c.suffix_len}, "
        f"budget {c.max_tokens_per_micro_batch} tokens/micro-batch",
        f"reuse      attention={c.attention} prefix_activations={c.prefix_activations} prefix_tree={c.prefix_tree}; "
        f"dense logits at {c.dense_logits} positions",
        f"{'lp diff' if c.forward_only else 'grad diff'}  max relative |reuse - dense| = {res.max_grad_rel_diff:.2e}",
        f"dense      {res.dense_seconds * 1e3:9.1f} ms / {what} (median of {c.repeats}; {_spread(res.dense_times)})",
        f"reuse      {res.reuse_seconds * 1e3:9.1f} ms / {what}  "
        f"(A {sec.get('A', '-')} / B {sec.get('B', '-')} / C {sec.get('C', '-')} ms; {_spread(res.reuse_times)})",
        f"peak mem   dense {_mib(res.dense_peak_memory_bytes)}; reuse A {mem.get('A', '-')} / B {mem.get('B', '-')} / "
        f"C {mem.get('C', '-')} (idle {_mib(res.idle_memory_bytes)})",
        f"speedup    {res.speedup:.2f}x   FLOP bound {res.flop_bound:.2f}x   efficiency {res.efficiency:.2f}",
    ]
    if res.engine is not None:
        e = res.engine
        lines += [
            f"verl stock {e.stock_seconds * 1e3:9.1f} ms / {what} (FSDPEngineWithLMHead; {_spread(e.stock_times)})",
            f"verl reuse {e.reuse_seconds * 1e3:9.1f} ms / {what} (verl-prefix engine; {_spread(e.reuse_times)}); "
            f"max relative diff {e.max_rel_diff:.2e}",
            f"engines    {e.speedup:.2f}x   FLOP bound {e.flop_bound:.2f}x   efficiency {e.efficiency:.2f}",
        ]
    if res.sequence_parallel is not None:
        sp = res.sequence_parallel
        lines += [
            f"sp={sp.size} dense {sp.dense_seconds * 1e3:9.1f} ms / {what} ({sp.size} ranks x {sp.threads_per_rank} "
            f"threads, nothing shared; {_spread(sp.dense_times)})",
            f"sp={sp.size} reuse {sp.reuse_seconds * 1e3:9.1f} ms / {what} ({_spread(sp.reuse_times)}); "
            f"max relative diff {sp.max_grad_rel_diff:.2e}",
            f"sp={sp.size}       {sp.speedup:.2f}x   FLOP bound {sp.flop_bound:.2f}x   efficiency {sp.efficiency:.2f}",
        ]
    if res.capacity is not None:
        cap = res.capacity
        capped = " (capped)" if cap.capped else ""
        lines.append(
            f"capacity   at {_mib(cap.budget_bytes)} above idle: "
            f"dense {cap.dense_rows} rows ({cap.dense_tokens} tokens), "
            f"reuse {cap.reuse_rows} rows ({cap.reuse_tokens} tokens), {cap.ratio:.2f}x{capped}"
        )
    return "\n".join(lines)
