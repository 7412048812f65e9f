"""N-step trace replay: dense and shared-prefix training side by side from the same initial weights.

A trace is what a GRPO/PPO run feeds its actor each step: token rows (prompt + response), the
index of each row's first response token, uids, per-token advantages and old log-probs. Both
trainers take the same PPO clipped-surrogate loss (token-mean over the step's response tokens,
as verl's default) and the same AdamW step; per step we record both losses, the relative
gradient difference and the parameter drift between the two copies.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .core import PrefixReuseConfig, forward_backward
from .dense import dense_forward_backward
from .random_models import FAMILIES, model_config, random_model

TRACE_SCHEMA = "verl-prefix/trace/1"
STEP_KEYS = ("input_ids", "response_start", "uids", "advantages", "old_log_probs")


@dataclass
class ReplayConfig:
    steps: int = 10
    family: str = "qwen3"
    hidden_size: int = 64
    num_layers: int = 2
    vocab_size: int = 512
    prompts_per_step: int = 2
    group_size: int = 4
    prompt_len: int = 96  # mean prompt length; each prompt is drawn within +-25%
    min_response: int = 4
    max_response: int = 24
    max_tokens_per_micro_batch: int = 256
    attention: str = "auto"
    prefix_activations: str = "keep"
    lr: float = 1e-3
    clip_ratio: float = 0.2
    dtype: str = "float32"
    seed: int = 0

    def check(self) -> None:
        """Raise ValueError naming the flag and the fix before anything runs."""
        positive = ("steps", "hidden_size", "num_layers", "vocab_size", "prompts_per_step", "group_size")
        positive += ("prompt_len", "min_response", "max_response", "max_tokens_per_micro_batch")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 1.")
        if self.min_response > self.max_response:
            raise ValueError(f"--min-response={self.min_response} is above --max-response={self.max_response}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype={self.dtype!r}: use one of {', '.join(DTYPES)}.")
        if self.family not in FAMILIES:
            raise ValueError(f"--family={self.family!r}: use one of {', '.join(FAMILIES)}.")
        if not self.lr > 0 or not 0 <= self.clip_ratio < 1:
            raise ValueError(f"--lr={self.lr} must be > 0 and --clip-ratio={self.clip_ratio} in [0, 1).")
        PrefixReuseConfig(
            max_tokens_per_micro_batch=self.max_tokens_per_micro_batch,
            attention=self.attention,  # type: ignore[arg-type]
            prefix_activations=self.prefix_activations,  # type: ignore[arg-type]
        ).validate(owner="replay")


DTYPES = ("float32", "float64", "bfloat16", "float16")

Step = dict  # the STEP_KEYS of one step: lists with one entry per row


@dataclass
class StepRecord:
    step: int
    loss_dense: float
    loss_reuse: float
    grad_rel_diff: float  # max over parameters of max|g_reuse - g_dense| / max|g_dense|
    param_drift: float  # after the step: max over parameters of max|p_reuse - p_dense| / max|p_dense|
    dense_seconds: float
    reuse_seconds: float


@dataclass
class ReplayResult:
    config: ReplayConfig
    steps: list[StepRecord] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"schema": "verl-prefix/replay/1", **asdict(self)}

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.as_dict(), indent=2))


def build_model(cfg: ReplayConfig) -> torch.nn.Module:
    config = model_config(cfg.family, cfg.hidden_size, cfg.num_layers, vocab_size=cfg.vocab_size)
    return random_model(config, getattr(torch, cfg.dtype), "cpu", cfg.seed)


# Traces


def generate_trace(cfg: ReplayConfig, model: torch.nn.Module | None = None) -> dict:
    """A GRPO-shaped trace: ragged prompts and responses, group-normalised rewards as advantages,
    old log-probs from the initial weights (so later steps are off-policy and clipping engages)."""
    model = model if model is not None else build_model(cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    steps = []
    for s in range(cfg.steps):
        rows, starts, uids, advantages = [], [], [], []
        for p in range(cfg.prompts_per_step):
            low, high = max(2, int(cfg.prompt_len * 0.75)), int(cfg.prompt_len * 1.25) + 1
            prompt = torch.randint(
                0, cfg.vocab_size, (int(torch.randint(low, high, (1,), generator=gen)),), generator=gen
            )
            rewards = torch.randn(cfg.group_size, generator=gen, dtype=torch.float64)
            scores = (rewards - rewards.mean()) / (rewards.std() + 1e-6) if cfg.group_size > 1 else rewards * 0
            for g in range(cfg.group_size):
                n = int(torch.randint(cfg.min_response, cfg.max_response + 1, (1,), generator=gen))
                rows.append(torch.cat([prompt, torch.randint(0, cfg.vocab_size, (n,), generator=gen)]))
                starts.append(len(prompt))
                uids.append(f"step{s}-prompt{p}")
                advantages.append(torch.full((n,), float(scores[g]), dtype=torch.float32))
        with torch.no_grad():
            old, _, _ = dense_forward_backward(model, rows, starts, None, cfg.max_tokens_per_micro_batch)
        steps.append(
            {
                "input_ids": rows,
                "response_start": starts,
                "uids": uids,
                "advantages": advantages,
                "old_log_probs": [o.float() for o in old],
            }
        )
    return {"schema": TRACE_SCHEMA, "steps": steps}


def save_trace(trace: dict, path: str | Path) -> None:
    torch.save(trace, path)


def load_trace(path: str | Path) -> dict:
    """Load and check a trace file (torch.save of {"schema", "steps": [step, ...]})."""
    if not Path(path).is_file():
        raise ValueError(f"--trace {path}: no such file (write one with --save-trace FILE).")
    try:
        trace = torch.load(path, weights_only=True)
    except Exception as exc:  # pickle, zip or format errors: not a trace
        raise ValueError(f"--trace {path}: not a verl-prefix trace ({type(exc).__name__}).") from None
    if not isinstance(trace, dict) or trace.get("schema") != TRACE_SCHEMA:
        raise ValueError(f"{path}: not a verl-prefix trace (expected schema {TRACE_SCHEMA!r}).")
    for i, step in enumerate(trace["steps"]):
        missing = [k for k in STEP_KEYS if k not in step]
        if missing:
            raise ValueError(f"{path}: step {i} lacks {missing}; each step needs {STEP_KEYS}.")
        n = len(step["input_ids"])
        if any(len(step[k]) != n for k in STEP_KEYS):
            raise ValueError(f"{path}: step {i} has fields of different lengths; one entry per row in each.")
        for r, (row, start) in enumerate(zip(step["input_ids"], step["response_start"], strict=True)):
            resp = len(row) - start
            if len(step["advantages"][r]) != resp or len(step["old_log_probs"][r]) != resp:
                raise ValueError(
                    f"{path}: step {i} row {r}: advantages/old_log_probs need one value per response token ({resp})."
                )
    return trace


# Training


def ppo_loss(step: Step, clip_ratio: float, losses: list[float]):
    """PPO clipped surrogate, token-mean over the step's response tokens; appends each call's value."""
    total = sum(len(a) for a in step["advantages"])

    def loss_fn(indices: list[int], log_probs: list[torch.Tensor]) -> torch.Tensor:
        terms = []
        for i, lp in zip(indices, log_probs, strict=True):
            adv, old = step["advantages"][i].to(lp), step["old_log_probs"][i].to(lp)
            ratio = torch.exp(lp - old)
            clipped = torch.clamp(ratio, 1 - clip_ratio, 1 + clip_ratio)
            terms.append(torch.maximum(-adv * ratio, -adv * clipped).sum())
        loss = torch.stack(terms).sum() / total
        losses.append(loss.item())
        return loss

    return loss_fn


def _rel_diff(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return max(((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item() for x, y in zip(a, b, strict=True))


def run_replay(trace: dict, cfg: ReplayConfig, progress: bool = False) -> ReplayResult:
    """Train a dense copy and a reuse copy of the same initial model over `trace`, step by step."""
    dense_model = build_model(cfg)
    vocab = dense_model.config.vocab_size
    for i, step in enumerate(trace["steps"]):
        top = max(int(r.max()) for r in step["input_ids"])
        if top >= vocab:
            raise ValueError(f"trace step {i} holds token id {top} >= vocab_size {vocab}; pass --vocab-size {top + 1}.")
    reuse_model = copy.deepcopy(dense_model)
    dense_opt = torch.optim.AdamW(dense_model.parameters(), lr=cfg.lr)
    reuse_opt = torch.optim.AdamW(reuse_model.parameters(), lr=cfg.lr)
    config = PrefixReuseConfig(
        max_tokens_per_micro_batch=cfg.max_tokens_per_micro_batch,
        attention=cfg.attention,
        prefix_activations=cfg.prefix_activations,
    )
    result = ReplayResult(config=cfg)
    steps = trace["steps"]
    iterator = range(len(steps))
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="replay", unit="step", file=sys.stderr)
    for s in iterator:
        step = steps[s]
        rows, starts = step["input_ids"], step["response_start"]
        dense_losses: list[float] = []
        reuse_losses: list[float] = []
        dense_opt.zero_grad(set_to_none=True)
        reuse_opt.zero_grad(set_to_none=True)

        t0 = time.perf_counter()
        dense_forward_backward(
            dense_model, rows, starts, ppo_loss(step, cfg.clip_ratio, dense_losses), cfg.max_tokens_per_micro_batch
        )
        t1 = time.perf_counter()
        forward_backward(reuse_model, rows, starts, step["uids"], ppo_loss(step, cfg.clip_ratio, reuse_losses), config)
        t2 = time.perf_counter()

        grad_diff = _rel_diff([p.grad for p in reuse_model.parameters()], [p.grad for p in dense_model.parameters()])
        dense_opt.step()
        reuse_opt.step()
        drift = _rel_diff(list(reuse_model.parameters()), list(dense_model.parameters()))
        result.steps.append(
            StepRecord(
                step=s,
                loss_dense=sum(dense_losses),
                loss_reuse=sum(reuse_losses),
                grad_rel_diff=grad_diff,
                param_drift=drift,
                dense_seconds=t1 - t0,
                reuse_seconds=t2 - t1,
            )
        )
    return result


def format_replay(result: ReplayResult) -> str:
    lines = ["| step | loss dense | loss reuse | grad rel diff | param drift | dense ms | reuse ms |", "|" + "---|" * 7]
    for r in result.steps:
        lines.append(
            f"| {r.step} | {r.loss_dense:.6f} | {r.loss_reuse:.6f} | {r.grad_rel_diff:.1e} | {r.param_drift:.1e} "
            f"| {r.dense_seconds * 1e3:.0f} | {r.reuse_seconds * 1e3:.0f} |"
        )
    worst = max(result.steps, key=lambda r: r.grad_rel_diff)
    lines.append(
        f"max grad rel diff {worst.grad_rel_diff:.1e} (step {worst.step}); "
        f"final param drift {result.steps[-1].param_drift:.1e}"
    )
    return "\n".join(lines)


def plot_replay(result: ReplayResult, path: str | Path) -> None:
    """Three panels: both losses, gradient difference (log), parameter drift (log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r.step for r in result.steps]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), constrained_layout=True)
    axes[0].plot(steps, [r.loss_dense for r in result.steps], "o-", label="dense")
    axes[0].plot(steps, [r.loss_reuse for r in result.steps], "x--", label="reuse")
    axes[0].set(xlabel="step", ylabel="PPO loss", title="loss")
    axes[0].legend()
    floor = 1e-18  # log axes cannot show an exact zero
    axes[1].semilogy(steps, [max(r.grad_rel_diff, floor) for r in result.steps], "o-")
    axes[1].set(xlabel="step", ylabel="max relative difference", title="gradient: reuse vs dense")
    axes[2].semilogy(steps, [max(r.param_drift, floor) for r in result.steps], "o-")
    axes[2].set(xlabel="step", ylabel="max relative difference", title="parameter drift")
    fig.suptitle(f"{len(steps)}-step replay, {result.config.dtype}")
    fig.savefig(path, dpi=110)
    plt.close(fig)
