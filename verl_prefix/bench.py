"""Dense vs shared-prefix training step on synthetic GRPO groups: gradient agreement, speed, bound.

Dense baseline: rows of equal length batched as [rows, P + S] through the model's stock SDPA
(causal fast path, no padding), full logits as verl computes them, micro-batches of at most
`max_tokens_per_micro_batch` tokens. Reuse: `forward_backward` with the same budget and loss.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from .core import PrefixReuseConfig, forward_backward, token_log_probs
from .random_models import model_config, random_model


@dataclass
class BenchConfig:
    family: str = "qwen3"
    hidden_size: int = 256
    num_layers: int = 4
    vocab_size: int = 8192
    prefix_len: int = 512  # shared prompt tokens per group (the prompt is prefix_len + 1 tokens)
    suffix_len: int = 64  # tokens per row after the prefix (last prompt token + response)
    group_size: int = 8
    groups: int = 2
    max_tokens_per_micro_batch: int = 4096
    attention: str = "sdpa"
    prefix_activations: str = "keep"
    dtype: str = "float32"
    device: str = "cpu"
    repeats: int = 3
    seed: int = 0


@dataclass
class BenchResult:
    config: BenchConfig
    dense_seconds: float  # median over repeats
    reuse_seconds: float
    speedup: float
    flop_bound: float
    efficiency: float  # speedup / flop_bound
    max_grad_rel_diff: float  # max over parameters of max|g_reuse - g_dense| / max|g_dense|
    phase_seconds: dict[str, float] = field(default_factory=dict)
    phase_peak_memory_bytes: dict[str, int | None] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def synthetic_groups(cfg: BenchConfig) -> tuple[list[torch.Tensor], list[int], list[str], list[torch.Tensor]]:
    """GRPO-shaped batch: `groups` prompts of prefix_len + 1 tokens, `group_size` responses each."""
    gen = torch.Generator().manual_seed(cfg.seed)
    response_len = cfg.suffix_len - 1
    rows, starts, uids, advantages = [], [], [], []
    for g in range(cfg.groups):
        prompt = torch.randint(0, cfg.vocab_size, (cfg.prefix_len + 1,), generator=gen)
        for _ in range(cfg.group_size):
            rows.append(torch.cat([prompt, torch.randint(0, cfg.vocab_size, (response_len,), generator=gen)]))
            starts.append(len(prompt))
            uids.append(f"uid-{g}")
            advantages.append(torch.randn(response_len, generator=gen))
    return rows, starts, uids, advantages


def _policy_loss(advantages: list[torch.Tensor], total_tokens: int):
    """Token-mean policy-gradient surrogate: -sum(A * logp) / total response tokens."""

    def loss_fn(indices: list[int], log_probs: list[torch.Tensor]) -> torch.Tensor:
        terms = [(advantages[i].to(lp) * lp).sum() for i, lp in zip(indices, log_probs, strict=True)]
        return -torch.stack(terms).sum() / total_tokens

    return loss_fn


def dense_step(model, rows, starts, loss_fn, max_tokens: int, temperature: float = 1.0) -> None:
    """Stock dense forward/backward over equal-length rows in micro-batches."""
    per_mb = max(1, max_tokens // len(rows[0]))
    for lo in range(0, len(rows), per_mb):
        idx = list(range(lo, min(lo + per_mb, len(rows))))
        batch = torch.stack([rows[i] for i in idx])
        logits = model(input_ids=batch, use_cache=False).logits
        log_probs = []
        for k, i in enumerate(idx):
            lp, _ = token_log_probs(logits[k, starts[i] - 1 : -1], rows[i][starts[i] :], temperature)
            log_probs.append(lp)
        loss_fn(idx, log_probs).backward()


def _timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def run_bench(cfg: BenchConfig, progress=None) -> BenchResult:
    device = torch.device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    model = random_model(
        model_config(cfg.family, cfg.hidden_size, cfg.num_layers, vocab_size=cfg.vocab_size), dtype, device, cfg.seed
    )
    rows, starts, uids, advantages = synthetic_groups(cfg)
    rows = [r.to(device) for r in rows]
    advantages = [a.to(device) for a in advantages]
    loss_fn = _policy_loss(advantages, sum(len(a) for a in advantages))
    config = PrefixReuseConfig(
        max_tokens_per_micro_batch=cfg.max_tokens_per_micro_batch,
        attention=cfg.attention,
        prefix_activations=cfg.prefix_activations,
    )
    params = list(model.parameters())

    def grads() -> list[torch.Tensor]:
        out = [p.grad.detach().clone() for p in params]
        model.zero_grad(set_to_none=True)
        return out

    def run_dense() -> None:
        dense_step(model, rows, starts, loss_fn, cfg.max_tokens_per_micro_batch)

    stats_holder = {}

    def run_reuse() -> None:
        stats_holder["stats"] = forward_backward(model, rows, starts, uids, loss_fn, config)

    # Warm-up (also the gradient comparison), then alternate timed repeats.
    model.zero_grad(set_to_none=True)
    run_dense()
    dense_grads = grads()
    run_reuse()
    reuse_grads = grads()
    diff = max(
        ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        for a, b in zip(reuse_grads, dense_grads, strict=True)
    )
    dense_times, reuse_times = [], []
    for r in range(cfg.repeats):
        dense_times.append(_timed(run_dense, device))
        model.zero_grad(set_to_none=True)
        reuse_times.append(_timed(run_reuse, device))
        model.zero_grad(set_to_none=True)
        if progress:
            progress(r + 1, cfg.repeats)
    stats = stats_holder["stats"]
    dense_s, reuse_s = statistics.median(dense_times), statistics.median(reuse_times)
    speedup = dense_s / reuse_s
    return BenchResult(
        config=cfg,
        dense_seconds=dense_s,
        reuse_seconds=reuse_s,
        speedup=speedup,
        flop_bound=stats.flop_bound,
        efficiency=speedup / stats.flop_bound,
        max_grad_rel_diff=diff,
        phase_seconds=dict(stats.seconds),
        phase_peak_memory_bytes=dict(stats.peak_memory_bytes),
    )


def format_result(res: BenchResult) -> str:
    c = res.config
    mem = {k: (f"{v / 2**20:.0f} MiB" if v is not None else "n/a") for k, v in res.phase_peak_memory_bytes.items()}
    lines = [
        f"model      {c.family} hidden={c.hidden_size} layers={c.num_layers} vocab={c.vocab_size} "
        f"{c.dtype} on {c.device}",
        f"batch      {c.groups} groups x G={c.group_size}, prefix P={c.prefix_len}, suffix S={c.suffix_len}, "
        f"budget {c.max_tokens_per_micro_batch} tokens/micro-batch",
        f"reuse      attention={c.attention} prefix_activations={c.prefix_activations}",
        f"grad diff  max relative |g_reuse - g_dense| = {res.max_grad_rel_diff:.2e}",
        f"dense      {res.dense_seconds * 1e3:9.1f} ms / step (median of {c.repeats})",
        f"reuse      {res.reuse_seconds * 1e3:9.1f} ms / step  "
        f"(A {res.phase_seconds['A'] * 1e3:.1f} / B {res.phase_seconds['B'] * 1e3:.1f} / "
        f"C {res.phase_seconds['C'] * 1e3:.1f} ms)",
        f"peak mem   A {mem['A']} / B {mem['B']} / C {mem['C']}",
        f"speedup    {res.speedup:.2f}x   FLOP bound {res.flop_bound:.2f}x   efficiency {res.efficiency:.2f}",
    ]
    return "\n".join(lines)
